//! TopicTree (retained store index) against the reference matcher `TopicFilter::matches`: after
//! random inserts and removes, a filter finds exactly the stored topics it matches, each once.

use std::collections::BTreeMap;

use flux_core::topic::{TopicFilter, TopicName, TopicTree};
use proptest::prelude::*;

fn level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("$s"), Just("")].prop_map(String::from)
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..5).prop_map(|v| v.join("/")).prop_filter("non-empty", |s| !s.is_empty())
}

fn filter() -> impl Strategy<Value = String> {
    let lvl = prop_oneof![3 => level(), 2 => Just("+".to_string())];
    (prop::collection::vec(lvl, 0..5), any::<bool>())
        .prop_map(|(mut v, hash)| {
            if hash || v.is_empty() {
                v.push("#".to_string());
            }
            v.join("/")
        })
        .prop_filter("a valid filter", |f| TopicFilter::new(f).is_ok())
}

#[derive(Debug, Clone)]
enum Op {
    Insert(String, u32),
    Remove(String),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![3 => (topic(), any::<u32>()).prop_map(|(t, v)| Op::Insert(t, v)), 1 => topic().prop_map(Op::Remove)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn tree_matches_reference(ops in prop::collection::vec(op(), 0..60), filters in prop::collection::vec(filter(), 1..12)) {
        let mut tree = TopicTree::new();
        let mut model: BTreeMap<String, u32> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(t, v) => {
                    let name = TopicName::new(&t).unwrap();
                    prop_assert_eq!(tree.insert(&name, v), model.insert(t, v));
                }
                Op::Remove(t) => {
                    let name = TopicName::new(&t).unwrap();
                    prop_assert_eq!(tree.remove(&name), model.remove(&t));
                }
            }
            prop_assert_eq!(tree.len(), model.len());
        }
        for f in filters {
            let filter = TopicFilter::new(&f).unwrap();
            let mut got: Vec<(String, u32)> = Vec::new();
            tree.for_each_match(&filter, |t, v| got.push((t.as_str().to_string(), *v)));
            got.sort();
            let want: Vec<(String, u32)> = model
                .iter()
                .filter(|(t, _)| filter.matches(&TopicName::new(t).unwrap()))
                .map(|(t, v)| (t.clone(), *v))
                .collect();
            prop_assert_eq!(got, want, "filter {}", f);
        }
    }
}
