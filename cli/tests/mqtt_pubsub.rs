//! Publish/subscribe through the real broker with rumqttc, MQTT 3.1.1 and 5: QoS 0/1/2, order
//! across shards, retained messages, shared subscriptions across shards, session takeover.
//!
//! Client ids are picked by home shard (`client_id_on_shard`) so that publisher and subscriber
//! live on different shards of fluxd's two.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::raw::{self, Next, Raw};
use tokio::sync::Semaphore;
use common::{client_id_on_shard, v4, v5, Broker, BrokerKind, WAIT};

const ORDERED_MESSAGES: usize = 2_000;
/// Most messages the order tests let the publisher run ahead of the subscriber. Below the
/// default `max_queued_messages` (1000), so the bounded per-session queue never has to drop:
/// these tests are about order and loss, the overflow policy has its own test.
const PUBLISH_AHEAD: usize = 500;

fn qos4(q: u8) -> rumqttc::QoS {
    rumqttc::qos(q).expect("valid QoS")
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::qos(q).expect("valid QoS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_3_3_5_qos_0_1_2_delivered_at_min_of_publish_and_subscription_qos() {
    let broker = Broker::start();
    let (mut sub, _) = v4::connect(broker.port, &client_id_on_shard("sub", 1), true).await;
    let (mut sub1, _) = v4::connect(broker.port, &client_id_on_shard("sub1", 0), true).await;
    let (publ, _) = v4::connect(broker.port, &client_id_on_shard("pub", 0), true).await;
    sub.subscribe("q/#", qos4(2)).await;
    sub1.subscribe("q/#", qos4(1)).await;
    for q in 0..=2u8 {
        publ.publish(&format!("q/{q}"), qos4(q), false, format!("qos{q}")).await;
        for (s, max) in [(&mut sub, 2u8), (&mut sub1, 1u8)] {
            let p = s.next_publish(WAIT).await.unwrap_or_else(|e| panic!("{}: qos {q}: {e}", s.id));
            assert_eq!(p.topic, format!("q/{q}"));
            assert_eq!(&p.payload[..], format!("qos{q}").as_bytes());
            assert_eq!(p.qos, qos4(q.min(max)), "{} got qos {:?} for publish qos {q}", s.id, p.qos);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_3_5_qos_0_1_2_delivered_at_min_of_publish_and_subscription_qos() {
    let broker = Broker::start();
    let (mut sub, _) = v5::connect(broker.port, &client_id_on_shard("sub", 1), true).await;
    let (mut sub1, _) = v5::connect(broker.port, &client_id_on_shard("sub1", 0), true).await;
    let (publ, _) = v5::connect(broker.port, &client_id_on_shard("pub", 0), true).await;
    sub.subscribe("q/#", qos5(2)).await;
    sub1.subscribe("q/#", qos5(1)).await;
    for q in 0..=2u8 {
        publ.publish(&format!("q/{q}"), qos5(q), false, format!("qos{q}")).await;
        for (s, max) in [(&mut sub, 2u8), (&mut sub1, 1u8)] {
            let p = s.next_publish(WAIT).await.unwrap_or_else(|e| panic!("{}: qos {q}: {e}", s.id));
            assert_eq!(v5::topic(&p), format!("q/{q}"));
            assert_eq!(&p.payload[..], format!("qos{q}").as_bytes());
            assert_eq!(p.qos, qos5(q.min(max)), "{} got qos {:?} for publish qos {q}", s.id, p.qos);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_4_6_0_cross_shard_delivery_keeps_publisher_order() {
    let broker = Broker::start();
    let (mut sub, _) = v4::connect(broker.port, &client_id_on_shard("order-sub", 1), true).await;
    let (publ, _) = v4::connect(broker.port, &client_id_on_shard("order-pub", 0), true).await;
    sub.subscribe("order/v4", qos4(1)).await;
    let window = Arc::new(Semaphore::new(PUBLISH_AHEAD));
    let sender_window = Arc::clone(&window);
    let sender = tokio::spawn(async move {
        for i in 0..ORDERED_MESSAGES {
            sender_window.acquire().await.expect("window").forget();
            publ.publish("order/v4", qos4(1), false, i.to_string()).await;
        }
        publ
    });
    for want in 0..ORDERED_MESSAGES {
        let p = sub.next_publish(WAIT).await.unwrap_or_else(|e| panic!("message {want}: {e}"));
        window.add_permits(1);
        assert_eq!(std::str::from_utf8(&p.payload).unwrap(), want.to_string(), "out of order");
    }
    sender.await.expect("publisher task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_6_0_cross_shard_delivery_keeps_publisher_order() {
    let broker = Broker::start();
    let (mut sub, _) = v5::connect(broker.port, &client_id_on_shard("order-sub", 1), true).await;
    let (publ, _) = v5::connect(broker.port, &client_id_on_shard("order-pub", 0), true).await;
    sub.subscribe("order/v5", qos5(1)).await;
    let window = Arc::new(Semaphore::new(PUBLISH_AHEAD));
    let sender_window = Arc::clone(&window);
    let sender = tokio::spawn(async move {
        for i in 0..ORDERED_MESSAGES {
            sender_window.acquire().await.expect("window").forget();
            publ.publish("order/v5", qos5(1), false, i.to_string()).await;
        }
        publ
    });
    for want in 0..ORDERED_MESSAGES {
        let p = sub.next_publish(WAIT).await.unwrap_or_else(|e| panic!("message {want}: {e}"));
        window.add_permits(1);
        assert_eq!(std::str::from_utf8(&p.payload).unwrap(), want.to_string(), "out of order");
    }
    sender.await.expect("publisher task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_3_3_1_3_retained_message_set_replayed_and_deleted() {
    let broker = Broker::start();
    let (mut publ, _) = v4::connect(broker.port, &client_id_on_shard("ret-pub", 0), true).await;
    publ.publish("ret/a", qos4(1), true, "kept").await;
    publ.wait_for(WAIT, |p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(())).await.expect("PUBACK");

    // A later subscriber on the other shard gets it with RETAIN set, through a wildcard.
    let (mut sub, _) = v4::connect(broker.port, &client_id_on_shard("ret-sub", 1), true).await;
    sub.subscribe("ret/+", qos4(1)).await;
    let p = sub.next_publish(WAIT).await.expect("retained message");
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("ret/a", &b"kept"[..], true));

    // An empty retained payload deletes it: a new subscriber first sees a live marker.
    publ.publish("ret/a", qos4(1), true, "").await;
    let p = sub.next_publish(WAIT).await.expect("live delete message");
    assert_eq!((p.topic.as_str(), p.payload.len()), ("ret/a", 0));
    let (mut late, _) = v4::connect(broker.port, &client_id_on_shard("ret-late", 1), true).await;
    late.subscribe("ret/#", qos4(1)).await;
    publ.publish("ret/marker", qos4(1), false, "marker").await;
    let p = late.next_publish(WAIT).await.expect("marker");
    assert_eq!(p.topic, "ret/marker", "deleted retained message was replayed: {p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_3_1_3_retained_message_set_replayed_and_deleted() {
    let broker = Broker::start();
    let (publ, _) = v5::connect(broker.port, &client_id_on_shard("ret-pub", 1), true).await;
    publ.publish("ret5/a/b", qos5(2), true, "kept").await;
    // Subscribing on the other shard after the publisher's QoS 2 flow: poll until replayed.
    let (mut sub, _) = v5::connect(broker.port, &client_id_on_shard("ret-sub", 0), true).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        sub.subscribe("ret5/#", qos5(1)).await;
        if let Ok(p) = sub.next_publish(Duration::from_millis(500)).await {
            assert_eq!((v5::topic(&p).as_str(), &p.payload[..], p.retain), ("ret5/a/b", &b"kept"[..], true));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "retained message never replayed");
    }
    publ.publish("ret5/a/b", qos5(1), true, "").await;
    let (mut late, _) = v5::connect(broker.port, &client_id_on_shard("ret-late", 0), true).await;
    // The delete is seen live by `sub`, so it has been applied before `late` subscribes.
    let p = sub.next_publish(WAIT).await.expect("live delete");
    assert!(p.payload.is_empty());
    late.subscribe("ret5/+/b", qos5(1)).await;
    publ.publish("ret5/m/b", qos5(1), false, "marker").await;
    let p = late.next_publish(WAIT).await.expect("marker");
    assert_eq!(v5::topic(&p), "ret5/m/b", "deleted retained message was replayed: {p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_4_8_2_shared_subscription_delivers_each_message_to_one_member_across_shards() {
    let broker = Broker::start();
    const N: usize = 200;
    let (mut a, _) = v5::connect(broker.port, &client_id_on_shard("share-a", 0), true).await;
    let (mut b, _) = v5::connect(broker.port, &client_id_on_shard("share-b", 1), true).await;
    for m in [&mut a, &mut b] {
        m.subscribe("$share/g/work/+", qos5(1)).await;
        m.subscribe("done", qos5(1)).await;
    }
    let (publ, _) = v5::connect(broker.port, &client_id_on_shard("share-pub", 0), true).await;
    for i in 0..N {
        publ.publish(&format!("work/{}", i % 7), qos5(1), false, i.to_string()).await;
    }
    publ.publish("done", qos5(1), false, "done").await;

    // Each member's "done" comes after everything the broker sent it for this publisher.
    let mut got: Vec<usize> = Vec::new();
    for m in [&mut a, &mut b] {
        loop {
            let p = m.next_publish(WAIT).await.unwrap_or_else(|e| panic!("{}: {e}", m.id));
            if v5::topic(&p) == "done" {
                break;
            }
            got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
        }
    }
    let unique: BTreeSet<usize> = got.iter().copied().collect();
    assert_eq!(got.len(), N, "deliveries {} for {N} messages (duplicates or losses)", got.len());
    assert_eq!(unique, (0..N).collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_3_1_4_3_takeover_disconnects_old_connection_with_0x8e() {
    // The old connection is a raw socket: rumqttc 0.24 cannot parse a DISCONNECT whose remaining
    // length is 1 (reason code, properties omitted, which 3.14.2.2.1 allows) and reports a plain
    // close instead, so it cannot witness the reason code. The new connection is rumqttc.
    let broker = Broker::start();
    let id = client_id_on_shard("taker", 1);
    // Session Expiry Interval 300 s, so the session (and its subscription) survives each takeover.
    let expiry = [0x11, 0, 0, 0x01, 0x2c];
    let (publ, _) = v5::connect(broker.port, &client_id_on_shard("take-pub", 0), true).await;
    let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
    props.session_expiry_interval = Some(300);

    // Several rounds, so that new connections are accepted on either shard.
    for round in 0..4u8 {
        let addr = broker.addr();
        let (clean, round_id) = (round == 0, id.clone());
        let mut old = tokio::task::spawn_blocking(move || {
            let mut old = Raw::connect_tcp(addr);
            old.send(&raw::connect_full(raw::V5, &round_id, if clean { 0x02 } else { 0x00 }, &expiry));
            match old.next(WAIT) {
                Next::Packet(p) if p.kind == raw::CONNACK && p.reason_code() == 0 => {
                    assert_eq!(p.body[0] & 1 == 1, !clean, "round {round}: session present flag");
                }
                other => panic!("round {round}: CONNACK: {other:?}"),
            }
            if clean {
                old.send(&raw::subscribe(raw::V5, 1, b"take/over", 1, 0b0010));
                assert!(matches!(old.next(WAIT), Next::Packet(p) if p.kind == raw::SUBACK));
            }
            old
        })
        .await
        .expect("raw connect");

        let mut opts = v5::options(broker.port, &id, false);
        opts.set_connect_properties(props.clone());
        let (mut new, ack) = v5::connect_with(opts).await;
        assert!(ack.session_present, "round {round}: session not carried over");
        let seen = tokio::task::spawn_blocking(move || old.expect_close(WAIT)).await.expect("raw close");
        // A redelivery of an earlier round's message to the old connection is legitimate.
        let seen: Vec<_> = seen.into_iter().filter(|p| p.kind != raw::PUBLISH).collect();
        match seen.as_slice() {
            [p] if p.kind == raw::DISCONNECT => {
                assert_eq!(p.reason_code(), 0x8E, "round {round}: old connection must get DISCONNECT 0x8E")
            }
            // Mosquitto 2.0 closes the old connection without the DISCONNECT the spec asks for.
            [] if broker.kind == BrokerKind::Mosquitto => {}
            other => panic!("round {round}: want DISCONNECT 0x8E then close, got {other:?}"),
        }
        // The subscription moved with the session.
        publ.publish("take/over", qos5(1), false, format!("round {round}")).await;
        let p = new.next_publish(WAIT).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(&p.payload[..], format!("round {round}").as_bytes());
        new.client.disconnect().await.expect("queue DISCONNECT");
        new.wait_closed(WAIT).await.expect("normal disconnect");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_3_1_4_2_takeover_closes_old_connection() {
    let broker = Broker::start();
    let id = client_id_on_shard("taker", 0);
    let (mut old, _) = v4::connect(broker.port, &id, false).await;
    old.subscribe("take/v4", qos4(1)).await;
    let (publ, _) = v4::connect(broker.port, &client_id_on_shard("take-pub", 1), true).await;
    for round in 0..4i32 {
        let (mut new, ack) = v4::connect(broker.port, &id, false).await;
        assert!(ack.session_present, "round {round}: session not carried over");
        old.wait_closed(WAIT).await.unwrap_or_else(|e| panic!("round {round}: old connection: {e}"));
        publ.publish("take/v4", qos4(1), false, format!("round {round}")).await;
        // The previous round's message may come again (DUP) if its PUBACK raced the takeover.
        loop {
            let p = new.next_publish(WAIT).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
            if &p.payload[..] == format!("round {round}").as_bytes() {
                break;
            }
            let previous = format!("round {}", round.wrapping_sub(1));
            assert!(p.dup && &p.payload[..] == previous.as_bytes(), "round {round}: unexpected {p:?}");
        }
        old = new;
    }
}
