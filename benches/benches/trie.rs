//! Subscription trie: matching one topic against 1k and 100k filters.
//!
//! The filter set looks like a device fleet: mostly exact filters
//! `site/{s}/device/{d}/{metric}`, plus per-site wildcards (`site/{s}/device/+/{metric}`,
//! `site/{s}/#`) and a few fleet-wide ones (`+/+/device/+/alarm`, `#`-rooted under `site/`).
//! Three topics are matched: one hitting an exact filter plus the wildcards of its site, one with
//! no subscriber at all, and a `$SYS` topic (skips the root wildcards).

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use flux_core::topic::{SubscriptionTrie, TopicFilter, TopicName};

const METRICS: [&str; 4] = ["temperature", "humidity", "pressure", "alarm"];

fn filters(n: usize) -> Vec<TopicFilter> {
    let mut out = Vec::with_capacity(n + 64);
    let sites = (n / 100).max(1);
    // Per-site wildcards, then exact device filters until n.
    for s in 0..sites {
        out.push(format!("site/{s}/device/+/temperature"));
        out.push(format!("site/{s}/#"));
    }
    out.push("+/+/device/+/alarm".into());
    out.push("site/+/device/+/+".into());
    let mut i = 0usize;
    while out.len() < n {
        let s = i % sites;
        let d = i / sites;
        out.push(format!("site/{s}/device/{d}/{}", METRICS[i % METRICS.len()]));
        i += 1;
    }
    out.into_iter()
        .map(|f| TopicFilter::new(&f).expect("valid filter"))
        .collect()
}

fn build(n: usize) -> SubscriptionTrie<u32> {
    let mut trie = SubscriptionTrie::new();
    for (i, f) in filters(n).iter().enumerate() {
        trie.insert(f, i as u32);
    }
    trie
}

fn bench_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("trie_match");
    for n in [1_000usize, 100_000] {
        let trie = build(n);
        let topics = [
            ("hit", TopicName::new("site/3/device/0/temperature").expect("valid topic")),
            ("miss", TopicName::new("plant/3/line/7/speed").expect("valid topic")),
            ("dollar", TopicName::new("$SYS/broker/load").expect("valid topic")),
        ];
        for (name, topic) in &topics {
            let mut matched = 0usize;
            trie.for_each_match(topic, |_, _| matched += 1);
            if *name == "hit" {
                assert!(matched >= 3, "hit topic should match exact + wildcards, got {matched}");
            }
            group.bench_with_input(BenchmarkId::new(*name, n), topic, |b, topic| {
                b.iter(|| {
                    let mut count = 0usize;
                    trie.for_each_match(black_box(topic), |_, v| count += *v as usize & 1);
                    black_box(count)
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("trie_insert_remove");
    let trie_filters = filters(1_000);
    group.bench_function("insert_remove_1k", |b| {
        b.iter(|| {
            let mut trie = SubscriptionTrie::new();
            for (i, f) in trie_filters.iter().enumerate() {
                trie.insert(f, i as u32);
            }
            for (i, f) in trie_filters.iter().enumerate() {
                trie.remove(f, &(i as u32));
            }
            black_box(trie.is_empty())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500));
    targets = bench_match
}
criterion_main!(benches);
