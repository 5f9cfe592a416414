//! Property tests of the codec: encode -> decode round trips for every packet type in both
//! versions (values generated are only those valid for the version), stream decoding fed in random
//! chunk sizes, and decoding arbitrary or mutated bytes never panics.

use bytes::{Bytes, BytesMut};
use flux_core::mqtt::properties::{allowed_in, PropertyContext};
use flux_core::mqtt::*;
use flux_core::topic::TopicName;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use ProtocolVersion::{V311, V5};

// ---- value strategies --------------------------------------------------------------------------

/// Valid MQTT strings: any non-control characters (so never U+0000), multi-byte ones included.
fn string() -> impl Strategy<Value = String> {
    "\\PC{0,8}"
}

fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn topic() -> impl Strategy<Value = TopicName> {
    "[a-z0-9$é]{0,4}(/[a-zA-Z0-9 ]{0,4}){0,3}"
        .prop_filter_map("non-empty", |s| TopicName::new(&s).ok())
}

/// Filters are not validated by the codec; anything but a "$share/" prefix (No Local is refused
/// there) will do.
fn filter() -> impl Strategy<Value = String> {
    "[a-z0-9+#/]{0,12}"
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    any::<u8>().prop_filter_map("defined reason code", ReasonCode::from_u8)
}

fn sparse<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    option::weighted(0.15, s)
}

/// Any property with a valid value; [`restrict`] then keeps those allowed in one place.
fn any_properties() -> impl Strategy<Value = Properties> {
    let flag = || sparse(0u8..=1);
    let a = (
        flag(),
        sparse(any::<u32>()),
        sparse(string()),
        sparse(string()),
        sparse(bytes()),
        vec(1u32..=268_435_455, 0..3),
        sparse(any::<u32>()),
        sparse(string()),
        sparse(any::<u16>()),
        sparse(string()),
    );
    let b = (
        sparse(bytes()),
        flag(),
        sparse(any::<u32>()),
        flag(),
        sparse(string()),
        sparse(string()),
        sparse(string()),
        sparse(1u16..),
        sparse(any::<u16>()),
        sparse(1u16..),
        flag(),
        flag(),
    );
    let c = (vec((string(), string()), 0..3), sparse(1u32..), flag(), flag(), flag());
    let all = (a, b, c).prop_map(|(a, b, c)| Properties {
        payload_format_indicator: a.0,
        message_expiry_interval: a.1,
        content_type: a.2,
        response_topic: a.3,
        correlation_data: a.4,
        subscription_identifiers: a.5,
        session_expiry_interval: a.6,
        assigned_client_identifier: a.7,
        server_keep_alive: a.8,
        authentication_method: a.9,
        authentication_data: b.0,
        request_problem_information: b.1,
        will_delay_interval: b.2,
        request_response_information: b.3,
        response_information: b.4,
        server_reference: b.5,
        reason_string: b.6,
        receive_maximum: b.7,
        topic_alias_maximum: b.8,
        topic_alias: b.9,
        maximum_qos: b.10,
        retain_available: b.11,
        user_properties: c.0,
        maximum_packet_size: c.1,
        wildcard_subscription_available: c.2,
        subscription_identifier_available: c.3,
        shared_subscription_available: c.4,
    });
    prop_oneof![1 => Just(Properties::default()), 3 => all]
}

/// Drop every property `ctx` may not carry, and fix up what the spec forbids in combination.
fn restrict(mut p: Properties, ctx: PropertyContext) -> Properties {
    use flux_core::mqtt::properties::id::*;
    fn keep<T>(v: &mut Option<T>, id: u8, ctx: PropertyContext) {
        if !allowed_in(id, ctx) {
            *v = None;
        }
    }
    keep(&mut p.payload_format_indicator, PAYLOAD_FORMAT_INDICATOR, ctx);
    keep(&mut p.message_expiry_interval, MESSAGE_EXPIRY_INTERVAL, ctx);
    keep(&mut p.content_type, CONTENT_TYPE, ctx);
    keep(&mut p.response_topic, RESPONSE_TOPIC, ctx);
    keep(&mut p.correlation_data, CORRELATION_DATA, ctx);
    if !allowed_in(SUBSCRIPTION_IDENTIFIER, ctx) {
        p.subscription_identifiers.clear();
    }
    if ctx == PropertyContext::Packet(PacketType::Subscribe) {
        p.subscription_identifiers.truncate(1);
    }
    keep(&mut p.session_expiry_interval, SESSION_EXPIRY_INTERVAL, ctx);
    keep(&mut p.assigned_client_identifier, ASSIGNED_CLIENT_IDENTIFIER, ctx);
    keep(&mut p.server_keep_alive, SERVER_KEEP_ALIVE, ctx);
    keep(&mut p.authentication_method, AUTHENTICATION_METHOD, ctx);
    keep(&mut p.authentication_data, AUTHENTICATION_DATA, ctx);
    if p.authentication_method.is_none() {
        p.authentication_data = None;
    }
    keep(&mut p.request_problem_information, REQUEST_PROBLEM_INFORMATION, ctx);
    keep(&mut p.will_delay_interval, WILL_DELAY_INTERVAL, ctx);
    keep(&mut p.request_response_information, REQUEST_RESPONSE_INFORMATION, ctx);
    keep(&mut p.response_information, RESPONSE_INFORMATION, ctx);
    keep(&mut p.server_reference, SERVER_REFERENCE, ctx);
    keep(&mut p.reason_string, REASON_STRING, ctx);
    keep(&mut p.receive_maximum, RECEIVE_MAXIMUM, ctx);
    keep(&mut p.topic_alias_maximum, TOPIC_ALIAS_MAXIMUM, ctx);
    keep(&mut p.topic_alias, TOPIC_ALIAS, ctx);
    keep(&mut p.maximum_qos, MAXIMUM_QOS, ctx);
    keep(&mut p.retain_available, RETAIN_AVAILABLE, ctx);
    keep(&mut p.maximum_packet_size, MAXIMUM_PACKET_SIZE, ctx);
    keep(&mut p.wildcard_subscription_available, WILDCARD_SUBSCRIPTION_AVAILABLE, ctx);
    keep(&mut p.subscription_identifier_available, SUBSCRIPTION_IDENTIFIER_AVAILABLE, ctx);
    keep(&mut p.shared_subscription_available, SHARED_SUBSCRIPTION_AVAILABLE, ctx);
    p
}

/// Properties for packet type `t`: any allowed ones in MQTT 5, none in 3.1.1.
fn props_for(v: ProtocolVersion, t: PacketType) -> BoxedStrategy<Properties> {
    props_in(v, PropertyContext::Packet(t))
}

fn props_in(v: ProtocolVersion, ctx: PropertyContext) -> BoxedStrategy<Properties> {
    match v {
        V311 => Just(Properties::default()).boxed(),
        V5 => any_properties().prop_map(move |p| restrict(p, ctx)).boxed(),
    }
}

// ---- packet strategies, one per type -----------------------------------------------------------

fn connect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let will = (topic(), bytes(), qos(), any::<bool>(), props_in(v, PropertyContext::Will))
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        string(),
        option::of(will),
        option::of(string()),
        option::of(bytes()),
        props_for(v, PacketType::Connect),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive_secs,
                client_id,
                will,
                username,
                password,
                properties,
            )| {
                let mut c = Connect {
                    protocol: v,
                    clean_start,
                    keep_alive_secs,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                };
                if v == V311 {
                    // 3.1.1: no password without user name; an empty id needs a clean session.
                    if c.username.is_none() {
                        c.password = None;
                    }
                    if c.client_id.is_empty() {
                        c.clean_start = true;
                    }
                }
                Packet::Connect(c)
            },
        )
        .boxed()
}

fn connack(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let reason = match v {
        V5 => reason().boxed(),
        V311 => (0u8..=5).prop_filter_map("3.1.1 code", ReasonCode::from_connack_v311).boxed(),
    };
    (any::<bool>(), reason, props_for(v, PacketType::ConnAck))
        .prop_map(|(session_present, reason, properties)| {
            Packet::ConnAck(ConnAck { session_present, reason, properties })
        })
        .boxed()
}

fn publish(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        any::<bool>(),
        packet_id(),
        props_for(v, PacketType::Publish),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(dup, qos, retain, topic, empty_topic, id, mut properties, payload)| {
            // MQTT 5: an empty topic name stands for an alias, which must then be present.
            let topic = if v == V5 && empty_topic {
                properties.topic_alias.get_or_insert(1);
                TopicName::empty_for_alias()
            } else {
                topic
            };
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload: Bytes::from(payload),
            })
        })
        .boxed()
}

fn pub_resp(v: ProtocolVersion, t: PacketType) -> BoxedStrategy<PubResp> {
    match v {
        V311 => packet_id().prop_map(PubResp::success).boxed(),
        V5 => (packet_id(), reason(), props_for(v, t))
            .prop_map(|(packet_id, reason, properties)| PubResp { packet_id, reason, properties })
            .boxed(),
    }
}

fn options(v: ProtocolVersion) -> BoxedStrategy<SubscriptionOptions> {
    match v {
        V311 => qos().prop_map(SubscriptionOptions::qos).boxed(),
        V5 => (qos(), any::<bool>(), any::<bool>(), 0u8..3)
            .prop_map(|(qos, no_local, retain_as_published, rh)| SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling: match rh {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            })
            .boxed(),
    }
}

fn subscribe(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (packet_id(), props_for(v, PacketType::Subscribe), vec((filter(), options(v)), 1..5))
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe { packet_id, properties, filters })
        })
        .boxed()
}

fn suback(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let code = match v {
        V5 => reason().boxed(),
        V311 => prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::GrantedQoS1),
            Just(ReasonCode::GrantedQoS2),
            Just(ReasonCode::UnspecifiedError),
        ]
        .boxed(),
    };
    (packet_id(), props_for(v, PacketType::SubAck), vec(code, 1..5))
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck { packet_id, properties, reasons })
        })
        .boxed()
}

fn unsubscribe(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (packet_id(), props_for(v, PacketType::Unsubscribe), vec(filter(), 1..5))
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
        })
        .boxed()
}

fn unsuback(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let reasons = match v {
        V5 => vec(reason(), 1..5).boxed(),
        V311 => Just(Vec::new()).boxed(),
    };
    (packet_id(), props_for(v, PacketType::UnsubAck), reasons)
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::UnsubAck(UnsubAck { packet_id, properties, reasons })
        })
        .boxed()
}

fn disconnect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    match v {
        V311 => Just(Packet::Disconnect(Disconnect::new(ReasonCode::Success))).boxed(),
        V5 => (reason(), props_for(v, PacketType::Disconnect))
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
            .boxed(),
    }
}

fn auth() -> BoxedStrategy<Packet> {
    (reason(), props_for(V5, PacketType::Auth))
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
        .boxed()
}

/// Any packet but CONNECT (what may follow CONNECT on a stream).
fn after_connect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut all = vec![
        connack(v),
        publish(v),
        pub_resp(v, PacketType::PubAck).prop_map(Packet::PubAck).boxed(),
        pub_resp(v, PacketType::PubRec).prop_map(Packet::PubRec).boxed(),
        pub_resp(v, PacketType::PubRel).prop_map(Packet::PubRel).boxed(),
        pub_resp(v, PacketType::PubComp).prop_map(Packet::PubComp).boxed(),
        subscribe(v),
        suback(v),
        unsubscribe(v),
        unsuback(v),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v),
    ];
    if v == V5 {
        all.push(auth());
    }
    proptest::strategy::Union::new(all).boxed()
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(V311), Just(V5)]
}

// ---- round trips -------------------------------------------------------------------------------

fn encode(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode_packet(p, v, &mut out);
    out
}

fn round_trip(p: Packet, v: ProtocolVersion) -> Result<(), TestCaseError> {
    let bytes = encode(&p, v);
    prop_assert_eq!(encoded_len(&p, v), bytes.len());
    let decoded = decode_packet(bytes.clone().freeze(), Some(v));
    prop_assert_eq!(decoded.as_ref(), Ok(&p), "bytes: {:02x?}", &bytes[..]);
    // And through the stream decoder, with the version it would have learnt from CONNECT.
    let mut d = Decoder::new(usize::MAX);
    if !matches!(p, Packet::Connect(_)) {
        d.version = Some(v);
    }
    let mut buf = bytes;
    prop_assert_eq!(d.decode(&mut buf), Ok(Some(p)));
    prop_assert!(buf.is_empty());
    prop_assert_eq!(d.version, Some(v));
    Ok(())
}

macro_rules! round_trip_tests {
    ($($name:ident: $v:expr => $strategy:expr;)*) => {
        proptest! {
            $(
                #[test]
                fn $name(p in $strategy) {
                    round_trip(p, $v)?;
                }
            )*
        }
    };
}

round_trip_tests! {
    round_trip_v311_connect: V311 => connect(V311);
    round_trip_v311_connack: V311 => connack(V311);
    round_trip_v311_publish: V311 => publish(V311);
    round_trip_v311_puback: V311 => pub_resp(V311, PacketType::PubAck).prop_map(Packet::PubAck);
    round_trip_v311_pubrec: V311 => pub_resp(V311, PacketType::PubRec).prop_map(Packet::PubRec);
    round_trip_v311_pubrel: V311 => pub_resp(V311, PacketType::PubRel).prop_map(Packet::PubRel);
    round_trip_v311_pubcomp: V311 => pub_resp(V311, PacketType::PubComp).prop_map(Packet::PubComp);
    round_trip_v311_subscribe: V311 => subscribe(V311);
    round_trip_v311_suback: V311 => suback(V311);
    round_trip_v311_unsubscribe: V311 => unsubscribe(V311);
    round_trip_v311_unsuback: V311 => unsuback(V311);
    round_trip_v311_pingreq: V311 => Just(Packet::PingReq);
    round_trip_v311_pingresp: V311 => Just(Packet::PingResp);
    round_trip_v311_disconnect: V311 => disconnect(V311);
    round_trip_v5_connect: V5 => connect(V5);
    round_trip_v5_connack: V5 => connack(V5);
    round_trip_v5_publish: V5 => publish(V5);
    round_trip_v5_puback: V5 => pub_resp(V5, PacketType::PubAck).prop_map(Packet::PubAck);
    round_trip_v5_pubrec: V5 => pub_resp(V5, PacketType::PubRec).prop_map(Packet::PubRec);
    round_trip_v5_pubrel: V5 => pub_resp(V5, PacketType::PubRel).prop_map(Packet::PubRel);
    round_trip_v5_pubcomp: V5 => pub_resp(V5, PacketType::PubComp).prop_map(Packet::PubComp);
    round_trip_v5_subscribe: V5 => subscribe(V5);
    round_trip_v5_suback: V5 => suback(V5);
    round_trip_v5_unsubscribe: V5 => unsubscribe(V5);
    round_trip_v5_unsuback: V5 => unsuback(V5);
    round_trip_v5_pingreq: V5 => Just(Packet::PingReq);
    round_trip_v5_pingresp: V5 => Just(Packet::PingResp);
    round_trip_v5_disconnect: V5 => disconnect(V5);
    round_trip_v5_auth: V5 => auth();
}

// ---- streams -----------------------------------------------------------------------------------

/// A CONNECT for `v` followed by up to 12 other packets of that version.
fn stream() -> impl Strategy<Value = (ProtocolVersion, Vec<Packet>)> {
    version().prop_flat_map(|v| {
        (connect(v), vec(after_connect(v), 0..12)).prop_map(move |(c, rest)| {
            let mut all = vec![c];
            all.extend(rest);
            (v, all)
        })
    })
}

/// Feed `wire` to a fresh decoder in chunks of the given sizes (cycled), decoding all it can
/// after each chunk.
fn decode_in_chunks(wire: &[u8], chunks: &[usize]) -> Result<Vec<Packet>, DecodeError> {
    let mut d = Decoder::new(usize::MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in chunks.iter().cycle() {
        if at >= wire.len() {
            break;
        }
        let end = (at + n).min(wire.len());
        buf.extend_from_slice(&wire[at..end]);
        at = end;
        while let Some(p) = d.decode(&mut buf)? {
            out.push(p);
        }
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    Ok(out)
}

proptest! {
    #[test]
    fn stream_decoded_in_random_chunks_gives_the_same_packets(
        (v, packets) in stream(),
        chunks in vec(1usize..40, 1..8),
    ) {
        let mut wire = BytesMut::new();
        for p in &packets {
            encode_packet(p, v, &mut wire);
        }
        let whole = decode_in_chunks(&wire, &[wire.len().max(1)]);
        prop_assert_eq!(whole.as_ref(), Ok(&packets));
        let chunked = decode_in_chunks(&wire, &chunks);
        prop_assert_eq!(chunked, Ok(packets));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..512), v in option::of(version())) {
        let mut d = Decoder::new(4096);
        let mut buf = BytesMut::from(&data[..]);
        drain(&mut d, &mut buf);
        let mut d = Decoder::new(4096);
        d.version = v;
        let mut buf = BytesMut::from(&data[..]);
        drain(&mut d, &mut buf);
        let _ = decode_packet(Bytes::from(data), v);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_connect_never_panic(
        c in version().prop_flat_map(connect),
        data in vec(any::<u8>(), 0..512),
    ) {
        let Packet::Connect(ref conn) = c else { unreachable!() };
        let mut buf = encode(&c, conn.protocol);
        buf.extend_from_slice(&data);
        let mut d = Decoder::new(4096);
        prop_assert_eq!(d.decode(&mut buf), Ok(Some(c.clone())));
        drain(&mut d, &mut buf);
    }

    /// Valid streams with a few bytes changed reach deep into the decoder; it must answer with a
    /// packet or an error, never a panic, and never return Truncated from the stream decoder.
    #[test]
    fn mutated_valid_streams_never_panic(
        (v, packets) in stream(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut wire = BytesMut::new();
        for p in &packets {
            encode_packet(p, v, &mut wire);
        }
        for (i, b) in edits {
            let i = i.index(wire.len());
            wire[i] = b;
        }
        let mut d = Decoder::new(1 << 16);
        drain(&mut d, &mut wire);
    }
}

fn drain(d: &mut Decoder, buf: &mut BytesMut) {
    loop {
        match d.decode(buf) {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                assert_ne!(e, DecodeError::Truncated, "the stream decoder never reports Truncated");
                return;
            }
        }
    }
}
