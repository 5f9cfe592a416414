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

pub use decode::codec::properties::{decode_publish_properties, encode_publish_properties};

/// The subscription options byte in its MQTT 5 form (QoS, No Local, Retain As Published, Retain
/// Handling), for storing a subscription.
pub fn subscription_options_byte(o: &SubscriptionOptions) -> u8 {
    o.qos.as_u8() | (u8::from(o.no_local) << 2) | (u8::from(o.retain_as_published) << 3) | ((o.retain_handling as u8) << 4)
}

/// The inverse of [`subscription_options_byte`]; `None` for a byte no subscription has.
pub fn subscription_options_from_byte(b: u8) -> Option<SubscriptionOptions> {
    if b & 0b1100_0000 != 0 {
        return None;
    }
    let retain_handling = match (b >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return None,
    };
    Some(SubscriptionOptions {
        qos: QoS::from_u8(b & 0b11)?,
        no_local: b & 0b0100 != 0,
        retain_as_published: b & 0b1000 != 0,
        retain_handling,
    })
}
