//! MQTT encoder. (Implementation in progress.)
use bytes::BytesMut;

use super::packet::{Packet, ProtocolVersion};

/// Append the wire form of `packet` for a peer speaking `version` to `out`.
pub fn encode_packet(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    let _ = (packet, version, out);
    todo!()
}

/// Total encoded size (fixed header included) of `packet` for `version`: lets a sender check the
/// peer's maximum packet size before writing.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let _ = (packet, version);
    todo!()
}
