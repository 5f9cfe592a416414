//! Incremental MQTT 3.1.1 / 5.0 decoder.
//!
//! [`Decoder::decode`] works on a connection's receive buffer: it reads the fixed header, rejects a
//! packet over the size limit as soon as the remaining length is known, waits (returning
//! `Ok(None)`) until the whole packet is buffered, then splits the frame off and hands it to
//! [`decode_packet`]. Payloads and binary fields are slices of that frame, never copies.
//!
//! Every rule of the specs that can be checked on one packet alone is checked here, and each
//! failure carries the variant whose reason code the spec asks for (see [`DecodeError::reason`]).
//! Choices where the specs leave room:
//! - CONNECT with a protocol name other than "MQTT" or "MQIsdp" is Malformed (it is not any MQTT
//!   version, so there is no version to refuse); "MQIsdp" (3.1) and "MQTT" with a level other than
//!   4 or 5 are `UnsupportedProtocolVersion(level)`.
//! - A will topic that is empty or holds a wildcard is `TopicNameInvalid` (0x90 is the CONNACK code
//!   MQTT 5 gives for an unacceptable will topic); bad UTF-8 in it is Malformed like any string.
//! - MQTT 3.1.1: an empty client identifier with clean session 0 is `ClientIdNotValid`
//!   (MQTT-3.1.3-8, CONNACK return code 2).
//! - A shared subscription with No Local set is a Protocol Error (MQTT-3.8.3-4).
//! - SUBACK and MQTT 5 UNSUBACK need at least one reason code (Protocol Error otherwise), like
//!   SUBSCRIBE and UNSUBSCRIBE need at least one filter.
//! - AUTH accepts a remaining length of 1 (reason code without properties), as DISCONNECT does.
//! - Reason codes are checked to be known to [`ReasonCode::from_u8`], not to be in the list of the
//!   particular packet; the session decides what an unexpected code means.

#[path = "codec/mod.rs"]
pub(crate) mod codec;

use bytes::{Bytes, BytesMut};

use self::codec::properties::decode_properties;
use self::codec::reader::Reader;
use self::codec::varint::parse_varint;
use super::error::DecodeError;
use super::packet::*;
use super::properties::{Properties, PropertyContext};
use super::reason::ReasonCode;
use crate::topic::TopicName;

pub use self::codec::varint::{varint_len, MAX_VARINT};

/// Stream decoder for one connection. Feed it the receive buffer; it returns whole packets and
/// leaves partial ones in the buffer.
#[derive(Debug)]
pub struct Decoder {
    /// `None` until CONNECT has been decoded (the first packet decides the version). Set from the
    /// first CONNECT only: a second CONNECT is still decoded (refusing it is the session's job) but
    /// does not change how the rest of the stream is read.
    pub version: Option<ProtocolVersion>,
    pub max_packet_size_bytes: usize,
}

impl Decoder {
    pub fn new(max_packet_size_bytes: usize) -> Decoder {
        Decoder { version: None, max_packet_size_bytes }
    }

    /// Take one complete packet off the front of `buf`. `Ok(None)`: need more bytes. The size
    /// limit is checked from the fixed header, before the body is buffered.
    ///
    /// An error ends the stream (the packet boundaries can no longer be trusted): the caller
    /// closes the connection with [`DecodeError::reason`].
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        // Known from the first byte: no need to wait for the rest.
        if let (None, Some(&first)) = (self.version, buf.first()) {
            if first >> 4 != PacketType::Connect as u8 {
                return Err(DecodeError::Protocol("first packet is not CONNECT"));
            }
        }
        let Some(header) = parse_fixed_header(buf, self.version)? else {
            return Ok(None);
        };
        if header.total_len > self.max_packet_size_bytes {
            return Err(DecodeError::TooLarge {
                size: header.total_len,
                max: self.max_packet_size_bytes,
            });
        }
        if buf.len() < header.total_len {
            // No `reserve` for the announced size: a peer would then make us allocate up to the
            // limit per connection for the price of a 5-byte header. The buffer grows only with
            // bytes that actually arrive.
            return Ok(None);
        }
        let frame = buf.split_to(header.total_len).freeze();
        let body = frame.slice(header.header_len..);
        let packet = decode_body(header, body, self.version)?;
        if let (None, Packet::Connect(c)) = (self.version, &packet) {
            self.version = Some(c.protocol);
        }
        Ok(Some(packet))
    }
}

/// Decode exactly one packet from a complete frame (fixed header included).
///
/// `version` is the connection's protocol version; CONNECT carries its own and ignores it, and
/// `None` reads every other packet as MQTT 3.1.1. A frame shorter than its remaining length is
/// [`DecodeError::Truncated`]; bytes after the end of the packet are Malformed.
pub fn decode_packet(
    frame: Bytes,
    version: Option<ProtocolVersion>,
) -> Result<Packet, DecodeError> {
    let header = parse_fixed_header(&frame, version)?.ok_or(DecodeError::Truncated)?;
    if frame.len() < header.total_len {
        return Err(DecodeError::Truncated);
    }
    if frame.len() > header.total_len {
        return Err(DecodeError::Malformed("bytes after the end of the packet"));
    }
    let body = frame.slice(header.header_len..);
    decode_body(header, body, version)
}

/// What the fixed header (MQTT 2.1) says.
#[derive(Clone, Copy, Debug)]
struct FixedHeader {
    packet_type: PacketType,
    flags: u8,
    /// Fixed header bytes: 1 + the remaining length's varint.
    header_len: usize,
    /// Whole packet: header + remaining length.
    total_len: usize,
}

/// Parse and check the fixed header at the front of `bytes`; `Ok(None)` if it is not complete.
fn parse_fixed_header(
    bytes: &[u8],
    version: Option<ProtocolVersion>,
) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    let (packet_type, flags) = check_first_byte(first, version)?;
    let Some((remaining, used)) = parse_varint(bytes.get(1..).unwrap_or(&[]))? else {
        return Ok(None);
    };
    let header_len = 1 + used;
    // At most 268_435_455 + 5: no overflow even on 32-bit targets.
    let total_len = header_len + remaining as usize;
    Ok(Some(FixedHeader { packet_type, flags, header_len, total_len }))
}

/// Packet type and flags of the first byte (MQTT 2.1.2-2.1.3). Wrong flags are Malformed.
fn check_first_byte(
    first: u8,
    version: Option<ProtocolVersion>,
) -> Result<(PacketType, u8), DecodeError> {
    use PacketType as T;
    let flags = first & 0x0F;
    let packet_type = match first >> 4 {
        1 => T::Connect,
        2 => T::ConnAck,
        3 => T::Publish,
        4 => T::PubAck,
        5 => T::PubRec,
        6 => T::PubRel,
        7 => T::PubComp,
        8 => T::Subscribe,
        9 => T::SubAck,
        10 => T::Unsubscribe,
        11 => T::UnsubAck,
        12 => T::PingReq,
        13 => T::PingResp,
        14 => T::Disconnect,
        15 => T::Auth,
        _ => return Err(DecodeError::Malformed("packet type 0 is reserved")),
    };
    if packet_type == T::Auth && version != Some(ProtocolVersion::V5) {
        return Err(DecodeError::Malformed("AUTH does not exist in MQTT 3.1.1"));
    }
    match packet_type {
        T::Publish => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::Malformed("PUBLISH with DUP set and QoS 0"));
            }
        }
        T::PubRel | T::Subscribe | T::Unsubscribe => {
            if flags != 0b0010 {
                return Err(DecodeError::Malformed("fixed header flags must be 0010"));
            }
        }
        _ => {
            if flags != 0 {
                return Err(DecodeError::Malformed("fixed header flags must be 0000"));
            }
        }
    }
    Ok((packet_type, flags))
}

fn decode_body(
    header: FixedHeader,
    body: Bytes,
    version: Option<ProtocolVersion>,
) -> Result<Packet, DecodeError> {
    use PacketType as T;
    let v = version.unwrap_or(ProtocolVersion::V311);
    let mut r = Reader::new(body);
    let packet = match header.packet_type {
        T::Connect => Packet::Connect(connect(&mut r)?),
        T::ConnAck => Packet::ConnAck(connack(&mut r, v)?),
        T::Publish => Packet::Publish(publish(&mut r, header.flags, v)?),
        T::PubAck => Packet::PubAck(pub_resp(&mut r, v, T::PubAck)?),
        T::PubRec => Packet::PubRec(pub_resp(&mut r, v, T::PubRec)?),
        T::PubRel => Packet::PubRel(pub_resp(&mut r, v, T::PubRel)?),
        T::PubComp => Packet::PubComp(pub_resp(&mut r, v, T::PubComp)?),
        T::Subscribe => Packet::Subscribe(subscribe(&mut r, v)?),
        T::SubAck => Packet::SubAck(suback(&mut r, v)?),
        T::Unsubscribe => Packet::Unsubscribe(unsubscribe(&mut r, v)?),
        T::UnsubAck => Packet::UnsubAck(unsuback(&mut r, v)?),
        T::PingReq => Packet::PingReq,
        T::PingResp => Packet::PingResp,
        T::Disconnect => Packet::Disconnect(disconnect(&mut r, v)?),
        T::Auth => Packet::Auth(auth(&mut r)?),
    };
    r.finish()?;
    Ok(packet)
}

fn props(r: &mut Reader, v: ProtocolVersion, t: PacketType) -> Result<Properties, DecodeError> {
    if v.is_v5() {
        decode_properties(r, PropertyContext::Packet(t))
    } else {
        Ok(Properties::default())
    }
}

fn reason(b: u8) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(b).ok_or(DecodeError::Malformed("unknown reason code"))
}

fn topic_error(e: crate::topic::TopicError) -> DecodeError {
    use crate::topic::TopicError as E;
    DecodeError::TopicNameInvalid(match e {
        E::Empty => "topic name is empty",
        E::TooLong => "topic name is too long",
        E::NullChar => "topic name contains U+0000",
        E::WildcardInName => "topic name contains a wildcard",
        _ => "topic name is not valid",
    })
}

/// CONNECT (3.1). The version comes from the packet itself.
fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT" | b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => return Err(DecodeError::Malformed("protocol name is not MQTT")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag is set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos_bits != 0 || will_retain) {
        return Err(DecodeError::Malformed("will QoS/retain set without will flag"));
    }
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if protocol == ProtocolVersion::V311 && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password flag without user name flag"));
    }
    let keep_alive_secs = r.u16()?;
    let properties = if protocol.is_v5() {
        decode_properties(r, PropertyContext::Packet(PacketType::Connect))?
    } else {
        Properties::default()
    };

    let client_id = r.string()?;
    if protocol == ProtocolVersion::V311 && client_id.is_empty() && !clean_start {
        return Err(DecodeError::ClientIdNotValid);
    }
    let will = if will_flag {
        let properties = if protocol.is_v5() {
            decode_properties(r, PropertyContext::Will)?
        } else {
            Properties::default()
        };
        let topic = TopicName::new(&r.string()?).map_err(topic_error)?;
        let payload = r.binary()?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(r.string()?) } else { None };
    let password = if password_flag { Some(r.binary()?) } else { None };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive_secs,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// CONNACK (3.2).
fn connack(r: &mut Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("CONNACK reserved flags are set"));
    }
    let code = r.u8()?;
    let reason = if v.is_v5() {
        reason(code)?
    } else {
        ReasonCode::from_connack_v311(code)
            .ok_or(DecodeError::Malformed("unknown CONNACK return code"))?
    };
    let properties = props(r, v, PacketType::ConnAck)?;
    Ok(ConnAck { session_present: flags & 0x01 != 0, reason, properties })
}

/// PUBLISH (3.3). `flags` were checked with the fixed header.
fn publish(r: &mut Reader, flags: u8, v: ProtocolVersion) -> Result<Publish, DecodeError> {
    let dup = flags & 0b1000 != 0;
    let retain = flags & 0b0001 != 0;
    let qos =
        QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(r.packet_id()?) };
    let properties = props(r, v, PacketType::Publish)?;
    let topic = if topic.is_empty() && v.is_v5() {
        // MQTT 5 3.3.2.1 / 3.3.4: an empty name is only valid when an alias stands for it.
        if properties.topic_alias.is_none() {
            return Err(DecodeError::Protocol("empty topic name without topic alias"));
        }
        TopicName::empty_for_alias()
    } else {
        TopicName::new(&topic).map_err(topic_error)?
    };
    let payload = r.rest();
    Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP (3.4-3.7). MQTT 5 lets the reason code (remaining length 2,
/// meaning Success) and the properties (remaining length 3) be left out.
fn pub_resp(r: &mut Reader, v: ProtocolVersion, t: PacketType) -> Result<PubResp, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v.is_v5() || r.is_empty() {
        return Ok(PubResp::success(packet_id));
    }
    let reason = reason(r.u8()?)?;
    let properties = if r.is_empty() { Properties::default() } else { props(r, v, t)? };
    Ok(PubResp { packet_id, reason, properties })
}

/// SUBSCRIBE (3.8).
fn subscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = props(r, v, PacketType::Subscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = subscription_options(r.u8()?, v)?;
        if options.no_local && filter.starts_with("$share/") {
            return Err(DecodeError::Protocol("no local set on a shared subscription"));
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
    }
    Ok(Subscribe { packet_id, properties, filters })
}

/// The subscription options byte (MQTT 5 3.8.3.1; in 3.1.1 only the QoS bits exist).
fn subscription_options(b: u8, v: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if v.is_v5() { 0b1100_0000 } else { 0b1111_1100 };
    if b & reserved != 0 {
        return Err(DecodeError::Malformed("subscription options reserved bits are set"));
    }
    let qos = QoS::from_u8(b & 0b11).ok_or(DecodeError::Malformed("subscription with QoS 3"))?;
    let retain_handling = match (b >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::Protocol("retain handling 3")),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: b & 0b0100 != 0,
        retain_as_published: b & 0b1000 != 0,
        retain_handling,
    })
}

/// SUBACK (3.9).
fn suback(r: &mut Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = props(r, v, PacketType::SubAck)?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let b = r.u8()?;
        let code = if v.is_v5() {
            reason(b)?
        } else {
            match b {
                0x00 => ReasonCode::Success,
                0x01 => ReasonCode::GrantedQoS1,
                0x02 => ReasonCode::GrantedQoS2,
                0x80 => ReasonCode::UnspecifiedError,
                _ => return Err(DecodeError::Malformed("unknown SUBACK return code")),
            }
        };
        reasons.push(code);
    }
    if reasons.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without a reason code"));
    }
    Ok(SubAck { packet_id, properties, reasons })
}

/// UNSUBSCRIBE (3.10).
fn unsubscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = props(r, v, PacketType::Unsubscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Unsubscribe { packet_id, properties, filters })
}

/// UNSUBACK (3.11). In 3.1.1 it is only the packet identifier.
fn unsuback(r: &mut Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v.is_v5() {
        return Ok(UnsubAck { packet_id, properties: Properties::default(), reasons: Vec::new() });
    }
    let properties = props(r, v, PacketType::UnsubAck)?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reasons.push(reason(r.u8()?)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::Protocol("UNSUBACK without a reason code"));
    }
    Ok(UnsubAck { packet_id, properties, reasons })
}

/// DISCONNECT (3.14). Empty in 3.1.1; in MQTT 5 remaining length 0 means Normal disconnection and
/// 1 means a reason code without properties.
fn disconnect(r: &mut Reader, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
    if !v.is_v5() || r.is_empty() {
        return Ok(Disconnect::new(ReasonCode::Success));
    }
    let reason = reason(r.u8()?)?;
    let properties =
        if r.is_empty() { Properties::default() } else { props(r, v, PacketType::Disconnect)? };
    Ok(Disconnect { reason, properties })
}

/// AUTH (3.15), MQTT 5 only (the fixed header check refuses it in 3.1.1).
fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    if r.is_empty() {
        return Ok(Auth { reason: ReasonCode::Success, properties: Properties::default() });
    }
    let reason = reason(r.u8()?)?;
    let properties = if r.is_empty() {
        Properties::default()
    } else {
        decode_properties(r, PropertyContext::Packet(PacketType::Auth))?
    };
    Ok(Auth { reason, properties })
}
