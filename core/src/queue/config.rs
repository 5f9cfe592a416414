//! Queue names and settings.

use std::sync::Arc;
use std::time::Duration;

/// Longest queue name, in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 255;

/// A validated queue name: 1..=255 bytes of UTF-8 without `/`, `+`, `#` or NUL, so that
/// `$queue/<name>` is one topic level. The queue of an MQTT `$q/<filter>` subscription is named
/// `$q/<filter>` ([`QueueName::for_filter`]), the one exception.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueNameError {
    #[error("a queue name is 1 to 255 bytes")]
    Length,
    #[error("a queue name cannot contain '/', '+', '#' or NUL")]
    Character,
}

impl QueueName {
    pub fn new(s: &str) -> Result<QueueName, QueueNameError> {
        if s.is_empty() || s.len() > MAX_QUEUE_NAME_BYTES {
            return Err(QueueNameError::Length);
        }
        if s.contains(['/', '+', '#', '\0']) {
            return Err(QueueNameError::Character);
        }
        Ok(QueueName(Arc::from(s)))
    }

    /// The queue an EMQX-style `$q/<filter>` subscription consumes (bound to `filter`).
    pub fn for_filter(filter: &crate::topic::TopicFilter) -> Result<QueueName, QueueNameError> {
        let name = format!("$q/{}", filter.as_str());
        if name.len() > MAX_QUEUE_NAME_BYTES {
            return Err(QueueNameError::Length);
        }
        Ok(QueueName(Arc::from(name)))
    }

    /// A name as found in the log or config: either form.
    pub fn parse_any(s: &str) -> Result<QueueName, QueueNameError> {
        match s.strip_prefix("$q/") {
            Some(f) => crate::topic::TopicFilter::new(f)
                .map_err(|_| QueueNameError::Character)
                .and_then(|f| QueueName::for_filter(&f)),
            None => QueueName::new(s),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a full queue does with a new message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Refuse it; the publisher is told (MQTT 5 PUBACK 0x97 Quota exceeded).
    #[default]
    RejectPublish,
    /// Take it and drop the oldest message (dead-lettered if the queue has a dead-letter queue),
    /// counted.
    DropHead,
}

/// Where a consumer group's next message goes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// Each consumer in turn (among those with room under their prefetch).
    #[default]
    RoundRobin,
    /// A consumer picked at random among those with room (deterministic generator, seeded per
    /// queue).
    Random,
    /// The consumer with the fewest unacknowledged messages.
    LeastInflight,
    /// Messages with the same key go to the same consumer while it lives (per-key order with
    /// parallel consumers); keys are reassigned when consumers come and go.
    KeyAffine(KeySource),
}

/// Where key-affine dispatch finds a message's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The value of this MQTT 5 user property.
    UserProperty(String),
    /// This topic level (0 = first).
    TopicLevel(usize),
}

/// A queue's settings. Every bound is explicit; memory per message is one refcounted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Messages in the queue (not yet done by every group); then `overflow` applies.
    pub max_messages: usize,
    /// Payload bytes in the queue; then `overflow` applies.
    pub max_bytes: usize,
    /// A message older than this is removed (dead-lettered if configured). `None`: never.
    pub message_ttl: Option<Duration>,
    pub overflow: Overflow,
    /// Queue that receives messages rejected too often, expired, or dropped by overflow.
    pub dead_letter: Option<QueueName>,
    /// Deliveries of one message to one group before it is dead-lettered (or dropped).
    pub max_deliveries: u32,
    pub dispatch: Dispatch,
    /// A delivered message not acknowledged within this time is delivered again (visibility
    /// timeout). `None`: only a disconnect or a reject redelivers.
    pub ack_timeout: Option<Duration>,
    /// Unacknowledged messages per consumer when the consumer does not say (prefetch).
    pub default_prefetch: u16,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            message_ttl: None,
            overflow: Overflow::RejectPublish,
            dead_letter: None,
            max_deliveries: 10,
            dispatch: Dispatch::RoundRobin,
            ack_timeout: Some(Duration::from_secs(30)),
            default_prefetch: 64,
        }
    }
}

/// A queue's settings as written by an operator: one `[[queue]]` of fluxd.toml, or the JSON body
/// of the admin endpoint's `PUT /queues/<name>`. Every key but `name` is optional.
#[derive(Debug, Default, serde::Deserialize, Clone, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    pub name: String,
    /// Topic filters bound to the queue: every matching publish is also stored in it.
    pub bind: Vec<String>,
    pub max_messages: Option<usize>,
    pub max_bytes: Option<usize>,
    /// 0 or absent: messages never expire.
    pub message_ttl_ms: Option<u64>,
    /// "reject-publish" (default) or "drop-head".
    pub overflow: Option<String>,
    pub dead_letter: Option<String>,
    pub max_deliveries: Option<u32>,
    /// "round-robin" (default), "random", "least-inflight", "key-affine".
    pub dispatch: Option<String>,
    /// For key-affine: "user-property:NAME" or "topic-level:N".
    pub key: Option<String>,
    /// 0: no ack timeout (only disconnects and rejects redeliver).
    pub ack_timeout_ms: Option<u64>,
    pub prefetch: Option<u16>,
}

impl QueueSettings {
    /// The queue these settings declare, or why they are invalid (naming the queue).
    pub fn spec(&self) -> Result<(QueueName, QueueConfig, Vec<crate::topic::TopicFilter>), String> {
        let who = &self.name;
        let name = QueueName::new(&self.name).map_err(|e| format!("name {who:?}: {e}"))?;
        let d = QueueConfig::default();
        let overflow = match self.overflow.as_deref() {
            None | Some("reject-publish") => Overflow::RejectPublish,
            Some("drop-head") => Overflow::DropHead,
            Some(o) => return Err(format!("{who}: overflow {o:?} is not reject-publish or drop-head")),
        };
        let dispatch = match self.dispatch.as_deref() {
            None | Some("round-robin") => Dispatch::RoundRobin,
            Some("random") => Dispatch::Random,
            Some("least-inflight") => Dispatch::LeastInflight,
            Some("key-affine") => {
                let key = self.key.as_deref().unwrap_or("");
                let source = if let Some(p) = key.strip_prefix("user-property:") {
                    KeySource::UserProperty(p.to_owned())
                } else if let Some(n) = key.strip_prefix("topic-level:") {
                    KeySource::TopicLevel(n.parse().map_err(|_| format!("{who}: key {key:?}: not a level number"))?)
                } else {
                    return Err(format!("{who}: key-affine needs key = \"user-property:NAME\" or \"topic-level:N\""));
                };
                Dispatch::KeyAffine(source)
            }
            Some(o) => return Err(format!("{who}: dispatch {o:?} is not round-robin, random, least-inflight or key-affine")),
        };
        let dead_letter = match &self.dead_letter {
            Some(n) => Some(QueueName::new(n).map_err(|e| format!("{who}: dead_letter {n:?}: {e}"))?),
            None => None,
        };
        let mut filters = Vec::new();
        for f in &self.bind {
            filters.push(crate::topic::TopicFilter::new(f).map_err(|e| format!("{who}: bind {f:?}: {e:?}"))?);
        }
        let config = QueueConfig {
            max_messages: self.max_messages.unwrap_or(d.max_messages).max(1),
            max_bytes: self.max_bytes.unwrap_or(d.max_bytes),
            message_ttl: self.message_ttl_ms.filter(|&ms| ms > 0).map(Duration::from_millis),
            overflow,
            dead_letter,
            max_deliveries: self.max_deliveries.unwrap_or(d.max_deliveries).max(1),
            dispatch,
            ack_timeout: match self.ack_timeout_ms {
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                None => d.ack_timeout,
            },
            default_prefetch: self.prefetch.unwrap_or(d.default_prefetch).max(1),
        };
        Ok((name, config, filters))
    }
}
