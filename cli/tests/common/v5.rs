//! rumqttc::v5 client whose event loop runs in its own task and forwards incoming packets to a
//! channel. A server DISCONNECT is reported with its reason code.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, Packet, Publish, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

pub enum Incoming {
    Packet(Packet),
    /// The connection ended; `disconnect` is the server's DISCONNECT reason code if it sent one.
    Closed { disconnect: Option<DisconnectReasonCode>, error: String },
}

pub struct Client {
    pub client: AsyncClient,
    pub id: String,
    rx: mpsc::UnboundedReceiver<Incoming>,
    stash: VecDeque<Publish>,
    task: tokio::task::JoinHandle<()>,
    /// Why the connection ended, once it has (for failure messages).
    pub close_reason: Option<String>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn options(port: u16, id: &str, clean_start: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(clean_start);
    o
}

pub async fn connect(port: u16, id: &str, clean_start: bool) -> (Client, ConnAck) {
    connect_with(options(port, id, clean_start)).await
}

/// Connects and waits for a successful CONNACK.
pub async fn connect_with(opts: MqttOptions) -> (Client, ConnAck) {
    let id = opts.client_id();
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Incoming::Packet(p)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let disconnect = match &e {
                        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
                            Some(*reason_code)
                        }
                        _ => None,
                    };
                    let _ = tx.send(Incoming::Closed { disconnect, error: e.to_string() });
                    return;
                }
            }
        }
    });
    let mut c = Client { client, id, rx, stash: VecDeque::new(), task, close_reason: None };
    let ack = c
        .wait_for(super::WAIT, |p| match p {
            Packet::ConnAck(a) => Some(a.clone()),
            _ => None,
        })
        .await
        .unwrap_or_else(|e| panic!("{}: no CONNACK: {e}", c.id));
    assert_eq!(ack.code, ConnectReturnCode::Success, "{}: CONNACK {:?}", c.id, ack.code);
    (c, ack)
}

impl Client {
    /// The first incoming packet for which `f` returns Some, within `timeout`. Publishes seen on
    /// the way are kept for `next_publish`.
    pub async fn wait_for<T>(&mut self, timeout: Duration, mut f: impl FnMut(&Packet) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("timed out after {timeout:?}")),
                Ok(None) => return Err("event loop gone".into()),
                Ok(Some(Incoming::Closed { error, .. })) => return Err(format!("connection closed: {error}")),
                Ok(Some(Incoming::Packet(p))) => {
                    if let Some(t) = f(&p) {
                        return Ok(t);
                    }
                    if let Packet::Publish(p) = p {
                        self.stash.push_back(p);
                    }
                }
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.expect("queue SUBSCRIBE");
        self.wait_for(super::WAIT, |p| match p {
            Packet::SubAck(a) => Some(a.return_codes.clone()),
            _ => None,
        })
        .await
        .unwrap_or_else(|e| panic!("{}: no SUBACK for {filter}: {e}", self.id))
    }

    pub async fn next_publish(&mut self, timeout: Duration) -> Result<Publish, String> {
        if let Some(p) = self.stash.pop_front() {
            return Ok(p);
        }
        self.wait_for(timeout, |p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// Waits until the server ends this connection; returns its DISCONNECT reason code, if any.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Result<Option<DisconnectReasonCode>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("still connected after {timeout:?}")),
                Ok(None) => return Ok(None),
                Ok(Some(Incoming::Closed { disconnect, error })) => {
                    self.close_reason = Some(error);
                    return Ok(disconnect);
                }
                Ok(Some(Incoming::Packet(Packet::Disconnect(d)))) => return Ok(Some(d.reason_code)),
                Ok(Some(Incoming::Packet(Packet::Publish(p)))) => self.stash.push_back(p),
                Ok(Some(Incoming::Packet(_))) => {}
            }
        }
    }

    pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, retain, payload.into()).await.expect("queue PUBLISH");
    }
}

pub fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}
