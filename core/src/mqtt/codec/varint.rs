//! Variable Byte Integer (MQTT 3.1.1 2.2.3, MQTT 5 1.5.5).

use crate::mqtt::error::DecodeError;

/// Largest value a variable byte integer can carry (four bytes of seven bits).
pub const MAX_VARINT: u32 = 268_435_455;

/// Parse a variable byte integer from the front of `bytes`.
///
/// `Ok(None)`: the integer is not complete yet (fewer than four bytes, all with the continuation
/// bit). `Ok(Some((value, bytes_used)))` otherwise. More than four bytes and non-minimal encodings
/// (a trailing `0x00` after a continuation, e.g. `80 00` for 0) are Malformed: MQTT 5 1.5.5 says
/// "the encoded value MUST use the minimum number of bytes necessary".
pub fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed("variable byte integer not minimally encoded"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(DecodeError::Malformed("variable byte integer longer than 4 bytes"));
    }
    Ok(None)
}

/// Bytes the variable byte integer encoding of `v` takes (values above [`MAX_VARINT`] count as 4;
/// they cannot be encoded and the writer clamps them).
pub fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::super::writer::{Counter, Sink};
    use super::*;

    #[test]
    fn mqtt_1_5_5_boundaries_round_trip_with_minimal_length() {
        for (v, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (MAX_VARINT, 4),
        ] {
            let mut out = bytes::BytesMut::new();
            out.put_varint(v);
            let mut c = Counter::default();
            c.put_varint(v);
            assert_eq!((out.len(), c.0, varint_len(v)), (len, len, len), "{v}");
            assert_eq!(parse_varint(&out), Ok(Some((v, len))));
            // Every proper prefix asks for more bytes.
            for cut in 0..len {
                assert_eq!(parse_varint(&out[..cut]), Ok(None));
            }
        }
    }
}
