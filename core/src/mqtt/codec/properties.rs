//! The MQTT 5 property codec (2.2.2): the property length, then identifier/value pairs.
//!
//! Decoding checks, in this order: an identifier that MQTT 5 does not define is Malformed; one
//! the packet (or the will) may not carry is a Protocol Error ([`allowed_in`]); a second copy of a
//! property that may appear once is a Protocol Error (only User Property, and Subscription
//! Identifier in PUBLISH, repeat); then the value's own rules (zero or out-of-range values where
//! the spec calls them a Protocol Error).

use bytes::Bytes;

use super::reader::Reader;
use super::writer::{Counter, Sink};
use crate::mqtt::error::DecodeError;
use crate::mqtt::packet::PacketType;
use crate::mqtt::properties::{allowed_in, id::*, Properties, PropertyContext};

fn known(id: u8) -> bool {
    matches!(
        id,
        PAYLOAD_FORMAT_INDICATOR
            | MESSAGE_EXPIRY_INTERVAL
            | CONTENT_TYPE
            | RESPONSE_TOPIC
            | CORRELATION_DATA
            | SUBSCRIPTION_IDENTIFIER
            | SESSION_EXPIRY_INTERVAL
            | ASSIGNED_CLIENT_IDENTIFIER
            | SERVER_KEEP_ALIVE
            | AUTHENTICATION_METHOD
            | AUTHENTICATION_DATA
            | REQUEST_PROBLEM_INFORMATION
            | WILL_DELAY_INTERVAL
            | REQUEST_RESPONSE_INFORMATION
            | RESPONSE_INFORMATION
            | SERVER_REFERENCE
            | REASON_STRING
            | RECEIVE_MAXIMUM
            | TOPIC_ALIAS_MAXIMUM
            | TOPIC_ALIAS
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | USER_PROPERTY
            | MAXIMUM_PACKET_SIZE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE
    )
}

/// A byte property that may only be 0 or 1 (Payload Format Indicator, Request Problem/Response
/// Information, Maximum QoS, and the "... Available" flags): anything else is a Protocol Error.
fn flag(r: &mut Reader, what: &'static str) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

fn nonzero_u16(r: &mut Reader, what: &'static str) -> Result<u16, DecodeError> {
    let v = r.u16()?;
    if v == 0 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

/// Read the property length and the properties it covers.
pub(crate) fn decode_properties(
    r: &mut Reader,
    ctx: PropertyContext,
) -> Result<Properties, DecodeError> {
    let len = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
    if len > r.remaining() {
        return Err(DecodeError::Malformed("property length exceeds the packet"));
    }
    let mut r = Reader::new(r.take(len)?);
    let mut p = Properties::default();
    // Bit n set: property n already seen. Every defined identifier is below 64.
    let mut seen: u64 = 0;
    while !r.is_empty() {
        let id = u8::try_from(r.varint()?).unwrap_or(u8::MAX);
        if !known(id) {
            return Err(DecodeError::Malformed("unknown property identifier"));
        }
        if !allowed_in(id, ctx) {
            return Err(DecodeError::Protocol("property not allowed in this packet"));
        }
        let repeats = id == USER_PROPERTY
            || (id == SUBSCRIPTION_IDENTIFIER
                && ctx == PropertyContext::Packet(PacketType::Publish));
        let bit = 1u64 << (id & 63);
        if !repeats && seen & bit != 0 {
            return Err(DecodeError::Protocol("property appears more than once"));
        }
        seen |= bit;
        match id {
            PAYLOAD_FORMAT_INDICATOR => {
                p.payload_format_indicator = Some(flag(&mut r, "payload format indicator not 0/1")?)
            }
            MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
            CONTENT_TYPE => p.content_type = Some(r.string()?),
            RESPONSE_TOPIC => p.response_topic = Some(r.string()?),
            CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
            SUBSCRIPTION_IDENTIFIER => {
                let v = r.varint()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("subscription identifier 0"));
                }
                p.subscription_identifiers.push(v);
            }
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
            SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
            AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
            REQUEST_PROBLEM_INFORMATION => {
                p.request_problem_information =
                    Some(flag(&mut r, "request problem information not 0/1")?)
            }
            WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
            REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information =
                    Some(flag(&mut r, "request response information not 0/1")?)
            }
            RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
            SERVER_REFERENCE => p.server_reference = Some(r.string()?),
            REASON_STRING => p.reason_string = Some(r.string()?),
            RECEIVE_MAXIMUM => p.receive_maximum = Some(nonzero_u16(&mut r, "receive maximum 0")?),
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
            TOPIC_ALIAS => p.topic_alias = Some(nonzero_u16(&mut r, "topic alias 0")?),
            MAXIMUM_QOS => p.maximum_qos = Some(flag(&mut r, "maximum QoS not 0/1")?),
            RETAIN_AVAILABLE => {
                p.retain_available = Some(flag(&mut r, "retain available not 0/1")?)
            }
            USER_PROPERTY => {
                let k = r.string()?;
                let v = r.string()?;
                p.user_properties.push((k, v));
            }
            MAXIMUM_PACKET_SIZE => {
                let v = r.u32()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                p.maximum_packet_size = Some(v);
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                p.wildcard_subscription_available =
                    Some(flag(&mut r, "wildcard subscription available not 0/1")?)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                p.subscription_identifier_available =
                    Some(flag(&mut r, "subscription identifier available not 0/1")?)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                p.shared_subscription_available =
                    Some(flag(&mut r, "shared subscription available not 0/1")?)
            }
            _ => return Err(DecodeError::Malformed("unknown property identifier")),
        }
    }
    // MQTT 5 3.1.2.11.10 / 3.2.2.3.18 / 3.15.2.2.3.
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::Protocol("authentication data without authentication method"));
    }
    Ok(p)
}

/// Write the property length and then every property present, in identifier order (user
/// properties and subscription identifiers in their own order).
pub(crate) fn write_properties<S: Sink>(p: &Properties, out: &mut S) {
    let mut len = Counter::default();
    write_list(p, &mut len);
    out.put_varint(u32::try_from(len.0).unwrap_or(u32::MAX));
    write_list(p, out);
}

fn write_list<S: Sink>(p: &Properties, out: &mut S) {
    fn byte<S: Sink>(out: &mut S, id: u8, v: Option<u8>) {
        if let Some(v) = v {
            out.put_u8(id);
            out.put_u8(v);
        }
    }
    fn two<S: Sink>(out: &mut S, id: u8, v: Option<u16>) {
        if let Some(v) = v {
            out.put_u8(id);
            out.put_u16(v);
        }
    }
    fn four<S: Sink>(out: &mut S, id: u8, v: Option<u32>) {
        if let Some(v) = v {
            out.put_u8(id);
            out.put_u32(v);
        }
    }
    fn string<S: Sink>(out: &mut S, id: u8, v: &Option<String>) {
        if let Some(v) = v {
            out.put_u8(id);
            out.put_string(v);
        }
    }
    fn binary<S: Sink>(out: &mut S, id: u8, v: &Option<Bytes>) {
        if let Some(v) = v {
            out.put_u8(id);
            out.put_binary(v);
        }
    }
    byte(out, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    four(out, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    string(out, CONTENT_TYPE, &p.content_type);
    string(out, RESPONSE_TOPIC, &p.response_topic);
    binary(out, CORRELATION_DATA, &p.correlation_data);
    for &v in &p.subscription_identifiers {
        out.put_u8(SUBSCRIPTION_IDENTIFIER);
        out.put_varint(v);
    }
    four(out, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    string(out, ASSIGNED_CLIENT_IDENTIFIER, &p.assigned_client_identifier);
    two(out, SERVER_KEEP_ALIVE, p.server_keep_alive);
    string(out, AUTHENTICATION_METHOD, &p.authentication_method);
    binary(out, AUTHENTICATION_DATA, &p.authentication_data);
    byte(out, REQUEST_PROBLEM_INFORMATION, p.request_problem_information);
    four(out, WILL_DELAY_INTERVAL, p.will_delay_interval);
    byte(out, REQUEST_RESPONSE_INFORMATION, p.request_response_information);
    string(out, RESPONSE_INFORMATION, &p.response_information);
    string(out, SERVER_REFERENCE, &p.server_reference);
    string(out, REASON_STRING, &p.reason_string);
    two(out, RECEIVE_MAXIMUM, p.receive_maximum);
    two(out, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    two(out, TOPIC_ALIAS, p.topic_alias);
    byte(out, MAXIMUM_QOS, p.maximum_qos);
    byte(out, RETAIN_AVAILABLE, p.retain_available);
    for (k, v) in &p.user_properties {
        out.put_u8(USER_PROPERTY);
        out.put_string(k);
        out.put_string(v);
    }
    four(out, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    byte(out, WILDCARD_SUBSCRIPTION_AVAILABLE, p.wildcard_subscription_available);
    byte(out, SUBSCRIPTION_IDENTIFIER_AVAILABLE, p.subscription_identifier_available);
    byte(out, SHARED_SUBSCRIPTION_AVAILABLE, p.shared_subscription_available);
}

/// Properties of a PUBLISH in their wire encoding (length prefix included), for storing a message
/// outside a packet (the write-ahead log).
pub fn encode_publish_properties(p: &Properties) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    write_properties(p, &mut out);
    out.to_vec()
}

/// The inverse of [`encode_publish_properties`]; validated as PUBLISH properties.
pub fn decode_publish_properties(bytes: &[u8]) -> Result<Properties, DecodeError> {
    let mut r = Reader::new(bytes::Bytes::copy_from_slice(bytes));
    let p = decode_properties(&mut r, PropertyContext::Packet(crate::mqtt::packet::PacketType::Publish))?;
    r.finish()?;
    Ok(p)
}
