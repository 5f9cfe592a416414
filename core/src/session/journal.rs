//! What a persistent session tells the runtime to write down, and what the runtime gives back to
//! rebuild it after a restart.
//!
//! A session whose expiry is above zero (MQTT 3.1.1 clean session 0, MQTT 5 Session Expiry
//! Interval > 0) records every change of its durable state as a [`Journal`] entry, in the order
//! the changes happened; the runtime takes them with [`Session::take_journal`] after each call
//! and writes them to its shard's log before anything the change allows is sent (SUBACK, PUBACK,
//! PUBREC, PUBCOMP, the PUBLISH itself). Replaying the entries in order onto a
//! [`RestoredSession`] gives back the state: that is the whole contract. Sessions that are not
//! persistent journal nothing.
//!
//! [`Session::take_journal`]: crate::session::Session::take_journal

use std::time::Instant;

use crate::mqtt::{PacketId, SubscriptionOptions};
use crate::session::message::Delivery;
use crate::session::state::{PendingWill, Subscription};

/// One change of a persistent session's durable state.
#[derive(Clone, Debug)]
pub enum Journal {
    /// A subscription was added or replaced (`filter` as received, `$share/...` included).
    Subscribe { filter: String, options: SubscriptionOptions, id: Option<u32>, group: Option<String> },
    /// A subscription was removed.
    Unsubscribe { filter: String },
    /// A QoS 1/2 message was accepted for delivery (queued, or about to be sent).
    Enqueued { msg_id: u64, delivery: Delivery },
    /// The message was sent with this packet id (it is now inflight, awaiting PUBACK/PUBREC).
    Sent { msg_id: u64, packet_id: PacketId },
    /// QoS 2: its PUBREC arrived; PUBREL sent, awaiting PUBCOMP.
    PubrecReceived { msg_id: u64 },
    /// The delivery is finished (acknowledged, refused, expired, too large, or handed to another
    /// member of its shared group): forget the message.
    Completed { msg_id: u64 },
    /// Inbound QoS 2: PUBREC sent for this packet id; a resend must not be routed again.
    Qos2Received { packet_id: PacketId },
    /// Inbound QoS 2: PUBREL received; the packet id is free again.
    Qos2Released { packet_id: PacketId },
}

/// One outbound message of a restored session.
#[derive(Clone, Debug)]
pub struct RestoredMessage {
    pub msg_id: u64,
    pub delivery: Delivery,
    /// Set once it was sent: the packet id it was sent with.
    pub packet_id: Option<PacketId>,
    /// QoS 2: PUBREC received (the next step is PUBREL).
    pub pubrec_received: bool,
}

/// The durable state of a session as rebuilt from the log; [`Session::restore`] turns it back
/// into an offline session.
///
/// [`Session::restore`]: crate::session::Session::restore
#[derive(Clone, Debug, Default)]
pub struct RestoredSession {
    pub client_id: String,
    /// 4 (3.1.1) or 5.
    pub protocol_level: u8,
    pub session_expiry_secs: u32,
    /// When the offline session ends (`None`: never), computed by the runtime from the wall
    /// clock of the disconnect.
    pub expires_at: Option<Instant>,
    pub subscriptions: Vec<(String, Subscription)>,
    /// In message-id order.
    pub messages: std::collections::VecDeque<RestoredMessage>,
    pub qos2_in: Vec<PacketId>,
    pub pending_will: Option<PendingWill>,
}

impl RestoredSession {
    /// Apply one journal entry (the log's replay).
    pub fn apply(&mut self, entry: Journal) {
        match entry {
            Journal::Subscribe { filter, options, id, group } => {
                let Ok(parsed) = crate::topic::SubscriptionFilter::parse(&filter) else { return };
                let sub = Subscription { filter: parsed, options, id, group };
                match self.subscriptions.iter_mut().find(|(f, _)| *f == filter) {
                    Some(slot) => slot.1 = sub,
                    None => self.subscriptions.push((filter, sub)),
                }
            }
            Journal::Unsubscribe { filter } => self.subscriptions.retain(|(f, _)| *f != filter),
            Journal::Enqueued { msg_id, delivery } => {
                let m = RestoredMessage { msg_id, delivery, packet_id: None, pubrec_received: false };
                match self.messages.binary_search_by_key(&msg_id, |m| m.msg_id) {
                    Ok(i) => self.messages[i] = m,
                    Err(i) => self.messages.insert(i, m),
                }
            }
            Journal::Sent { msg_id, packet_id } => {
                if let Some(m) = self.message(msg_id) {
                    m.packet_id = Some(packet_id);
                }
            }
            Journal::PubrecReceived { msg_id } => {
                if let Some(m) = self.message(msg_id) {
                    m.pubrec_received = true;
                }
            }
            Journal::Completed { msg_id } => {
                if let Ok(i) = self.messages.binary_search_by_key(&msg_id, |m| m.msg_id) {
                    self.messages.remove(i);
                }
            }
            Journal::Qos2Received { packet_id } => {
                if !self.qos2_in.contains(&packet_id) {
                    self.qos2_in.push(packet_id);
                }
            }
            Journal::Qos2Released { packet_id } => self.qos2_in.retain(|p| *p != packet_id),
        }
    }

    fn message(&mut self, msg_id: u64) -> Option<&mut RestoredMessage> {
        let i = self.messages.binary_search_by_key(&msg_id, |m| m.msg_id).ok()?;
        self.messages.get_mut(i)
    }
}
