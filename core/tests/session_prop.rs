//! State-machine test of the outbound QoS 1/2 path against a simple model of a client.
//!
//! Random sequences of deliveries (QoS 1 or 2, each a fresh message), client acknowledgements
//! (PUBACK/PUBREC/PUBCOMP for anything the client was sent and owes an answer to, in any order),
//! disconnects and reconnects (with a random Receive Maximum). Every packet the session sends is
//! checked as it comes out:
//! - first transmissions are in delivery order (FIFO), with DUP=0, while fewer than the window
//!   are unacknowledged, with a packet id no other unacknowledged message holds;
//! - a retransmission only comes from `attach`, carries DUP=1 and the original packet id;
//! - a message the client acknowledged (PUBACK, or PUBREC) is never sent again;
//! - PUBREL only for a message the client sent PUBREC for.
//!
//! At the end the client reconnects and answers everything: every message delivered was received
//! or (queue full) dropped, never both, and the drops are counted exactly.
//!
//! Crashes: the session's journal is replayed after every step onto a `RestoredSession`, as the
//! shard's log would be; a crash replaces the session by `Session::restore` of that image (and
//! checks that the checkpoint form, `snapshot_journal`, rebuilds the same image). The same
//! invariants must hold across it: nothing acknowledged comes back, nothing unacknowledged is lost,
//! retransmissions keep their packet ids.

mod session_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use flux_core::mqtt::{Packet, PubResp, QoS};
use flux_core::session::{DeliverOutcome, DropReason, Outbox, RestoredSession, Session};
use flux_core::Limits;
use proptest::prelude::*;
use session_support::*;

#[derive(Clone, Debug)]
enum Op {
    /// Deliver a fresh message at QoS 2 (true) or 1 (false).
    Deliver(bool),
    /// The client answers one of the packets it owes an answer to (index modulo how many).
    Ack(usize),
    Disconnect,
    /// (Re)connect with this Receive Maximum; a connected client is taken over.
    Reconnect(u16),
    /// The server crashes and restarts from its log.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => any::<bool>().prop_map(Op::Deliver),
        5 => (0usize..64).prop_map(Op::Ack),
        1 => Just(Op::Disconnect),
        1 => (1u16..=5).prop_map(Op::Reconnect),
        1 => Just(Op::Crash),
    ]
}

/// What the server waits for, as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// QoS 1 PUBLISH sent; waits for PUBACK.
    Qos1Sent,
    /// QoS 2 PUBLISH sent; waits for PUBREC.
    Qos2Sent,
    /// PUBREL sent; waits for PUBCOMP.
    Released,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// PUBACK, PUBREC or PUBCOMP.
enum Answer {
    Ack,
    Rec,
    Comp,
}

struct Model {
    session: Session,
    now: Instant,
    server_max_inflight: u16,
    online: bool,
    window: usize,
    /// Sequence number of the next message delivered; also how many were delivered.
    next_seq: u64,
    qos_of: HashMap<u64, QoS>,
    dropped: BTreeSet<u64>,
    received: BTreeSet<u64>,
    /// Packet id of each message's first transmission.
    first_id: HashMap<u64, u16>,
    last_first: Option<u64>,
    /// Unacknowledged messages by packet id.
    outstanding: BTreeMap<u16, (u64, Stage)>,
    /// Messages the client acknowledged (PUBACK, or PUBREC): never to be sent again.
    acknowledged: BTreeSet<u64>,
    /// Answers the client owes on this connection.
    owed: Vec<(u16, Answer)>,
    /// The session's journal so far, replayed (what the log would give back).
    image: RestoredSession,
    limits: Limits,
    /// Queue-full drops counted by sessions that crashed (a restored session counts from 0).
    dropped_before_crash: u64,
}

impl Model {
    fn new(server_max_inflight: u16, max_queued_messages: usize, receive_max: u16) -> Model {
        let limits = Limits { max_inflight_messages: server_max_inflight, max_queued_messages, ..Limits::default() };
        let now = Instant::now();
        let (session, _) = online(&Self::connect(receive_max), &limits, now);
        let image = RestoredSession {
            client_id: "c".into(),
            protocol_level: 5,
            session_expiry_secs: 3600,
            ..RestoredSession::default()
        };
        Model {
            image,
            limits: limits.clone(),
            dropped_before_crash: 0,
            session,
            now,
            server_max_inflight,
            online: true,
            window: usize::from(receive_max.min(server_max_inflight)),
            next_seq: 0,
            qos_of: HashMap::new(),
            dropped: BTreeSet::new(),
            received: BTreeSet::new(),
            first_id: HashMap::new(),
            last_first: None,
            outstanding: BTreeMap::new(),
            acknowledged: BTreeSet::new(),
            owed: Vec::new(),
        }
    }

    fn connect(receive_max: u16) -> flux_core::mqtt::Connect {
        let mut c = connect_v5_persistent("c", 3600);
        c.properties.receive_maximum = Some(receive_max);
        c
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Deliver(qos2) => self.deliver(if qos2 { QoS::ExactlyOnce } else { QoS::AtLeastOnce }),
            Op::Ack(i) => self.answer(i),
            Op::Disconnect => self.disconnect(),
            Op::Reconnect(receive_max) => self.reconnect(receive_max),
            Op::Crash => self.crash(),
        }
        self.journal();
        self.check_counts();
    }

    fn journal(&mut self) {
        for entry in self.session.take_journal() {
            self.image.apply(entry);
        }
    }

    fn crash(&mut self) {
        self.journal();
        let mut from_snapshot = RestoredSession { client_id: "c".into(), protocol_level: 5, session_expiry_secs: 3600, ..RestoredSession::default() };
        for entry in self.session.snapshot_journal() {
            from_snapshot.apply(entry);
        }
        assert_eq!(describe(&from_snapshot), describe(&self.image), "checkpoint and journal disagree");
        self.dropped_before_crash += u64::from(self.session.stats.dropped_queue_full);
        self.session = Session::restore(self.image.clone(), &std::sync::Arc::new(self.limits.clone()));
        self.online = false;
        self.owed.clear();
    }

    fn deliver(&mut self, qos: QoS) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.qos_of.insert(seq, qos);
        let d = delivery(message("t", &seq.to_be_bytes(), qos), qos);
        let mut out = Outbox::default();
        let outcome = self.session.deliver(d, self.now, &mut out);
        self.receive(&out, false);
        match outcome {
            DeliverOutcome::Sent => assert_eq!(self.last_first, Some(seq), "Sent but not sent"),
            DeliverOutcome::Queued => assert!(!self.first_id.contains_key(&seq), "Queued but sent"),
            DeliverOutcome::Dropped(DropReason::QueueFull) => {
                assert!(!self.first_id.contains_key(&seq));
                self.dropped.insert(seq);
            }
            DeliverOutcome::Dropped(r) => panic!("unexpected drop {r:?}"),
        }
    }

    fn answer(&mut self, i: usize) {
        if !self.online || self.owed.is_empty() {
            return;
        }
        let (id, answer) = self.owed.remove(i % self.owed.len());
        let (seq, stage) = *self.outstanding.get(&id).expect("an answer owed is for an outstanding message");
        let packet = match answer {
            Answer::Ack => {
                assert_eq!(stage, Stage::Qos1Sent);
                self.outstanding.remove(&id);
                self.acknowledged.insert(seq);
                Packet::PubAck(PubResp::success(pid(id)))
            }
            Answer::Rec => {
                assert_eq!(stage, Stage::Qos2Sent);
                self.outstanding.insert(id, (seq, Stage::Released));
                self.acknowledged.insert(seq);
                Packet::PubRec(PubResp::success(pid(id)))
            }
            Answer::Comp => {
                assert_eq!(stage, Stage::Released);
                self.outstanding.remove(&id);
                Packet::PubComp(PubResp::success(pid(id)))
            }
        };
        let out = handle_ok(&mut self.session, packet, self.now);
        if answer == Answer::Rec {
            let rels = out.packets.iter().filter(|p| matches!(p, Packet::PubRel(r) if r.packet_id == pid(id))).count();
            assert_eq!(rels, 1, "PUBREC must be answered by one PUBREL: {:?}", out.packets);
        }
        self.receive(&out, false);
    }

    fn disconnect(&mut self) {
        if !self.online {
            return;
        }
        let (_, ended) = self.session.detach(self.now, false);
        assert!(!ended);
        self.online = false;
        self.owed.clear();
    }

    fn reconnect(&mut self, receive_max: u16) {
        self.disconnect();
        let limits = Limits { max_inflight_messages: self.server_max_inflight, ..Limits::default() };
        let n = negotiated(&Self::connect(receive_max), &limits);
        self.window = usize::from(receive_max.min(self.server_max_inflight));
        self.online = true;
        let mut out = Outbox::default();
        self.session.attach(&n, self.now, &mut out);
        // Everything unacknowledged comes first, in the order it was first sent.
        let mut expected: Vec<(u64, u16, Stage)> =
            self.outstanding.iter().map(|(&id, &(seq, stage))| (seq, id, stage)).collect();
        expected.sort_by_key(|e| e.0);
        assert!(out.packets.len() >= expected.len(), "missing retransmissions: {:?}", out.packets);
        for ((seq, id, stage), p) in expected.iter().zip(&out.packets) {
            match (stage, p) {
                (Stage::Released, Packet::PubRel(r)) => assert_eq!(r.packet_id, pid(*id)),
                (Stage::Qos1Sent | Stage::Qos2Sent, Packet::Publish(p)) => {
                    assert_eq!(p.packet_id, Some(pid(*id)));
                    assert_eq!(seq_of(p), *seq);
                }
                _ => panic!("retransmission of {seq} ({stage:?}) out of order: {p:?}"),
            }
        }
        self.receive(&out, true);
    }

    /// The client takes in what the session sent, checking every invariant on the way.
    fn receive(&mut self, out: &Outbox, from_attach: bool) {
        assert!(out.events.is_empty());
        for p in &out.packets {
            match p {
                Packet::Publish(p) => {
                    let seq = seq_of(p);
                    let id = p.packet_id.expect("QoS 1/2 has a packet id").get();
                    assert_eq!(Some(&p.qos), self.qos_of.get(&seq));
                    assert!(!self.acknowledged.contains(&seq), "message {seq} sent again after its acknowledgement");
                    assert!(!self.dropped.contains(&seq));
                    if let Some(&first) = self.first_id.get(&seq) {
                        assert!(from_attach, "retransmission of {seq} outside attach");
                        assert!(p.dup, "retransmission of {seq} without DUP");
                        assert_eq!(id, first, "retransmission of {seq} with another packet id");
                        assert_eq!(self.outstanding.get(&id).map(|x| x.0), Some(seq));
                    } else {
                        assert!(!p.dup, "first transmission of {seq} with DUP");
                        if let Some(last) = self.last_first {
                            assert!(seq > last, "{seq} sent after {last}: not FIFO");
                        }
                        let skipped = self.last_first.map_or(0, |l| l + 1)..seq;
                        assert!(skipped.clone().all(|s| self.dropped.contains(&s)), "{skipped:?} overtaken by {seq}");
                        assert!(
                            self.outstanding.len() < self.window,
                            "sent {seq} with {} unacknowledged, window {}",
                            self.outstanding.len(),
                            self.window
                        );
                        assert!(!self.outstanding.contains_key(&id), "packet id {id} in use by {:?}", self.outstanding[&id]);
                        self.first_id.insert(seq, id);
                        self.last_first = Some(seq);
                        let stage = if p.qos == QoS::ExactlyOnce { Stage::Qos2Sent } else { Stage::Qos1Sent };
                        self.outstanding.insert(id, (seq, stage));
                    }
                    self.received.insert(seq);
                    let answer = if p.qos == QoS::ExactlyOnce { Answer::Rec } else { Answer::Ack };
                    self.owed.push((id, answer));
                }
                Packet::PubRel(r) => {
                    let id = r.packet_id.get();
                    assert_eq!(self.outstanding.get(&id).map(|x| x.1), Some(Stage::Released), "PUBREL for {id}");
                    self.owed.push((id, Answer::Comp));
                }
                p => panic!("unexpected packet {p:?}"),
            }
        }
    }

    fn check_counts(&self) {
        assert_eq!(self.session.inflight_len(), self.outstanding.len());
        let sent = self.first_id.len() as u64;
        let dropped = self.dropped.len() as u64;
        assert_eq!(self.session.queued_len() as u64, self.next_seq - sent - dropped);
        assert_eq!(u64::from(self.session.stats.dropped_queue_full) + self.dropped_before_crash, dropped);
    }

    /// Reconnect if needed and answer everything until the session has nothing left.
    fn drain(&mut self, receive_max: u16) {
        if !self.online {
            self.reconnect(receive_max);
        }
        for _ in 0..(10 * self.next_seq + 10) {
            if self.owed.is_empty() {
                break;
            }
            self.answer(0);
            self.check_counts();
        }
        assert!(self.owed.is_empty(), "the exchange did not finish");
        assert_eq!((self.session.inflight_len(), self.session.queued_len()), (0, 0));
        for seq in 0..self.next_seq {
            assert!(
                self.received.contains(&seq) != self.dropped.contains(&seq),
                "message {seq}: received {} dropped {}",
                self.received.contains(&seq),
                self.dropped.contains(&seq)
            );
        }
        assert_eq!(self.received.len() + self.dropped.len(), self.next_seq as usize);
    }
}

/// The parts of an image that matter, comparable.
/// (msg id, packet id, PUBREC received, payload) per message; inbound QoS 2 ids; filters.
type Described = (Vec<(u64, Option<u16>, bool, Vec<u8>)>, Vec<u16>, Vec<String>);

fn describe(image: &RestoredSession) -> Described {
    let messages = image
        .messages
        .iter()
        .map(|m| (m.msg_id, m.packet_id.map(|p| p.get()), m.pubrec_received, m.delivery.message.payload.to_vec()))
        .collect();
    let mut qos2: Vec<u16> = image.qos2_in.iter().map(|p| p.get()).collect();
    qos2.sort_unstable();
    let mut subs: Vec<String> = image.subscriptions.iter().map(|(f, _)| f.clone()).collect();
    subs.sort();
    (messages, qos2, subs)
}

fn seq_of(p: &flux_core::mqtt::Publish) -> u64 {
    let bytes: [u8; 8] = p.payload[..].try_into().expect("8-byte sequence number");
    u64::from_be_bytes(bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mqtt_4_4_outbound_qos12_against_model_nothing_lost(
        server_max in 1u16..=4,
        receive_max in 1u16..=5,
        final_receive_max in 1u16..=5,
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut m = Model::new(server_max, 100_000, receive_max);
        for op in &ops {
            m.step(op);
        }
        m.drain(final_receive_max);
        prop_assert!(m.dropped.is_empty());
    }

    #[test]
    fn mqtt_4_4_outbound_qos12_against_model_drops_counted_exactly(
        server_max in 1u16..=4,
        max_queued in 0usize..=3,
        receive_max in 1u16..=5,
        final_receive_max in 1u16..=5,
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut m = Model::new(server_max, max_queued, receive_max);
        for op in &ops {
            m.step(op);
        }
        m.drain(final_receive_max);
    }
}
