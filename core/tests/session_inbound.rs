//! Packets from the client to the session: PUBLISH at each QoS, PUBREL, topic aliases, payload
//! format, receive maximum, PINGREQ, DISCONNECT and session expiry.

mod session_support;

use std::time::Instant;

use flux_core::mqtt::{Disconnect, Packet, Properties, PubResp, QoS, ReasonCode};
use flux_core::session::{Close, Outbox, Session};
use flux_core::Limits;
use session_support::*;

fn v5() -> (Session, Instant) {
    let now = Instant::now();
    (online(&connect_v5_persistent("c", 3600), &Limits::default(), now).0, now)
}

fn v311() -> (Session, Instant) {
    let now = Instant::now();
    (online(&connect_v311("c"), &Limits::default(), now).0, now)
}

fn closed_with(s: &mut Session, p: Packet, now: Instant) -> Close {
    let mut out = Outbox::default();
    s.handle(p, now, &mut out).expect_err("the connection must close")
}

#[test]
fn mqtt_4_3_1_qos0_publish_is_routed_without_acknowledgement() {
    let (mut s, now) = v5();
    let out = handle_ok(&mut s, Packet::Publish(publish("a/b", b"x", QoS::AtMostOnce, None)), now);
    assert!(out.packets.is_empty());
    let (m, ack) = only_publish_event(&out);
    assert_eq!(ack, None);
    assert_eq!(m.topic.as_str(), "a/b");
    assert_eq!(&m.payload[..], b"x");
    assert_eq!(m.qos, QoS::AtMostOnce);
    // The publisher is recorded for No Local.
    assert_eq!(m.publisher.as_deref(), Some("c"));
}

#[test]
fn mqtt_4_3_2_qos1_publish_acknowledged_only_after_routing() {
    let (mut s, now) = v5();
    let out = handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::AtLeastOnce, Some(5))), now);
    assert!(out.packets.is_empty(), "no PUBACK before the message is routed");
    let (_, ack) = only_publish_event(&out);
    assert_eq!(ack, Some((pid(5), QoS::AtLeastOnce)));

    let mut out = Outbox::default();
    s.publish_routed(pid(5), QoS::AtLeastOnce, true, &mut out);
    assert_eq!(only_packet(&out), &Packet::PubAck(resp(5, ReasonCode::Success)));
}

#[test]
fn mqtt5_3_4_2_1_puback_no_matching_subscribers_0x10() {
    let (mut s, _) = v5();
    let mut out = Outbox::default();
    s.publish_routed(pid(5), QoS::AtLeastOnce, false, &mut out);
    assert_eq!(only_packet(&out), &Packet::PubAck(resp(5, ReasonCode::NoMatchingSubscribers)));
}

#[test]
fn mqtt5_3_5_2_1_pubrec_no_matching_subscribers_0x10() {
    let (mut s, now) = v5();
    handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(6))), now);
    let mut out = Outbox::default();
    s.publish_routed(pid(6), QoS::ExactlyOnce, false, &mut out);
    assert_eq!(only_packet(&out), &Packet::PubRec(resp(6, ReasonCode::NoMatchingSubscribers)));
}

#[test]
fn mqtt_3_4_v311_puback_and_pubrec_are_plain_success_without_subscribers() {
    let (mut s, _) = v311();
    let mut out = Outbox::default();
    s.publish_routed(pid(1), QoS::AtLeastOnce, false, &mut out);
    s.publish_routed(pid(2), QoS::ExactlyOnce, false, &mut out);
    assert_eq!(
        out.packets,
        vec![Packet::PubAck(resp(1, ReasonCode::Success)), Packet::PubRec(resp(2, ReasonCode::Success))]
    );
}

#[test]
fn mqtt_4_3_3_qos2_duplicate_publish_not_routed_twice() {
    let (mut s, now) = v5();
    let first = handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(7))), now);
    assert_eq!(only_publish_event(&first).1, Some((pid(7), QoS::ExactlyOnce)));
    let mut out = Outbox::default();
    s.publish_routed(pid(7), QoS::ExactlyOnce, true, &mut out);
    assert_eq!(only_packet(&out), &pubrec(7));

    // The PUBREC was lost: the client sends the PUBLISH again with DUP=1.
    let mut again = publish("a", b"x", QoS::ExactlyOnce, Some(7));
    again.dup = true;
    let out = handle_ok(&mut s, Packet::Publish(again.clone()), now);
    assert!(out.events.is_empty(), "a QoS 2 retransmission must not be routed again");
    assert_eq!(only_packet(&out), &pubrec(7));

    // Also across a reconnect: the inbound QoS 2 state belongs to the session.
    s.detach(now, false);
    let n = negotiated(&connect_v5_persistent("c", 3600), &Limits::default());
    s.attach(&n, now, &mut Outbox::default());
    let out = handle_ok(&mut s, Packet::Publish(again), now);
    assert!(out.events.is_empty());

    // PUBREL ends the exchange; the id may then carry a new message, which is routed.
    assert_eq!(only_packet(&handle_ok(&mut s, pubrel(7), now)), &pubcomp(7));
    let out = handle_ok(&mut s, Packet::Publish(publish("a", b"y", QoS::ExactlyOnce, Some(7))), now);
    assert_eq!(out.events.len(), 1);
}

#[test]
fn mqtt_4_3_2_qos1_duplicate_publish_is_routed_again() {
    // At least once: the server may deliver a QoS 1 retransmission again; it must acknowledge it.
    let (mut s, now) = v5();
    handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::AtLeastOnce, Some(1))), now);
    let out = handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::AtLeastOnce, Some(1))), now);
    assert_eq!(only_publish_event(&out).1, Some((pid(1), QoS::AtLeastOnce)));
}

#[test]
fn mqtt5_3_6_4_pubrel_answered_with_pubcomp() {
    let (mut s, now) = v5();
    handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(3))), now);
    assert_eq!(only_packet(&handle_ok(&mut s, pubrel(3), now)), &pubcomp(3));
}

#[test]
fn mqtt5_3_7_2_1_pubrel_for_unknown_id_gets_pubcomp_0x92() {
    let (mut s, now) = v5();
    let out = handle_ok(&mut s, pubrel(9), now);
    assert_eq!(only_packet(&out), &Packet::PubComp(resp(9, ReasonCode::PacketIdentifierNotFound)));
    // A second PUBREL for a finished exchange is unknown too.
    handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(3))), now);
    handle_ok(&mut s, pubrel(3), now);
    let out = handle_ok(&mut s, pubrel(3), now);
    assert_eq!(only_packet(&out), &Packet::PubComp(resp(3, ReasonCode::PacketIdentifierNotFound)));
}

#[test]
fn mqtt_3_7_v311_pubrel_for_unknown_id_gets_plain_pubcomp() {
    let (mut s, now) = v311();
    assert_eq!(only_packet(&handle_ok(&mut s, pubrel(9), now)), &pubcomp(9));
}

#[test]
fn mqtt5_3_3_4_receive_maximum_exceeded_0x93() {
    let now = Instant::now();
    let limits = Limits { max_inflight_messages: 2, ..Limits::default() };
    let (mut s, _) = online(&connect_v5("c"), &limits, now);
    for id in 1..=2 {
        handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(id))), now);
    }
    let close = closed_with(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(3))), now);
    assert_eq!(close.reason, ReasonCode::ReceiveMaximumExceeded);
    assert_eq!(close.reason.as_u8(), 0x93);
    assert!(close.send_disconnect && !close.discard_will);

    // A PUBREL frees a slot.
    let (mut s, _) = online(&connect_v5("c"), &limits, now);
    for id in 1..=2 {
        handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(id))), now);
    }
    handle_ok(&mut s, pubrel(1), now);
    handle_ok(&mut s, Packet::Publish(publish("a", b"x", QoS::ExactlyOnce, Some(3))), now);
}

fn aliased(topic_name: &str, alias: u16) -> Packet {
    let mut p = publish(topic_name, b"x", QoS::AtMostOnce, None);
    p.properties.topic_alias = Some(alias);
    Packet::Publish(p)
}

fn routed_topic(out: &Outbox) -> String {
    only_publish_event(out).0.topic.as_str().to_string()
}

#[test]
fn mqtt5_3_3_2_3_4_topic_alias_set_then_used_then_replaced() {
    let (mut s, now) = v5();
    assert_eq!(routed_topic(&handle_ok(&mut s, aliased("a/b", 1), now)), "a/b");
    assert_eq!(routed_topic(&handle_ok(&mut s, aliased("", 1), now)), "a/b");
    // A PUBLISH with both a name and an alias maps the alias anew.
    assert_eq!(routed_topic(&handle_ok(&mut s, aliased("c", 1), now)), "c");
    assert_eq!(routed_topic(&handle_ok(&mut s, aliased("", 1), now)), "c");
    // Forwarded properties never carry the publisher's alias.
    let out = handle_ok(&mut s, aliased("", 1), now);
    assert_eq!(only_publish_event(&out).0.properties.topic_alias, None);
}

#[test]
fn mqtt5_3_3_2_3_4_topic_alias_without_mapping_is_protocol_error() {
    let (mut s, now) = v5();
    let close = closed_with(&mut s, aliased("", 2), now);
    assert_eq!(close.reason, ReasonCode::ProtocolError);
    assert!(close.send_disconnect);
}

#[test]
fn mqtt5_3_3_2_3_4_topic_alias_zero_is_0x94() {
    let (mut s, now) = v5();
    assert_eq!(closed_with(&mut s, aliased("a", 0), now).reason, ReasonCode::TopicAliasInvalid);
}

#[test]
fn mqtt5_3_3_2_3_4_topic_alias_above_maximum_is_0x94() {
    let now = Instant::now();
    let limits = Limits { max_topic_aliases: 4, ..Limits::default() };
    let (mut s, _) = online(&connect_v5("c"), &limits, now);
    handle_ok(&mut s, aliased("a", 4), now);
    let close = closed_with(&mut s, aliased("a", 5), now);
    assert_eq!(close.reason, ReasonCode::TopicAliasInvalid);
    assert_eq!(close.reason.as_u8(), 0x94);
}

#[test]
fn mqtt5_3_3_2_3_4_topic_alias_mappings_end_with_the_connection() {
    let now = Instant::now();
    let c = connect_v5_persistent("c", 3600);
    let (mut s, n) = online(&c, &Limits::default(), now);
    handle_ok(&mut s, aliased("a", 1), now);
    s.detach(now, false);
    s.attach(&n, now, &mut Outbox::default());
    assert_eq!(closed_with(&mut s, aliased("", 1), now).reason, ReasonCode::ProtocolError);
}

#[test]
fn mqtt5_3_3_2_3_2_payload_format_1_with_invalid_utf8_refused_0x99() {
    let (mut s, now) = v5();
    let bad = |qos, id| {
        let mut p = publish("a", b"\xff\xfe", qos, id);
        p.properties.payload_format_indicator = Some(1);
        Packet::Publish(p)
    };
    let out = handle_ok(&mut s, bad(QoS::AtLeastOnce, Some(1)), now);
    assert!(out.events.is_empty(), "an invalid payload is not routed");
    assert_eq!(only_packet(&out), &Packet::PubAck(resp(1, ReasonCode::PayloadFormatInvalid)));

    let out = handle_ok(&mut s, bad(QoS::ExactlyOnce, Some(2)), now);
    assert!(out.events.is_empty());
    assert_eq!(only_packet(&out), &Packet::PubRec(resp(2, ReasonCode::PayloadFormatInvalid)));
    // A PUBREC >= 0x80 ends the QoS 2 exchange: the id is free and a new message on it is routed.
    let out = handle_ok(&mut s, Packet::Publish(publish("a", b"ok", QoS::ExactlyOnce, Some(2))), now);
    assert_eq!(out.events.len(), 1);
}

#[test]
fn mqtt5_3_3_2_3_2_qos0_payload_format_1_with_invalid_utf8_closes_with_0x99() {
    let (mut s, now) = v5();
    let mut p = publish("a", b"\xff\xfe", QoS::AtMostOnce, None);
    p.properties.payload_format_indicator = Some(1);
    let mut out = Outbox::default();
    let close = s.handle(Packet::Publish(p), now, &mut out).unwrap_err();
    assert_eq!(close.reason, ReasonCode::PayloadFormatInvalid);
    assert!(close.send_disconnect);
    assert!(out.events.is_empty(), "an invalid payload is not routed");
}

#[test]
fn mqtt5_3_3_2_3_2_payload_format_1_with_valid_utf8_is_routed_with_indicator() {
    let (mut s, now) = v5();
    let mut p = publish("a", "héllo".as_bytes(), QoS::AtMostOnce, None);
    p.properties.payload_format_indicator = Some(1);
    let out = handle_ok(&mut s, Packet::Publish(p), now);
    assert_eq!(only_publish_event(&out).0.properties.payload_format_indicator, Some(1));
}

#[test]
fn mqtt5_3_3_2_3_3_message_expiry_interval_becomes_a_deadline() {
    let (mut s, now) = v5();
    let mut p = publish("a", b"x", QoS::AtMostOnce, None);
    p.properties.message_expiry_interval = Some(10);
    let out = handle_ok(&mut s, Packet::Publish(p), now);
    let m = only_publish_event(&out).0;
    assert_eq!(m.expires_at, Some(now + secs(10)));
    assert_eq!(m.properties.message_expiry_interval, None, "expiry travels as the deadline");
}

#[test]
fn mqtt5_3_3_4_topic_over_the_level_limit_is_0x90() {
    let now = Instant::now();
    let limits = Limits { max_topic_levels: 2, ..Limits::default() };
    let (mut s, _) = online(&connect_v5("c"), &limits, now);
    let close = closed_with(&mut s, Packet::Publish(publish("a/b/c", b"x", QoS::AtMostOnce, None)), now);
    assert_eq!(close.reason, ReasonCode::TopicNameInvalid);
}

#[test]
fn mqtt_3_12_4_pingreq_answered_with_pingresp() {
    let (mut s, now) = v5();
    assert_eq!(only_packet(&handle_ok(&mut s, Packet::PingReq, now)), &Packet::PingResp);
}

#[test]
fn mqtt5_3_1_0_second_connect_is_protocol_error() {
    let (mut s, now) = v5();
    let close = closed_with(&mut s, Packet::Connect(connect_v5("c")), now);
    assert_eq!(close.reason, ReasonCode::ProtocolError);
}

#[test]
fn mqtt5_3_14_2_2_2_disconnect_session_expiry_from_zero_to_nonzero_is_protocol_error() {
    let now = Instant::now();
    let (mut s, _) = online(&connect_v5("c"), &Limits::default(), now);
    let d = Disconnect {
        reason: ReasonCode::Success,
        properties: Properties { session_expiry_interval: Some(60), ..Properties::default() },
    };
    let close = closed_with(&mut s, Packet::Disconnect(d), now);
    assert_eq!(close, Close { reason: ReasonCode::ProtocolError, send_disconnect: true, discard_will: false });
    // The session still ends with the connection.
    assert!(s.detach(now, false).1);
}

#[test]
fn mqtt5_3_14_2_2_2_disconnect_sets_new_session_expiry() {
    let now = Instant::now();
    let (mut s, _) = online(&connect_v5_persistent("c", 10), &Limits::default(), now);
    let d = Disconnect {
        reason: ReasonCode::Success,
        properties: Properties { session_expiry_interval: Some(100), ..Properties::default() },
    };
    let close = closed_with(&mut s, Packet::Disconnect(d), now);
    assert_eq!(close, Close { reason: ReasonCode::Success, send_disconnect: false, discard_will: true });
    let (_, ended) = s.detach(now, false);
    assert!(!ended);
    assert_eq!(s.expires_at(), Some(now + secs(100)));

    // And to zero: the session ends with this connection.
    let (mut s, _) = online(&connect_v5_persistent("c", 10), &Limits::default(), now);
    let d = Disconnect {
        reason: ReasonCode::Success,
        properties: Properties { session_expiry_interval: Some(0), ..Properties::default() },
    };
    closed_with(&mut s, Packet::Disconnect(d), now);
    assert!(s.detach(now, false).1);
}

#[test]
fn mqtt5_3_1_2_11_session_expiry_zero_ends_with_connection() {
    let now = Instant::now();
    let (mut s, _) = online(&connect_v5("c"), &Limits::default(), now);
    let (_, ended) = s.detach(now, true);
    assert!(ended);
    assert!(s.is_expired(now));
}

#[test]
fn mqtt5_3_1_2_11_session_expires_after_its_interval_offline() {
    let now = Instant::now();
    let (mut s, n) = online(&connect_v5_persistent("c", 10), &Limits::default(), now);
    assert!(!s.is_expired(now + secs(1000)), "an online session never expires");
    let (_, ended) = s.detach(now, true);
    assert!(!ended);
    assert!(!s.is_expired(now + secs(9)));
    assert!(s.is_expired(now + secs(10)));
    // Reconnecting in time stops the clock.
    s.attach(&n, now + secs(5), &mut Outbox::default());
    assert_eq!(s.expires_at(), None);
    assert!(!s.is_expired(now + secs(20)));
}

#[test]
fn mqtt_3_1_2_4_v311_persistent_session_never_expires() {
    let now = Instant::now();
    let mut c = connect_v311("c");
    c.clean_start = false;
    let (mut s, _) = online(&c, &Limits::default(), now);
    let (_, ended) = s.detach(now, true);
    assert!(!ended);
    assert!(!s.is_expired(now + secs(10 * 365 * 24 * 3600)));
}

#[test]
fn mqtt5_3_4_puback_for_unknown_id_is_ignored() {
    let (mut s, now) = v5();
    let out = handle_ok(&mut s, Packet::PubAck(PubResp::success(pid(42))), now);
    assert!(out.packets.is_empty() && out.events.is_empty());
}

#[test]
fn mqtt5_3_14_2_2_2_disconnect_expiry_judged_by_what_connect_asked_not_the_cap() {
    // The server caps every session to expiry 0; the client asked for 60 s, so setting an
    // expiry on DISCONNECT is allowed (and capped again), not a Protocol Error.
    let limits = Limits { max_session_expiry_secs: 0, ..Limits::default() };
    let c = connect_v5_persistent("capped", 60);
    let (mut s, _) = online(&c, &limits, Instant::now());
    let mut d = Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(30);
    let mut out = Outbox::default();
    let close = s.handle(Packet::Disconnect(d), Instant::now(), &mut out).unwrap_err();
    assert_eq!(close.reason, ReasonCode::Success);
    assert!(!close.send_disconnect);
}
