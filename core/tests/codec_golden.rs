//! Golden tests: byte sequences written out by hand from the MQTT 3.1.1 and 5.0 specs decode to the
//! expected packet, and that packet encodes back to exactly the same bytes.

use bytes::{Bytes, BytesMut};
use flux_core::mqtt::properties::Properties;
use flux_core::mqtt::*;
use flux_core::topic::TopicName;

use ProtocolVersion::{V311, V5};

/// `bytes` decodes to `expected` for `version` and `expected` encodes back to `bytes`.
fn golden(version: ProtocolVersion, bytes: &[u8], expected: Packet) {
    let decoded = decode_packet(Bytes::copy_from_slice(bytes), Some(version))
        .unwrap_or_else(|e| panic!("decode failed: {e}"));
    assert_eq!(decoded, expected);
    let mut out = BytesMut::new();
    encode_packet(&expected, version, &mut out);
    assert_eq!(&out[..], bytes, "encoding differs");
    assert_eq!(encoded_len(&expected, version), bytes.len());
}

/// `expected` encodes to `bytes` (for encoder-only normalisations).
fn encodes_to(version: ProtocolVersion, packet: &Packet, bytes: &[u8]) {
    let mut out = BytesMut::new();
    encode_packet(packet, version, &mut out);
    assert_eq!(&out[..], bytes);
    assert_eq!(encoded_len(packet, version), bytes.len());
}

fn pid(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

#[test]
fn mqtt311_3_1_connect_minimal() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x0F,
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name
        0x04,                               // level 4
        0x02,                               // clean session
        0x00, 0x3C,                         // keep alive 60
        0x00, 0x03, b'a', b'b', b'c',       // client id
    ];
    let expected = Packet::Connect(Connect {
        protocol: V311,
        clean_start: true,
        keep_alive_secs: 60,
        client_id: "abc".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    });
    golden(V311, &bytes, expected.clone());
    // The stream decoder takes it as the first packet and learns the version from it.
    let mut d = Decoder::new(1024);
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(d.decode(&mut buf).unwrap(), Some(expected));
    assert_eq!(d.version, Some(V311));
    assert!(buf.is_empty());
}

#[test]
fn mqtt311_3_1_connect_with_will_username_password() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x24,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
        0xEC,                               // user, password, will retain, will QoS 1, will
        0x00, 0x0A,
        0x00, 0x02, b'i', b'd',
        0x00, 0x03, b'w', b'/', b't',       // will topic
        0x00, 0x03, b'b', b'y', b'e',       // will payload
        0x00, 0x04, b'u', b's', b'e', b'r',
        0x00, 0x04, b'p', b'a', b's', b's',
    ];
    golden(
        V311,
        &bytes,
        Packet::Connect(Connect {
            protocol: V311,
            clean_start: false,
            keep_alive_secs: 10,
            client_id: "id".into(),
            will: Some(Will {
                topic: topic("w/t"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"pass")),
            properties: Properties::default(),
        }),
    );
}

#[test]
fn mqtt5_3_1_connect_with_properties_and_will_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x2A,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05,
        0xC6,                               // user, password, will (QoS 0), clean start
        0x00, 0x3C,
        0x08,                               // properties: 8 bytes
        0x11, 0x00, 0x00, 0x00, 0x0A,       //   session expiry 10
        0x21, 0x00, 0x14,                   //   receive maximum 20
        0x00, 0x03, b'a', b'b', b'c',
        0x05,                               // will properties: 5 bytes
        0x18, 0x00, 0x00, 0x00, 0x05,       //   will delay 5
        0x00, 0x01, b't',
        0x00, 0x00,                         // empty will payload
        0x00, 0x01, b'u',
        0x00, 0x02, 0x00, 0xFF,             // binary password
    ];
    golden(
        V5,
        &bytes,
        Packet::Connect(Connect {
            protocol: V5,
            clean_start: true,
            keep_alive_secs: 60,
            client_id: "abc".into(),
            will: Some(Will {
                topic: topic("t"),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Properties { will_delay_interval: Some(5), ..Properties::default() },
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(&[0x00, 0xFF])),
            properties: Properties {
                session_expiry_interval: Some(10),
                receive_maximum: Some(20),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn mqtt311_3_2_connack() {
    let ack = |session_present, reason| {
        Packet::ConnAck(ConnAck { session_present, reason, properties: Properties::default() })
    };
    golden(V311, &[0x20, 0x02, 0x01, 0x00], ack(true, ReasonCode::Success));
    golden(V311, &[0x20, 0x02, 0x00, 0x05], ack(false, ReasonCode::NotAuthorized));
    // A v5-only reason maps to the closest 3.1.1 return code.
    encodes_to(V311, &ack(false, ReasonCode::ServerBusy), &[0x20, 0x02, 0x00, 0x03]);
    encodes_to(V311, &ack(false, ReasonCode::Banned), &[0x20, 0x02, 0x00, 0x05]);
}

#[test]
fn mqtt5_3_2_connack_with_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x20, 0x0D,
        0x00, 0x00,
        0x0A,
        0x12, 0x00, 0x02, b'i', b'd',       // assigned client identifier
        0x13, 0x00, 0x1E,                   // server keep alive 30
        0x24, 0x01,                         // maximum QoS 1
    ];
    golden(
        V5,
        &bytes,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::Success,
            properties: Properties {
                assigned_client_identifier: Some("id".into()),
                maximum_qos: Some(1),
                server_keep_alive: Some(30),
                ..Properties::default()
            },
        }),
    );
    golden(
        V5,
        &[0x20, 0x03, 0x00, 0x87, 0x00],
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::NotAuthorized,
            properties: Properties::default(),
        }),
    );
}

#[test]
fn mqtt311_3_3_publish_qos1() {
    let bytes = [0x33, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i'];
    golden(
        V311,
        &bytes,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic("a/b"),
            packet_id: Some(pid(10)),
            properties: Properties::default(),
            payload: Bytes::from_static(b"hi"),
        }),
    );
}

#[test]
fn mqtt311_3_3_publish_qos0_and_dup_qos2() {
    golden(
        V311,
        &[0x30, 0x04, 0x00, 0x01, b't', b'x'],
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic("t"),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        }),
    );
    golden(
        V311,
        &[0x3C, 0x05, 0x00, 0x01, b't', 0xFF, 0xFF],
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: topic("t"),
            packet_id: Some(pid(0xFFFF)),
            properties: Properties::default(),
            payload: Bytes::new(),
        }),
    );
}

#[test]
fn mqtt5_3_3_publish_with_topic_alias_and_empty_topic() {
    let bytes = [0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05, b'x'];
    let decoded = decode_packet(Bytes::copy_from_slice(&bytes), Some(V5)).unwrap();
    let Packet::Publish(p) = &decoded else { panic!("not a publish: {decoded:?}") };
    assert!(p.topic.is_empty());
    golden(
        V5,
        &bytes,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicName::empty_for_alias(),
            packet_id: None,
            properties: Properties { topic_alias: Some(5), ..Properties::default() },
            payload: Bytes::from_static(b"x"),
        }),
    );
}

#[test]
fn mqtt5_3_3_publish_with_repeated_subscription_ids_and_user_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x32, 0x1C,
        0x00, 0x01, b't',
        0x00, 0x07,
        0x14,                                       // properties: 20 bytes
        0x01, 0x01,                                 //   payload format: UTF-8
        0x0B, 0x01,                                 //   subscription id 1
        0x0B, 0x80, 0x01,                           //   subscription id 128
        0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v',   //   user property k=v
        0x26, 0x00, 0x01, b'k', 0x00, 0x00,         //   user property k=""
        b'o', b'k',
    ];
    golden(
        V5,
        &bytes,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic("t"),
            packet_id: Some(pid(7)),
            properties: Properties {
                payload_format_indicator: Some(1),
                subscription_identifiers: vec![1, 128],
                user_properties: vec![("k".into(), "v".into()), ("k".into(), String::new())],
                ..Properties::default()
            },
            payload: Bytes::from_static(b"ok"),
        }),
    );
}

#[test]
fn mqtt_3_4_to_3_7_publish_responses() {
    let id = pid(1);
    for (first, make) in [
        (0x40u8, Packet::PubAck as fn(PubResp) -> Packet),
        (0x50, Packet::PubRec),
        (0x62, Packet::PubRel),
        (0x70, Packet::PubComp),
    ] {
        golden(V311, &[first, 0x02, 0x00, 0x01], make(PubResp::success(id)));
        // MQTT 5 short form: Success without properties is the packet id alone.
        golden(V5, &[first, 0x02, 0x00, 0x01], make(PubResp::success(id)));
        // Reason code without properties: no property length.
        let not_found = PubResp {
            packet_id: id,
            reason: ReasonCode::PacketIdentifierNotFound,
            properties: Properties::default(),
        };
        golden(V5, &[first, 0x03, 0x00, 0x01, 0x92], make(not_found.clone()));
        // A 3.1.1 peer gets the packet id alone whatever the reason.
        encodes_to(V311, &make(not_found), &[first, 0x02, 0x00, 0x01]);
        // With a reason string.
        let with_props = PubResp {
            packet_id: id,
            reason: ReasonCode::Success,
            properties: Properties { reason_string: Some("r".into()), ..Properties::default() },
        };
        golden(
            V5,
            &[first, 0x08, 0x00, 0x01, 0x00, 0x04, 0x1F, 0x00, 0x01, b'r'],
            make(with_props),
        );
    }
    // The long form of a plain Success decodes to the same value.
    assert_eq!(
        decode_packet(Bytes::from_static(&[0x40, 0x04, 0x00, 0x01, 0x00, 0x00]), Some(V5)).unwrap(),
        Packet::PubAck(PubResp::success(id))
    );
}

#[test]
fn mqtt311_3_8_subscribe_and_3_9_suback() {
    #[rustfmt::skip]
    let bytes = [
        0x82, 0x0E,
        0x00, 0x01,
        0x00, 0x03, b'a', b'/', b'b', 0x01,
        0x00, 0x03, b'c', b'/', b'#', 0x02,
    ];
    golden(
        V311,
        &bytes,
        Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            properties: Properties::default(),
            filters: vec![
                ("a/b".into(), SubscriptionOptions::qos(QoS::AtLeastOnce)),
                ("c/#".into(), SubscriptionOptions::qos(QoS::ExactlyOnce)),
            ],
        }),
    );
    golden(
        V311,
        &[0x90, 0x04, 0x00, 0x01, 0x01, 0x80],
        Packet::SubAck(SubAck {
            packet_id: pid(1),
            properties: Properties::default(),
            reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::UnspecifiedError],
        }),
    );
    // Any MQTT 5 failure code is 0x80 Failure for a 3.1.1 peer.
    encodes_to(
        V311,
        &Packet::SubAck(SubAck {
            packet_id: pid(1),
            properties: Properties::default(),
            reasons: vec![ReasonCode::Success, ReasonCode::TopicFilterInvalid],
        }),
        &[0x90, 0x04, 0x00, 0x01, 0x00, 0x80],
    );
}

#[test]
fn mqtt5_3_8_subscribe_with_options_and_subscription_id() {
    #[rustfmt::skip]
    let bytes = [
        0x82, 0x0B,
        0x00, 0x01,
        0x02, 0x0B, 0x05,                   // subscription identifier 5
        0x00, 0x03, b'a', b'/', b'b',
        0x2D,                               // QoS 1, no local, retain as published, handling 2
    ];
    golden(
        V5,
        &bytes,
        Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            properties: Properties { subscription_identifiers: vec![5], ..Properties::default() },
            filters: vec![(
                "a/b".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            )],
        }),
    );
    golden(
        V5,
        &[0x90, 0x05, 0x00, 0x01, 0x00, 0x02, 0x8F],
        Packet::SubAck(SubAck {
            packet_id: pid(1),
            properties: Properties::default(),
            reasons: vec![ReasonCode::GrantedQoS2, ReasonCode::TopicFilterInvalid],
        }),
    );
}

#[test]
fn mqtt_3_10_unsubscribe_and_3_11_unsuback() {
    let unsub = Packet::Unsubscribe(Unsubscribe {
        packet_id: pid(2),
        properties: Properties::default(),
        filters: vec!["a/+".into()],
    });
    golden(V311, &[0xA2, 0x07, 0x00, 0x02, 0x00, 0x03, b'a', b'/', b'+'], unsub.clone());
    golden(V5, &[0xA2, 0x08, 0x00, 0x02, 0x00, 0x00, 0x03, b'a', b'/', b'+'], unsub);
    golden(
        V311,
        &[0xB0, 0x02, 0x00, 0x05],
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(5),
            properties: Properties::default(),
            reasons: vec![],
        }),
    );
    let v5_ack = Packet::UnsubAck(UnsubAck {
        packet_id: pid(5),
        properties: Properties::default(),
        reasons: vec![ReasonCode::NoSubscriptionExisted],
    });
    golden(V5, &[0xB0, 0x04, 0x00, 0x05, 0x00, 0x11], v5_ack.clone());
    // 3.1.1 UNSUBACK is the packet identifier only.
    encodes_to(V311, &v5_ack, &[0xB0, 0x02, 0x00, 0x05]);
}

#[test]
fn mqtt_3_12_3_13_ping() {
    golden(V311, &[0xC0, 0x00], Packet::PingReq);
    golden(V5, &[0xD0, 0x00], Packet::PingResp);
}

#[test]
fn mqtt_3_14_disconnect() {
    golden(V311, &[0xE0, 0x00], Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    golden(V5, &[0xE0, 0x00], Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    golden(
        V5,
        &[0xE0, 0x01, 0x8E],
        Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver)),
    );
    golden(
        V5,
        &[0xE0, 0x07, 0x04, 0x05, 0x11, 0x00, 0x00, 0x00, 0x00],
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::DisconnectWithWillMessage,
            properties: Properties { session_expiry_interval: Some(0), ..Properties::default() },
        }),
    );
    // 3.1.1 DISCONNECT has no reason code.
    encodes_to(
        V311,
        &Packet::Disconnect(Disconnect::new(ReasonCode::ServerShuttingDown)),
        &[0xE0, 0x00],
    );
}

#[test]
fn mqtt5_3_15_auth() {
    golden(
        V5,
        &[0xF0, 0x00],
        Packet::Auth(Auth { reason: ReasonCode::Success, properties: Properties::default() }),
    );
    #[rustfmt::skip]
    let bytes = [
        0xF0, 0x0F,
        0x18,
        0x0D,
        0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M',
        0x16, 0x00, 0x02, 0x01, 0x02,
    ];
    golden(
        V5,
        &bytes,
        Packet::Auth(Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: Properties {
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(&[1, 2])),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn mqtt_2_2_3_remaining_length_multi_byte() {
    // 200-byte payload: remaining length 5 + 200 = 205 = 0xCD 0x01.
    let payload = vec![0xAB; 200];
    let mut bytes = vec![0x30, 0xCD, 0x01, 0x00, 0x03, b'a', b'/', b'b'];
    bytes.extend_from_slice(&payload);
    golden(
        V311,
        &bytes,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic("a/b"),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from(payload),
        }),
    );
}

#[test]
fn decoder_payload_is_zero_copy_slice_of_receive_buffer() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x00,
    ]);
    buf.extend_from_slice(&[0x00, 0x00]); // empty client id
    buf.extend_from_slice(&[0x30, 0x08, 0x00, 0x01, b't', b'p', b'a', b'y', b'l', b'd']);
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let mut d = Decoder::new(1024);
    assert!(matches!(d.decode(&mut buf).unwrap(), Some(Packet::Connect(_))));
    let Some(Packet::Publish(p)) = d.decode(&mut buf).unwrap() else { panic!("expected PUBLISH") };
    assert_eq!(&p.payload[..], b"payld");
    let at = p.payload.as_ptr() as usize;
    assert!(at >= start && at + p.payload.len() <= end, "payload was copied");
    assert_eq!(d.decode(&mut buf).unwrap(), None);
}

#[test]
fn decoder_waits_for_whole_packet_and_leaves_partial_bytes() {
    let connect = [0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00, 0x00];
    let connect = [&connect[..], &[0x00, 0x00]].concat();
    let mut d = Decoder::new(1024);
    let mut buf = BytesMut::new();
    for (i, &b) in connect.iter().enumerate() {
        buf.extend_from_slice(&[b]);
        let got = d.decode(&mut buf).unwrap();
        if i + 1 < connect.len() {
            assert_eq!(got, None, "after {} bytes", i + 1);
            assert_eq!(buf.len(), i + 1, "partial packet must stay in the buffer");
        } else {
            assert!(matches!(got, Some(Packet::Connect(ref c)) if c.protocol == V5));
        }
    }
    assert_eq!(d.version, Some(V5));
    assert!(buf.is_empty());
}
