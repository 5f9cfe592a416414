//! What travels from a publisher to subscribers: one refcounted [`Publication`] shared by every
//! destination (shards, sessions, the retained store), never copied.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::mqtt::{Properties, QoS};
use crate::topic::{TopicFilter, TopicName};

/// An application message as published, after topic alias resolution. Immutable once built.
#[derive(Debug, PartialEq)]
pub struct Publication {
    pub topic: TopicName,
    pub payload: Bytes,
    /// QoS the publisher used (the ceiling for every delivery).
    pub qos: QoS,
    /// The RETAIN flag as published (kept for retain-as-published subscriptions).
    pub retain: bool,
    /// Only the properties forwarded to subscribers unchanged: payload format, content type,
    /// response topic, correlation data, user properties. Message expiry is `expires_at`; topic
    /// alias and subscription identifiers are per delivery.
    pub properties: Properties,
    /// When the message expiry interval runs out; `None`: never.
    pub expires_at: Option<Instant>,
    /// Client identifier of the publisher, for No Local (MQTT 5 3.8.3.1). A will carries the id of
    /// the client it belongs to (it is that client's message); `None` is for messages the server
    /// makes itself, which reach every subscriber.
    pub publisher: Option<Arc<str>>,
}

pub type Message = Arc<Publication>;

impl Publication {
    /// Keep only the properties a subscriber should see from a publisher's PUBLISH (or will).
    pub fn forwarded_properties(p: &Properties) -> Properties {
        Properties {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            ..Properties::default()
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Remaining expiry in whole seconds, rounded up so a live message never says 0.
    pub fn remaining_expiry_secs(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }
}

/// One message for one session: the QoS and flags after applying that session's subscriptions.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Message,
    /// min(published QoS, granted QoS), the highest over overlapping subscriptions.
    pub qos: QoS,
    /// RETAIN flag to send: true for retained messages sent because of a subscribe; otherwise the
    /// published flag if a matching subscription has retain-as-published, else false.
    pub retain: bool,
    /// Identifiers of every matching subscription that had one.
    pub subscription_ids: Vec<u32>,
    /// Set when the message reached this session through a shared subscription (group, filter):
    /// if the session goes away unacknowledged, another member of the group gets it.
    pub shared: Option<(Arc<str>, TopicFilter)>,
    /// Set when the message comes from a durable queue: the session's PUBACK acknowledges it
    /// there ([`crate::session::Event::QueueAck`]); the queue, not the session, keeps it durable.
    pub queue: Option<QueueTag>,
}

/// Which queue delivery a message is, for the acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueTag {
    pub queue: crate::queue::QueueName,
    pub consumer: crate::queue::ConsumerId,
    pub offset: crate::queue::Offset,
}
