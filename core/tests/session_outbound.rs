//! Messages from the server to the client: the inflight window, the bounded queue, QoS 1/2
//! acknowledgement flows, message expiry, Maximum Packet Size, resume after reconnect, and shared
//! subscription hand-off.

mod session_support;

use std::time::Instant;

use flux_core::mqtt::{Packet, Properties, PubResp, QoS, ReasonCode};
use flux_core::session::{DeliverOutcome, DropReason, Outbox, Session};
use flux_core::Limits;
use session_support::*;

/// A persistent v5 session with client Receive Maximum `receive_max`, online at `now`.
fn with_window(receive_max: u16, limits: &Limits, now: Instant) -> (Session, flux_core::session::Negotiated) {
    let mut c = connect_v5_persistent("c", 3600);
    c.properties.receive_maximum = Some(receive_max);
    online(&c, limits, now)
}

fn deliver_all(s: &mut Session, names: &[&str], qos: QoS, now: Instant, out: &mut Outbox) -> Vec<DeliverOutcome> {
    names.iter().map(|n| s.deliver(msg(n, qos), now, out)).collect()
}

fn id_of(out: &Outbox, payload: &str) -> u16 {
    publishes(out)
        .iter()
        .find(|p| &p.payload[..] == payload.as_bytes())
        .and_then(|p| p.packet_id)
        .unwrap_or_else(|| panic!("no PUBLISH of {payload} in {out:?}"))
        .get()
}

#[test]
fn mqtt5_4_9_outbound_window_is_client_receive_maximum_when_smaller() {
    let now = Instant::now();
    let limits = Limits { max_inflight_messages: 5, ..Limits::default() };
    let (mut s, _) = with_window(3, &limits, now);
    let mut out = Outbox::default();
    let outcomes = deliver_all(&mut s, &["1", "2", "3", "4"], QoS::AtLeastOnce, now, &mut out);
    use DeliverOutcome::*;
    assert_eq!(outcomes, vec![Sent, Sent, Sent, Queued]);
    assert_eq!(payloads(&out), vec!["1", "2", "3"]);
    assert_eq!((s.inflight_len(), s.queued_len()), (3, 1));
}

#[test]
fn mqtt5_4_9_outbound_window_is_server_inflight_limit_when_smaller() {
    let now = Instant::now();
    let limits = Limits { max_inflight_messages: 2, ..Limits::default() };
    let (mut s, _) = with_window(10, &limits, now);
    let mut out = Outbox::default();
    let outcomes = deliver_all(&mut s, &["1", "2", "3"], QoS::ExactlyOnce, now, &mut out);
    assert_eq!(outcomes, vec![DeliverOutcome::Sent, DeliverOutcome::Sent, DeliverOutcome::Queued]);
    assert_eq!(payloads(&out), vec!["1", "2"]);
}

#[test]
fn mqtt5_4_9_qos0_is_not_held_by_the_window() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    assert_eq!(s.deliver(msg("q1", QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Sent);
    assert_eq!(s.deliver(msg("q0", QoS::AtMostOnce), now, &mut out), DeliverOutcome::Sent);
    let p = publishes(&out);
    assert_eq!(p[1].qos, QoS::AtMostOnce);
    assert_eq!(p[1].packet_id, None);
    assert_eq!(s.inflight_len(), 1);
}

#[test]
fn mqtt_4_3_2_first_transmission_has_dup_0_and_distinct_packet_ids() {
    let now = Instant::now();
    let (mut s, _) = with_window(10, &Limits::default(), now);
    let mut out = Outbox::default();
    deliver_all(&mut s, &["a", "b", "c"], QoS::AtLeastOnce, now, &mut out);
    let p = publishes(&out);
    assert!(p.iter().all(|p| !p.dup));
    let mut ids: Vec<u16> = p.iter().map(|p| p.packet_id.expect("QoS 1 has an id").get()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
}

#[test]
fn limits_queue_full_drops_and_counts() {
    let now = Instant::now();
    let limits = Limits { max_queued_messages: 2, ..Limits::default() };
    let (mut s, _) = with_window(1, &limits, now);
    let mut out = Outbox::default();
    let outcomes = deliver_all(&mut s, &["1", "2", "3", "4", "5"], QoS::AtLeastOnce, now, &mut out);
    use DeliverOutcome::*;
    assert_eq!(
        outcomes,
        vec![Sent, Queued, Queued, Dropped(DropReason::QueueFull), Dropped(DropReason::QueueFull)]
    );
    assert_eq!(s.stats.dropped_queue_full, 2);
    assert_eq!(s.queued_len(), 2);
}

#[test]
fn mqtt_4_6_0_puback_frees_the_window_and_pumps_the_queue_in_order() {
    let now = Instant::now();
    let (mut s, _) = with_window(2, &Limits::default(), now);
    let mut out = Outbox::default();
    deliver_all(&mut s, &["1", "2", "3", "4", "5"], QoS::AtLeastOnce, now, &mut out);
    let (id1, id2) = (id_of(&out, "1"), id_of(&out, "2"));
    // Acknowledge out of order: the freed slot still goes to the oldest queued message.
    let out2 = handle_ok(&mut s, puback(id2), now);
    assert_eq!(payloads(&out2), vec!["3"]);
    let out1 = handle_ok(&mut s, puback(id1), now);
    assert_eq!(payloads(&out1), vec!["4"]);
    let out3 = handle_ok(&mut s, puback(id_of(&out2, "3")), now);
    assert_eq!(payloads(&out3), vec!["5"]);
    assert_eq!(s.queued_len(), 0);
}

#[test]
fn mqtt_4_3_3_outbound_qos2_pubrec_pubrel_pubcomp() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    deliver_all(&mut s, &["a", "b"], QoS::ExactlyOnce, now, &mut out);
    let id = id_of(&out, "a");
    assert_eq!(publishes(&out)[0].qos, QoS::ExactlyOnce);

    let out = handle_ok(&mut s, pubrec(id), now);
    assert_eq!(out.packets, vec![pubrel(id)], "PUBREL, and the window stays held until PUBCOMP");
    assert_eq!(s.inflight_len(), 1);
    // A repeated PUBREC (our PUBREL was lost) is answered with PUBREL again.
    assert_eq!(handle_ok(&mut s, pubrec(id), now).packets, vec![pubrel(id)]);
    // A PUBACK does not end a QoS 2 exchange.
    assert!(handle_ok(&mut s, puback(id), now).packets.is_empty());
    assert_eq!(s.inflight_len(), 1);

    let out = handle_ok(&mut s, pubcomp(id), now);
    assert_eq!(payloads(&out), vec!["b"]);
    // PUBCOMP again is a stale duplicate: nothing happens.
    let out = handle_ok(&mut s, pubcomp(id), now);
    assert!(out.packets.is_empty());
    assert_eq!(s.inflight_len(), 1);
}

#[test]
fn mqtt5_4_3_3_pubrec_with_error_code_ends_the_exchange() {
    let now = Instant::now();
    let (mut s, n) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    deliver_all(&mut s, &["a", "b"], QoS::ExactlyOnce, now, &mut out);
    let id = id_of(&out, "a");
    let out = handle_ok(&mut s, Packet::PubRec(resp(id, ReasonCode::QuotaExceeded)), now);
    // No PUBREL; the window slot goes to the next message.
    assert_eq!(payloads(&out), vec!["b"]);
    assert!(!out.packets.iter().any(|p| matches!(p, Packet::PubRel(_))));
    // "a" is never sent again, not even on resume.
    s.detach(now, false);
    let mut out = Outbox::default();
    s.attach(&n, now, &mut out);
    assert_eq!(payloads(&out), vec!["b"]);
}

#[test]
fn mqtt5_4_3_3_pubrec_for_unknown_id_gets_pubrel_0x92() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let out = handle_ok(&mut s, pubrec(77), now);
    assert_eq!(out.packets, vec![Packet::PubRel(resp(77, ReasonCode::PacketIdentifierNotFound))]);
}

#[test]
fn mqtt5_4_3_3_pubrec_with_error_for_unknown_id_gets_no_pubrel() {
    // MQTT 5 4.3.3: PUBREL answers only a PUBREC whose reason code is below 0x80.
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let out = handle_ok(&mut s, Packet::PubRec(resp(77, ReasonCode::UnspecifiedError)), now);
    assert!(out.packets.is_empty(), "{:?}", out.packets);
}

#[test]
fn mqtt_4_3_2_puback_for_a_qos2_id_or_pubcomp_before_pubrec_changes_nothing() {
    let now = Instant::now();
    let (mut s, _) = with_window(5, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("a", QoS::ExactlyOnce), now, &mut out);
    let id = id_of(&out, "a");
    handle_ok(&mut s, pubcomp(id), now);
    assert_eq!(s.inflight_len(), 1);
}

#[test]
fn mqtt5_3_3_2_3_3_expired_message_is_not_sent() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    let m = message_expiring("t", b"old", QoS::AtLeastOnce, now);
    assert_eq!(s.deliver(delivery(m, QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Dropped(DropReason::Expired));
    assert!(out.packets.is_empty());
    assert_eq!(s.stats.dropped_expired, 1);
}

#[test]
fn mqtt5_3_3_2_3_3_queued_message_that_expires_is_dropped_when_its_turn_comes() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("first", QoS::AtLeastOnce), now, &mut out);
    let first = id_of(&out, "first");
    let m = message_expiring("t", b"short", QoS::AtLeastOnce, now + secs(5));
    assert_eq!(s.deliver(delivery(m, QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Queued);
    s.deliver(msg("last", QoS::AtLeastOnce), now, &mut out);
    let out = handle_ok(&mut s, puback(first), now + secs(6));
    assert_eq!(payloads(&out), vec!["last"]);
    assert_eq!(s.stats.dropped_expired, 1);
}

#[test]
fn mqtt5_3_3_2_3_3_sent_publish_carries_remaining_expiry() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("first", QoS::AtLeastOnce), now, &mut out);
    let first = id_of(&out, "first");
    let m = message_expiring("t", b"x", QoS::AtLeastOnce, now + secs(10));
    s.deliver(delivery(m, QoS::AtLeastOnce), now, &mut out);
    // Waited 4 s in the queue: 6 s left.
    let out = handle_ok(&mut s, puback(first), now + secs(4));
    assert_eq!(publishes(&out)[0].properties.message_expiry_interval, Some(6));
    // A message without expiry carries none.
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("x", QoS::AtLeastOnce), now, &mut out);
    assert_eq!(publishes(&out)[0].properties.message_expiry_interval, None);
}

#[test]
fn mqtt5_3_3_4_sent_publish_carries_subscription_ids_and_retain_flag() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut d = msg("x", QoS::AtLeastOnce);
    d.subscription_ids = vec![3, 9];
    d.retain = true;
    let mut out = Outbox::default();
    s.deliver(d, now, &mut out);
    let p = publishes(&out)[0];
    assert_eq!(p.properties.subscription_identifiers, vec![3, 9]);
    assert!(p.retain);
}

#[test]
fn mqtt5_3_1_2_25_publish_larger_than_client_maximum_packet_size_is_dropped() {
    let now = Instant::now();
    let mut c = connect_v5_persistent("c", 3600);
    c.properties.maximum_packet_size = Some(64);
    c.properties.receive_maximum = Some(1);
    let (mut s, _) = online(&c, &Limits::default(), now);
    let mut out = Outbox::default();
    let big = delivery(message("t", &[b'x'; 100], QoS::AtLeastOnce), QoS::AtLeastOnce);
    assert_eq!(s.deliver(big.clone(), now, &mut out), DeliverOutcome::Dropped(DropReason::TooLarge));
    let big0 = delivery(message("t", &[b'x'; 100], QoS::AtMostOnce), QoS::AtMostOnce);
    assert_eq!(s.deliver(big0, now, &mut out), DeliverOutcome::Dropped(DropReason::TooLarge));
    assert!(out.packets.is_empty());
    assert_eq!(s.stats.dropped_too_large, 2);
    assert_eq!(s.inflight_len(), 0, "a dropped message holds no window slot");
    // A queued one too large is skipped when its turn comes ("as if delivered").
    s.deliver(msg("small", QoS::AtLeastOnce), now, &mut out);
    let id = id_of(&out, "small");
    assert_eq!(s.deliver(big, now, &mut out), DeliverOutcome::Queued);
    s.deliver(msg("next", QoS::AtLeastOnce), now, &mut out);
    let out = handle_ok(&mut s, puback(id), now);
    assert_eq!(payloads(&out), vec!["next"]);
    assert_eq!(s.stats.dropped_too_large, 3);
}

#[test]
fn mqtt5_3_1_2_25_retransmission_larger_than_new_maximum_packet_size_is_dropped() {
    // The client reconnects announcing a smaller Maximum Packet Size than the unacknowledged
    // message: the server must not send it, and behaves as if it had been delivered.
    let now = Instant::now();
    let c = connect_v5_persistent("c", 3600);
    let (mut s, _) = online(&c, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(delivery(message("t", &[b'x'; 100], QoS::AtLeastOnce), QoS::AtLeastOnce), now, &mut out);
    assert_eq!(s.inflight_len(), 1);
    s.detach(now, false);
    let mut small = c.clone();
    small.properties.maximum_packet_size = Some(64);
    let n = negotiated(&small, &Limits::default());
    let mut out = Outbox::default();
    s.attach(&n, now, &mut out);
    assert!(out.packets.is_empty(), "{:?}", out.packets);
    assert_eq!(s.inflight_len(), 0);
    assert_eq!(s.stats.dropped_too_large, 1);
}

#[test]
fn mqtt5_3_1_2_11_qos0_dropped_while_offline_qos1_queued() {
    let now = Instant::now();
    let (mut s, n) = with_window(10, &Limits::default(), now);
    s.detach(now, false);
    let mut out = Outbox::default();
    assert_eq!(s.deliver(msg("q0", QoS::AtMostOnce), now, &mut out), DeliverOutcome::Dropped(DropReason::Qos0Offline));
    assert_eq!(s.deliver(msg("q1", QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Queued);
    assert_eq!(s.deliver(msg("q2", QoS::ExactlyOnce), now, &mut out), DeliverOutcome::Queued);
    assert!(out.packets.is_empty());
    assert_eq!(s.stats.dropped_qos0_offline, 1);
    let mut out = Outbox::default();
    s.attach(&n, now, &mut out);
    assert_eq!(payloads(&out), vec!["q1", "q2"]);
    assert!(publishes(&out).iter().all(|p| !p.dup), "never sent before: DUP=0");
}

#[test]
fn mqtt_4_4_0_1_resume_retransmits_publish_with_dup_in_order_then_pubrel_then_queue() {
    let now = Instant::now();
    let (mut s, n) = with_window(3, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("a", QoS::AtLeastOnce), now, &mut out);
    s.deliver(msg("b", QoS::ExactlyOnce), now, &mut out);
    s.deliver(msg("c", QoS::ExactlyOnce), now, &mut out);
    s.deliver(msg("d", QoS::AtLeastOnce), now, &mut out);
    let (a, b, c) = (id_of(&out, "a"), id_of(&out, "b"), id_of(&out, "c"));
    assert_eq!(handle_ok(&mut s, pubrec(c), now).packets, vec![pubrel(c)]);
    s.detach(now, true);

    let mut n2 = n.clone();
    n2.client_receive_maximum = 10;
    let mut out = Outbox::default();
    s.attach(&n2, now + secs(1), &mut out);
    let kinds: Vec<(String, u16, bool)> = out
        .packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => {
                (String::from_utf8_lossy(&p.payload).into_owned(), p.packet_id.map_or(0, |i| i.get()), p.dup)
            }
            Packet::PubRel(r) => ("PUBREL".to_string(), r.packet_id.get(), false),
            p => panic!("unexpected {p:?}"),
        })
        .collect();
    assert_eq!(
        kinds[..3],
        [("a".to_string(), a, true), ("b".to_string(), b, true), ("PUBREL".to_string(), c, false)]
    );
    assert_eq!(kinds[3].0, "d");
    assert!(!kinds[3].2, "first transmission of d: DUP=0");
    assert_eq!(kinds.len(), 4);
    // The resumed flows complete normally.
    handle_ok(&mut s, puback(a), now);
    handle_ok(&mut s, pubrec(b), now);
    handle_ok(&mut s, pubcomp(b), now);
    handle_ok(&mut s, pubcomp(c), now);
    handle_ok(&mut s, puback(kinds[3].1), now);
    assert_eq!((s.inflight_len(), s.queued_len()), (0, 0));
}

#[test]
fn mqtt_4_4_0_1_resume_with_smaller_receive_maximum_retransmits_all_but_sends_nothing_new() {
    let now = Instant::now();
    let (mut s, n) = with_window(3, &Limits::default(), now);
    let mut out = Outbox::default();
    deliver_all(&mut s, &["a", "b", "c", "d"], QoS::AtLeastOnce, now, &mut out);
    let a = id_of(&out, "a");
    s.detach(now, false);
    let mut n1 = n.clone();
    n1.client_receive_maximum = 1;
    let mut out = Outbox::default();
    s.attach(&n1, now, &mut out);
    assert_eq!(payloads(&out), vec!["a", "b", "c"]);
    // Two acks still leave the window (1) full.
    let out = handle_ok(&mut s, puback(a), now);
    assert!(out.packets.is_empty());
}

#[test]
fn mqtt_4_3_2_acknowledged_message_is_not_retransmitted_on_resume() {
    let now = Instant::now();
    let (mut s, n) = with_window(5, &Limits::default(), now);
    let mut out = Outbox::default();
    deliver_all(&mut s, &["a", "b"], QoS::AtLeastOnce, now, &mut out);
    handle_ok(&mut s, puback(id_of(&out, "a")), now);
    s.detach(now, false);
    let mut out = Outbox::default();
    s.attach(&n, now, &mut out);
    assert_eq!(payloads(&out), vec!["b"]);
}

#[test]
fn mqtt5_4_8_2_take_shared_undelivered_returns_unacked_qos1_and_queued_shared_messages() {
    let now = Instant::now();
    let (mut s, _) = with_window(2, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(shared(msg("s1", QoS::AtLeastOnce)), now, &mut out);
    s.deliver(msg("p1", QoS::AtLeastOnce), now, &mut out);
    s.deliver(shared(msg("s2", QoS::AtLeastOnce)), now, &mut out);
    s.deliver(msg("p2", QoS::AtLeastOnce), now, &mut out);
    s.detach(now, false);
    let taken: Vec<String> =
        s.take_shared_undelivered().iter().map(|d| String::from_utf8_lossy(&d.message.payload).into_owned()).collect();
    assert_eq!(taken, vec!["s1", "s2"]);
    assert_eq!((s.inflight_len(), s.queued_len()), (1, 1));
    assert!(s.take_shared_undelivered().is_empty());
}

#[test]
fn mqtt5_4_8_2_4_shared_qos2_in_flight_stays_with_its_session() {
    // MQTT-4.8.2-4/-5: a QoS 2 message the server started sending is completed with that client
    // when it reconnects, and never sent to another member of the group.
    let now = Instant::now();
    let (mut s, n) = with_window(5, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(shared(msg("rec", QoS::ExactlyOnce)), now, &mut out);
    s.deliver(shared(msg("comp", QoS::ExactlyOnce)), now, &mut out);
    handle_ok(&mut s, pubrec(id_of(&out, "comp")), now);
    s.detach(now, false);
    assert!(s.take_shared_undelivered().is_empty());
    let mut out = Outbox::default();
    s.attach(&n, now, &mut out);
    assert_eq!(payloads(&out), vec!["rec"]);
    assert!(publishes(&out)[0].dup);
    assert!(matches!(out.packets[1], Packet::PubRel(_)));
}

#[test]
fn mqtt5_4_8_2_queued_shared_qos2_not_yet_sent_may_move() {
    let now = Instant::now();
    let (mut s, _) = with_window(1, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("p", QoS::AtLeastOnce), now, &mut out);
    s.deliver(shared(msg("s", QoS::ExactlyOnce)), now, &mut out);
    s.detach(now, false);
    let taken = s.take_shared_undelivered();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].qos, QoS::ExactlyOnce);
}

#[test]
fn mqtt_2_2_1_packet_ids_wrap_and_skip_ids_in_use() {
    let now = Instant::now();
    let (mut s, _) = with_window(2, &Limits::default(), now);
    let mut out = Outbox::default();
    s.deliver(msg("held", QoS::AtLeastOnce), now, &mut out);
    let held = id_of(&out, "held");
    // Cycle the other slot through the whole id space and a bit more.
    for i in 0..70_000u32 {
        let mut out = Outbox::default();
        s.deliver(msg(&i.to_string(), QoS::AtLeastOnce), now, &mut out);
        let id = publishes(&out)[0].packet_id.expect("id").get();
        assert_ne!(id, held, "an id in use must not be reused");
        handle_ok(&mut s, Packet::PubAck(PubResp { packet_id: pid(id), reason: ReasonCode::Success, properties: Properties::default() }), now);
    }
}

#[test]
fn flux_limits_queue_bounded_in_bytes_too() {
    // 10-byte payloads, room for 25 bytes: two queue, the third is dropped and counted; once the
    // window drains the queue, bytes are given back and queueing resumes.
    let limits = Limits { max_queued_bytes: 25, max_inflight_messages: 1, ..Limits::default() };
    let c = connect_v5("bytes");
    let (mut s, _) = online(&c, &limits, Instant::now());
    let now = Instant::now();
    let mut out = Outbox::default();
    let payload = "0123456789";
    assert_eq!(s.deliver(msg(payload, QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Sent);
    assert_eq!(s.deliver(msg(payload, QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Queued);
    assert_eq!(s.deliver(msg(payload, QoS::AtLeastOnce), now, &mut out), DeliverOutcome::Queued);
    assert_eq!(s.queued_bytes(), 20);
    assert_eq!(
        s.deliver(msg(payload, QoS::AtLeastOnce), now, &mut out),
        DeliverOutcome::Dropped(DropReason::QueueFull)
    );
    assert_eq!(s.stats.dropped_queue_full, 1);
    // PUBACK of the inflight message lets one queued message out and frees its bytes.
    let first = out.packets.iter().find_map(|p| match p {
        Packet::Publish(p) => p.packet_id,
        _ => None,
    });
    let mut out2 = Outbox::default();
    s.handle(Packet::PubAck(PubResp::success(first.unwrap())), now, &mut out2).unwrap();
    assert_eq!(s.queued_bytes(), 10);
    assert_eq!(s.deliver(msg(payload, QoS::AtLeastOnce), now, &mut out2), DeliverOutcome::Queued);
}
