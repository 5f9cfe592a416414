//! Loss and duplicate accounting for `crash` and the `queue` scenario of `load`: what each
//! publisher sent and had acknowledged, what each subscriber received, and the verdicts drawn
//! from them. Pure logic, no I/O.
//!
//! Sequence numbers are per publisher and dense from 0 (`next_seq` is the count sent), so sets
//! of them are bitsets.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A set of sequence numbers.
#[derive(Clone, Debug, Default)]
pub struct SeqSet {
    words: Vec<u64>,
    len: u64,
}

impl SeqSet {
    /// Adds `seq`; true if it was not there yet.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (w, bit) = ((seq / 64) as usize, seq % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let mask = 1u64 << bit;
        if self.words[w] & mask != 0 {
            return false;
        }
        self.words[w] |= mask;
        self.len += 1;
        true
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.words
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1u64 << (seq % 64)) != 0)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u64)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }

    /// The largest member.
    pub fn max(&self) -> Option<u64> {
        let (w, bits) = self.words.iter().enumerate().rev().find(|(_, &b)| b != 0)?;
        Some(w as u64 * 64 + 63 - u64::from(bits.leading_zeros()))
    }
}

/// A set of sequence numbers below a fixed capacity that several threads insert into at once
/// (each insert is one `fetch_or`): the deliveries of one publisher's messages to any of a group
/// of competing consumers, so that a message taken by two consumers counts as a duplicate.
#[derive(Debug)]
pub struct AtomicSeqSet {
    words: Box<[AtomicU64]>,
}

/// What [`AtomicSeqSet::insert`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    New,
    Duplicate,
    /// At or beyond the capacity: never sent, so not a real message.
    OutOfRange,
}

impl AtomicSeqSet {
    /// Room for sequence numbers `0..capacity`.
    pub fn with_capacity(capacity: u64) -> AtomicSeqSet {
        let words = capacity.div_ceil(64) as usize;
        AtomicSeqSet {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn insert(&self, seq: u64) -> Insert {
        let Some(word) = self.words.get((seq / 64) as usize) else {
            return Insert::OutOfRange;
        };
        let mask = 1u64 << (seq % 64);
        if word.fetch_or(mask, Ordering::AcqRel) & mask == 0 {
            Insert::New
        } else {
            Insert::Duplicate
        }
    }

    /// A copy, for [`verdict`].
    pub fn snapshot(&self) -> SeqSet {
        let words: Vec<u64> = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        let len = words.iter().map(|w| u64::from(w.count_ones())).sum();
        SeqSet { words, len }
    }
}

/// One publisher's side: how many it sent (sequence numbers 0..next_seq) and which of them the
/// broker acknowledged.
#[derive(Clone, Debug, Default)]
pub struct PubLedger {
    pub next_seq: u64,
    pub acked: SeqSet,
    /// Acknowledgements with a failure reason code (not counted as acknowledged).
    pub refused: u64,
    /// Acknowledgements for a packet id with nothing outstanding.
    pub unexpected_acks: u64,
}

impl PubLedger {
    /// The sequence number for the next publish.
    pub fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    pub fn ack(&mut self, seq: u64) {
        self.acked.insert(seq);
    }
}

/// One subscriber's receipts, per publisher.
#[derive(Clone, Debug, Default)]
pub struct Receipts {
    pub per_publisher: Vec<SeqSet>,
    /// Receptions of a (publisher, seq) already received.
    pub duplicates: u64,
    pub total: u64,
    /// Payloads without a readable stamp, or naming no known publisher.
    pub malformed: u64,
}

impl Receipts {
    pub fn new(publishers: usize) -> Receipts {
        Receipts {
            per_publisher: vec![SeqSet::default(); publishers],
            ..Receipts::default()
        }
    }

    pub fn record(&mut self, publisher: usize, seq: u64) {
        self.total += 1;
        match self.per_publisher.get_mut(publisher) {
            Some(set) => {
                if !set.insert(seq) {
                    self.duplicates += 1;
                }
            }
            None => self.malformed += 1,
        }
    }

    /// Every acknowledged message of every publisher has been received.
    pub fn covers(&self, ledgers: &[PubLedger]) -> bool {
        ledgers.iter().enumerate().all(|(p, l)| {
            let got = self.per_publisher.get(p);
            l.acked.iter().all(|s| got.is_some_and(|g| g.contains(s)))
        })
    }
}

/// Verdict for one subscriber (or for a group of competing consumers taken together).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Verdict {
    /// Distinct messages received.
    pub received: u64,
    /// Receptions beyond the first of a message (allowed at QoS 1).
    pub duplicates: u64,
    /// Acknowledged messages never received: the failures.
    pub lost: u64,
    /// Up to 10 lost (publisher, seq).
    pub lost_examples: Vec<(usize, u64)>,
    /// Received although never acknowledged (in flight at a kill; allowed).
    pub unacked_received: u64,
    /// Received with a sequence number that was never sent, or an unreadable stamp: corruption.
    pub phantom: u64,
}

pub fn verdict(ledgers: &[PubLedger], receipts: &Receipts) -> Verdict {
    let mut v = Verdict {
        duplicates: receipts.duplicates,
        phantom: receipts.malformed,
        ..Verdict::default()
    };
    let empty = SeqSet::default();
    for (p, l) in ledgers.iter().enumerate() {
        let got = receipts.per_publisher.get(p).unwrap_or(&empty);
        v.received += got.len();
        for s in l.acked.iter() {
            if !got.contains(s) {
                v.lost += 1;
                if v.lost_examples.len() < 10 {
                    v.lost_examples.push((p, s));
                }
            }
        }
        for s in got.iter() {
            if s >= l.next_seq {
                v.phantom += 1;
            } else if !l.acked.contains(s) {
                v.unacked_received += 1;
            }
        }
    }
    // Receipts naming a publisher beyond the ledgers.
    for got in receipts.per_publisher.iter().skip(ledgers.len()) {
        v.phantom += got.len();
    }
    v
}

/// The retained message read back after a restart, judged against what was acknowledged before
/// the kill: it must be the last acknowledged value or a later one that was sent.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub enum RetainedCheck {
    /// Nothing acknowledged yet and nothing retained.
    NoneYet,
    /// value >= last acknowledged (and was sent).
    Ok { value: u64, max_acked: Option<u64> },
    /// An older value than one acknowledged, or none at all although one was: a loss.
    Regressed { value: Option<u64>, max_acked: u64 },
    /// A value that was never sent (or an unreadable one).
    Phantom { value: Option<u64> },
}

impl RetainedCheck {
    /// `value`: the retained sequence number read back (None: no retained message; Some(None):
    /// a retained message whose payload has no stamp is passed as `malformed`).
    pub fn judge(value: Option<u64>, malformed: bool, ledger: &PubLedger) -> RetainedCheck {
        let max_acked = ledger.acked.max();
        if malformed {
            return RetainedCheck::Phantom { value };
        }
        match (value, max_acked) {
            (None, None) => RetainedCheck::NoneYet,
            (None, Some(m)) => RetainedCheck::Regressed {
                value: None,
                max_acked: m,
            },
            (Some(v), _) if v >= ledger.next_seq => RetainedCheck::Phantom { value },
            (Some(v), Some(m)) if v < m => RetainedCheck::Regressed {
                value: Some(v),
                max_acked: m,
            },
            (Some(v), m) => RetainedCheck::Ok {
                value: v,
                max_acked: m,
            },
        }
    }

    pub fn ok(&self) -> bool {
        matches!(self, RetainedCheck::NoneYet | RetainedCheck::Ok { .. })
    }
}

/// xorshift64*: a small seeded generator for the kill moments (reproducible from the seed).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that small seeds do not start in a weak state; never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [lo, hi] (hi < lo is taken as lo).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(sent: u64, acked: &[u64]) -> PubLedger {
        let mut l = PubLedger {
            next_seq: sent,
            ..PubLedger::default()
        };
        for &s in acked {
            l.ack(s);
        }
        l
    }

    #[test]
    fn seqset_inserts_once_iterates_in_order_and_knows_its_max() {
        let mut s = SeqSet::default();
        assert_eq!(s.max(), None);
        assert!(s.insert(130));
        assert!(s.insert(0));
        assert!(s.insert(63));
        assert!(s.insert(64));
        assert!(!s.insert(64));
        assert_eq!(s.len(), 4);
        assert!(s.contains(63) && !s.contains(62) && !s.contains(10_000));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 130]);
        assert_eq!(s.max(), Some(130));
    }

    #[test]
    fn lost_duplicate_unacked_and_phantom_are_told_apart() {
        // Publisher 0 sent 0..6, acked 0..4; publisher 1 sent 0..3, acked 0..3.
        let ledgers = vec![ledger(6, &[0, 1, 2, 3]), ledger(3, &[0, 1, 2])];
        let mut r = Receipts::new(2);
        for s in [0, 1, 1, 3, 4, 9] {
            r.record(0, s); // 1 twice (dup), 2 missing (lost), 4 unacked, 9 never sent
        }
        for s in [0, 1, 2, 2, 2] {
            r.record(1, s);
        }
        r.record(7, 0); // no such publisher
        let v = verdict(&ledgers, &r);
        assert_eq!(v.lost, 1);
        assert_eq!(v.lost_examples, vec![(0, 2)]);
        assert_eq!(v.duplicates, 3);
        assert_eq!(v.unacked_received, 1);
        assert_eq!(v.phantom, 2);
        assert_eq!(v.received, 5 + 3);
        assert!(!r.covers(&ledgers));
        r.record(0, 2);
        assert!(r.covers(&ledgers));
        assert_eq!(verdict(&ledgers, &r).lost, 0);
    }

    #[test]
    fn atomic_set_tells_new_from_duplicate_and_bounds_its_range() {
        let s = AtomicSeqSet::with_capacity(130);
        assert_eq!(s.insert(0), Insert::New);
        assert_eq!(s.insert(129), Insert::New);
        assert_eq!(s.insert(129), Insert::Duplicate);
        assert_eq!(s.insert(64), Insert::New);
        // 130 rounds up to 3 words: 130..192 is stored but was never sent; 192 is out.
        assert_eq!(s.insert(192), Insert::OutOfRange);
        assert_eq!(AtomicSeqSet::with_capacity(0).insert(0), Insert::OutOfRange);
        let snap = s.snapshot();
        assert_eq!(snap.len(), 3);
        assert_eq!(snap.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        // From several threads at once: each seq is new exactly once.
        let shared = std::sync::Arc::new(AtomicSeqSet::with_capacity(10_000));
        let news: u64 = (0..4)
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || {
                    (0..10_000u64)
                        .filter(|&q| s.insert(q) == Insert::New)
                        .count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(news, 10_000);
        assert_eq!(shared.snapshot().len(), 10_000);
    }

    #[test]
    fn nothing_acked_nothing_lost() {
        let ledgers = vec![ledger(5, &[])];
        let r = Receipts::new(1);
        assert!(r.covers(&ledgers));
        assert_eq!(verdict(&ledgers, &r), Verdict::default());
    }

    #[test]
    fn retained_must_be_the_last_acked_or_later() {
        let l = ledger(10, &[0, 1, 2, 5]);
        assert_eq!(
            RetainedCheck::judge(Some(5), false, &l),
            RetainedCheck::Ok {
                value: 5,
                max_acked: Some(5)
            }
        );
        assert!(RetainedCheck::judge(Some(7), false, &l).ok()); // sent, not yet acked: fine
        assert_eq!(
            RetainedCheck::judge(Some(4), false, &l),
            RetainedCheck::Regressed {
                value: Some(4),
                max_acked: 5
            }
        );
        assert!(!RetainedCheck::judge(None, false, &l).ok());
        assert!(!RetainedCheck::judge(Some(10), false, &l).ok()); // never sent
        assert!(!RetainedCheck::judge(Some(6), true, &l).ok());
        let fresh = ledger(3, &[]);
        assert_eq!(
            RetainedCheck::judge(None, false, &fresh),
            RetainedCheck::NoneYet
        );
        assert!(RetainedCheck::judge(Some(1), false, &fresh).ok());
    }

    #[test]
    fn rng_is_reproducible_and_stays_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.range(100, 1500)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.range(100, 1500)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| (100..=1500).contains(&x)));
        assert!(xs.iter().any(|&x| x != xs[0]));
        assert_eq!(Rng::new(0).range(5, 5), 5);
        assert_eq!(Rng::new(0).range(5, 1), 5);
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
