//! `SubscriptionTrie` against a model: a plain set of (filter, value) pairs matched one by one with
//! the reference matcher `TopicFilter::matches` (MQTT 4.7). Levels come from a tiny alphabet so
//! filters share prefixes, collide and overlap all the time.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use flux_core::topic::{SubscriptionTrie, TopicFilter, TopicName};
use proptest::prelude::*;

const LEVELS: [&str; 4] = ["a", "b", "$s", ""];

fn filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![4 => proptest::sample::select(&LEVELS[..]), 2 => Just("+")];
    (proptest::collection::vec(level, 0..=4), any::<bool>()).prop_filter_map(
        "a filter of one empty level is the empty string",
        |(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            TopicFilter::new(&levels.join("/")).ok()
        },
    )
}

fn topic() -> impl Strategy<Value = TopicName> {
    proptest::collection::vec(proptest::sample::select(&LEVELS[..]), 1..=5)
        .prop_filter_map("the empty string is not a topic", |levels| {
            TopicName::new(&levels.join("/")).ok()
        })
}

#[derive(Clone, Debug)]
enum Op {
    Insert(usize, u8),
    Remove(usize, u8),
    /// Remove every value of one filter, the way a shard drops a route when its last subscriber
    /// leaves.
    RemoveAll(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<usize>(), 0u8..4).prop_map(|(f, v)| Op::Insert(f, v)),
        3 => (any::<usize>(), 0u8..4).prop_map(|(f, v)| Op::Remove(f, v)),
        1 => any::<usize>().prop_map(Op::RemoveAll),
    ]
}

type Model = BTreeSet<(TopicFilter, u8)>;

/// Nodes the trie must hold for the model's filters, no more (pruning) and no fewer: one per
/// distinct level prefix, where a trailing `#` is not a node of its own.
fn expected_nodes(model: &Model) -> usize {
    let mut prefixes = HashSet::new();
    for (filter, _) in model {
        let levels: Vec<&str> = filter.levels().collect();
        let n = if levels.last() == Some(&"#") { levels.len() - 1 } else { levels.len() };
        for i in 1..=n {
            prefixes.insert(levels[..i].join("/"));
        }
    }
    prefixes.len()
}

fn check(
    trie: &SubscriptionTrie<u8>,
    model: &Model,
    topics: &[TopicName],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(trie.len(), model.len());
    prop_assert_eq!(trie.is_empty(), model.is_empty());
    let mut per_filter: BTreeMap<&TopicFilter, usize> = BTreeMap::new();
    for (filter, _) in model {
        *per_filter.entry(filter).or_default() += 1;
    }
    prop_assert_eq!(trie.filter_count(), per_filter.len());
    for (filter, n) in &per_filter {
        prop_assert_eq!(trie.count(filter), *n, "count({})", filter);
    }
    prop_assert_eq!(trie.node_count(), expected_nodes(model));

    let mut listed: Vec<(TopicFilter, u8)> = trie.iter().map(|(f, v)| (f.clone(), *v)).collect();
    listed.sort();
    prop_assert_eq!(listed, model.iter().cloned().collect::<Vec<_>>());

    for topic in topics {
        let mut got = Vec::new();
        trie.for_each_match(topic, |f, v| got.push((f.clone(), *v)));
        got.sort();
        let want: Vec<(TopicFilter, u8)> =
            model.iter().filter(|(f, _)| f.matches(topic)).cloned().collect();
        // `want` has no duplicates, so equality also says each pair was reported exactly once.
        prop_assert_eq!(got, want, "topic {}", topic);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn trie_matches_reference_matcher(
        filters in proptest::collection::vec(filter(), 1..12),
        ops in proptest::collection::vec(op(), 0..80),
        topics in proptest::collection::vec(topic(), 1..12),
    ) {
        let mut trie = SubscriptionTrie::new();
        let mut model = Model::new();
        for op in ops {
            match op {
                Op::Insert(i, v) => {
                    let f = &filters[i % filters.len()];
                    prop_assert_eq!(trie.insert(f, v), model.insert((f.clone(), v)));
                }
                Op::Remove(i, v) => {
                    let f = &filters[i % filters.len()];
                    prop_assert_eq!(trie.remove(f, &v), model.remove(&(f.clone(), v)));
                }
                Op::RemoveAll(i) => {
                    let f = &filters[i % filters.len()];
                    for v in 0..4 {
                        prop_assert_eq!(trie.remove(f, &v), model.remove(&(f.clone(), v)));
                    }
                    prop_assert_eq!(trie.count(f), 0);
                }
            }
            check(&trie, &model, &topics)?;
        }

        // Draining whole returns every node.
        for (f, v) in std::mem::take(&mut model) {
            prop_assert!(trie.remove(&f, &v));
        }
        check(&trie, &model, &topics)?;
        prop_assert_eq!(trie.node_count(), 0);
        prop_assert_eq!(trie.filter_count(), 0);
    }

    /// Matching against an arbitrary, unrelated set of filters: every topic, every filter.
    #[test]
    fn every_filter_topic_pair_agrees(
        filters in proptest::collection::btree_set(filter(), 0..30),
        topics in proptest::collection::vec(topic(), 1..20),
    ) {
        let mut trie = SubscriptionTrie::new();
        let mut model = Model::new();
        for (i, f) in filters.iter().enumerate() {
            let v = (i % 3) as u8;
            prop_assert!(trie.insert(f, v));
            model.insert((f.clone(), v));
        }
        check(&trie, &model, &topics)?;
    }
}
