//! Sans-IO MQTT session machine: CONNECT negotiation ([`connect`]), the session itself
//! ([`state`]) and the message model shared with the router ([`message`]).

pub mod connect;
pub mod journal;
pub mod message;
pub mod state;

pub use connect::{connack_refusal, negotiate, Negotiated};
pub use journal::{Journal, RestoredMessage, RestoredSession};
pub use message::{Delivery, Message, Publication};
pub use state::{
    publish_packet, Close, DeliverOutcome, DropReason, Event, Outbox, PendingWill, Session,
    SessionStats, Subscribed, Subscription,
};
