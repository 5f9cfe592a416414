//! Builders shared by the `session_*` tests: CONNECTs, negotiated sessions, messages, deliveries,
//! and readers for what a session put into its [`Outbox`].
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flux_core::mqtt::{
    Connect, Packet, PacketId, Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode, Will,
};
use flux_core::session::{negotiate, Delivery, Event, Message, Negotiated, Outbox, Publication, Session};
use flux_core::topic::{TopicFilter, TopicName};
use flux_core::Limits;

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("non-zero packet id")
}

pub fn topic(s: &str) -> TopicName {
    TopicName::new(s).expect("valid topic name")
}

pub fn connect(protocol: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive_secs: 30,
        client_id: client_id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

pub fn connect_v5(client_id: &str) -> Connect {
    connect(ProtocolVersion::V5, client_id)
}

pub fn connect_v311(client_id: &str) -> Connect {
    connect(ProtocolVersion::V311, client_id)
}

/// A v5 CONNECT that keeps its session `expiry_secs` after the connection.
pub fn connect_v5_persistent(client_id: &str, expiry_secs: u32) -> Connect {
    let mut c = connect_v5(client_id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(expiry_secs);
    c
}

pub fn will(topic_name: &str, payload: &'static [u8], delay_secs: Option<u32>) -> Will {
    Will {
        topic: topic(topic_name),
        payload: Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties { will_delay_interval: delay_secs, ..Properties::default() },
    }
}

pub fn negotiated(c: &Connect, limits: &Limits) -> Negotiated {
    negotiate(c, limits, || "assigned-id".to_string()).expect("CONNECT accepted")
}

/// A new session for `c`, attached at `now`.
pub fn online(c: &Connect, limits: &Limits, now: Instant) -> (Session, Negotiated) {
    let n = negotiated(c, limits);
    let mut s = Session::new(&n, &std::sync::Arc::new(limits.clone()));
    let mut out = Outbox::default();
    s.attach(&n, now, &mut out);
    assert!(out.packets.is_empty() && out.events.is_empty(), "a new session owes nothing: {out:?}");
    (s, n)
}

pub fn message(topic_name: &str, payload: &[u8], qos: QoS) -> Message {
    Arc::new(Publication {
        topic: topic(topic_name),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: Some(Arc::from("publisher")),
    })
}

pub fn message_expiring(topic_name: &str, payload: &[u8], qos: QoS, expires_at: Instant) -> Message {
    Arc::new(Publication {
        topic: topic(topic_name),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        properties: Properties::default(),
        expires_at: Some(expires_at),
        publisher: Some(Arc::from("publisher")),
    })
}

pub fn delivery(m: Message, qos: QoS) -> Delivery {
    Delivery { message: m, qos, retain: false, subscription_ids: Vec::new(), shared: None, queue: None }
}

/// A delivery of a fresh message whose payload is `payload`.
pub fn msg(payload: &str, qos: QoS) -> Delivery {
    delivery(message("t", payload.as_bytes(), qos), qos)
}

pub fn shared(mut d: Delivery) -> Delivery {
    d.shared = Some((Arc::from("g"), TopicFilter::new("t").expect("valid filter")));
    d
}

/// A client PUBLISH.
pub fn publish(topic_name: &str, payload: &[u8], qos: QoS, id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: if topic_name.is_empty() { TopicName::empty_for_alias() } else { topic(topic_name) },
        packet_id: id.map(pid),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

pub fn resp(id: u16, reason: ReasonCode) -> PubResp {
    PubResp { packet_id: pid(id), reason, properties: Properties::default() }
}

pub fn puback(id: u16) -> Packet {
    Packet::PubAck(PubResp::success(pid(id)))
}
pub fn pubrec(id: u16) -> Packet {
    Packet::PubRec(PubResp::success(pid(id)))
}
pub fn pubrel(id: u16) -> Packet {
    Packet::PubRel(PubResp::success(pid(id)))
}
pub fn pubcomp(id: u16) -> Packet {
    Packet::PubComp(PubResp::success(pid(id)))
}

/// The PUBLISH packets in `out`, in order.
pub fn publishes(out: &Outbox) -> Vec<&Publish> {
    out.packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// Payloads of the PUBLISH packets in `out`, as text.
pub fn payloads(out: &Outbox) -> Vec<String> {
    publishes(out).iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
}

/// The only packet in `out`.
pub fn only_packet(out: &Outbox) -> &Packet {
    assert_eq!(out.packets.len(), 1, "expected exactly one packet: {:?}", out.packets);
    &out.packets[0]
}

/// The only event in `out`, which must be a Publish.
pub fn only_publish_event(out: &Outbox) -> (&Message, Option<(PacketId, QoS)>) {
    assert_eq!(out.events.len(), 1, "expected exactly one event: {:?}", out.events);
    match &out.events[0] {
        Event::Publish { message, ack } => (message, *ack),
        e => panic!("expected a Publish event, got {e:?}"),
    }
}

/// Run one packet through the session, returning the outbox; the packet must not close.
pub fn handle_ok(s: &mut Session, p: Packet, now: Instant) -> Outbox {
    let mut out = Outbox::default();
    s.handle(p, now, &mut out).unwrap_or_else(|c| panic!("closed with {c:?}"));
    out
}
