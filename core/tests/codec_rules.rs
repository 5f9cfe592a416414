//! One test per validation rule of the decoder, each checking the exact [`DecodeError`] variant
//! (and so the reason code the connection is closed with).

use bytes::{Bytes, BytesMut};
use flux_core::mqtt::*;

use ProtocolVersion::{V311, V5};

// ---- helpers: build frames by hand -------------------------------------------------------------

fn varint(mut v: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            return out;
        }
    }
}

/// A frame: first byte, remaining length, body.
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    [&[first][..], &varint(body.len()), body].concat()
}

/// A length-prefixed string/binary field.
fn s(x: &[u8]) -> Vec<u8> {
    [&(x.len() as u16).to_be_bytes()[..], x].concat()
}

/// A property block: property length then the properties.
fn props(p: &[u8]) -> Vec<u8> {
    [&varint(p.len())[..], p].concat()
}

/// CONNECT with protocol "MQTT", `level`, `flags`, keep alive 0, properties when level 5, then
/// `payload`.
fn connect(level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = s(b"MQTT");
    body.extend_from_slice(&[level, flags, 0, 0]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    pkt(0x10, &body)
}

fn err(version: Option<ProtocolVersion>, frame: &[u8]) -> DecodeError {
    match decode_packet(Bytes::copy_from_slice(frame), version) {
        Ok(p) => panic!("decoded {p:?}, expected an error"),
        Err(e) => e,
    }
}

fn ok(version: Option<ProtocolVersion>, frame: &[u8]) -> Packet {
    decode_packet(Bytes::copy_from_slice(frame), version)
        .unwrap_or_else(|e| panic!("expected a packet, got {e}"))
}

fn is_malformed(e: DecodeError) -> bool {
    matches!(e, DecodeError::Malformed(_))
}

fn is_protocol(e: DecodeError) -> bool {
    matches!(e, DecodeError::Protocol(_))
}

/// A PUBLISH QoS 0 to "t" with the given MQTT 5 property bytes.
fn publish_v5_with(p: &[u8]) -> Vec<u8> {
    pkt(0x30, &[s(b"t"), props(p), b"x".to_vec()].concat())
}

// ---- fixed header (MQTT 2.1) -------------------------------------------------------------------

#[test]
fn mqtt_2_1_2_packet_type_0_is_malformed() {
    assert!(is_malformed(err(Some(V311), &[0x00, 0x00])));
    assert!(is_malformed(err(Some(V5), &[0x00, 0x00])));
}

#[test]
fn mqtt311_2_1_2_auth_packet_is_malformed() {
    assert!(is_malformed(err(Some(V311), &[0xF0, 0x00])));
    // With no version known, non-CONNECT packets are read as 3.1.1.
    assert!(is_malformed(err(None, &[0xF0, 0x00])));
    assert!(
        ok(Some(V5), &[0xF0, 0x00])
            == Packet::Auth(Auth { reason: ReasonCode::Success, properties: Default::default() })
    );
}

#[test]
fn mqtt_2_1_3_1_pubrel_subscribe_unsubscribe_flags_must_be_0010() {
    for v in [V311, V5] {
        for bad in [0x60, 0x61, 0x63, 0x6A] {
            assert!(is_malformed(err(Some(v), &[bad, 0x02, 0x00, 0x01])), "{bad:#x}");
        }
        let sub_body = [&[0x00, 0x01][..], &props(&[])[..], &s(b"a"), &[0x00]].concat();
        let sub_body =
            if v == V5 { sub_body } else { [&[0x00, 0x01][..], &s(b"a"), &[0]].concat() };
        assert!(is_malformed(err(Some(v), &pkt(0x80, &sub_body))));
        assert!(is_malformed(err(Some(v), &pkt(0x83, &sub_body))));
        assert!(matches!(ok(Some(v), &pkt(0x82, &sub_body)), Packet::Subscribe(_)));
        let unsub_body = if v == V5 {
            [&[0x00, 0x01][..], &props(&[]), &s(b"a")].concat()
        } else {
            [&[0x00, 0x01][..], &s(b"a")].concat()
        };
        assert!(is_malformed(err(Some(v), &pkt(0xA0, &unsub_body))));
        assert!(matches!(ok(Some(v), &pkt(0xA2, &unsub_body)), Packet::Unsubscribe(_)));
    }
}

#[test]
fn mqtt_2_1_3_1_other_packet_flags_must_be_0000() {
    for v in [V311, V5] {
        assert!(is_malformed(err(Some(v), &[0x41, 0x02, 0x00, 0x01])), "PUBACK");
        assert!(is_malformed(err(Some(v), &[0x58, 0x02, 0x00, 0x01])), "PUBREC");
        assert!(is_malformed(err(Some(v), &[0x72, 0x02, 0x00, 0x01])), "PUBCOMP");
        assert!(is_malformed(err(Some(v), &[0x21, 0x02, 0x00, 0x00])), "CONNACK");
        assert!(is_malformed(err(Some(v), &[0x92, 0x03, 0x00, 0x01, 0x00])), "SUBACK");
        assert!(is_malformed(err(Some(v), &[0xB2, 0x02, 0x00, 0x01])), "UNSUBACK");
        assert!(is_malformed(err(Some(v), &[0xC1, 0x00])), "PINGREQ");
        assert!(is_malformed(err(Some(v), &[0xD4, 0x00])), "PINGRESP");
        assert!(is_malformed(err(Some(v), &[0xE2, 0x00])), "DISCONNECT");
    }
    assert!(is_malformed(err(Some(V5), &[0xF1, 0x00])), "AUTH");
    let mut c = connect(4, 0x02, &s(b""));
    c[0] = 0x12;
    assert!(is_malformed(err(None, &c)), "CONNECT");
}

#[test]
fn mqtt_3_3_1_2_publish_qos_3_is_malformed() {
    assert!(is_malformed(err(Some(V311), &[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01])));
    assert!(is_malformed(err(Some(V5), &[0x37, 0x05, 0x00, 0x01, b't', 0x00, 0x01])));
}

#[test]
fn mqtt_3_3_1_2_dup_with_qos_0_is_malformed() {
    assert!(is_malformed(err(Some(V311), &[0x38, 0x03, 0x00, 0x01, b't'])));
    assert!(is_malformed(err(Some(V5), &[0x38, 0x04, 0x00, 0x01, b't', 0x00])));
}

// ---- variable byte integer and remaining length (MQTT 1.5.5 / 2.2.3) ----------------------------

#[test]
fn mqtt5_1_5_5_varint_longer_than_4_bytes_is_malformed() {
    let mut d = Decoder::new(usize::MAX);
    d.version = Some(V5);
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
    assert!(is_malformed(d.decode(&mut buf).unwrap_err()));
    // Found as soon as the fourth byte still has the continuation bit.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x80, 0x80][..]);
    assert!(is_malformed(d.decode(&mut buf).unwrap_err()));
    // Inside a packet: a subscription identifier of five bytes.
    let frame = publish_v5_with(&[0x0B, 0x81, 0x81, 0x81, 0x81, 0x01]);
    assert!(is_malformed(err(Some(V5), &frame)));
}

#[test]
fn mqtt5_1_5_5_varint_not_minimal_is_malformed() {
    let mut d = Decoder::new(usize::MAX);
    d.version = Some(V311);
    // 0 encoded in two bytes.
    let mut buf = BytesMut::from(&[0xC0, 0x80, 0x00][..]);
    assert!(is_malformed(d.decode(&mut buf).unwrap_err()));
    // 2 encoded in three bytes.
    let mut buf = BytesMut::from(&[0x40, 0x82, 0x80, 0x00, 0x00, 0x01][..]);
    assert!(is_malformed(d.decode(&mut buf).unwrap_err()));
    // A property length of 0 in two bytes.
    let frame = pkt(0x30, &[s(b"t"), vec![0x80, 0x00]].concat());
    assert!(is_malformed(err(Some(V5), &frame)));
    // The largest and smallest values of each width are accepted.
    for (n, enc) in [(127usize, vec![0x7F]), (128, vec![0x80, 0x01]), (16_383, vec![0xFF, 0x7F])] {
        let frame = publish_v5_with(&[[0x0B].as_slice(), &enc].concat());
        let Packet::Publish(p) = ok(Some(V5), &frame) else { panic!() };
        assert_eq!(p.properties.subscription_identifiers, vec![n as u32]);
    }
}

#[test]
fn mqtt_2_2_3_leftover_bytes_are_malformed() {
    assert!(is_malformed(err(Some(V311), &[0xC0, 0x01, 0x00])), "PINGREQ with a body");
    assert!(is_malformed(err(Some(V311), &[0x40, 0x03, 0x00, 0x01, 0x00])), "3.1.1 PUBACK");
    assert!(is_malformed(err(Some(V311), &[0xB0, 0x03, 0x00, 0x01, 0x00])), "3.1.1 UNSUBACK");
    assert!(is_malformed(err(Some(V311), &[0xE0, 0x01, 0x00])), "3.1.1 DISCONNECT");
    assert!(is_malformed(err(Some(V311), &[0x20, 0x03, 0x00, 0x00, 0x00])), "3.1.1 CONNACK");
    let c = connect(4, 0x02, &[s(b"id"), vec![0xAA]].concat());
    assert!(is_malformed(err(None, &c)), "CONNECT with trailing byte");
    // Bytes after a property block that claims fewer bytes than follow, in PUBACK.
    assert!(is_malformed(err(Some(V5), &[0x40, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00])));
}

#[test]
fn mqtt_2_2_3_missing_bytes_are_malformed() {
    assert!(is_malformed(err(Some(V311), &[0x40, 0x01, 0x00])), "PUBACK with half an id");
    assert!(is_malformed(err(Some(V311), &[0x30, 0x02, 0x00, 0x03])), "topic longer than packet");
    assert!(is_malformed(err(Some(V311), &[0x32, 0x03, 0x00, 0x01, b't'])), "no packet id");
    let frame = pkt(0x40, &[0x00, 0x01, 0x00, 0x05, 0x1F]);
    assert!(is_malformed(err(Some(V5), &frame)), "property length past the end");
    assert!(is_malformed(err(None, &pkt(0x10, &s(b"MQTT")))), "CONNECT without level");
}

#[test]
fn decode_packet_on_short_frame_is_truncated_and_long_frame_malformed() {
    assert_eq!(err(Some(V311), &[0x40, 0x02, 0x00]), DecodeError::Truncated);
    assert_eq!(err(Some(V311), &[0x40]), DecodeError::Truncated);
    assert!(is_malformed(err(Some(V311), &[0x40, 0x02, 0x00, 0x01, 0x00])));
}

// ---- strings (MQTT 1.5.4) ----------------------------------------------------------------------

#[test]
fn mqtt5_1_5_4_invalid_utf8_is_malformed() {
    assert!(is_malformed(err(Some(V311), &pkt(0x30, &s(&[b'a', 0xFF])))));
    // An encoded surrogate (U+D800).
    assert!(is_malformed(err(Some(V311), &pkt(0x30, &s(&[0xED, 0xA0, 0x80])))));
    // Overlong encoding of '/'.
    assert!(is_malformed(err(Some(V311), &pkt(0x30, &s(&[0xC0, 0xAF])))));
    // In a user property.
    let p = [&[0x26][..], &s(&[0xFF]), &s(b"v")].concat();
    assert!(is_malformed(err(Some(V5), &publish_v5_with(&p))));
    // In a client identifier.
    assert!(is_malformed(err(None, &connect(4, 0x02, &s(&[0xFE])))));
}

#[test]
fn mqtt5_1_5_4_null_character_is_malformed() {
    assert!(is_malformed(err(Some(V311), &pkt(0x30, &s(b"a\0b")))));
    assert!(is_malformed(err(None, &connect(5, 0x02, &s(b"\0")))));
    let sub = pkt(0x82, &[&[0x00, 0x01][..], &s(b"a/\0"), &[0x00]].concat());
    assert!(is_malformed(err(Some(V311), &sub)));
}

// ---- CONNECT (3.1) -----------------------------------------------------------------------------

#[test]
fn mqtt_3_1_2_1_protocol_mqisdp_is_unsupported_version() {
    let mut body = s(b"MQIsdp");
    body.extend_from_slice(&[3, 0x02, 0, 0]);
    body.extend_from_slice(&s(b"id"));
    assert_eq!(err(None, &pkt(0x10, &body)), DecodeError::UnsupportedProtocolVersion(3));
}

#[test]
fn mqtt_3_1_2_2_unknown_protocol_level_is_unsupported_version() {
    for level in [0, 3, 6, 255] {
        let c = connect(level, 0x02, &s(b"id"));
        assert_eq!(err(None, &c), DecodeError::UnsupportedProtocolVersion(level));
    }
    let e = DecodeError::UnsupportedProtocolVersion(6);
    assert_eq!(e.reason(), ReasonCode::UnsupportedProtocolVersion);
}

#[test]
fn mqtt_3_1_2_1_other_protocol_name_is_malformed() {
    for name in [&b"MQTX"[..], b"mqtt", b"", b"MQTTT"] {
        let mut body = s(name);
        body.extend_from_slice(&[4, 0x02, 0, 0]);
        body.extend_from_slice(&s(b"id"));
        assert!(is_malformed(err(None, &pkt(0x10, &body))), "{name:?}");
    }
}

#[test]
fn mqtt_3_1_2_3_reserved_flag_is_malformed() {
    assert!(is_malformed(err(None, &connect(4, 0x03, &s(b"id")))));
    assert!(is_malformed(err(None, &connect(5, 0x03, &s(b"id")))));
}

#[test]
fn mqtt_3_1_2_11_will_qos_without_will_flag_is_malformed() {
    for v in [4, 5] {
        assert!(is_malformed(err(None, &connect(v, 0x0A, &s(b"id")))), "QoS 1");
        assert!(is_malformed(err(None, &connect(v, 0x12, &s(b"id")))), "QoS 2");
    }
}

#[test]
fn mqtt_3_1_2_15_will_retain_without_will_flag_is_malformed() {
    for v in [4, 5] {
        assert!(is_malformed(err(None, &connect(v, 0x22, &s(b"id")))));
    }
}

#[test]
fn mqtt_3_1_2_12_will_qos_3_is_malformed() {
    let will = [s(b"id"), s(b"w"), s(b"x")].concat();
    assert!(is_malformed(err(None, &connect(4, 0x1E, &will))));
    let will5 = [s(b"id"), props(&[]), s(b"w"), s(b"x")].concat();
    assert!(is_malformed(err(None, &connect(5, 0x1E, &will5))));
    // QoS 2 is fine.
    let Packet::Connect(c) = ok(None, &connect(5, 0x16, &will5)) else { panic!() };
    assert_eq!(c.will.map(|w| w.qos), Some(QoS::ExactlyOnce));
}

#[test]
fn mqtt311_3_1_2_22_password_without_username_is_malformed() {
    let payload = [s(b"id"), s(b"pw")].concat();
    assert!(is_malformed(err(None, &connect(4, 0x42, &payload))));
    // MQTT 5 allows it (3.1.2.9).
    let Packet::Connect(c) = ok(None, &connect(5, 0x42, &payload)) else { panic!() };
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn mqtt_3_1_3_3_will_topic_with_wildcard_is_topic_name_invalid() {
    for topic in [&b"a/+"[..], b"#", b""] {
        let will = [s(b"id"), s(topic), s(b"x")].concat();
        assert!(matches!(err(None, &connect(4, 0x06, &will)), DecodeError::TopicNameInvalid(_)));
        let will5 = [s(b"id"), props(&[]), s(topic), s(b"x")].concat();
        assert!(matches!(err(None, &connect(5, 0x06, &will5)), DecodeError::TopicNameInvalid(_)));
    }
}

#[test]
fn mqtt_3_1_3_6_empty_client_id_is_allowed() {
    for level in [4, 5] {
        let Packet::Connect(c) = ok(None, &connect(level, 0x02, &s(b""))) else { panic!() };
        assert_eq!(c.client_id, "");
    }
    // MQTT 5 also without clean start: the server assigns one.
    assert!(matches!(ok(None, &connect(5, 0x00, &s(b""))), Packet::Connect(_)));
}

#[test]
fn mqtt311_3_1_3_8_empty_client_id_without_clean_session_is_client_id_not_valid() {
    assert_eq!(err(None, &connect(4, 0x00, &s(b""))), DecodeError::ClientIdNotValid);
    assert_eq!(DecodeError::ClientIdNotValid.reason().connack_v311(), 2);
}

#[test]
fn mqtt5_3_1_2_properties_are_checked_in_connect_and_will() {
    // Topic alias may not appear in CONNECT.
    let mut body = s(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 0]);
    body.extend_from_slice(&props(&[0x23, 0x00, 0x01]));
    body.extend_from_slice(&s(b"id"));
    assert!(is_protocol(err(None, &pkt(0x10, &body))));
    // Session expiry may not appear in the will properties.
    let will = [s(b"id"), props(&[0x11, 0, 0, 0, 1]), s(b"w"), s(b"x")].concat();
    assert!(is_protocol(err(None, &connect(5, 0x06, &will))));
    // Will delay interval may.
    let will = [s(b"id"), props(&[0x18, 0, 0, 0, 1]), s(b"w"), s(b"x")].concat();
    let Packet::Connect(c) = ok(None, &connect(5, 0x06, &will)) else { panic!() };
    assert_eq!(c.will.and_then(|w| w.properties.will_delay_interval), Some(1));
}

// ---- Decoder stream rules ----------------------------------------------------------------------

#[test]
fn mqtt_3_1_0_1_first_packet_must_be_connect() {
    let mut d = Decoder::new(1024);
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    assert!(is_protocol(d.decode(&mut buf).unwrap_err()));
    // Known from the first byte alone.
    let mut d = Decoder::new(1024);
    let mut buf = BytesMut::from(&[0x30][..]);
    assert!(is_protocol(d.decode(&mut buf).unwrap_err()));
}

#[test]
fn decoder_learns_version_from_first_connect_and_decodes_a_second_one() {
    let mut d = Decoder::new(1024);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&connect(5, 0x02, &s(b"a")));
    buf.extend_from_slice(&[0xE0, 0x01, 0x04]); // v5 DISCONNECT with a reason code
    buf.extend_from_slice(&connect(4, 0x02, &s(b"b")));
    assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Connect(_)))));
    assert_eq!(d.version, Some(V5));
    assert_eq!(
        d.decode(&mut buf).unwrap(),
        Some(Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage)))
    );
    let Ok(Some(Packet::Connect(c))) = d.decode(&mut buf) else { panic!() };
    assert_eq!(c.protocol, V311);
    assert_eq!(d.version, Some(V5), "the connection's version stays that of the first CONNECT");
    assert_eq!(d.decode(&mut buf), Ok(None));
}

#[test]
fn mqtt5_3_1_2_24_too_large_is_detected_from_the_fixed_header() {
    let mut d = Decoder::new(100);
    d.version = Some(V311);
    // Only the fixed header of a 2 + 16384-byte PUBLISH has arrived.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x01][..]);
    let e = d.decode(&mut buf).unwrap_err();
    assert_eq!(e, DecodeError::TooLarge { size: 4 + 16_384, max: 100 });
    assert_eq!(e.reason(), ReasonCode::PacketTooLarge);
    // The limit counts the fixed header: 100 bytes in all is fine, 101 is not.
    let mut d = Decoder::new(100);
    d.version = Some(V311);
    let body = [s(b"t"), vec![0; 95]].concat();
    let mut buf = BytesMut::from(&pkt(0x30, &body)[..]);
    assert_eq!(buf.len(), 100);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Publish(_)))));
    let body = [s(b"t"), vec![0; 96]].concat();
    let mut buf = BytesMut::from(&pkt(0x30, &body)[..2]);
    assert!(matches!(d.decode(&mut buf), Err(DecodeError::TooLarge { size: 101, max: 100 })));
}

// ---- PUBLISH (3.3) -----------------------------------------------------------------------------

#[test]
fn mqtt_3_3_2_2_topic_name_with_wildcard_is_topic_name_invalid() {
    for t in [&b"a/+"[..], b"#", b"a/#"] {
        let e = err(Some(V311), &pkt(0x30, &s(t)));
        assert!(matches!(e, DecodeError::TopicNameInvalid(_)), "{e:?}");
        assert_eq!(e.reason(), ReasonCode::TopicNameInvalid);
        let e = err(Some(V5), &pkt(0x30, &[s(t), props(&[])].concat()));
        assert!(matches!(e, DecodeError::TopicNameInvalid(_)), "{e:?}");
    }
}

#[test]
fn mqtt311_4_7_3_1_empty_topic_name_is_topic_name_invalid() {
    assert!(matches!(err(Some(V311), &pkt(0x30, &s(b""))), DecodeError::TopicNameInvalid(_)));
}

#[test]
fn mqtt5_3_3_2_3_4_empty_topic_without_topic_alias_is_protocol_error() {
    assert!(is_protocol(err(Some(V5), &pkt(0x30, &[s(b""), props(&[])].concat()))));
    let Packet::Publish(p) = ok(Some(V5), &publish_empty_topic_with_alias()) else { panic!() };
    assert!(p.topic.is_empty());
    assert_eq!(p.properties.topic_alias, Some(1));
}

fn publish_empty_topic_with_alias() -> Vec<u8> {
    pkt(0x30, &[s(b""), props(&[0x23, 0x00, 0x01])].concat())
}

#[test]
fn mqtt_2_2_1_3_zero_packet_id_is_protocol_error() {
    for v in [V311, V5] {
        let pp = if v == V5 { props(&[]) } else { vec![] };
        let publish = pkt(0x32, &[s(b"t"), vec![0, 0], pp.clone()].concat());
        assert!(is_protocol(err(Some(v), &publish)), "PUBLISH");
        for first in [0x40, 0x50, 0x62, 0x70] {
            assert!(is_protocol(err(Some(v), &[first, 0x02, 0x00, 0x00])), "{first:#x}");
        }
        let sub = pkt(0x82, &[vec![0, 0], pp.clone(), s(b"a"), vec![0]].concat());
        assert!(is_protocol(err(Some(v), &sub)), "SUBSCRIBE");
        let suback = pkt(0x90, &[vec![0, 0], pp.clone(), vec![0]].concat());
        assert!(is_protocol(err(Some(v), &suback)), "SUBACK");
        let unsub = pkt(0xA2, &[vec![0, 0], pp.clone(), s(b"a")].concat());
        assert!(is_protocol(err(Some(v), &unsub)), "UNSUBSCRIBE");
        let unsuback =
            pkt(0xB0, &[vec![0, 0], pp.clone(), if v == V5 { vec![0] } else { vec![] }].concat());
        assert!(is_protocol(err(Some(v), &unsuback)), "UNSUBACK");
    }
}

// ---- SUBSCRIBE / UNSUBSCRIBE (3.8, 3.10) -------------------------------------------------------

fn subscribe(v: ProtocolVersion, options: u8) -> Vec<u8> {
    let pp = if v == V5 { props(&[]) } else { vec![] };
    pkt(0x82, &[vec![0, 1], pp, s(b"a/b"), vec![options]].concat())
}

#[test]
fn mqtt_3_8_3_3_subscribe_without_filter_is_protocol_error() {
    assert!(is_protocol(err(Some(V311), &[0x82, 0x02, 0x00, 0x01])));
    assert!(is_protocol(err(Some(V5), &[0x82, 0x03, 0x00, 0x01, 0x00])));
}

#[test]
fn mqtt5_3_8_3_5_subscription_options_reserved_bits_are_malformed() {
    assert!(is_malformed(err(Some(V5), &subscribe(V5, 0x40))));
    assert!(is_malformed(err(Some(V5), &subscribe(V5, 0x80))));
    assert!(matches!(ok(Some(V5), &subscribe(V5, 0x2E)), Packet::Subscribe(_)));
}

#[test]
fn mqtt311_3_8_3_4_subscribe_upper_six_bits_are_malformed() {
    for b in [0x04, 0x08, 0x10, 0x20, 0x40, 0x80] {
        assert!(is_malformed(err(Some(V311), &subscribe(V311, b))), "{b:#x}");
    }
}

#[test]
fn mqtt5_3_8_3_1_retain_handling_3_is_protocol_error() {
    assert!(is_protocol(err(Some(V5), &subscribe(V5, 0x30))));
}

#[test]
fn mqtt_3_8_3_4_subscription_qos_3_is_malformed() {
    assert!(is_malformed(err(Some(V311), &subscribe(V311, 0x03))));
    assert!(is_malformed(err(Some(V5), &subscribe(V5, 0x03))));
}

#[test]
fn mqtt5_3_8_3_4_no_local_on_shared_subscription_is_protocol_error() {
    let frame = pkt(0x82, &[vec![0, 1], props(&[]), s(b"$share/g/a"), vec![0x04]].concat());
    assert!(is_protocol(err(Some(V5), &frame)));
    let frame = pkt(0x82, &[vec![0, 1], props(&[]), s(b"$share/g/a"), vec![0x01]].concat());
    assert!(matches!(ok(Some(V5), &frame), Packet::Subscribe(_)));
}

#[test]
fn mqtt_3_10_3_2_unsubscribe_without_filter_is_protocol_error() {
    assert!(is_protocol(err(Some(V311), &[0xA2, 0x02, 0x00, 0x01])));
    assert!(is_protocol(err(Some(V5), &[0xA2, 0x03, 0x00, 0x01, 0x00])));
}

#[test]
fn suback_and_unsuback_without_reason_codes_are_protocol_errors() {
    assert!(is_protocol(err(Some(V311), &[0x90, 0x02, 0x00, 0x01])));
    assert!(is_protocol(err(Some(V5), &[0x90, 0x03, 0x00, 0x01, 0x00])));
    assert!(is_protocol(err(Some(V5), &[0xB0, 0x03, 0x00, 0x01, 0x00])));
}

// ---- properties (MQTT 5 2.2.2) -----------------------------------------------------------------

#[test]
fn mqtt5_2_2_2_2_property_not_allowed_in_packet_is_protocol_error() {
    // Session expiry interval in PUBLISH.
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&[0x11, 0, 0, 0, 1]))));
    // Reason string in SUBSCRIBE.
    let p = [&[0x1F][..], &s(b"r")].concat();
    let frame = pkt(0x82, &[vec![0, 1], props(&p), s(b"a"), vec![0]].concat());
    assert!(is_protocol(err(Some(V5), &frame)));
    // Topic alias in PUBACK.
    assert!(is_protocol(err(Some(V5), &pkt(0x40, &[0, 1, 0, 3, 0x23, 0, 1]))));
    // Maximum QoS in CONNECT.
    let mut body = s(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 0]);
    body.extend_from_slice(&props(&[0x24, 0x00]));
    body.extend_from_slice(&s(b"id"));
    assert!(is_protocol(err(None, &pkt(0x10, &body))));
}

#[test]
fn mqtt5_2_2_2_2_unknown_property_is_malformed() {
    for id in [0x00, 0x04, 0x05, 0x2B, 0x7F] {
        assert!(is_malformed(err(Some(V5), &publish_v5_with(&[id, 0]))), "{id:#x}");
    }
    // A two-byte identifier is no defined property either.
    assert!(is_malformed(err(Some(V5), &publish_v5_with(&[0x81, 0x01, 0]))));
}

#[test]
fn mqtt5_2_2_2_2_duplicate_property_is_protocol_error() {
    let twice = [0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2];
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&twice))));
    let twice = [0x23, 0, 1, 0x23, 0, 2];
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&twice))));
    let ct = [&[0x03][..], &s(b"a"), &[0x03], &s(b"a")].concat();
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&ct))));
}

#[test]
fn mqtt5_3_3_2_3_user_property_and_publish_subscription_id_may_repeat() {
    let up = [&[0x26][..], &s(b"k"), &s(b"1"), &[0x26], &s(b"k"), &s(b"2")].concat();
    let Packet::Publish(p) = ok(Some(V5), &publish_v5_with(&up)) else { panic!() };
    assert_eq!(p.properties.user_properties.len(), 2);
    let Packet::Publish(p) = ok(Some(V5), &publish_v5_with(&[0x0B, 1, 0x0B, 2])) else { panic!() };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 2]);
}

#[test]
fn mqtt5_3_8_2_1_2_more_than_one_subscription_id_in_subscribe_is_protocol_error() {
    let frame = pkt(0x82, &[vec![0, 1], props(&[0x0B, 1, 0x0B, 2]), s(b"a"), vec![0]].concat());
    assert!(is_protocol(err(Some(V5), &frame)));
}

#[test]
fn mqtt5_3_3_2_3_8_subscription_id_0_is_protocol_error() {
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&[0x0B, 0]))));
    let frame = pkt(0x82, &[vec![0, 1], props(&[0x0B, 0]), s(b"a"), vec![0]].concat());
    assert!(is_protocol(err(Some(V5), &frame)));
}

fn connect_v5_props(p: &[u8]) -> Vec<u8> {
    let mut body = s(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 0]);
    body.extend_from_slice(&props(p));
    body.extend_from_slice(&s(b"id"));
    pkt(0x10, &body)
}

fn connack_v5_props(p: &[u8]) -> Vec<u8> {
    pkt(0x20, &[vec![0, 0], props(p)].concat())
}

#[test]
fn mqtt5_3_1_2_11_3_receive_maximum_0_is_protocol_error() {
    assert!(is_protocol(err(None, &connect_v5_props(&[0x21, 0, 0]))));
    assert!(is_protocol(err(Some(V5), &connack_v5_props(&[0x21, 0, 0]))));
}

#[test]
fn mqtt5_3_1_2_11_4_maximum_packet_size_0_is_protocol_error() {
    assert!(is_protocol(err(None, &connect_v5_props(&[0x27, 0, 0, 0, 0]))));
    assert!(is_protocol(err(Some(V5), &connack_v5_props(&[0x27, 0, 0, 0, 0]))));
}

#[test]
fn mqtt5_3_3_2_3_4_topic_alias_0_is_protocol_error() {
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&[0x23, 0, 0]))));
}

#[test]
fn mqtt5_2_2_2_byte_flags_other_than_0_or_1_are_protocol_errors() {
    assert!(is_protocol(err(Some(V5), &publish_v5_with(&[0x01, 2]))), "payload format");
    assert!(is_protocol(err(None, &connect_v5_props(&[0x17, 2]))), "request problem info");
    assert!(is_protocol(err(None, &connect_v5_props(&[0x19, 2]))), "request response info");
    for id in [0x24, 0x25, 0x28, 0x29, 0x2A] {
        assert!(is_protocol(err(Some(V5), &connack_v5_props(&[id, 2]))), "{id:#x}");
        assert!(matches!(ok(Some(V5), &connack_v5_props(&[id, 1])), Packet::ConnAck(_)));
    }
}

#[test]
fn mqtt5_3_2_2_3_4_maximum_qos_2_is_protocol_error() {
    assert!(is_protocol(err(Some(V5), &connack_v5_props(&[0x24, 2]))));
    let Packet::ConnAck(c) = ok(Some(V5), &connack_v5_props(&[0x24, 0])) else { panic!() };
    assert_eq!(c.properties.maximum_qos, Some(0));
}

#[test]
fn mqtt5_3_1_2_11_10_authentication_data_without_method_is_protocol_error() {
    assert!(is_protocol(err(None, &connect_v5_props(&[0x16, 0, 1, 9]))));
    let auth = pkt(0xF0, &[vec![0x18], props(&[0x16, 0, 1, 9])].concat());
    assert!(is_protocol(err(Some(V5), &auth)));
}

// ---- reason codes ------------------------------------------------------------------------------

#[test]
fn mqtt5_2_4_unknown_reason_code_is_malformed() {
    assert!(is_malformed(err(Some(V5), &[0x40, 0x03, 0x00, 0x01, 0x03])), "PUBACK");
    assert!(is_malformed(err(Some(V5), &[0x20, 0x03, 0x00, 0x05, 0x00])), "CONNACK");
    assert!(is_malformed(err(Some(V5), &[0x90, 0x04, 0x00, 0x01, 0x00, 0x03])), "SUBACK");
    assert!(is_malformed(err(Some(V5), &[0xB0, 0x04, 0x00, 0x01, 0x00, 0xFF])), "UNSUBACK");
    assert!(is_malformed(err(Some(V5), &[0xE0, 0x01, 0x7F])), "DISCONNECT");
    assert!(is_malformed(err(Some(V5), &[0xF0, 0x01, 0x17])), "AUTH");
}

#[test]
fn mqtt311_3_2_2_3_unknown_connack_return_code_is_malformed() {
    assert!(is_malformed(err(Some(V311), &[0x20, 0x02, 0x00, 0x06])));
    assert!(is_malformed(err(Some(V311), &[0x20, 0x02, 0x00, 0x87])));
    let Packet::ConnAck(c) = ok(Some(V311), &[0x20, 0x02, 0x00, 0x04]) else { panic!() };
    assert_eq!(c.reason, ReasonCode::BadUserNameOrPassword);
}

#[test]
fn mqtt_3_2_2_1_connack_reserved_flags_are_malformed() {
    assert!(is_malformed(err(Some(V311), &[0x20, 0x02, 0x02, 0x00])));
    assert!(is_malformed(err(Some(V5), &[0x20, 0x03, 0x80, 0x00, 0x00])));
}

#[test]
fn mqtt311_3_9_3_suback_return_codes_are_0_1_2_or_0x80() {
    for bad in [0x03, 0x81, 0x87, 0x8F] {
        assert!(is_malformed(err(Some(V311), &[0x90, 0x03, 0x00, 0x01, bad])), "{bad:#x}");
    }
    let Packet::SubAck(a) = ok(Some(V311), &[0x90, 0x06, 0, 1, 0, 1, 2, 0x80]) else { panic!() };
    assert_eq!(
        a.reasons,
        vec![
            ReasonCode::Success,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError
        ]
    );
}

#[test]
fn error_variants_map_to_their_reason_codes() {
    assert_eq!(DecodeError::Malformed("x").reason().as_u8(), 0x81);
    assert_eq!(DecodeError::Protocol("x").reason().as_u8(), 0x82);
    assert_eq!(DecodeError::TooLarge { size: 2, max: 1 }.reason().as_u8(), 0x95);
    assert_eq!(DecodeError::UnsupportedProtocolVersion(3).reason().as_u8(), 0x84);
    assert_eq!(DecodeError::TopicNameInvalid("x").reason().as_u8(), 0x90);
    assert_eq!(DecodeError::ClientIdNotValid.reason().as_u8(), 0x85);
}
