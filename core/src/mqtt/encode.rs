//! MQTT 3.1.1 / 5.0 encoder.
//!
//! Each packet is written for the version the peer speaks: for 3.1.1 properties and the reason
//! codes 3.1.1 lacks are left out (PUBACK & co. are the packet identifier alone, UNSUBACK too,
//! DISCONNECT is empty, CONNACK and SUBACK codes are mapped to their 3.1.1 return codes). For
//! MQTT 5 the short forms the spec allows are used: PUBACK/PUBREC/PUBREL/PUBCOMP with Success and
//! no properties carry only the packet identifier, one with another reason and no properties has
//! no property length, DISCONNECT and AUTH with Success and no properties are empty.
//!
//! The body is written through one function for both measuring and writing (see
//! `codec/writer.rs`), so [`encoded_len`] is exactly what [`encode_packet`] appends.
//!
//! Encoding never panics. A value the model can hold but the wire cannot (a string over 65535
//! bytes, a packet over 256 MiB, a QoS > 0 PUBLISH without packet identifier) is the caller's bug:
//! it trips a `debug_assert` and is clamped in release. Other conventions:
//! - CONNECT is written for `version` (its protocol name and level come from it, not from
//!   [`Connect::protocol`]).
//! - PUBLISH with QoS 0 never has DUP set on the wire (MQTT-3.3.1-2), and has no packet identifier.
//! - Properties are written as given; which properties a packet may carry is the caller's concern.
//! - AUTH does not exist in 3.1.1: for a 3.1.1 peer nothing is written (and `encoded_len` is 0).

use bytes::BytesMut;

use super::decode::codec::properties::write_properties;
use super::decode::codec::varint::{varint_len, MAX_VARINT};
use super::decode::codec::writer::{Counter, Sink};
use super::packet::*;
use super::properties::Properties;
use super::reason::ReasonCode;

/// Append the wire form of `packet` for a peer speaking `version` to `out`.
pub fn encode_packet(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    if !representable(packet, version) {
        return;
    }
    let body_len = body_len(packet, version);
    out.reserve(1 + varint_len(body_len) + body_len as usize);
    out.put_u8(first_byte(packet));
    out.put_varint(body_len);
    write_body(packet, version, out);
}

/// Total encoded size (fixed header included) of `packet` for `version`: lets a sender check the
/// peer's maximum packet size before writing.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    if !representable(packet, version) {
        return 0;
    }
    let body_len = body_len(packet, version);
    1 + varint_len(body_len) + body_len as usize
}

fn representable(packet: &Packet, version: ProtocolVersion) -> bool {
    let ok = version.is_v5() || !matches!(packet, Packet::Auth(_));
    debug_assert!(ok, "AUTH cannot be sent to an MQTT 3.1.1 peer");
    ok
}

/// The remaining length, clamped to what the fixed header can carry.
fn body_len(packet: &Packet, version: ProtocolVersion) -> u32 {
    let mut c = Counter::default();
    write_body(packet, version, &mut c);
    debug_assert!(c.0 <= MAX_VARINT as usize, "packet body of {} bytes", c.0);
    u32::try_from(c.0).unwrap_or(u32::MAX).min(MAX_VARINT)
}

fn first_byte(packet: &Packet) -> u8 {
    let flags = match packet {
        Packet::Publish(p) => {
            let dup = p.dup && p.qos != QoS::AtMostOnce;
            (u8::from(dup) << 3) | (p.qos.as_u8() << 1) | u8::from(p.retain)
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    ((packet.packet_type() as u8) << 4) | flags
}

fn write_body<S: Sink>(packet: &Packet, v: ProtocolVersion, out: &mut S) {
    match packet {
        Packet::Connect(c) => connect(c, v, out),
        Packet::ConnAck(c) => {
            out.put_u8(u8::from(c.session_present));
            if v.is_v5() {
                out.put_u8(c.reason.as_u8());
                write_properties(&c.properties, out);
            } else {
                out.put_u8(c.reason.connack_v311());
            }
        }
        Packet::Publish(p) => publish(p, v, out),
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            out.put_u16(p.packet_id.get());
            if v.is_v5() {
                short_reason_and_properties(p.reason, &p.properties, out);
            }
        }
        Packet::Subscribe(s) => {
            out.put_u16(s.packet_id.get());
            props(&s.properties, v, out);
            for (filter, o) in &s.filters {
                out.put_string(filter);
                out.put_u8(if v.is_v5() { crate::mqtt::subscription_options_byte(o) } else { o.qos.as_u8() });
            }
        }
        Packet::SubAck(s) => {
            out.put_u16(s.packet_id.get());
            props(&s.properties, v, out);
            for &r in &s.reasons {
                out.put_u8(if v.is_v5() { r.as_u8() } else { suback_v311(r) });
            }
        }
        Packet::Unsubscribe(u) => {
            out.put_u16(u.packet_id.get());
            props(&u.properties, v, out);
            for filter in &u.filters {
                out.put_string(filter);
            }
        }
        Packet::UnsubAck(u) => {
            out.put_u16(u.packet_id.get());
            if v.is_v5() {
                write_properties(&u.properties, out);
                for &r in &u.reasons {
                    out.put_u8(r.as_u8());
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v.is_v5() {
                short_reason_and_properties(d.reason, &d.properties, out);
            }
        }
        Packet::Auth(a) => {
            if v.is_v5() && (a.reason != ReasonCode::Success || !a.properties.is_empty()) {
                out.put_u8(a.reason.as_u8());
                write_properties(&a.properties, out);
            }
        }
    }
}

/// MQTT 5 tail of PUBACK/PUBREC/PUBREL/PUBCOMP/DISCONNECT: nothing for Success without
/// properties, the reason code alone without properties, else both.
fn short_reason_and_properties<S: Sink>(reason: ReasonCode, p: &Properties, out: &mut S) {
    if reason == ReasonCode::Success && p.is_empty() {
        return;
    }
    out.put_u8(reason.as_u8());
    if !p.is_empty() {
        write_properties(p, out);
    }
}

fn props<S: Sink>(p: &Properties, v: ProtocolVersion, out: &mut S) {
    if v.is_v5() {
        write_properties(p, out);
    }
}

/// 3.1.1 SUBACK return codes: granted QoS 0/1/2, anything else is Failure (0x80).
fn suback_v311(r: ReasonCode) -> u8 {
    match r {
        ReasonCode::Success => 0x00,
        ReasonCode::GrantedQoS1 => 0x01,
        ReasonCode::GrantedQoS2 => 0x02,
        _ => 0x80,
    }
}

fn connect<S: Sink>(c: &Connect, v: ProtocolVersion, out: &mut S) {
    out.put_string("MQTT");
    out.put_u8(v.level());
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.as_u8() << 3) | (u8::from(w.retain) << 5);
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    out.put_u8(flags);
    out.put_u16(c.keep_alive_secs);
    props(&c.properties, v, out);
    out.put_string(&c.client_id);
    if let Some(w) = &c.will {
        props(&w.properties, v, out);
        out.put_string(w.topic.as_str());
        out.put_binary(&w.payload);
    }
    if let Some(u) = &c.username {
        out.put_string(u);
    }
    if let Some(p) = &c.password {
        out.put_binary(p);
    }
}

fn publish<S: Sink>(p: &Publish, v: ProtocolVersion, out: &mut S) {
    out.put_string(p.topic.as_str());
    if p.qos != QoS::AtMostOnce {
        debug_assert!(p.packet_id.is_some(), "QoS {} PUBLISH without packet id", p.qos.as_u8());
        out.put_u16(p.packet_id.map_or(0, PacketId::get));
    }
    props(&p.properties, v, out);
    out.put_slice(&p.payload);
}
