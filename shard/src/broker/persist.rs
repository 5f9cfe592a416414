//! The broker's side of durability: rebuilding a shard's state from its replayed log at start,
//! and checkpoints that rewrite the live state so older segments can be deleted.
//!
//! Runs on the shard that owns the state (sessions by home shard, retained messages by topic
//! owner), on that shard's executor.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use flux_core::session::{Message, Session};
use flux_wal::Record;

use super::{Broker, SessionEntry};
use crate::durable::{self, Replayed};
use crate::signal::Gather;

/// Bytes of records a checkpoint appends before it commits and goes on (bounds its memory).
const CHECKPOINT_CHUNK_BYTES: usize = 4 << 20;

impl Broker {
    /// Install the state replayed from this shard's log: retained messages, and persistent
    /// sessions (offline, with their subscriptions, queued and inflight messages, inbound QoS 2
    /// ids, expiry and delayed will). Returns the route acknowledgements to await before the
    /// shard accepts clients, so a publish after start-up reaches every restored subscription.
    pub fn restore(&self, replayed: Replayed, now: Instant) -> Vec<Gather> {
        let clock = self.clock;
        let mut retained = 0usize;
        for stored in replayed.retained.values() {
            let Some(m) = durable::message_from_stored(stored, &clock, None) else { continue };
            if m.is_expired(now) {
                continue;
            }
            let topic = m.topic.clone();
            self.state.borrow_mut().retained.insert(&topic, m);
            retained += 1;
        }
        let now_ms = clock.to_ms(now);
        let mut waits = self.restore_queues(replayed.queues);
        let sessions = replayed.sessions.len();
        for (client_id, logged) in replayed.sessions {
            let mut image = logged.image;
            let expiry = image.session_expiry_secs;
            if expiry == 0 {
                // Cannot be logged (only persistent sessions are), but never keep it.
                self.append(Record::SessionExpire { client_id });
                continue;
            }
            // Connected at the crash: the session's clock starts now, as if it disconnected.
            let at_ms = logged.disconnected_at_ms.unwrap_or(now_ms);
            image.expires_at = (expiry != u32::MAX)
                .then(|| clock.to_instant(at_ms.saturating_add(u64::from(expiry) * 1000)));
            image.pending_will = logged
                .will
                .as_ref()
                .and_then(|(at, w)| durable::pending_will_from_stored(*at, w, &client_id, &clock));
            let session = Session::restore(image, &self.limits);
            if logged.disconnected_at_ms.is_none() {
                self.append(Record::SessionDisconnected {
                    client_id: client_id.clone(),
                    at_ms,
                    session_expiry_secs: expiry,
                });
            }
            let deadlines: Vec<Instant> =
                session.expires_at().into_iter().chain(session.pending_will().map(|w| w.publish_at)).collect();
            // Queue subscriptions attach when the client comes back (`open_session`).
            let filters: Vec<_> = session
                .subscriptions()
                .map(|s| s.filter.clone())
                .filter(|f| super::queues::queue_filter(f).is_none())
                .collect();
            let mut entry = SessionEntry { session, conn: None, conn_id: 0, logged: true };
            self.write_journal(&mut entry);
            let key = {
                let mut st = self.state.borrow_mut();
                st.next_key += 1;
                let key = st.next_key;
                st.entries.insert(key, Rc::new(RefCell::new(entry)));
                st.by_client_id.insert(client_id.into(), key);
                for d in deadlines {
                    st.deadlines.insert((d, key));
                }
                key
            };
            for f in &filters {
                waits.extend(self.add_subscription(key, f));
            }
        }
        tracing::info!(shard = %self.me, retained, sessions, records = replayed.records,
            orphan_records = replayed.orphans, "state restored from the WAL");
        waits
    }

    /// Write a checkpoint when the log has grown enough: every live state is appended again
    /// (retained messages, persistent sessions), committed, and the segments before it are
    /// deleted. Each state is snapshotted without awaiting in between, so records written by
    /// the broker meanwhile land after its snapshot and replay stays in order; records of
    /// states the replay has not seen (their start was in a deleted segment) are ignored. The
    /// copies only add what replay lacks (`SessionCheckpoint` never resets a session, messages are
    /// keyed by id), so a checkpoint cut short by a crash or a full disk loses nothing.
    pub async fn checkpoint_if_due(&self) {
        let Some(log) = self.log.clone() else { return };
        if !log.checkpoint_due() {
            return;
        }
        log.set_checkpointing(true);
        let start = log.wal().next_lsn();
        let mut live_bytes = 0u64;
        let mut ok = true;
        let retained: Vec<Message> = {
            let mut v = Vec::new();
            self.state.borrow().retained.for_each(|_, m| v.push(m.clone()));
            v
        };
        for m in retained {
            // Skip what was cleared or replaced since the list was taken: its record is later.
            let current = self.state.borrow().retained.get(&m.topic).is_some_and(|cur| std::sync::Arc::ptr_eq(cur, &m));
            if current {
                ok &= log.append_checkpoint(&Record::RetainedSet { message: durable::stored_message(&m, &self.clock) });
                live_bytes += m.payload.len() as u64 + 64;
            }
            ok &= self.checkpoint_chunk(&log).await;
        }
        let (queue_records, queue_bytes) = self.queue_checkpoint_records();
        live_bytes += queue_bytes;
        for r in &queue_records {
            ok &= log.append_checkpoint(r);
        }
        ok &= self.checkpoint_chunk(&log).await;
        let keys: Vec<_> = self.state.borrow().entries.keys().copied().collect();
        for key in keys {
            let Some(entry) = self.entry(key) else { continue };
            {
                let e = entry.borrow();
                if !e.logged {
                    continue;
                }
                let client_id = e.session.client_id().to_string();
                ok &= log.append_checkpoint(&Record::SessionCheckpoint {
                    client_id: client_id.clone(),
                    protocol_level: super::protocol_level(&e.session),
                    session_expiry_secs: e.session.session_expiry_secs(),
                });
                for j in e.session.snapshot_journal() {
                    ok &= log.append_checkpoint(&durable::journal_record(&client_id, &j, &self.clock));
                    if let flux_core::session::Journal::Enqueued { delivery, .. } = &j {
                        live_bytes += delivery.message.payload.len() as u64;
                    }
                    live_bytes += 64;
                }
                if e.conn.is_none() {
                    let expires_ms = e.session.expires_at().map(|at| self.clock.to_ms(at));
                    let expiry = e.session.session_expiry_secs();
                    let at_ms = match expires_ms {
                        Some(ms) => ms.saturating_sub(u64::from(expiry) * 1000),
                        None => self.clock.to_ms(Instant::now()),
                    };
                    ok &= log.append_checkpoint(&Record::SessionDisconnected { client_id: client_id.clone(), at_ms, session_expiry_secs: expiry });
                    if let Some(w) = e.session.pending_will() {
                        ok &= log.append_checkpoint(&Record::WillDelayed {
                            client_id,
                            publish_at_ms: self.clock.to_ms(w.publish_at),
                            will: durable::stored_message(&w.message, &self.clock),
                        });
                    }
                }
            }
            ok &= self.checkpoint_chunk(&log).await;
        }
        ok &= log.flush().await;
        if ok && log.wal().poisoned().is_none() {
            log.finish_checkpoint(start, live_bytes).await;
        } else {
            tracing::error!("WAL checkpoint failed; older segments are kept");
        }
        log.set_checkpointing(false);
    }

    /// Commit once a checkpoint has buffered a chunk, and let the shard's other work run.
    async fn checkpoint_chunk(&self, log: &durable::ShardLog) -> bool {
        let mut ok = true;
        if log.wal().pending_bytes() >= CHECKPOINT_CHUNK_BYTES {
            ok = log.flush().await;
        }
        glommio::yield_if_needed().await;
        ok
    }

    /// Run checkpoints as they come due, for the life of the shard.
    pub async fn run_checkpoints(self: Rc<Self>) {
        let Some(log) = self.log.clone() else { return };
        loop {
            // Only a log that grew can need a checkpoint: an idle shard sleeps here instead of
            // waking 20 times a second.
            log.grown().await;
            // Cheap to check; often enough that a fast writer cannot outrun it by much (at 100 MB/s
            // of log, 5 MB between checks).
            glommio::timer::sleep(Duration::from_millis(50)).await;
            self.checkpoint_if_due().await;
        }
    }
}
