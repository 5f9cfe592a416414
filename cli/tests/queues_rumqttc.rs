//! Durable queues with rumqttc (MQTT 3.1.1 and 5) through the real fluxd: competing consumers on
//! two shards each get a share and together every message exactly once while all ack; a consumer
//! that joins later gets the backlog (FIFO order is checked by the Python suite).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{client_id_on_shard, skip_under_mosquitto, v4, v5, Broker, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_competing_consumers_v311_and_v5_share_every_message_exactly_once() {
    if skip_under_mosquitto("Flux durable queues") {
        return;
    }
    let broker = Broker::start();
    let (mut a, _) = v4::connect(broker.port, &client_id_on_shard("qa", 0), true).await;
    let (mut b, _) = v5::connect(broker.port, &client_id_on_shard("qb", 1), true).await;
    a.subscribe("$queue/rq/rq/#", rumqttc::QoS::AtLeastOnce).await;
    b.subscribe("$queue/rq", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    let (publ, _) = v4::connect(broker.port, &client_id_on_shard("qp", 1), true).await;
    let n = 200;
    for i in 0..n {
        publ.publish("rq/x", rumqttc::QoS::AtLeastOnce, false, format!("{i}")).await;
    }
    let mut seen: BTreeMap<String, (u32, &str)> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < n && Instant::now() < deadline {
        if let Ok(p) = a.next_publish(Duration::from_millis(20)).await {
            let e = seen.entry(String::from_utf8_lossy(&p.payload).into_owned()).or_insert((0, "a"));
            e.0 += 1;
        }
        if let Ok(p) = b.next_publish(Duration::from_millis(20)).await {
            let e = seen.entry(String::from_utf8_lossy(&p.payload).into_owned()).or_insert((0, "b"));
            e.0 += 1;
        }
    }
    assert_eq!(seen.len(), n, "messages missing: {n} published, {} consumed", seen.len());
    assert!(seen.values().all(|(count, _)| *count == 1), "a message was delivered twice");
    let by_a = seen.values().filter(|(_, who)| *who == "a").count();
    assert!(by_a > 0 && by_a < n, "consumers did not compete: a got {by_a} of {n}");

    // A consumer that joins after publishes were stored gets them, oldest first.
    drop(a);
    drop(b);
    for i in 0..10 {
        publ.publish("rq/x", rumqttc::QoS::AtLeastOnce, false, format!("late-{i}")).await;
    }
    let (mut c, _) = v5::connect(broker.port, &client_id_on_shard("qc", 0), true).await;
    c.subscribe("$queue/rq", rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await;
    // (The first consumers' sockets close asynchronously: one of them may still have taken a
    // message, which then comes back; so the backlog is compared as a set here.)
    let mut late = std::collections::BTreeSet::new();
    while late.len() < 10 {
        let p = c.next_publish(WAIT).await.unwrap_or_else(|e| panic!("backlog message {}: {e}", late.len()));
        late.insert(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(late, (0..10).map(|i| format!("late-{i}")).collect());
}
