//! The will: when it is published, discarded, delayed, cancelled, and what it looks like.

mod session_support;

use std::time::Instant;

use bytes::Bytes;
use flux_core::mqtt::{Connect, Disconnect, Packet, Properties, QoS, ReasonCode};
use flux_core::session::{Outbox, Session};
use flux_core::Limits;
use session_support::*;

fn with_will(expiry_secs: u32, delay_secs: Option<u32>) -> Connect {
    let mut c = connect_v5_persistent("c", expiry_secs);
    c.will = Some(will("status/c", b"gone", delay_secs));
    c
}

fn start(c: &Connect, now: Instant) -> (Session, flux_core::session::Negotiated) {
    online(c, &Limits::default(), now)
}

fn disconnect(s: &mut Session, reason: ReasonCode, now: Instant) -> bool {
    let mut out = Outbox::default();
    let close = s.handle(Packet::Disconnect(Disconnect::new(reason)), now, &mut out).expect_err("closes");
    assert!(!close.send_disconnect, "the server does not answer a DISCONNECT");
    !close.discard_will
}

#[test]
fn mqtt5_3_14_4_normal_disconnect_discards_the_will() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(60, None), now);
    let publish_will = disconnect(&mut s, ReasonCode::Success, now);
    assert!(!publish_will);
    let (will, _) = s.detach(now, publish_will);
    assert!(will.is_none());
    assert!(s.pending_will().is_none());
}

#[test]
fn mqtt5_3_14_2_1_disconnect_with_will_message_0x04_publishes_it() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(60, None), now);
    let publish_will = disconnect(&mut s, ReasonCode::DisconnectWithWillMessage, now);
    assert!(publish_will);
    let (will, _) = s.detach(now, publish_will);
    assert_eq!(will.map(|m| m.payload.clone()), Some(Bytes::from_static(b"gone")));
}

#[test]
fn mqtt_3_1_2_8_abnormal_close_publishes_the_will() {
    let now = Instant::now();
    let mut c = with_will(60, None);
    if let Some(w) = &mut c.will {
        w.qos = QoS::ExactlyOnce;
        w.retain = true;
        w.properties.content_type = Some("text/plain".into());
        w.properties.user_properties = vec![("k".into(), "v".into())];
    }
    let (mut s, _) = start(&c, now);
    let (will, ended) = s.detach(now, true);
    assert!(!ended);
    let m = will.expect("will published at once");
    assert_eq!(m.topic.as_str(), "status/c");
    assert_eq!(&m.payload[..], b"gone");
    assert_eq!(m.qos, QoS::ExactlyOnce);
    assert!(m.retain);
    assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(m.properties.user_properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(m.properties.will_delay_interval, None, "the delay is not forwarded");
    // Published once only.
    assert!(s.take_due_will(now + secs(1000)).is_none());
}

#[test]
fn mqtt_3_1_2_8_v311_will_published_on_abnormal_close() {
    let now = Instant::now();
    let mut c = connect_v311("c");
    c.will = Some(will("status/c", b"gone", None));
    let (mut s, _) = start(&c, now);
    let (will, ended) = s.detach(now, true);
    assert!(will.is_some());
    assert!(ended);
}

#[test]
fn mqtt5_3_1_3_2_2_will_delay_makes_a_pending_will_due_later() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(600, Some(30)), now);
    let (will, ended) = s.detach(now, true);
    assert!(will.is_none(), "not published before the delay");
    assert!(!ended);
    assert_eq!(s.pending_will().map(|w| w.publish_at), Some(now + secs(30)));
    assert!(s.take_due_will(now + secs(29)).is_none());
    let m = s.take_due_will(now + secs(30)).expect("due");
    assert_eq!(&m.payload[..], b"gone");
    assert!(s.take_due_will(now + secs(31)).is_none(), "taken once");
}

#[test]
fn mqtt5_3_1_3_2_2_reconnect_before_the_delay_cancels_the_will() {
    let now = Instant::now();
    let c = with_will(600, Some(30));
    let (mut s, _) = start(&c, now);
    s.detach(now, true);
    // The new connection has no will of its own.
    let mut c2 = c.clone();
    c2.will = None;
    let n2 = negotiated(&c2, &Limits::default());
    s.attach(&n2, now + secs(10), &mut Outbox::default());
    assert!(s.pending_will().is_none());
    assert!(s.take_due_will(now + secs(60)).is_none());
    // And that connection closing abnormally publishes nothing: the old will is gone.
    assert!(s.detach(now + secs(61), true).0.is_none());
}

#[test]
fn mqtt5_3_1_3_2_2_will_delay_capped_by_session_expiry() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(10, Some(100)), now);
    s.detach(now, true);
    assert_eq!(s.pending_will().map(|w| w.publish_at), Some(now + secs(10)));
    assert!(s.take_due_will(now + secs(9)).is_none());
    assert!(s.take_due_will(now + secs(10)).is_some());
    assert!(s.is_expired(now + secs(10)));
}

#[test]
fn mqtt5_3_1_3_2_2_session_expiry_zero_publishes_delayed_will_at_once() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(0, Some(100)), now);
    let (will, ended) = s.detach(now, true);
    assert!(will.is_some());
    assert!(ended);
}

#[test]
fn mqtt5_3_1_3_2_2_disconnect_shortening_session_expiry_shortens_will_delay() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(600, Some(100)), now);
    let mut out = Outbox::default();
    let d = Disconnect {
        reason: ReasonCode::DisconnectWithWillMessage,
        properties: Properties { session_expiry_interval: Some(5), ..Properties::default() },
    };
    let close = s.handle(Packet::Disconnect(d), now, &mut out).expect_err("closes");
    s.detach(now, !close.discard_will);
    assert_eq!(s.pending_will().map(|w| w.publish_at), Some(now + secs(5)));
}

#[test]
fn mqtt5_3_1_3_2_4_will_message_expiry_counts_from_when_the_will_is_published() {
    // "sent as the Publication Expiry Interval when the Server publishes the Will Message": with a
    // 60 s delay and a 30 s message expiry the will must still be alive when published.
    let now = Instant::now();
    let mut c = with_will(600, Some(60));
    if let Some(w) = &mut c.will {
        w.properties.message_expiry_interval = Some(30);
    }
    let (mut s, _) = start(&c, now);
    s.detach(now, true);
    let at = now + secs(60);
    let m = s.take_due_will(at).expect("due");
    assert!(!m.is_expired(at), "the will expired before it was published");
    assert_eq!(m.remaining_expiry_secs(at), Some(30));
}

#[test]
fn mqtt5_3_1_3_2_4_immediate_will_message_expiry_counts_from_now() {
    let now = Instant::now();
    let mut c = with_will(600, None);
    if let Some(w) = &mut c.will {
        w.properties.message_expiry_interval = Some(30);
    }
    let (mut s, _) = start(&c, now);
    let m = s.detach(now, true).0.expect("published at once");
    assert_eq!(m.expires_at, Some(now + secs(30)));
}

#[test]
fn mqtt5_3_1_2_5_discarded_session_gives_back_its_pending_will() {
    let now = Instant::now();
    let (mut s, _) = start(&with_will(600, Some(30)), now);
    s.detach(now, true);
    assert!(s.take_pending_will(now + secs(5)).is_some());
    assert!(s.pending_will().is_none());
}

#[test]
fn mqtt5_3_1_3_2_4_will_published_early_counts_its_expiry_from_then() {
    // Will delay 30 s, message expiry 10 s; the session is discarded 5 s after the disconnect, so
    // the will goes out then and must expire 10 s later, not 10 s after the delay would have run.
    let now = Instant::now();
    let mut c = with_will(600, Some(30));
    if let Some(w) = &mut c.will {
        w.properties.message_expiry_interval = Some(10);
    }
    let (mut s, _) = start(&c, now);
    s.detach(now, true);
    let m = s.take_pending_will(now + secs(5)).expect("pending will");
    assert_eq!(m.expires_at, Some(now + secs(15)));
}

#[test]
fn mqtt_3_14_4_v311_disconnect_discards_the_will() {
    let now = Instant::now();
    let mut c = connect_v311("c");
    c.will = Some(will("status/c", b"gone", None));
    let (mut s, _) = start(&c, now);
    let publish_will = disconnect(&mut s, ReasonCode::Success, now);
    assert!(!publish_will);
    assert!(s.detach(now, publish_will).0.is_none());
}
