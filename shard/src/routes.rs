//! The route table: which shards need a message for a topic. Replicated on every shard; each
//! shard changes only its own entries and broadcasts them (see `Broker::update_route`).
//!
//! It maps filters to *shards*, never to sessions: a shard's subscriber table (its local trie)
//! resolves sessions after the one hop.

use std::collections::HashMap;
use std::sync::Arc;

use flux_core::topic::{SubscriptionTrie, TopicFilter, TopicName};
use flux_core::ShardId;

use crate::msg::RouteKey;

#[derive(Default)]
pub struct RouteTable {
    plain: SubscriptionTrie<ShardId>,
    /// Shards with persistent subscribers under the filter.
    durable: SubscriptionTrie<ShardId>,
    /// (group, shard) under the group's filter, present while that shard has members.
    shared: SubscriptionTrie<(Arc<str>, ShardId)>,
    /// Members per shard of each shared group, and the group's round-robin cursor.
    groups: HashMap<(Arc<str>, TopicFilter), SharedGroup>,
}

#[derive(Default)]
struct SharedGroup {
    members: Vec<(ShardId, u32)>,
    cursor: u64,
}

impl RouteTable {
    /// Apply `shard`'s member count for `key`.
    pub fn set(&mut self, key: &RouteKey, shard: ShardId, members: u32) {
        match key {
            RouteKey::Plain(filter) => {
                if members > 0 {
                    self.plain.insert(filter, shard);
                } else {
                    self.plain.remove(filter, &shard);
                }
            }
            RouteKey::Durable(filter) => {
                if members > 0 {
                    self.durable.insert(filter, shard);
                } else {
                    self.durable.remove(filter, &shard);
                }
            }
            RouteKey::Shared { group, filter } => {
                let k = (group.clone(), filter.clone());
                let g = self.groups.entry(k.clone()).or_default();
                g.members.retain(|(s, _)| *s != shard);
                if members > 0 {
                    g.members.push((shard, members));
                    g.members.sort_unstable_by_key(|(s, _)| *s);
                    self.shared.insert(filter, (group.clone(), shard));
                } else {
                    self.shared.remove(filter, &(group.clone(), shard));
                    if g.members.is_empty() {
                        self.groups.remove(&k);
                    }
                }
            }
        }
    }

    /// Mark in `out` (indexed by shard) every shard with a plain subscriber matching `topic`.
    pub fn plain_destinations(&self, topic: &TopicName, out: &mut [bool]) {
        self.plain.for_each_match(topic, |_, shard| {
            if let Some(slot) = out.get_mut(shard.index()) {
                *slot = true;
            }
        });
    }

    /// Mark in `out` every shard with a persistent subscriber (plain or shared) matching `topic`.
    pub fn durable_destinations(&self, topic: &TopicName, out: &mut [bool]) {
        self.durable.for_each_match(topic, |_, shard| {
            if let Some(slot) = out.get_mut(shard.index()) {
                *slot = true;
            }
        });
    }

    /// The shared groups matching `topic`, each once.
    pub fn shared_groups(&self, topic: &TopicName, out: &mut Vec<(Arc<str>, TopicFilter)>) {
        self.shared.for_each_match(topic, |filter, (group, _)| {
            if !out.iter().any(|(g, f)| g == group && f == filter) {
                out.push((group.clone(), filter.clone()));
            }
        });
    }

    /// Pick the shard that delivers the next message of a shared group: round-robin weighted by
    /// each shard's member count, skipping `exclude`.
    pub fn pick_shared(&mut self, group: &Arc<str>, filter: &TopicFilter, exclude: Option<ShardId>) -> Option<ShardId> {
        let g = self.groups.get_mut(&(group.clone(), filter.clone()))?;
        let eligible = |s: &ShardId| Some(*s) != exclude;
        let total: u64 = g.members.iter().filter(|(s, _)| eligible(s)).map(|(_, n)| u64::from(*n)).sum();
        if total == 0 {
            return None;
        }
        let mut pick = g.cursor % total;
        g.cursor = g.cursor.wrapping_add(1);
        for (shard, n) in g.members.iter().filter(|(s, _)| eligible(s)) {
            if pick < u64::from(*n) {
                return Some(*shard);
            }
            pick -= u64::from(*n);
        }
        None
    }

    pub fn has_plain(&self) -> bool {
        !self.plain.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn plain_destinations_follow_updates() {
        let mut t = RouteTable::default();
        t.set(&RouteKey::Plain(f("a/+")), ShardId(1), 1);
        t.set(&RouteKey::Plain(f("#")), ShardId(0), 3);
        let mut out = [false; 3];
        t.plain_destinations(&TopicName::new("a/b").unwrap(), &mut out);
        assert_eq!(out, [true, true, false]);
        t.set(&RouteKey::Plain(f("a/+")), ShardId(1), 0);
        let mut out = [false; 3];
        t.plain_destinations(&TopicName::new("a/b").unwrap(), &mut out);
        assert_eq!(out, [true, false, false]);
    }

    #[test]
    fn shared_pick_is_weighted_round_robin() {
        let mut t = RouteTable::default();
        let g: Arc<str> = Arc::from("g");
        let key = RouteKey::Shared { group: g.clone(), filter: f("t") };
        t.set(&key, ShardId(0), 1);
        t.set(&key, ShardId(1), 3);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[t.pick_shared(&g, &f("t"), None).unwrap().index()] += 1;
        }
        assert_eq!(counts, [100, 300]);
        assert_eq!(t.pick_shared(&g, &f("t"), Some(ShardId(1))), Some(ShardId(0)));
        t.set(&key, ShardId(0), 0);
        assert_eq!(t.pick_shared(&g, &f("t"), Some(ShardId(1))), None);
        t.set(&key, ShardId(1), 0);
        assert_eq!(t.pick_shared(&g, &f("t"), None), None);
    }
}
