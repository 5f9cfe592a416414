//! A bounds-checked cursor over one received frame. Every read that runs past the end is
//! Malformed (the remaining length promised bytes the packet does not have), and binary data and
//! payloads come out as zero-copy slices of the frame.

use bytes::Bytes;

use super::varint::parse_varint;
use crate::mqtt::error::DecodeError;

const SHORT: DecodeError = DecodeError::Malformed("packet shorter than its fields");

pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Reader {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn rest_slice(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(SHORT)?;
        self.pos += 1;
        Ok(b)
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.array::<2>()?;
        Ok(u16::from_be_bytes(b))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.array::<4>()?;
        Ok(u32::from_be_bytes(b))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.buf.get(self.pos..self.pos + N).ok_or(SHORT)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        self.pos += N;
        Ok(out)
    }

    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        match parse_varint(self.rest_slice())? {
            Some((v, used)) => {
                self.pos += used;
                Ok(v)
            }
            None => Err(SHORT),
        }
    }

    /// The next `n` bytes as a zero-copy slice.
    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(SHORT);
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// Everything left, zero-copy.
    pub fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos.min(self.buf.len())..);
        self.pos = self.buf.len();
        out
    }

    /// Binary Data (1.5.6): two-byte length, then that many bytes (zero-copy).
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// UTF-8 Encoded String (1.5.4): well-formed UTF-8 (no surrogates) and no U+0000.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw)
            .map_err(|_| DecodeError::Malformed("string is not well-formed UTF-8"))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s.to_owned())
    }

    /// The two-byte packet identifier; zero is a Protocol Error (MQTT-2.2.1-3).
    pub fn packet_id(&mut self) -> Result<crate::mqtt::packet::PacketId, DecodeError> {
        let v = self.u16()?;
        crate::mqtt::packet::PacketId::new(v).ok_or(DecodeError::Protocol("packet identifier is 0"))
    }

    /// The remaining length promised exactly the bytes the fields used: leftovers are Malformed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("bytes left over after the last field"))
        }
    }
}
