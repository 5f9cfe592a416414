//! MQTT 3.1.1 and 5.0: packet model ([`packet`]), reason codes ([`reason`]), wire errors
//! ([`error`]), and the incremental codec ([`decode`], [`encode`]).
//!
//! One packet model serves both versions: fields that 3.1.1 lacks (properties, reason codes) are
//! empty/default there and the encoder leaves them out for a 3.1.1 peer.

pub mod decode;
pub mod encode;
pub mod error;
pub mod packet;
pub mod properties;
pub mod reason;

pub use decode::{decode_packet, Decoder};
pub use encode::{encode_packet, encoded_len};
pub use error::DecodeError;
pub use packet::*;
pub use properties::Properties;
pub use reason::ReasonCode;
