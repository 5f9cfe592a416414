//! A deliberately tiny MQTT codec over a blocking `std::net::TcpStream`, for sending bytes that
//! no well-behaved client library would produce. Written by hand on purpose: the point is to
//! control every byte, and to stay independent of the broker's own codec.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const V311: u8 = 4;
pub const V5: u8 = 5;

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// Fixed header byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// CONNECT with clean start, keep alive 30 s, no properties; `flags_extra` is OR-ed into the
/// connect flags (e.g. 0x01 sets the reserved bit).
pub fn connect(version: u8, client_id: &str, flags_extra: u8) -> Vec<u8> {
    connect_full(version, client_id, 0x02 | flags_extra, &[])
}

/// CONNECT with explicit connect flags and (MQTT 5) property bytes; keep alive 30 s.
pub fn connect_full(version: u8, client_id: &str, flags: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(version);
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    if version == V5 {
        body.extend(varint(properties.len()));
        body.extend_from_slice(properties);
    }
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

/// SUBSCRIBE with the given fixed-header flags (the spec demands 0b0010).
pub fn subscribe(version: u8, packet_id: u16, filter: &[u8], qos: u8, header_flags: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
    }
    body.extend(string(filter));
    body.push(qos);
    packet(0x80 | header_flags, &body)
}

/// PUBLISH with raw flags (dup/qos/retain in the low nibble) and any topic bytes.
pub fn publish(version: u8, flags: u8, topic: &[u8], packet_id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if version == V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | flags, &body)
}

#[derive(Debug)]
pub struct Packet {
    pub kind: u8,
    pub flags: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// Reason code of a v5 DISCONNECT (0x00 when the body is empty), or the CONNACK return code.
    pub fn reason_code(&self) -> u8 {
        match self.kind {
            DISCONNECT => self.body.first().copied().unwrap_or(0),
            CONNACK => self.body.get(1).copied().unwrap_or(0xff),
            _ => panic!("no reason code in packet type {}", self.kind),
        }
    }
}

/// What the peer did next.
#[derive(Debug)]
pub enum Next {
    Packet(Packet),
    /// Orderly close (EOF) or reset: the server closed this connection.
    Closed,
    /// Nothing within the deadline.
    Timeout,
}

pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect_tcp(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw { stream, buf: Vec::new() }
    }

    /// TCP connect, CONNECT, and wait for a successful CONNACK.
    pub fn connected(addr: SocketAddr, version: u8, client_id: &str) -> Raw {
        let mut raw = Raw::connect_tcp(addr);
        raw.send(&connect(version, client_id, 0));
        match raw.next(super::WAIT) {
            Next::Packet(p) if p.kind == CONNACK && p.reason_code() == 0 => raw,
            other => panic!("expected a successful CONNACK, got {other:?}"),
        }
    }

    /// Writes bytes; a write error means the server already closed, which the following
    /// `next` observes, so it is not an error here.
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    fn parse(&mut self) -> Option<Packet> {
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += usize::from(b & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            assert!(i <= 4, "server sent an over-long remaining length");
        }
        if self.buf.len() < i + len {
            return None;
        }
        let first = self.buf[0];
        let body = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some(Packet { kind: first >> 4, flags: first & 0x0f, body })
    }

    /// The next packet, or the close, within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.parse() {
                return Next::Packet(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).expect("read timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Next::Closed, // reset
            }
        }
    }

    /// Waits until the server closes this connection. Packets that arrive first are returned
    /// (so the caller can check a DISCONNECT and its reason code).
    pub fn expect_close(&mut self, timeout: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Next::Packet(p) => seen.push(p),
                Next::Closed => return seen,
                Next::Timeout => panic!("server did not close the connection within {timeout:?}; saw {seen:?}"),
            }
        }
    }
}
