//! Where encoded bytes go. Every packet is written once through a [`Sink`]: a [`Counter`] pass gives
//! the lengths the headers need (and [`crate::mqtt::encoded_len`]), a `BytesMut` pass writes. One
//! code path for both means the length and the bytes cannot disagree.
//!
//! Values the wire cannot carry (a string over 65535 bytes, a variable byte integer over
//! [`MAX_VARINT`]) are the caller's bug: they trip a `debug_assert` and are clamped in release
//! rather than panicking, so a bad value corrupts one packet, never the process.

use bytes::{BufMut, BytesMut};

use super::varint::MAX_VARINT;

pub(crate) trait Sink {
    fn put_u8(&mut self, v: u8);
    fn put_slice(&mut self, s: &[u8]);

    fn put_u16(&mut self, v: u16) {
        self.put_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.put_slice(&v.to_be_bytes());
    }
    fn put_varint(&mut self, v: u32) {
        debug_assert!(v <= MAX_VARINT, "variable byte integer {v} out of range");
        let mut v = v.min(MAX_VARINT);
        loop {
            let mut b = (v & 0x7F) as u8;
            v >>= 7;
            if v > 0 {
                b |= 0x80;
            }
            self.put_u8(b);
            if v == 0 {
                break;
            }
        }
    }
    /// Binary Data: two-byte length then the bytes; over-long data is cut at 65535 bytes.
    fn put_binary(&mut self, b: &[u8]) {
        debug_assert!(b.len() <= usize::from(u16::MAX), "binary field of {} bytes", b.len());
        let n = b.len().min(usize::from(u16::MAX));
        self.put_u16(n as u16);
        self.put_slice(b.get(..n).unwrap_or(b));
    }
    fn put_string(&mut self, s: &str) {
        self.put_binary(s.as_bytes());
    }
}

/// A sink that only counts.
#[derive(Default)]
pub(crate) struct Counter(pub usize);

impl Sink for Counter {
    fn put_u8(&mut self, _: u8) {
        self.0 += 1;
    }
    fn put_slice(&mut self, s: &[u8]) {
        self.0 += s.len();
    }
}

impl Sink for BytesMut {
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v);
    }
    fn put_slice(&mut self, s: &[u8]) {
        self.extend_from_slice(s);
    }
}
