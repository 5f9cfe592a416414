//! A minimal blocking MQTT client for load generation, built on the workspace codec
//! (`flux_core::mqtt::{encode_packet, Decoder}`).
//!
//! Why not rumqttc: on a 2-core machine the load generator shares the CPUs with the broker, so the
//! client must cost as little as possible and add no queueing of its own. rumqttc routes every
//! publish through an event loop and a bounded request channel (an extra task hop and allocation
//! per message) and paces nothing; here a publisher thread encodes straight into its socket and a
//! subscriber thread decodes straight out of it, and the open-loop pacer can sleep with a 1 µs
//! timer slack instead of tokio's 1 ms timer wheel. The codec is the one fluxd uses; the peers
//! (Mosquitto, rumqttd) are independent implementations, so a codec bug shows up as a failure
//! against them.
//!
//! One socket is split in two: a [`Reader`] owned by one thread and a [`Writer`] behind a mutex,
//! shared when a reading thread must answer (PUBREL for a PUBREC, PUBACK for a PUBLISH).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use flux_core::mqtt::{
    encode_packet, ConnAck, Connect, Decoder, Packet, PacketId, Properties, ProtocolVersion,
    ReasonCode, Subscribe, SubscriptionOptions,
};
use socket2::{Domain, Protocol, Socket, Type};

/// Largest packet the load client accepts from a broker.
const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Read size per `read` call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Opens a TCP connection to `addr`, first binding to `bind` (port chosen by the kernel) when
/// given, so that many connections can come from distinct source addresses.
pub fn tcp_connect(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = bind {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect_timeout(&addr.into(), timeout)?;
    socket.set_nodelay(true)?;
    Ok(socket.into())
}

pub struct ConnectOptions<'a> {
    pub addr: SocketAddr,
    pub bind: Option<IpAddr>,
    pub client_id: &'a str,
    pub version: ProtocolVersion,
    pub keep_alive_secs: u16,
    pub timeout: Duration,
    /// Clean session (3.1.1) / Clean Start (5). `false` resumes a session kept by the broker.
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval (ignored in 3.1.1, where `clean_start: false` alone keeps the
    /// session). `None` or 0: the session ends with the connection.
    pub session_expiry_secs: Option<u32>,
}

impl<'a> ConnectOptions<'a> {
    /// A clean, non-persistent session.
    pub fn clean(
        addr: SocketAddr,
        client_id: &'a str,
        version: ProtocolVersion,
        keep_alive_secs: u16,
        timeout: Duration,
    ) -> ConnectOptions<'a> {
        ConnectOptions {
            addr,
            bind: None,
            client_id,
            version,
            keep_alive_secs,
            timeout,
            clean_start: true,
            session_expiry_secs: None,
        }
    }

    /// A session the broker keeps (and, in fluxd, makes durable) across disconnections:
    /// clean_session=0 in 3.1.1, Clean Start 0 with a Session Expiry Interval in 5.
    pub fn persistent(mut self, expiry_secs: u32) -> ConnectOptions<'a> {
        self.clean_start = false;
        self.session_expiry_secs = Some(expiry_secs);
        self
    }
}

/// The reading half of a connection.
pub struct Reader {
    stream: TcpStream,
    buf: BytesMut,
    scratch: Box<[u8]>,
    decoder: Decoder,
}

/// The writing half of a connection. Packets are encoded into a buffer and written with
/// [`Writer::flush`], so several packets can go out in one `write`.
pub struct Writer {
    stream: TcpStream,
    buf: BytesMut,
    version: ProtocolVersion,
}

/// CONNECT + CONNACK. Returns the two halves and the CONNACK.
pub fn connect(opts: &ConnectOptions<'_>) -> anyhow::Result<(Reader, Writer, ConnAck)> {
    let stream = tcp_connect(opts.addr, opts.bind, opts.timeout)
        .with_context(|| format!("connect to {} (from {:?})", opts.addr, opts.bind))?;
    stream.set_read_timeout(Some(opts.timeout))?;
    let mut writer = Writer {
        stream: stream.try_clone()?,
        buf: BytesMut::with_capacity(256),
        version: opts.version,
    };
    let mut decoder = Decoder::new(MAX_PACKET_BYTES);
    // The client reads the server's side of the stream, which never starts with CONNECT: tell the
    // decoder the version up front.
    decoder.version = Some(opts.version);
    let mut reader = Reader {
        stream,
        buf: BytesMut::with_capacity(256),
        scratch: vec![0u8; READ_CHUNK_BYTES].into_boxed_slice(),
        decoder,
    };
    let mut properties = Properties::default();
    if opts.version == ProtocolVersion::V5 {
        properties.session_expiry_interval = opts.session_expiry_secs.filter(|&s| s > 0);
    }
    writer.push(&Packet::Connect(Connect {
        protocol: opts.version,
        clean_start: opts.clean_start,
        keep_alive_secs: opts.keep_alive_secs,
        client_id: opts.client_id.to_string(),
        will: None,
        username: None,
        password: None,
        properties,
    }));
    writer.flush()?;
    let connack = match reader.recv().context("reading CONNACK")? {
        Some(Packet::ConnAck(c)) => c,
        Some(other) => bail!(
            "{}: expected CONNACK, got {:?}",
            opts.client_id,
            other.packet_type()
        ),
        None => bail!("{}: connection closed before CONNACK", opts.client_id),
    };
    if connack.reason != ReasonCode::Success {
        bail!("{}: CONNACK refused: {:?}", opts.client_id, connack.reason);
    }
    reader.stream.set_read_timeout(None)?;
    Ok((reader, writer, connack))
}

/// SUBSCRIBE to one filter and wait for its SUBACK (anything else received first is an error:
/// nothing publishes before every subscriber is ready).
pub fn subscribe(
    reader: &mut Reader,
    writer: &mut Writer,
    filter: &str,
    qos: flux_core::mqtt::QoS,
    timeout: Duration,
) -> anyhow::Result<()> {
    subscribe_inner(reader, writer, filter, qos, timeout, false).map(|_| ())
}

/// SUBSCRIBE to one filter and wait for its SUBACK, keeping the PUBLISH packets that arrive
/// before it (a server may send matching messages before the SUBACK, MQTT 3.1.1 3.8.4 / 5.0
/// 3.8.4: a durable queue with a backlog does): the caller handles (and acknowledges) them first.
pub fn subscribe_keeping_publishes(
    reader: &mut Reader,
    writer: &mut Writer,
    filter: &str,
    qos: flux_core::mqtt::QoS,
    timeout: Duration,
) -> anyhow::Result<Vec<Packet>> {
    subscribe_inner(reader, writer, filter, qos, timeout, true)
}

fn subscribe_inner(
    reader: &mut Reader,
    writer: &mut Writer,
    filter: &str,
    qos: flux_core::mqtt::QoS,
    timeout: Duration,
    keep_publishes: bool,
) -> anyhow::Result<Vec<Packet>> {
    let packet_id = PacketId::new(1).context("packet id")?;
    writer.push(&Packet::Subscribe(Subscribe {
        packet_id,
        properties: Properties::default(),
        filters: vec![(filter.to_string(), SubscriptionOptions::qos(qos))],
    }));
    writer.flush()?;
    reader.stream.set_read_timeout(Some(timeout))?;
    let mut early = Vec::new();
    let result = loop {
        match reader.recv().context("reading SUBACK")? {
            Some(Packet::SubAck(ack)) => match ack.reasons.first() {
                Some(code) if !code.is_error() => break Ok(early),
                other => break Err(anyhow::anyhow!("SUBACK for {filter} refused: {other:?}")),
            },
            Some(p @ Packet::Publish(_)) if keep_publishes => early.push(p),
            Some(other) => {
                break Err(anyhow::anyhow!(
                    "expected SUBACK, got {:?}",
                    other.packet_type()
                ))
            }
            None => break Err(anyhow::anyhow!("connection closed before SUBACK")),
        }
    };
    reader.stream.set_read_timeout(None)?;
    result
}

impl Reader {
    /// The next packet; `Ok(None)` at end of stream. Blocks (subject to the socket's read timeout).
    pub fn recv(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(Some(p));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// A packet already buffered, without reading the socket.
    pub fn try_decode(&mut self) -> anyhow::Result<Option<Packet>> {
        self.decoder
            .decode(&mut self.buf)
            .map_err(|e| anyhow::anyhow!("decode: {e}"))
    }

    /// One `read` into the buffer. `Ok(false)` at end of stream.
    pub fn fill(&mut self) -> anyhow::Result<bool> {
        // Read into a reused scratch buffer and append: one copy of the bytes that arrived, no
        // zero-filling of spare capacity and no unsafe.
        let n = self.stream.read(&mut self.scratch)?;
        if n == 0 {
            return Ok(false);
        }
        self.buf.extend_from_slice(&self.scratch[..n]);
        Ok(true)
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl Writer {
    /// Encode `packet` into the write buffer.
    pub fn push(&mut self, packet: &Packet) {
        encode_packet(packet, self.version, &mut self.buf);
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Write everything buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.stream.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// DISCONNECT (best effort) and close both directions.
    pub fn disconnect(&mut self) {
        self.push(&Packet::Disconnect(flux_core::mqtt::Disconnect::new(
            ReasonCode::Success,
        )));
        let _ = self.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}
