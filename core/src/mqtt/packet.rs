//! The MQTT packet model shared by 3.1.1 and 5.0.

use std::num::NonZeroU16;

use bytes::Bytes;

use super::properties::Properties;
use super::reason::ReasonCode;
use crate::topic::TopicName;

/// Protocol level from CONNECT: 4 = MQTT 3.1.1, 5 = MQTT 5.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    V311,
    V5,
}

impl ProtocolVersion {
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// A packet identifier: never zero on the wire (MQTT-2.2.1-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketId(pub NonZeroU16);

impl PacketId {
    pub fn new(v: u16) -> Option<PacketId> {
        NonZeroU16::new(v).map(PacketId)
    }
    pub fn get(self) -> u16 {
        self.0.get()
    }
    /// The next id after this one, wrapping from 65535 to 1.
    pub fn next(self) -> PacketId {
        PacketId(NonZeroU16::new(self.0.get().wrapping_add(1)).unwrap_or(NonZeroU16::MIN))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResp),
    PubRec(PubResp),
    PubRel(PubResp),
    PubComp(PubResp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

/// Fixed-header packet type numbers (MQTT 2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    /// Valid MQTT UTF-8; may be empty (the server then assigns one, or refuses in 3.1.1 when
    /// clean_session is 0).
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// CONNECT properties (session expiry, receive maximum, maximum packet size, topic alias
    /// maximum, request response/problem information, user properties, authentication).
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Will {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (will delay interval, payload format, message expiry, content type,
    /// response topic, correlation data, user properties).
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConnAck {
    pub session_present: bool,
    /// For 3.1.1 only codes with a 3.1.1 equivalent are sent; see [`ReasonCode::connack_v311`].
    pub reason: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty only in MQTT 5 when a topic alias stands for the name (resolved by the session).
    pub topic: TopicName,
    /// `Some` exactly when qos > 0.
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    /// Zero-copy slice of the receive buffer.
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct PubResp {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl PubResp {
    pub fn success(packet_id: PacketId) -> PubResp {
        PubResp { packet_id, reason: ReasonCode::Success, properties: Properties::default() }
    }
}

/// Retain handling option of a subscription (MQTT 5 3.8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// 2: do not send retained messages.
    DoNotSend = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    /// Subscription identifier and user properties.
    pub properties: Properties,
    /// Filters as sent; validated as [`crate::topic::TopicFilter`] by the session so that one bad
    /// filter gets its own SUBACK code in MQTT 5 rather than failing the packet.
    pub filters: Vec<(String, SubscriptionOptions)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Per filter: 0x00/0x01/0x02 granted QoS, or a failure code (>= 0x80).
    pub reasons: Vec<ReasonCode>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Empty for MQTT 3.1.1 (its UNSUBACK has no payload).
    pub reasons: Vec<ReasonCode>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Disconnect {
    pub fn new(reason: ReasonCode) -> Disconnect {
        Disconnect { reason, properties: Properties::default() }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}
