"""Durable queues over MQTT: `$queue/<name>[/<filter>]`, `$q/<filter>`, `PUBLISH $queue/<name>`,
competing consumers, offline backlog, redelivery, rejects and dead-lettering, consumer groups,
limits, and kill -9 under load. Real paho-mqtt clients (and raw packets where a client library
cannot send what is tested) against the real fluxd.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter

import pytest
from paho.mqtt.packettypes import PacketTypes

from crash import CrashBroker, wait_until
from harness import (PUBACK, PUBLISH, SUBACK, WAIT, Broker, cid, fluxd_queue, packet, props, publish_fields,
                     skip_under_mosquitto, subscribe_packet)


@pytest.fixture
def qbroker():
    skip_under_mosquitto("Flux durable queues")
    made = []

    def make(extra_config: str = "", crash: bool = False, **limits):
        b = (CrashBroker if crash else Broker)(limits, extra_config=extra_config)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


def drain(c, n: int, what: str = "queue message") -> list:
    return [c.expect(WAIT, f"{what} {i + 1}/{n}") for i in range(n)]


def test_competing_consumers_get_each_message_once(qbroker, client):
    b = qbroker()
    c1 = client(b, cid("q-c1", 0), version=5)
    c2 = client(b, cid("q-c2", 1), version=5)
    assert c1.subscribe("$queue/work/jobs/#", qos=1) == [1]
    assert c2.subscribe("$queue/work", qos=1) == [1]
    pub = client(b, cid("q-pub"), version=5)
    n = 40
    for i in range(n):
        assert pub.publish(f"jobs/{i % 3}", str(i).encode(), qos=1) == 0
    got = Counter()
    deadline = time.monotonic() + WAIT
    while sum(got.values()) < n and time.monotonic() < deadline:
        for c, name in ((c1, "c1"), (c2, "c2")):
            while not c.messages.empty():
                m = c.messages.get_nowait()
                got[(name, m.payload)] += 1
    payloads = Counter(p for (_, p) in got.elements())
    assert set(payloads) == {str(i).encode() for i in range(n)}, "a message was lost"
    assert all(v == 1 for v in payloads.values()), f"delivered twice: {[p for p, v in payloads.items() if v > 1]}"
    assert {name for (name, _) in got} == {"c1", "c2"}, "one consumer got nothing: not competing"


def test_offline_backlog_in_order_and_live_subscribers_get_every_message_too(qbroker, client):
    b = qbroker()
    first = client(b, cid("q-first"), version=5)
    assert first.subscribe("$queue/telemetry/sensors/#", qos=1) == [1]
    first.disconnect()  # the queue exists and is bound; no consumer now
    live = client(b, cid("q-live"), version=5)
    assert live.subscribe("sensors/#", qos=1) == [1]
    pub = client(b, cid("q-pub"), version=5)
    n = 25
    for i in range(n):
        assert pub.publish(f"sensors/{i}", str(i).encode(), qos=1) == 0
    assert [m.payload for m in drain(live, n, "live message")] == [str(i).encode() for i in range(n)]
    late = client(b, cid("q-late"), version=5)
    assert late.subscribe("$queue/telemetry", qos=1) == [1]
    got = drain(late, n)
    assert [m.payload for m in got] == [str(i).encode() for i in range(n)], "backlog not FIFO"
    assert [m.topic for m in got] == [f"sensors/{i}" for i in range(n)], "consumers see the published topic"
    late.expect_none()


def test_publish_to_queue_topic_and_q_filter_queue(qbroker, client):
    b = qbroker()
    pub = client(b, cid("q-pub"), version=5)
    for i in range(3):
        assert pub.publish("$queue/direct", f"d{i}".encode(), qos=1) == 0
    c = client(b, cid("q-c"), version=5)
    assert c.subscribe("$queue/direct", qos=1) == [1]
    assert [m.payload for m in drain(c, 3)] == [b"d0", b"d1", b"d2"]
    # $q/<filter>: a queue named after the filter, bound to it.
    q = client(b, cid("q-q"), version=5)
    assert q.subscribe("$q/alerts/+", qos=1) == [1]
    assert pub.publish("alerts/fire", b"hot", qos=1) == 0
    m = q.expect()
    assert (m.topic, m.payload) == ("alerts/fire", b"hot")


def test_unacked_messages_are_redelivered_when_the_consumer_goes(qbroker, client):
    b = qbroker()
    slow = client(b, cid("q-slow", 0), version=5, manual_ack=True)
    assert slow.subscribe("$queue/tasks/tasks/#", qos=1) == [1]
    pub = client(b, cid("q-pub"), version=5)
    for i in range(5):
        assert pub.publish("tasks/x", f"t{i}".encode(), qos=1) == 0
    held = drain(slow, 5, "delivery to the consumer that never acks")
    assert [m.payload for m in held] == [b"t0", b"t1", b"t2", b"t3", b"t4"]
    slow.kill()  # gone without acknowledging
    other = client(b, cid("q-other", 1), version=5)
    assert other.subscribe("$queue/tasks", qos=1) == [1]
    assert sorted(m.payload for m in drain(other, 5, "redelivery")) == [b"t0", b"t1", b"t2", b"t3", b"t4"]


def raw_consumer(raw, b, client_id: str, topic: str):
    r = raw(b)
    assert r.connect(5, client_id) == (False, 0)
    r.send(subscribe_packet(5, 1, topic, 1))
    r.expect(SUBACK)
    return r


def puback(packet_id: int, reason: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id) + bytes([reason, 0]))


def test_rejected_messages_go_to_another_consumer_then_to_the_dead_letter_queue(qbroker, client, raw):
    config = ('[[queue]]\nname = "pay"\nbind = ["pay/#"]\nmax_deliveries = 2\ndead_letter = "pay-dlq"\n'
              'ack_timeout_ms = 0\n\n[[queue]]\nname = "pay-dlq"\n')
    b = qbroker(extra_config=config)
    r = raw_consumer(raw, b, cid("q-rej"), "$queue/pay")
    pub = client(b, cid("q-pub"), version=5)
    assert pub.publish("pay/1", b"bad", qos=1) == 0
    # Refused twice (PUBACK 0x80): with max_deliveries = 2 it is dead-lettered.
    for attempt in range(2):
        kind, flags, body = r.expect(PUBLISH)
        f = publish_fields(5, flags, body)
        assert f["payload"] == b"bad", f
        r.send(puback(f["packet_id"], 0x80))
    dlq = client(b, cid("q-dlq"), version=5)
    assert dlq.subscribe("$queue/pay-dlq", qos=1) == [1]
    m = dlq.expect(WAIT, "the dead letter")
    assert m.payload == b"bad"
    assert r.next(0.5) is None, "a dead-lettered message was delivered again"


def test_consumer_groups_each_get_every_message(qbroker, client):
    b = qbroker()
    group = props(PacketTypes.SUBSCRIBE, UserProperty=[("group", "billing")])
    a = client(b, cid("q-ga"), version=5)
    g = client(b, cid("q-gb"), version=5)
    assert a.subscribe("$queue/events/ev/#", qos=1) == [1]
    assert g.subscribe("$queue/events", qos=1, properties=group) == [1]
    pub = client(b, cid("q-pub"), version=5)
    for i in range(10):
        assert pub.publish(f"ev/{i}", str(i).encode(), qos=1) == 0
    want = [str(i).encode() for i in range(10)]
    assert [m.payload for m in drain(a, 10, "default group")] == want
    assert [m.payload for m in drain(g, 10, "billing group")] == want


def test_full_queue_rejects_the_publish_with_quota_exceeded(qbroker, client):
    b = qbroker(extra_config='[[queue]]\nname = "small"\nbind = ["small/#"]\nmax_messages = 3\n')
    pub = client(b, cid("q-pub", 1), version=5)
    codes = [pub.publish("small/x", str(i).encode(), qos=1) for i in range(5)]
    assert codes == [0, 0, 0, 0x97, 0x97], codes
    c = client(b, cid("q-c"), version=5)
    assert c.subscribe("$queue/small", qos=1) == [1]
    assert [m.payload for m in drain(c, 3)] == [b"0", b"1", b"2"]
    c.expect_none()


def test_kill9_under_load_loses_no_acknowledged_publish_and_redelivers_unacked(qbroker, client):
    b = qbroker(crash=True)
    consumer_id = cid("q-kc", 0)
    c = client(b, consumer_id, version=5, clean=False, session_expiry=3600)
    assert c.subscribe("$queue/ledger/ledger/#", qos=1) == [1]
    c.disconnect()  # the queue keeps the backlog while no one consumes
    pub = client(b, cid("q-kp", 1), version=5)
    acked = set()
    stop = threading.Event()

    def publish():
        i = 0
        while not stop.is_set() and i < 5000:
            try:
                rc = pub.publish("ledger/x", str(i).encode(), qos=1)
            except AssertionError:
                return  # the broker died under us
            if rc == 0:
                acked.add(str(i).encode())
            i += 1

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    wait_until(lambda: len(acked) >= 200, WAIT * 3, "200 acknowledged publishes")
    b.kill9()
    stop.set()
    t.join(WAIT)
    b.restart()
    c = client(b, consumer_id, version=5, clean=False, session_expiry=3600)
    got = set()
    deadline = time.monotonic() + WAIT * 3
    while not acked <= got and time.monotonic() < deadline:
        try:
            got.add(c.messages.get(timeout=0.5).payload)
        except Exception:
            pass
    missing = acked - got
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged publishes lost: {sorted(missing)[:10]}"


def test_fluxd_queue_commands_create_list_purge_delete(qbroker, client):
    b = qbroker()
    rc, out = fluxd_queue(b, "create", "audit", "--bind", "audit/#", "--settings", '{"max_messages": 1000}')
    assert rc == 0 and out["declared"], out
    pub = client(b, cid("q-pub"), version=5)
    for i in range(4):
        assert pub.publish(f"audit/{i}", b"x", qos=1) == 0  # bound before `create` answered
    rc, out = fluxd_queue(b, "list")
    assert rc == 0
    audit = next(q for q in out if q["name"] == "audit")
    assert audit["depth"] == 4 and audit["published"] == 4, audit
    group = audit["groups"][0]
    assert (group["group"], group["lag_messages"]) == ("default", 4) and group["oldest_age_ms"] >= 0, group
    rc, out = fluxd_queue(b, "stats", "audit")
    assert rc == 0 and out["depth"] == 4
    rc, out = fluxd_queue(b, "purge", "audit")
    assert rc == 0 and out["purged"] == 4, out
    # Bindings are added and removed while running.
    rc, out = fluxd_queue(b, "create", "audit", "--bind", "extra/#")
    assert rc == 0, out
    assert pub.publish("extra/1", b"e", qos=1) == 0
    rc, out = fluxd_queue(b, "unbind", "audit", "--bind", "audit/#")
    assert rc == 0 and out["unbound"] == 1, out
    assert pub.publish("audit/1", b"x", qos=1) == 0x10  # no longer stored: no matching subscribers
    rc, out = fluxd_queue(b, "stats", "audit")
    assert rc == 0 and out["depth"] == 1, out
    rc, out = fluxd_queue(b, "delete", "audit")
    assert rc == 0 and out["deleted"], out
    rc, out = fluxd_queue(b, "stats", "audit")
    assert rc != 0, f"a deleted queue still has stats: {out}"
    rc, out = fluxd_queue(b, "create", "bad", "--settings", '{"dispatch": "sideways"}')
    assert rc != 0 and "dispatch" in str(out), out
    # The deleted queue's binding is gone on every shard: a publish is not stored anywhere.
    assert pub.publish("audit/9", b"x", qos=1) == 0x10  # No matching subscribers


def test_ack_timeout_redelivers_to_another_consumer(qbroker, client):
    b = qbroker(extra_config='[[queue]]\nname = "vt"\nbind = ["vt/#"]\nack_timeout_ms = 1000\n')
    holder = client(b, cid("q-holder", 0), version=5, manual_ack=True)
    assert holder.subscribe("$queue/vt", qos=1) == [1]
    pub = client(b, cid("q-pub"), version=5)
    assert pub.publish("vt/1", b"slow", qos=1) == 0
    assert holder.expect().payload == b"slow"  # held, never acknowledged
    other = client(b, cid("q-other", 1), version=5)
    assert other.subscribe("$queue/vt", qos=1) == [1]
    m = other.expect(WAIT, "redelivery after the ack timeout")
    assert m.payload == b"slow"


def test_mqtt311_consumer_acks_by_puback(qbroker, client):
    b = qbroker()
    c = client(b, cid("q-311"), version=4)
    assert c.subscribe("$queue/legacy/legacy/#", qos=1) == [1]
    pub = client(b, cid("q-pub"), version=4)
    for i in range(5):
        assert pub.publish("legacy/x", str(i).encode(), qos=1) == 0
    assert [m.payload for m in drain(c, 5)] == [b"0", b"1", b"2", b"3", b"4"]
    c.close()
    again = client(b, cid("q-311b"), version=4)
    assert again.subscribe("$queue/legacy", qos=1) == [1]
    again.expect_none()  # every message was acknowledged: nothing comes back


def test_persistent_queue_consumer_keeps_its_group_across_kill9(qbroker, client):
    b = qbroker(crash=True)
    group = props(PacketTypes.SUBSCRIBE, UserProperty=[("group", "billing")])
    cid_ = cid("q-pg", 0)
    c = client(b, cid_, version=5, clean=False, session_expiry=3600)
    assert c.subscribe("$queue/invoices/inv/#", qos=1, properties=group) == [1]
    c.disconnect()
    b.kill9()
    b.restart()
    c = client(b, cid_, version=5, clean=False, session_expiry=3600)
    assert c.session_present

    def billing_consumers():
        rc, out = fluxd_queue(b, "stats", "invoices")
        if rc != 0:
            return None
        return {g["group"]: g["consumers"] for g in out["groups"]}.get("billing")

    assert wait_until(billing_consumers, WAIT, "the resumed consumer back in group billing") == 1


def test_max_queues_bounds_the_queues_clients_create(qbroker, client):
    from harness import shard_for
    b = qbroker(max_queues=1)
    pub = client(b, cid("q-pub"), version=5)
    names = [f"made-{i}" for i in range(6)]
    codes = {n: pub.publish(f"$queue/{n}", b"x", qos=1) for n in names}
    first_per_shard = {}
    for n in names:
        first_per_shard.setdefault(shard_for(n), n)
    want = {n: (0 if first_per_shard[shard_for(n)] == n else 0x97) for n in names}
    assert codes == want, codes
    wait_until(lambda: "max_queues" in b.log(), WAIT, "a log line about the refused queue")


def test_dead_letters_name_their_origin_and_redrive_moves_them_back(qbroker, client, raw):
    config = ('[[queue]]\nname = "rd"\nbind = ["rd/#"]\nmax_deliveries = 1\ndead_letter = "rd-dlq"\n'
              'ack_timeout_ms = 0\n\n[[queue]]\nname = "rd-dlq"\n')
    b = qbroker(extra_config=config)
    r = raw_consumer(raw, b, cid("q-rdc"), "$queue/rd")
    pub = client(b, cid("q-rdp"), version=5)
    for i in range(3):
        assert pub.publish("rd/x", b"m%d" % i, qos=1) == 0
        kind, flags, body = r.expect(PUBLISH)
        r.send(puback(publish_fields(5, flags, body)["packet_id"], 0x80))
    r.close()
    wait_until(lambda: fluxd_queue(b, "stats", "rd-dlq")[1]["depth"] == 3, WAIT, "3 dead letters")
    # A second group reads the dead letters without taking them from the default group.
    look = client(b, cid("q-rdl"), version=5)
    group = props(PacketTypes.SUBSCRIBE, UserProperty=[("group", "inspect")])
    assert look.subscribe("$queue/rd-dlq", qos=1, properties=group) == [1]
    m = look.expect(WAIT, "a dead letter")
    up = dict(m.properties.UserProperty)
    assert up.get("x-death-queue") == "rd" and up.get("x-death-reason") == "rejected", up
    look.disconnect()
    rc, out = fluxd_queue(b, "redrive", "rd-dlq")
    assert rc == 0 and out["moved"] == 3, out
    assert fluxd_queue(b, "stats", "rd-dlq")[1]["depth"] == 0
    c = client(b, cid("q-rdn"), version=5)
    assert c.subscribe("$queue/rd", qos=1) == [1]
    assert [x.payload for x in drain(c, 3, "re-driven message")] == [b"m0", b"m1", b"m2"]


def test_seek_replays_a_group_from_an_offset_or_a_time(qbroker, client):
    b = qbroker()
    # A second group that never reads keeps the messages in the queue after the default group
    # acknowledged them: a seek can go back that far.
    keep = client(b, cid("q-sk"), version=5)
    group = props(PacketTypes.SUBSCRIBE, UserProperty=[("group", "archive")])
    assert keep.subscribe("$queue/hist/hist/#", qos=1, properties=group) == [1]
    keep.disconnect()
    pub = client(b, cid("q-sp"), version=5)
    for i in range(5):
        assert pub.publish("hist/x", b"h%d" % i, qos=1) == 0
    c = client(b, cid("q-sc"), version=5)
    assert c.subscribe("$queue/hist", qos=1) == [1]
    want = [b"h%d" % i for i in range(5)]
    assert [m.payload for m in drain(c, 5, "first read")] == want
    wait_until(lambda: fluxd_queue(b, "stats", "hist")[1]["groups"][0]["lag_messages"] == 0
               if fluxd_queue(b, "stats", "hist")[1]["groups"][0]["group"] == "default"
               else fluxd_queue(b, "stats", "hist")[1]["groups"][1]["lag_messages"] == 0,
               WAIT, "default group acknowledged everything")
    rc, out = fluxd_queue(b, "seek", "hist", "--offset", "3")
    assert rc == 0 and out["offset"] == 3, out
    assert [m.payload for m in drain(c, 2, "after seek to 3")] == want[3:]
    rc, out = fluxd_queue(b, "seek", "hist", "--since-secs", "3600")
    assert rc == 0 and out["offset"] == 0, out
    assert [m.payload for m in drain(c, 5, "after seek to an hour ago")] == want
    c.expect_none()
