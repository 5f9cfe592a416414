//! SUBSCRIBE and UNSUBSCRIBE: per-filter reason codes, quotas, re-subscription, shared
//! subscriptions, and the events the runtime acts on.

mod session_support;

use std::time::Instant;

use flux_core::mqtt::{
    Packet, Properties, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use flux_core::session::{Event, Outbox, Session, Subscribed};
use flux_core::topic::SubscriptionFilter;
use flux_core::Limits;
use session_support::*;

fn subscribe(filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        properties: Properties::default(),
        filters: filters.iter().map(|(f, q)| (f.to_string(), SubscriptionOptions::qos(*q))).collect(),
    })
}

fn subscribed(out: &Outbox) -> (&[Subscribed], &SubAck) {
    assert!(out.packets.is_empty(), "SUBACK waits for the route tables: {:?}", out.packets);
    assert_eq!(out.events.len(), 1);
    match &out.events[0] {
        Event::Subscribe { added, suback } => (added, suback),
        e => panic!("expected a Subscribe event, got {e:?}"),
    }
}

fn session(c: flux_core::mqtt::Connect, limits: &Limits) -> (Session, Instant) {
    let now = Instant::now();
    (online(&c, limits, now).0, now)
}

#[test]
fn mqtt5_3_9_3_granted_qos_per_filter() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let out = handle_ok(&mut s, subscribe(&[("a", QoS::AtMostOnce), ("b/+", QoS::AtLeastOnce), ("c/#", QoS::ExactlyOnce)]), now);
    let (added, suback) = subscribed(&out);
    assert_eq!(suback.packet_id, pid(1));
    assert_eq!(suback.reasons, vec![ReasonCode::Success, ReasonCode::GrantedQoS1, ReasonCode::GrantedQoS2]);
    assert_eq!(added.len(), 3);
    assert!(added.iter().all(|a| !a.existed));
    assert_eq!(s.subscriptions().count(), 3);
}

#[test]
fn mqtt5_3_9_3_invalid_filter_gets_0x8f_and_others_still_granted() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let out = handle_ok(&mut s, subscribe(&[("a/#/b", QoS::AtLeastOnce), ("ok", QoS::AtLeastOnce), ("a+", QoS::AtMostOnce)]), now);
    let (added, suback) = subscribed(&out);
    assert_eq!(suback.reasons, vec![ReasonCode::TopicFilterInvalid, ReasonCode::GrantedQoS1, ReasonCode::TopicFilterInvalid]);
    assert_eq!(suback.reasons[0].as_u8(), 0x8F);
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].subscription.filter.to_string(), "ok");
}

#[test]
fn mqtt_3_9_3_v311_invalid_filter_gets_failure_0x80() {
    let (mut s, now) = session(connect_v311("c"), &Limits::default());
    let out = handle_ok(&mut s, subscribe(&[("a/#/b", QoS::AtLeastOnce), ("ok", QoS::ExactlyOnce)]), now);
    let (_, suback) = subscribed(&out);
    assert_eq!(suback.reasons, vec![ReasonCode::UnspecifiedError, ReasonCode::GrantedQoS2]);
    assert_eq!(suback.reasons[0].as_u8(), 0x80);
}

#[test]
fn mqtt5_3_9_3_filter_over_the_level_limit_gets_0x8f() {
    let limits = Limits { max_topic_levels: 2, ..Limits::default() };
    let (mut s, now) = session(connect_v5("c"), &limits);
    let out = handle_ok(&mut s, subscribe(&[("a/b/c", QoS::AtMostOnce), ("$share/g/a/b/c", QoS::AtMostOnce)]), now);
    assert_eq!(subscribed(&out).1.reasons, vec![ReasonCode::TopicFilterInvalid; 2]);
}

#[test]
fn mqtt5_3_9_3_subscriptions_over_the_quota_get_0x97() {
    let limits = Limits { max_subscriptions_per_session: 2, ..Limits::default() };
    let (mut s, now) = session(connect_v5("c"), &limits);
    let out = handle_ok(&mut s, subscribe(&[("a", QoS::AtMostOnce), ("b", QoS::AtMostOnce), ("c", QoS::AtMostOnce)]), now);
    let (added, suback) = subscribed(&out);
    assert_eq!(suback.reasons, vec![ReasonCode::Success, ReasonCode::Success, ReasonCode::QuotaExceeded]);
    assert_eq!(suback.reasons[2].as_u8(), 0x97);
    assert_eq!(added.len(), 2);
    // Replacing an existing subscription at the quota is fine.
    let out = handle_ok(&mut s, subscribe(&[("a", QoS::AtLeastOnce)]), now);
    assert_eq!(subscribed(&out).1.reasons, vec![ReasonCode::GrantedQoS1]);

    // 3.1.1 has only one failure code.
    let (mut s, now) = session(connect_v311("c"), &limits);
    let out = handle_ok(&mut s, subscribe(&[("a", QoS::AtMostOnce), ("b", QoS::AtMostOnce), ("c", QoS::AtMostOnce)]), now);
    assert_eq!(subscribed(&out).1.reasons[2], ReasonCode::UnspecifiedError);
}

#[test]
fn mqtt5_3_8_4_resubscribe_replaces_options_and_says_it_existed() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    handle_ok(&mut s, subscribe(&[("a/+", QoS::AtMostOnce)]), now);
    let out = handle_ok(&mut s, subscribe(&[("a/+", QoS::ExactlyOnce)]), now);
    let (added, _) = subscribed(&out);
    assert!(added[0].existed);
    assert_eq!(s.subscriptions().count(), 1);
    assert_eq!(s.subscription("a/+").map(|x| x.options.qos), Some(QoS::ExactlyOnce));
}

#[test]
fn mqtt5_3_8_2_1_2_subscription_identifier_kept_with_the_subscription() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let mut p = Subscribe {
        packet_id: pid(2),
        properties: Properties { subscription_identifiers: vec![42], ..Properties::default() },
        filters: vec![("a".to_string(), SubscriptionOptions::qos(QoS::AtMostOnce))],
    };
    handle_ok(&mut s, Packet::Subscribe(p.clone()), now);
    assert_eq!(s.subscription("a").and_then(|x| x.id), Some(42));
    // Re-subscribing without an identifier removes it (MQTT 5 3.8.4: the subscription is replaced).
    p.properties.subscription_identifiers.clear();
    handle_ok(&mut s, Packet::Subscribe(p), now);
    assert_eq!(s.subscription("a").and_then(|x| x.id), None);
}

#[test]
fn mqtt5_4_8_2_shared_subscription_is_parsed_into_group_and_filter() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let out = handle_ok(&mut s, subscribe(&[("$share/g1/a/+", QoS::AtLeastOnce), ("a/+", QoS::AtMostOnce)]), now);
    let (added, suback) = subscribed(&out);
    assert_eq!(suback.reasons, vec![ReasonCode::GrantedQoS1, ReasonCode::Success]);
    let shared = &added[0].subscription.filter;
    assert_eq!(shared.group(), Some("g1"));
    assert_eq!(shared.filter().as_str(), "a/+");
    assert!(matches!(added[1].subscription.filter, SubscriptionFilter::Plain(_)));
    // The shared and the plain subscription of the same filter are two subscriptions.
    assert_eq!(s.subscriptions().count(), 2);
    assert!(s.subscription("$share/g1/a/+").is_some());
}

#[test]
fn mqtt5_4_8_2_malformed_shared_subscription_gets_0x8f() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let out = handle_ok(&mut s, subscribe(&[("$share/g", QoS::AtMostOnce), ("$share/g+/a", QoS::AtMostOnce), ("$share//a", QoS::AtMostOnce)]), now);
    assert_eq!(subscribed(&out).1.reasons, vec![ReasonCode::TopicFilterInvalid; 3]);
}

#[test]
fn mqtt5_3_8_3_1_no_local_on_shared_subscription_is_protocol_error() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let mut options = SubscriptionOptions::qos(QoS::AtMostOnce);
    options.no_local = true;
    let p = Subscribe { packet_id: pid(1), properties: Properties::default(), filters: vec![("$share/g/a".into(), options)] };
    let mut out = Outbox::default();
    let close = s.handle(Packet::Subscribe(p), now, &mut out).expect_err("closes");
    assert_eq!(close.reason, ReasonCode::ProtocolError);
}

fn unsubscribe(filters: &[&str]) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        packet_id: pid(3),
        properties: Properties::default(),
        filters: filters.iter().map(|f| f.to_string()).collect(),
    })
}

#[test]
fn mqtt5_3_11_3_unsuback_0x11_for_a_filter_not_subscribed() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    handle_ok(&mut s, subscribe(&[("a", QoS::AtMostOnce), ("$share/g/b", QoS::AtMostOnce)]), now);
    let out = handle_ok(&mut s, unsubscribe(&["a", "nope", "$share/g/b"]), now);
    assert_eq!(
        out.packets,
        vec![Packet::UnsubAck(UnsubAck {
            packet_id: pid(3),
            properties: Properties::default(),
            reasons: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted, ReasonCode::Success],
        })]
    );
    match &out.events[..] {
        [Event::Unsubscribe { removed }] => {
            let texts: Vec<String> = removed.iter().map(|f| f.to_string()).collect();
            assert_eq!(texts, vec!["a".to_string(), "$share/g/b".to_string()]);
        }
        e => panic!("expected one Unsubscribe event, got {e:?}"),
    }
    assert_eq!(s.subscriptions().count(), 0);
}

#[test]
fn mqtt5_3_11_3_unsubscribe_of_nothing_has_no_event() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    let out = handle_ok(&mut s, unsubscribe(&["x"]), now);
    assert!(out.events.is_empty());
}

#[test]
fn mqtt_3_11_v311_unsuback_has_no_reason_codes() {
    let (mut s, now) = session(connect_v311("c"), &Limits::default());
    handle_ok(&mut s, subscribe(&[("a", QoS::AtMostOnce)]), now);
    let out = handle_ok(&mut s, unsubscribe(&["a", "nope"]), now);
    match only_packet(&out) {
        Packet::UnsubAck(u) => assert!(u.reasons.is_empty()),
        p => panic!("expected UNSUBACK, got {p:?}"),
    }
    assert_eq!(out.events.len(), 1);
}

#[test]
fn mqtt5_3_1_2_4_discarded_session_gives_back_every_subscription() {
    let (mut s, now) = session(connect_v5("c"), &Limits::default());
    handle_ok(&mut s, subscribe(&[("a", QoS::AtMostOnce), ("$share/g/b", QoS::AtMostOnce)]), now);
    let mut taken: Vec<String> = s.take_subscriptions().iter().map(|f| f.to_string()).collect();
    taken.sort();
    assert_eq!(taken, vec!["$share/g/b".to_string(), "a".to_string()]);
    assert_eq!(s.subscriptions().count(), 0);
}
