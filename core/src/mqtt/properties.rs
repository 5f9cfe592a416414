//! MQTT 5 properties (2.2.2). One struct carries every property; which identifiers a packet may
//! carry is checked by the decoder ([`allowed_in`]) and a property that appears twice where the spec
//! forbids it is a Protocol Error.

use bytes::Bytes;

use super::packet::PacketType;

/// Property identifiers (MQTT 5 2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Where a property may appear: the packet types, plus the will properties of CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertyContext {
    Packet(PacketType),
    Will,
}

/// Whether property `prop` may appear in `ctx` (MQTT 5 table 2-4).
pub fn allowed_in(prop: u8, ctx: PropertyContext) -> bool {
    use id::*;
    use PacketType as T;
    use PropertyContext::{Packet as P, Will as W};
    match prop {
        PAYLOAD_FORMAT_INDICATOR | MESSAGE_EXPIRY_INTERVAL | CONTENT_TYPE | RESPONSE_TOPIC
        | CORRELATION_DATA => matches!(ctx, P(T::Publish) | W),
        SUBSCRIPTION_IDENTIFIER => matches!(ctx, P(T::Publish) | P(T::Subscribe)),
        SESSION_EXPIRY_INTERVAL => matches!(ctx, P(T::Connect) | P(T::ConnAck) | P(T::Disconnect)),
        ASSIGNED_CLIENT_IDENTIFIER | SERVER_KEEP_ALIVE | RESPONSE_INFORMATION | MAXIMUM_QOS
        | RETAIN_AVAILABLE | WILDCARD_SUBSCRIPTION_AVAILABLE | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => matches!(ctx, P(T::ConnAck)),
        AUTHENTICATION_METHOD | AUTHENTICATION_DATA => {
            matches!(ctx, P(T::Connect) | P(T::ConnAck) | P(T::Auth))
        }
        REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => matches!(ctx, P(T::Connect)),
        WILL_DELAY_INTERVAL => matches!(ctx, W),
        SERVER_REFERENCE => matches!(ctx, P(T::ConnAck) | P(T::Disconnect)),
        REASON_STRING => matches!(
            ctx,
            P(T::ConnAck)
                | P(T::PubAck)
                | P(T::PubRec)
                | P(T::PubRel)
                | P(T::PubComp)
                | P(T::SubAck)
                | P(T::UnsubAck)
                | P(T::Disconnect)
                | P(T::Auth)
        ),
        RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => {
            matches!(ctx, P(T::Connect) | P(T::ConnAck))
        }
        TOPIC_ALIAS => matches!(ctx, P(T::Publish)),
        USER_PROPERTY => true,
        _ => false,
    }
}

/// Every MQTT 5 property. `None`/empty means absent. Strings are valid MQTT UTF-8 (checked by the
/// decoder). Only `user_properties` and `subscription_identifiers` (in PUBLISH) may repeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// In SUBSCRIBE at most one (1..=268_435_455); in a PUBLISH to a subscriber, one per matching
    /// subscription that had one.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}
