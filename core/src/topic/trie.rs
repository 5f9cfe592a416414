//! Subscription trie: topic filters mapped to sets of values, matched against topic names.
//!
//! The broker holds two kinds of these, both owned by one shard and never shared or locked:
//! - the route table (`filter -> shard ids`): every shard keeps its own full copy, changed only by
//!   route updates arriving over the cross-shard rings, and consulted on every PUBLISH to decide
//!   which shards to forward to;
//! - the local subscriber table (`filter -> session keys`) of the shard that owns those sessions.
//!
//! Shape: one node per filter level prefix. A node keeps its literal children in a `HashMap`, the
//! `+` child in its own slot and the `#` filter (always a leaf, so no node) as an entry beside it.
//! Matching a topic with `n` levels costs one hash lookup per level on each path it follows, plus
//! the `+` and `#` slots, and allocates nothing. Removal prunes every node left empty, so memory
//! comes back when subscriptions go.
//!
//! Depth: matching loops down literal levels and recurses only into `+` children, so stack depth
//! is the number of `+` levels in the deepest matching filter. Insert, remove and drop do not
//! recurse at all. Callers bound filter depth with [`crate::Limits::max_topic_levels`] before
//! inserting.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use super::{TopicFilter, TopicName};

/// Values stored under one exact filter, and the filter itself (an `Arc` clone) so matches can
/// hand it out without rebuilding it from the path.
#[derive(Debug)]
struct Entry<V> {
    filter: TopicFilter,
    values: HashSet<V>,
}

#[derive(Debug)]
struct Node<V> {
    /// Literal next levels. Never holds the keys `+` or `#`: those are wildcards in a filter and
    /// cannot occur in a topic name.
    children: HashMap<Box<str>, Node<V>>,
    /// The `+` next level.
    plus: Option<Box<Node<V>>>,
    /// The filter that ends at this node (`.../level`).
    entry: Option<Box<Entry<V>>>,
    /// The filter that ends in `#` right below this node (`.../level/#`, or `#` at the root).
    hash: Option<Box<Entry<V>>>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node { children: HashMap::new(), plus: None, entry: None, hash: None }
    }
}

impl<V> Node<V> {
    fn child(&self, level: &str) -> Option<&Node<V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<V> {
        if level == "+" {
            return self.plus.get_or_insert_with(Box::default);
        }
        // Allocates the key even when the node exists; subscribing is not the hot path, and the
        // allocation-free `get_mut`-then-`insert` form does not pass today's borrow checker.
        self.children.entry(Box::from(level)).or_default()
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.entry.is_none()
            && self.hash.is_none()
    }

    /// Number of children, the `+` child included.
    fn fan_out(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some())
    }

    fn slot(&self, ends_in_hash: bool) -> &Option<Box<Entry<V>>> {
        if ends_in_hash {
            &self.hash
        } else {
            &self.entry
        }
    }

    fn slot_mut(&mut self, ends_in_hash: bool) -> &mut Option<Box<Entry<V>>> {
        if ends_in_hash {
            &mut self.hash
        } else {
            &mut self.entry
        }
    }
}

/// The levels of `filter` that name trie nodes (a trailing `#` does not: it is a slot of the node
/// above), and whether the filter ends in `#`.
fn node_path(filter: &TopicFilter) -> (std::str::Split<'_, char>, bool) {
    let s = filter.as_str();
    match s.strip_suffix('#') {
        // The root `#`: no node levels at all. `"".split('/')` would yield one empty level.
        Some("") => {
            let mut levels = "".split('/');
            levels.next();
            (levels, true)
        }
        Some(prefix) => match prefix.strip_suffix('/') {
            Some(parent) => (parent.split('/'), true),
            // Unreachable for a validated filter (`#` is alone in its level); treat as literal.
            None => (s.split('/'), false),
        },
        None => (s.split('/'), false),
    }
}

/// Topic filters mapped to sets of values. See the module docs for where instances live.
#[derive(Debug)]
pub struct SubscriptionTrie<V> {
    root: Node<V>,
    /// (filter, value) pairs.
    len: usize,
    /// Filters with at least one value.
    filter_count: usize,
}

impl<V> Default for SubscriptionTrie<V> {
    fn default() -> Self {
        SubscriptionTrie { root: Node::default(), len: 0, filter_count: 0 }
    }
}

impl<V> Drop for SubscriptionTrie<V> {
    /// Tears the tree down with an explicit stack; the default recursive drop would use one stack
    /// frame per level of the deepest filter.
    fn drop(&mut self) {
        let mut stack: Vec<Node<V>> = self.root.children.drain().map(|(_, n)| n).collect();
        stack.extend(self.root.plus.take().map(|n| *n));
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, n)| n));
            stack.extend(node.plus.take().map(|n| *n));
        }
    }
}

impl<V: Clone + Eq + Hash> SubscriptionTrie<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `value` under `filter`. Returns true if (filter, value) was not there before.
    pub fn insert(&mut self, filter: &TopicFilter, value: V) -> bool {
        let (levels, ends_in_hash) = node_path(filter);
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_or_insert(level);
        }
        let entry = node.slot_mut(ends_in_hash).get_or_insert_with(|| {
            self.filter_count += 1;
            Box::new(Entry { filter: filter.clone(), values: HashSet::new() })
        });
        let added = entry.values.insert(value);
        if added {
            self.len += 1;
        }
        added
    }

    /// Remove (filter, value). Returns true if it was there. Prunes nodes that become empty.
    pub fn remove(&mut self, filter: &TopicFilter, value: &V) -> bool {
        let (levels, ends_in_hash) = node_path(filter);

        // Walk down, remembering the deepest node that must survive if the filter's own node ends
        // up empty: the root, or any node holding something besides the path we walk.
        let mut depth = 0usize;
        let mut keep_depth = 0usize;
        let mut node = &mut self.root;
        for level in levels.clone() {
            if depth > 0 && (node.fan_out() > 1 || node.entry.is_some() || node.hash.is_some()) {
                keep_depth = depth;
            }
            match node.child_mut(level) {
                Some(next) => node = next,
                None => return false,
            }
            depth += 1;
        }

        let slot = node.slot_mut(ends_in_hash);
        let Some(entry) = slot.as_mut() else { return false };
        if !entry.values.remove(value) {
            return false;
        }
        self.len -= 1;
        if entry.values.is_empty() {
            *slot = None;
            self.filter_count -= 1;
        }
        if depth == 0 || !node.is_empty() {
            return true;
        }
        // `node` is empty and so is every node between it and the one at `keep_depth`: cut the
        // chain off just below that one.
        let mut levels = levels;
        let mut keeper = &mut self.root;
        for _ in 0..keep_depth {
            match levels.next().and_then(|level| keeper.child_mut(level)) {
                Some(next) => keeper = next,
                None => return true,
            }
        }
        match levels.next() {
            Some("+") => keeper.plus = None,
            Some(level) => {
                keeper.children.remove(level);
            }
            None => {}
        }
        true
    }

    /// Whether any value is stored under exactly this filter, and how many.
    pub fn count(&self, filter: &TopicFilter) -> usize {
        let (levels, ends_in_hash) = node_path(filter);
        let mut node = &self.root;
        for level in levels {
            match node.child(level) {
                Some(next) => node = next,
                None => return 0,
            }
        }
        node.slot(ends_in_hash).as_ref().map_or(0, |e| e.values.len())
    }

    /// Call `f(filter, value)` once for every stored (filter, value) whose filter matches `topic`
    /// (MQTT 4.7: `+` one level, `#` this level and all below including the parent level, and a
    /// filter starting with a wildcard never matches a topic starting with `$`).
    pub fn for_each_match(&self, topic: &TopicName, mut f: impl FnMut(&TopicFilter, &V)) {
        let mut levels = topic.levels();
        if topic.is_dollar() {
            // MQTT 4.7.2: skip the root's `#` and `+`; only a literal first level can match.
            let first = levels.next().and_then(|level| self.root.children.get(level));
            if let Some(node) = first {
                walk(node, levels, &mut f);
            }
        } else {
            walk(&self.root, levels, &mut f);
        }
    }

    /// Number of (filter, value) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Number of distinct filters holding at least one value.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes besides the root: a memory diagnostic, and how tests check pruning. Walks the
    /// whole trie.
    pub fn node_count(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            count += node.fan_out();
            stack.extend(node.children.values());
            stack.extend(node.plus.as_deref());
        }
        count
    }

    /// Every (filter, value) pair, in no particular order (for replicating a whole table to a new
    /// shard, and for tests).
    pub fn iter(&self) -> impl Iterator<Item = (&TopicFilter, &V)> {
        Iter { nodes: vec![&self.root], entries: Vec::new(), current: None }
    }
}

/// Report the `#` slot, then follow the next topic level into the literal child (by looping) and
/// the `+` child (by recursing).
fn walk<V>(
    mut node: &Node<V>,
    mut levels: std::str::Split<'_, char>,
    f: &mut impl FnMut(&TopicFilter, &V),
) {
    loop {
        if let Some(entry) = &node.hash {
            emit(entry, f);
        }
        let Some(level) = levels.next() else {
            if let Some(entry) = &node.entry {
                emit(entry, f);
            }
            return;
        };
        if let Some(plus) = &node.plus {
            walk(plus, levels.clone(), f);
        }
        match node.children.get(level) {
            Some(next) => node = next,
            None => return,
        }
    }
}

fn emit<V>(entry: &Entry<V>, f: &mut impl FnMut(&TopicFilter, &V)) {
    for value in &entry.values {
        f(&entry.filter, value);
    }
}

struct Iter<'a, V> {
    nodes: Vec<&'a Node<V>>,
    entries: Vec<&'a Entry<V>>,
    current: Option<(&'a TopicFilter, std::collections::hash_set::Iter<'a, V>)>,
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (&'a TopicFilter, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((filter, values)) = &mut self.current {
                if let Some(value) = values.next() {
                    return Some((*filter, value));
                }
                self.current = None;
            }
            if let Some(entry) = self.entries.pop() {
                self.current = Some((&entry.filter, entry.values.iter()));
                continue;
            }
            let node = self.nodes.pop()?;
            self.entries.extend(node.entry.as_deref());
            self.entries.extend(node.hash.as_deref());
            self.nodes.extend(node.children.values());
            self.nodes.extend(node.plus.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn t(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn matches(trie: &SubscriptionTrie<u32>, topic: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        trie.for_each_match(&t(topic), |filter, v| out.push((filter.to_string(), *v)));
        out.sort();
        out
    }

    fn only(filter: &str) -> SubscriptionTrie<u32> {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f(filter), 1);
        trie
    }

    fn hit(filter: &str, topic: &str) -> bool {
        let got = matches(&only(filter), topic);
        assert_eq!(!got.is_empty(), f(filter).matches(&t(topic)), "{filter} vs {topic}");
        !got.is_empty()
    }

    #[test]
    fn mqtt_4_7_1_2_multi_level_wildcard() {
        assert!(hit("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(hit("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(hit("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon"));
        assert!(hit("sport/#", "sport"));
        assert!(hit("#", "sport/tennis"));
        assert!(hit("#", "/"));
        assert!(!hit("sport/tennis/player1/#", "sport/tennis/player2"));
        assert!(!hit("sport/tennis/#", "sport"));
    }

    #[test]
    fn mqtt_4_7_1_3_single_level_wildcard() {
        assert!(hit("sport/tennis/+", "sport/tennis/player1"));
        assert!(hit("sport/tennis/+", "sport/tennis/player2"));
        assert!(!hit("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!hit("sport/+", "sport"));
        assert!(hit("sport/+", "sport/"));
        assert!(hit("+", "sport"));
        assert!(hit("+/+", "/finance"));
        assert!(hit("/+", "/finance"));
        assert!(!hit("+", "/finance"));
        assert!(hit("+/tennis/#", "sport/tennis/player1"));
        assert!(hit("+/#", "sport"));
    }

    #[test]
    fn mqtt_4_7_2_dollar_topics_not_matched_by_leading_wildcard() {
        assert!(!hit("#", "$SYS/x"));
        assert!(!hit("#", "$SYS"));
        assert!(!hit("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!hit("+", "$SYS"));
        assert!(hit("$SYS/#", "$SYS/x"));
        assert!(hit("$SYS/#", "$SYS"));
        assert!(hit("$SYS/monitor/+", "$SYS/monitor/Clients"));
        // Only the first level counts: a `$` further down is an ordinary character.
        assert!(hit("a/#", "a/$b"));
        assert!(hit("+/+", "a/$b"));
    }

    #[test]
    fn overlapping_filters_each_reported_once_with_their_filter() {
        let mut trie = SubscriptionTrie::new();
        for (i, filter) in ["a/b", "a/+", "a/#", "#", "+/b", "+/+", "+/#", "a/b/#", "a", "b/#"]
            .into_iter()
            .enumerate()
        {
            trie.insert(&f(filter), i as u32);
        }
        trie.insert(&f("a/b"), 100);
        let got = matches(&trie, "a/b");
        let want: Vec<(String, u32)> = [
            ("#", 3),
            ("+/#", 6),
            ("+/+", 5),
            ("+/b", 4),
            ("a/#", 2),
            ("a/+", 1),
            ("a/b", 0),
            ("a/b", 100),
            ("a/b/#", 7),
        ]
        .into_iter()
        .map(|(s, v)| (s.to_string(), v))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn insert_and_remove_are_idempotent() {
        let mut trie = SubscriptionTrie::new();
        assert!(trie.insert(&f("a/+"), 1));
        assert!(!trie.insert(&f("a/+"), 1));
        assert!(trie.insert(&f("a/+"), 2));
        assert_eq!((trie.len(), trie.filter_count(), trie.count(&f("a/+"))), (2, 1, 2));
        assert_eq!(trie.count(&f("a")), 0);
        assert_eq!(trie.count(&f("a/#")), 0);
        assert!(trie.remove(&f("a/+"), &1));
        assert!(!trie.remove(&f("a/+"), &1));
        assert!(!trie.remove(&f("a/b"), &2));
        assert!(!trie.remove(&f("a/#"), &2));
        assert!(!trie.remove(&f("a"), &2));
        assert_eq!((trie.len(), trie.filter_count(), trie.count(&f("a/+"))), (1, 1, 1));
        assert!(trie.remove(&f("a/+"), &2));
        assert!(trie.is_empty());
        assert_eq!((trie.len(), trie.filter_count(), trie.node_count()), (0, 0, 0));
    }

    #[test]
    fn removing_everything_prunes_every_node() {
        let filters = ["#", "+", "a", "a/b/c/d", "a/b/#", "a/+/c", "+/+/+/#", "/", "//#", "$s/x"];
        let mut trie = SubscriptionTrie::new();
        for (i, filter) in filters.iter().enumerate() {
            trie.insert(&f(filter), i as u32);
            trie.insert(&f(filter), 99);
        }
        assert_eq!((trie.len(), trie.filter_count()), (20, 10));
        assert!(trie.node_count() > 0);
        for (i, filter) in filters.iter().enumerate() {
            assert!(trie.remove(&f(filter), &(i as u32)));
        }
        assert_eq!((trie.len(), trie.filter_count()), (10, 10));
        for filter in filters.iter().rev() {
            assert!(trie.remove(&f(filter), &99));
        }
        assert_eq!((trie.len(), trie.filter_count(), trie.node_count()), (0, 0, 0));
        assert_eq!(trie.iter().count(), 0);
    }

    #[test]
    fn pruning_keeps_nodes_still_in_use() {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f("a/b/c/d"), 1);
        trie.insert(&f("a/b"), 2);
        trie.insert(&f("a/+/x"), 3);
        assert_eq!(trie.node_count(), 6); // a, a/b, a/b/c, a/b/c/d, a/+, a/+/x
        assert!(trie.remove(&f("a/b/c/d"), &1));
        assert_eq!(trie.node_count(), 4); // a, a/b, a/+, a/+/x
        assert_eq!(matches(&trie, "a/b"), vec![("a/b".to_string(), 2)]);
        assert!(trie.remove(&f("a/+/x"), &3));
        assert_eq!(trie.node_count(), 2);
        assert_eq!(matches(&trie, "a/b"), vec![("a/b".to_string(), 2)]);
    }

    #[test]
    fn deep_filters_do_not_exhaust_the_stack() {
        // 32k levels: the most a 65535-byte filter can have. Insert, match, remove and drop are
        // loops (matching recurses only into `+` levels).
        let deep = vec!["a"; 32_000].join("/");
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f(&deep), 1);
        trie.insert(&f(&format!("{deep}/#")), 2);
        assert_eq!(matches(&trie, &deep).len(), 2);
        assert!(trie.remove(&f(&deep), &1));
        assert_eq!(trie.node_count(), 32_000);
        drop(trie);
    }
}
