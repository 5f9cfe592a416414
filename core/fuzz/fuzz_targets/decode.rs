//! Runs the stream decoder over arbitrary input, in chunks, as a connection would. The first byte
//! picks the starting state (version unknown, 3.1.1, or 5) and the chunk size, so the fuzzer also
//! reaches packets after CONNECT without having to build a valid CONNECT first. Every packet that
//! decodes must encode again, with `encoded_len` equal to the bytes written, and decode back to
//! the same packet.
#![no_main]

use bytes::BytesMut;
use flux_core::mqtt::{
    decode_packet, encode_packet, encoded_len, DecodeError, Decoder, Packet, ProtocolVersion,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else { return };
    let mut decoder = Decoder::new(1 << 20);
    decoder.version = match mode & 0b11 {
        1 => Some(ProtocolVersion::V311),
        2 => Some(ProtocolVersion::V5),
        _ => None,
    };
    let chunk = usize::from(mode >> 2).max(1);
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(packet)) => check_encode(&packet, decoder.version),
                Ok(None) => break,
                Err(e) => {
                    assert_ne!(e, DecodeError::Truncated);
                    return;
                }
            }
        }
    }
});

fn check_encode(packet: &Packet, version: Option<ProtocolVersion>) {
    let version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => version.unwrap_or(ProtocolVersion::V311),
    };
    let mut out = BytesMut::new();
    encode_packet(packet, version, &mut out);
    assert_eq!(out.len(), encoded_len(packet, version));
    assert_eq!(decode_packet(out.freeze(), Some(version)).as_ref(), Ok(packet));
}
