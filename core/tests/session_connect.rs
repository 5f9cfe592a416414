//! CONNECT negotiation (`negotiate`, `Negotiated::connack`), one test per spec rule.

mod session_support;

use flux_core::mqtt::{Properties, ReasonCode};
use flux_core::session::negotiate;
use flux_core::Limits;
use session_support::*;

#[test]
fn mqtt5_3_1_3_1_empty_client_id_is_assigned_and_sent_in_connack() {
    let limits = Limits::default();
    let n = negotiate(&connect_v5(""), &limits, || "made-up".to_string()).expect("accepted");
    assert_eq!(n.client_id, "made-up");
    assert!(n.assigned_client_id);
    let connack = n.connack(false, &limits);
    assert_eq!(connack.reason, ReasonCode::Success);
    assert_eq!(connack.properties.assigned_client_identifier.as_deref(), Some("made-up"));
}

#[test]
fn mqtt5_3_2_2_3_7_client_chosen_id_is_not_echoed_in_connack() {
    let limits = Limits::default();
    let n = negotiate(&connect_v5("mine"), &limits, || panic!("must not assign an id")).expect("accepted");
    assert_eq!(n.client_id, "mine");
    assert!(!n.assigned_client_id);
    assert_eq!(n.connack(false, &limits).properties.assigned_client_identifier, None);
}

#[test]
fn mqtt5_3_1_3_1_empty_client_id_with_clean_start_0_is_assigned() {
    let mut c = connect_v5("");
    c.clean_start = false;
    let n = negotiate(&c, &Limits::default(), || "x".to_string()).expect("accepted");
    assert_eq!(n.client_id, "x");
}

#[test]
fn mqtt_3_1_3_8_v311_empty_client_id_without_clean_session_refused_0x85() {
    let mut c = connect_v311("");
    c.clean_start = false;
    let err = negotiate(&c, &Limits::default(), || "x".to_string()).expect_err("refused");
    assert_eq!(err, ReasonCode::ClientIdentifierNotValid);
    assert_eq!(err.as_u8(), 0x85);
    // MQTT 3.1.1 3.2.2.3: the 3.1.1 CONNACK says 0x02 Identifier rejected.
    assert_eq!(err.connack_v311(), 2);
}

#[test]
fn mqtt_3_1_3_7_v311_empty_client_id_with_clean_session_gets_an_id_but_no_properties() {
    let limits = Limits::default();
    let n = negotiate(&connect_v311(""), &limits, || "x".to_string()).expect("accepted");
    assert_eq!(n.client_id, "x");
    // 3.1.1 CONNACK has no properties at all.
    assert!(n.connack(false, &limits).properties.is_empty());
}

#[test]
fn mqtt5_3_1_3_1_client_id_longer_than_the_limit_refused_0x85() {
    let limits = Limits { max_client_id_bytes: 4, ..Limits::default() };
    assert_eq!(negotiate(&connect_v5("12345"), &limits, || "x".into()).unwrap_err(), ReasonCode::ClientIdentifierNotValid);
    assert!(negotiate(&connect_v5("1234"), &limits, || "x".into()).is_ok());
}

#[test]
fn mqtt5_4_12_authentication_method_refused_0x8c() {
    let mut c = connect_v5("c");
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let err = negotiate(&c, &Limits::default(), || "x".into()).expect_err("refused");
    assert_eq!(err, ReasonCode::BadAuthenticationMethod);
    assert_eq!(err.as_u8(), 0x8C);
}

#[test]
fn mqtt5_3_1_2_11_absent_session_expiry_means_session_ends_with_connection() {
    let limits = Limits::default();
    let n = negotiated(&connect_v5("c"), &limits);
    assert_eq!(n.session_expiry_secs, 0);
    assert!(!n.expiry_changed);
    assert_eq!(n.connack(false, &limits).properties.session_expiry_interval, None);
}

#[test]
fn mqtt5_3_2_2_3_2_session_expiry_capped_and_connack_says_so() {
    let limits = Limits { max_session_expiry_secs: 100, ..Limits::default() };
    let n = negotiated(&connect_v5_persistent("c", 1000), &limits);
    assert_eq!(n.session_expiry_secs, 100);
    assert!(n.expiry_changed);
    assert_eq!(n.connack(true, &limits).properties.session_expiry_interval, Some(100));

    // Within the limit: granted as asked, and CONNACK does not repeat it.
    let n = negotiated(&connect_v5_persistent("c", 50), &limits);
    assert_eq!(n.session_expiry_secs, 50);
    assert!(!n.expiry_changed);
    assert_eq!(n.connack(true, &limits).properties.session_expiry_interval, None);
}

#[test]
fn mqtt_3_1_2_4_v311_clean_session_0_never_expires_and_1_ends_with_connection() {
    let limits = Limits::default();
    let mut c = connect_v311("c");
    c.clean_start = false;
    assert_eq!(negotiated(&c, &limits).session_expiry_secs, u32::MAX);
    c.clean_start = true;
    assert_eq!(negotiated(&c, &limits).session_expiry_secs, 0);
}

#[test]
fn mqtt5_3_2_2_3_14_keep_alive_above_maximum_capped_and_sent_as_server_keep_alive() {
    let limits = Limits { max_keep_alive_secs: 60, ..Limits::default() };
    let mut c = connect_v5("c");
    c.keep_alive_secs = 120;
    let n = negotiated(&c, &limits);
    assert_eq!(n.keep_alive_secs, 60);
    assert_eq!(n.server_keep_alive, Some(60));
    assert_eq!(n.connack(false, &limits).properties.server_keep_alive, Some(60));
}

#[test]
fn mqtt5_3_2_2_3_14_keep_alive_zero_replaced_by_server_keep_alive_when_limited() {
    let limits = Limits { max_keep_alive_secs: 60, ..Limits::default() };
    let mut c = connect_v5("c");
    c.keep_alive_secs = 0;
    let n = negotiated(&c, &limits);
    assert_eq!((n.keep_alive_secs, n.server_keep_alive), (60, Some(60)));
}

#[test]
fn mqtt5_3_2_2_3_14_keep_alive_within_maximum_kept_without_server_keep_alive() {
    let limits = Limits { max_keep_alive_secs: 60, ..Limits::default() };
    let mut c = connect_v5("c");
    c.keep_alive_secs = 30;
    let n = negotiated(&c, &limits);
    assert_eq!((n.keep_alive_secs, n.server_keep_alive), (30, None));
    assert_eq!(n.connack(false, &limits).properties.server_keep_alive, None);

    // No maximum configured: the client's value, 0 included, is used as is.
    let mut c = connect_v5("c");
    c.keep_alive_secs = 0;
    let n = negotiated(&c, &Limits::default());
    assert_eq!((n.keep_alive_secs, n.server_keep_alive), (0, None));
}

#[test]
fn mqtt_3_1_2_10_v311_has_no_server_keep_alive_property() {
    let limits = Limits { max_keep_alive_secs: 60, ..Limits::default() };
    let mut c = connect_v311("c");
    c.keep_alive_secs = 120;
    let n = negotiated(&c, &limits);
    assert_eq!(n.server_keep_alive, None);
    assert!(n.connack(false, &limits).properties.is_empty());
}

#[test]
fn mqtt5_3_2_2_3_connack_carries_receive_maximum_packet_size_and_topic_alias_maximum() {
    let limits = Limits {
        max_inflight_messages: 10,
        max_packet_size_bytes: 5000,
        max_topic_aliases: 7,
        ..Limits::default()
    };
    let p = negotiated(&connect_v5("c"), &limits).connack(false, &limits).properties;
    assert_eq!(p.receive_maximum, Some(10));
    assert_eq!(p.maximum_packet_size, Some(5000));
    assert_eq!(p.topic_alias_maximum, Some(7));
}

#[test]
fn mqtt5_3_2_2_3_3_connack_receive_maximum_is_never_zero() {
    // MQTT 5 3.2.2.3.3: a Receive Maximum of 0 is a Protocol Error.
    let limits = Limits { max_inflight_messages: 0, ..Limits::default() };
    let p = negotiated(&connect_v5("c"), &limits).connack(false, &limits).properties;
    assert_eq!(p.receive_maximum, Some(1));
}

#[test]
fn mqtt5_3_1_2_11_client_receive_maximum_and_packet_size_are_taken_from_connect() {
    let mut c = connect_v5("c");
    c.properties = Properties { receive_maximum: Some(3), maximum_packet_size: Some(200), ..Properties::default() };
    let n = negotiated(&c, &Limits::default());
    assert_eq!(n.client_receive_maximum, 3);
    assert_eq!(n.client_maximum_packet_size, Some(200));

    // Absent: 65535 and no limit (MQTT 5 3.1.2.11.3, 3.1.2.11.4).
    let n = negotiated(&connect_v5("c"), &Limits::default());
    assert_eq!(n.client_receive_maximum, u16::MAX);
    assert_eq!(n.client_maximum_packet_size, None);
}

#[test]
fn mqtt5_3_1_3_3_will_topic_over_the_limit_refused_0x90() {
    let limits = Limits { max_topic_levels: 2, ..Limits::default() };
    let mut c = connect_v5("c");
    c.will = Some(will("a/b/c", b"bye", None));
    assert_eq!(negotiate(&c, &limits, || "x".into()).unwrap_err(), ReasonCode::TopicNameInvalid);
    c.will = Some(will("a/b", b"bye", None));
    assert!(negotiate(&c, &limits, || "x".into()).is_ok());
}
