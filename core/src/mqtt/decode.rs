//! Incremental MQTT decoder. (Implementation in progress.)
use bytes::BytesMut;

use super::error::DecodeError;
use super::packet::{Packet, ProtocolVersion};

/// Stream decoder for one connection. Feed it the receive buffer; it returns whole packets and
/// leaves partial ones in the buffer.
#[derive(Debug)]
pub struct Decoder {
    /// `None` until CONNECT has been decoded (the first packet decides the version).
    pub version: Option<ProtocolVersion>,
    pub max_packet_size_bytes: usize,
}

impl Decoder {
    pub fn new(max_packet_size_bytes: usize) -> Decoder {
        Decoder { version: None, max_packet_size_bytes }
    }

    /// Take one complete packet off the front of `buf`. `Ok(None)`: need more bytes. The size
    /// limit is checked from the fixed header, before the body is buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let _ = buf;
        todo!()
    }
}

/// Decode exactly one packet from a complete frame (fixed header included).
pub fn decode_packet(
    frame: bytes::Bytes,
    version: Option<ProtocolVersion>,
) -> Result<Packet, DecodeError> {
    let _ = (frame, version);
    todo!()
}
