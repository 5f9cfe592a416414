//! Decode errors and their wire consequence.

use super::reason::ReasonCode;

/// Why bytes from a peer could not be turned into a packet. Every variant knows the reason code the
/// server sends (MQTT 5 DISCONNECT/CONNACK) before closing the connection: see [`DecodeError::reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the packet needs; not an error on a stream, just "read more". The decoder
    /// only returns this from [`super::decode_packet`] when called on a complete frame.
    #[error("packet truncated")]
    Truncated,
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(&'static str),
    /// CONNECT carried a client identifier the server rejects.
    #[error("client identifier not valid")]
    ClientIdNotValid,
}

impl DecodeError {
    /// The reason code to send for this error (MQTT 5 4.13).
    pub fn reason(&self) -> ReasonCode {
        match self {
            DecodeError::Truncated | DecodeError::Malformed(_) => ReasonCode::MalformedPacket,
            DecodeError::Protocol(_) => ReasonCode::ProtocolError,
            DecodeError::TooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocolVersion(_) => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::TopicNameInvalid(_) => ReasonCode::TopicNameInvalid,
            DecodeError::ClientIdNotValid => ReasonCode::ClientIdentifierNotValid,
        }
    }
}
