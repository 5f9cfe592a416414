//! Malformed and forbidden input over a raw `TcpStream`, against the real broker. Each case must
//! close only the offending connection (MQTT 5: after a DISCONNECT with the reason code the spec
//! names) while a client connected before it keeps publishing and receiving.
//!
//! Every test runs the case once as MQTT 3.1.1 and once as MQTT 5 on the same broker.

mod common;

use common::raw::{self, Next, Packet, Raw, DISCONNECT, V311, V5};
use common::{client_id_on_shard, Broker, BrokerKind, WAIT};

/// A client connected before the bad one (home shard 0), subscribed to its own topic.
struct Witness {
    raw: Raw,
    topic: String,
    next_id: u16,
}

impl Witness {
    fn new(broker: &Broker) -> Witness {
        let id = client_id_on_shard("witness", 0);
        let mut raw = Raw::connected(broker.addr(), V311, &id);
        let topic = format!("ok/{id}");
        raw.send(&raw::subscribe(V311, 1, topic.as_bytes(), 1, 0b0010));
        match raw.next(WAIT) {
            Next::Packet(p) if p.kind == raw::SUBACK && p.body.get(2) == Some(&1) => {}
            other => panic!("witness SUBSCRIBE failed: {other:?}"),
        }
        Witness { raw, topic, next_id: 10 }
    }

    /// Publishes QoS 1 to its own topic and expects both the PUBACK and the delivery.
    fn still_works(&mut self, label: &str) {
        self.next_id += 1;
        let payload = format!("alive after {label}");
        self.raw.send(&raw::publish(V311, 0b0010, self.topic.as_bytes(), Some(self.next_id), payload.as_bytes()));
        let (mut acked, mut delivered) = (false, false);
        while !(acked && delivered) {
            match self.raw.next(WAIT) {
                Next::Packet(p) if p.kind == raw::PUBACK => acked = true,
                Next::Packet(p) if p.kind == raw::PUBLISH => {
                    assert!(p.body.ends_with(payload.as_bytes()), "unexpected delivery {p:?}");
                    let id = u16::from_be_bytes([p.body[2 + self.topic.len()], p.body[3 + self.topic.len()]]);
                    self.raw.send(&raw::packet(0x40, &id.to_be_bytes()));
                    delivered = true;
                }
                other => panic!("witness broken after {label}: {other:?}"),
            }
        }
    }
}

/// The server must close `conn`; in MQTT 5 after a DISCONNECT carrying `code`. Mosquitto
/// sometimes closes without one (the spec allows "MAY send" for some of these cases); under
/// fluxd the DISCONNECT is required.
fn expect_closed_with(broker: &Broker, conn: &mut Raw, version: u8, codes: &[u8], label: &str) {
    let seen = conn.expect_close(WAIT);
    if version == V5 {
        match seen.as_slice() {
            [p] if p.kind == DISCONNECT => {
                assert!(codes.contains(&p.reason_code()), "{label}: DISCONNECT 0x{:02x}, want one of {codes:02x?}", p.reason_code())
            }
            [] if broker.kind == BrokerKind::Mosquitto => {
                eprintln!("{label}: mosquitto closed without DISCONNECT (fluxd must send 0x{:02x})", codes[0])
            }
            other => panic!("{label}: want DISCONNECT {codes:02x?} then close, got {other:?}"),
        }
    } else {
        assert!(seen.is_empty(), "{label}: MQTT 3.1.1 has no server DISCONNECT, got {seen:?}");
    }
}

/// Connects, sends `bad`, and checks the close and the witness.
fn after_connect(broker: &Broker, witness: &mut Witness, bad: impl Fn(u8) -> Vec<u8>, codes: &[u8], label: &str) {
    for version in [V311, V5] {
        let id = client_id_on_shard("bad", (version % 2).into());
        let mut conn = Raw::connected(broker.addr(), version, &id);
        conn.send(&bad(version));
        let label = format!("{label} (v{version})");
        expect_closed_with(broker, &mut conn, version, codes, &label);
        witness.still_works(&label);
    }
}

#[test]
fn mqtt5_4_8_garbage_bytes_close_only_that_connection() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);

    // Before CONNECT: an HTTP request is not an MQTT CONNECT; no CONNACK, just a close.
    let mut conn = Raw::connect_tcp(broker.addr());
    conn.send(b"GET / HTTP/1.1\r\nHost: flux\r\n\r\n");
    let seen = conn.expect_close(WAIT);
    assert!(seen.iter().all(|p| p.kind != raw::CONNACK || p.reason_code() != 0), "accepted garbage: {seen:?}");
    witness.still_works("garbage before CONNECT");

    // After CONNECT: packet type 0 is reserved (forbidden).
    after_connect(&broker, &mut witness, |_| vec![0x00, 0x02, 0xde, 0xad], &[0x81, 0x82], "reserved packet type 0");
}

#[test]
fn mqtt5_3_3_1_4_publish_qos3_is_malformed() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);
    after_connect(&broker, &mut witness, |v| raw::publish(v, 0b0110, b"q/3", Some(1), b"x"), &[0x81], "PUBLISH QoS 3");
}

#[test]
fn mqtt5_3_8_1_1_subscribe_reserved_header_flags_are_malformed() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);
    after_connect(&broker, &mut witness, |v| raw::subscribe(v, 7, b"s/#", 0, 0b0000), &[0x81], "SUBSCRIBE flags 0");
}

#[test]
fn mqtt5_1_5_4_1_ill_formed_utf8_topic_is_malformed() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);
    after_connect(&broker, &mut witness, |v| raw::publish(v, 0, b"utf8/\xff\xfe", None, b"x"), &[0x81], "bad UTF-8 topic");
}

#[test]
fn mqtt5_1_5_5_over_long_variable_byte_integer_is_malformed() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);
    // Five length bytes: the fourth still has its continuation bit set.
    after_connect(&broker, &mut witness, |_| vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], &[0x81], "5-byte remaining length");
}

#[test]
fn mqtt5_3_1_2_24_packet_over_maximum_size_closes_with_0x95() {
    // Both brokers take this limit: fluxd `max_packet_size_bytes`, Mosquitto `max_packet_size`.
    let broker = Broker::with_limits(&[("max_packet_size_bytes", "1024")]);
    let mut witness = Witness::new(&broker);
    after_connect(
        &broker,
        &mut witness,
        |v| raw::publish(v, 0b0010, b"big/one", Some(3), &vec![b'x'; 4096]),
        &[0x95],
        "oversize PUBLISH",
    );
}

#[test]
fn mqtt5_3_1_2_3_reserved_connect_flag_is_malformed() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);
    for version in [V311, V5] {
        let mut conn = Raw::connect_tcp(broker.addr());
        conn.send(&raw::connect(version, &client_id_on_shard("reserved", 1), 0x01));
        let seen = conn.expect_close(WAIT);
        // No session may start: at most a refusing CONNACK (MQTT 5 allows 0x81 there).
        let refused = |p: &Packet| p.kind == raw::CONNACK && p.reason_code() != 0;
        assert!(seen.iter().all(refused), "v{version}: reserved CONNECT flag accepted: {seen:?}");
        witness.still_works(&format!("reserved CONNECT flag (v{version})"));
    }
}

#[test]
fn mqtt5_3_1_0_2_second_connect_is_a_protocol_error() {
    let broker = Broker::start();
    let mut witness = Witness::new(&broker);
    after_connect(&broker, &mut witness, |v| raw::connect(v, "again", 0), &[0x82], "second CONNECT");
}
