//! MQTT codec: encode and decode of one packet per type, for 3.1.1 and 5.0, and the streaming
//! decoder over a buffer of back-to-back PUBLISHes (what a connection's read loop does).
//!
//! `cargo bench -p flux-benches --bench codec -- --quick` for a fast pass.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flux_core::mqtt::{
    decode_packet, encode_packet, ConnAck, Connect, Decoder, Disconnect, Packet, PacketId,
    Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode, SubAck, Subscribe,
    SubscriptionOptions, Unsubscribe,
};
use flux_core::topic::TopicName;

fn pid(v: u16) -> PacketId {
    PacketId::new(v).expect("non-zero packet id")
}

fn publish(qos: QoS, payload_bytes: usize) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: TopicName::new("site/42/device/1234/temperature").expect("valid topic"),
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(7)),
        properties: Properties::default(),
        payload: Bytes::from(vec![0xA5; payload_bytes]),
    })
}

/// One representative packet of each type (AUTH is MQTT 5 only and rare; left out).
fn packets() -> Vec<(&'static str, Packet)> {
    vec![
        (
            "connect",
            Packet::Connect(Connect {
                protocol: ProtocolVersion::V5,
                clean_start: true,
                keep_alive_secs: 60,
                client_id: "sensor-000123".into(),
                will: None,
                username: Some("user".into()),
                password: Some(Bytes::from_static(b"secret")),
                properties: Properties::default(),
            }),
        ),
        (
            "connack",
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason: ReasonCode::Success,
                properties: Properties::default(),
            }),
        ),
        ("publish_qos0_64B", publish(QoS::AtMostOnce, 64)),
        ("publish_qos1_64B", publish(QoS::AtLeastOnce, 64)),
        ("publish_qos1_4KiB", publish(QoS::AtLeastOnce, 4096)),
        ("puback", Packet::PubAck(PubResp::success(pid(7)))),
        ("pubrec", Packet::PubRec(PubResp::success(pid(7)))),
        ("pubrel", Packet::PubRel(PubResp::success(pid(7)))),
        ("pubcomp", Packet::PubComp(PubResp::success(pid(7)))),
        (
            "subscribe",
            Packet::Subscribe(Subscribe {
                packet_id: pid(3),
                properties: Properties::default(),
                filters: vec![
                    ("site/+/device/+/temperature".into(), SubscriptionOptions::qos(QoS::AtLeastOnce)),
                    ("site/42/#".into(), SubscriptionOptions::qos(QoS::AtMostOnce)),
                ],
            }),
        ),
        (
            "suback",
            Packet::SubAck(SubAck {
                packet_id: pid(3),
                properties: Properties::default(),
                reasons: vec![ReasonCode::GrantedQoS1, ReasonCode::Success],
            }),
        ),
        (
            "unsubscribe",
            Packet::Unsubscribe(Unsubscribe {
                packet_id: pid(4),
                properties: Properties::default(),
                filters: vec!["site/42/#".into()],
            }),
        ),
        ("pingreq", Packet::PingReq),
        ("pingresp", Packet::PingResp),
        ("disconnect", Packet::Disconnect(Disconnect::new(ReasonCode::Success))),
    ]
}

fn version_name(v: ProtocolVersion) -> &'static str {
    if v.is_v5() {
        "v5"
    } else {
        "v311"
    }
}

fn bench_encode_decode(c: &mut Criterion) {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut encode = c.benchmark_group(format!("encode_{}", version_name(version)));
        for (name, packet) in packets() {
            let mut out = BytesMut::with_capacity(8192);
            encode.bench_function(name, |b| {
                b.iter(|| {
                    out.clear();
                    encode_packet(black_box(&packet), version, &mut out);
                    black_box(out.len())
                })
            });
        }
        encode.finish();

        let mut decode = c.benchmark_group(format!("decode_{}", version_name(version)));
        for (name, packet) in packets() {
            let mut out = BytesMut::new();
            encode_packet(&packet, version, &mut out);
            let frame = out.freeze();
            // Check once that the frame decodes, so the bench measures the success path.
            decode_packet(frame.clone(), Some(version)).expect("round trip");
            decode.bench_function(name, |b| {
                b.iter(|| decode_packet(black_box(frame.clone()), Some(version)).map(|p| black_box(p).packet_type()))
            });
        }
        decode.finish();
    }
}

/// The streaming path: 100 QoS 0 PUBLISHes back to back in one receive buffer.
fn bench_stream(c: &mut Criterion) {
    const N: u64 = 100;
    let mut group = c.benchmark_group("decoder_stream");
    group.throughput(Throughput::Elements(N));
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::new();
        for _ in 0..N {
            encode_packet(&publish(QoS::AtMostOnce, 64), version, &mut buf);
        }
        let wire = buf.freeze();
        group.bench_function(format!("publish_qos0_64B_x100_{}", version_name(version)), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut decoder = Decoder::new(1 << 20);
                    decoder.version = Some(version);
                    let mut n = 0u64;
                    while let Ok(Some(p)) = decoder.decode(&mut buf) {
                        black_box(&p);
                        n += 1;
                    }
                    assert_eq!(n, N);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(300));
    targets = bench_encode_decode, bench_stream
}
criterion_main!(benches);
