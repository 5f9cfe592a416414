"""Durability across kill -9: retained messages, persistent sessions (MQTT 3.1.1 and 5), QoS 2
exactly once, session expiry across restarts, and a short crash loop.

Each test SIGKILLs fluxd (no shutdown code runs, as in a crash or an OOM kill) and starts a new
fluxd on the same data directory (crash.CrashBroker); the new process binds a new port, so clients
connect again. Whatever was acknowledged before the kill (PUBACK, PUBCOMP, SUBACK, a processed
DISCONNECT) must be there after the restart.

Flux-only: the Mosquitto the suite compares against runs with `persistence false`, which loses all
of this on kill -9 by design.
"""

from __future__ import annotations

import os
import queue
import random
import struct
import time
from collections import Counter

import pytest
from paho.mqtt.packettypes import PacketTypes

from crash import CrashBroker, SeqPublisher, sleep_until, topic_on, wait_until
from harness import (CLOSED, PUBLISH, PUBREL, QUIET, SUBACK, WAIT, cid, packet, prop_u32, props,
                     publish_fields, shard_for, skip_under_mosquitto, subscribe_packet)

NEVER = 3600  # a Session Expiry Interval that cannot run out during a test
SESSION_EXPIRY = 0x11  # property identifier


@pytest.fixture
def crash_broker():
    """Factory: crash_broker(**limits) -> a CrashBroker (fluxd that can be killed and restarted)."""
    skip_under_mosquitto("durability across kill -9 (the Mosquitto reference runs with `persistence false`)")
    started = []

    def make(**limits):
        b = CrashBroker(limits)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def dbroker(crash_broker):
    return crash_broker()


def persistent(client, broker, client_id, version, **kw):
    """Connects with a persistent session: clean_session=0 (3.1.1) or clean_start=0 with a long
    Session Expiry Interval (5)."""
    return client(broker, client_id, version=version, clean=False,
                  session_expiry=NEVER if version == 5 else None, **kw)


def collect(c, want: set, timeout: float = WAIT, allowed: frozenset = frozenset()) -> list:
    """Receives until every payload in `want` has arrived (duplicates are kept in the result).
    A payload outside `want | allowed` fails at once: it was never published."""
    got, seen = [], set()
    deadline = time.monotonic() + timeout
    while not want <= seen:
        try:
            m = c.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"{c.id}: {len(want - seen)} of {len(want)} messages missing after {timeout}s: "
                f"{sorted(want - seen)[:20]}; received {[x.payload for x in got][:40]}") from None
        assert m.payload in want or m.payload in allowed, f"{c.id}: message never published: {m.topic} {m.payload!r}"
        got.append(m)
        seen.add(m.payload)
    return got


def retained_now(client, broker, filter_: str) -> dict:
    """topic -> message for every retained message matching `filter_`, as a new subscriber sees it:
    everything before a live marker published after the SUBACK (the replay cannot be overtaken)."""
    marker = "dur/retained-probe/marker"
    sub = client(broker, cid("ret-probe"), version=5)
    assert sub.subscribe(filter_, qos=1) == [1]
    assert sub.subscribe(marker, qos=1) == [1]
    pub = client(broker, cid("ret-marker"), version=5)
    pub.publish(marker, b"m", qos=1)
    out = {}
    for m in sub.until(marker):
        assert m.retain, f"replayed {m.topic} without RETAIN"
        assert m.topic not in out, f"retained {m.topic} replayed twice: {out[m.topic].payload!r}, {m.payload!r}"
        out[m.topic] = m
    sub.close()
    pub.close()
    return out


def payloads(retained: dict) -> dict:
    return {t: m.payload for t, m in retained.items()}


# ---- 1. retained messages -------------------------------------------------------------------

def test_retained_set_update_and_clear_survive_kill9(dbroker, client):
    b = dbroker
    expect: dict[str, bytes] = {}

    def put(pub, topic, payload, **kw):
        rc = pub.publish(topic, payload, qos=1, retain=True, **kw)
        # PUBACK 0x10 (no matching subscribers) is a success too: nobody subscribes here.
        assert rc in (0, 0x10), f"retained publish to {topic}: PUBACK 0x{rc:02x}"
        if payload:
            expect[topic] = payload
        else:
            expect.pop(topic, None)

    big = random.Random(1).randbytes(70_000)  # spans many WAL blocks
    topics = {}
    pub = client(b, cid("ret-pub", 0), version=5)
    for s in (0, 1):
        # Owner shard of a topic's retained message is shard_for(topic): cover both.
        keep, upd, gone = (topic_on(f"dur/ret/s{s}/{k}", s) for k in ("keep", "upd", "gone"))
        topics[s] = (keep, upd, gone)
        put(pub, keep, b"keep\x00\xff" + bytes([s]))
        put(pub, upd, b"old")
        put(pub, upd, big if s else b"new 0")  # last write wins after replay
        put(pub, gone, b"doomed")
        put(pub, gone, b"")  # retained clear, acknowledged
    with_props = topic_on("dur/ret/props", 1)
    put(pub, with_props, b"{}", properties=props(PacketTypes.PUBLISH, ContentType="application/json",
                                                 UserProperty=[("k", "v")]))
    assert {shard_for(t) for t in expect} == {0, 1}
    assert payloads(retained_now(client, b, "dur/ret/#")) == expect, "retained set before the crash (test self-check)"

    b.crash_restart()
    after = retained_now(client, b, "dur/ret/#")
    assert payloads(after) == expect, (
        f"retained messages after kill -9 + restart: missing {sorted(set(expect) - set(after))}, "
        f"unexpected {sorted(set(after) - set(expect))}, "
        f"wrong payload {sorted(t for t in expect if t in after and after[t].payload != expect[t])}")
    m = after[with_props]
    assert m.properties.ContentType == "application/json", "retained message properties after restart"
    assert ("k", "v") in m.properties.UserProperty, "retained message user property after restart"

    # Writes made after a recovery are as durable, and a second recovery replays both lives.
    pub = client(b, cid("ret-pub", 1), version=5)
    for s in (0, 1):
        keep, upd, gone = topics[s]
        put(pub, keep, b"")
        put(pub, gone, f"back {s}".encode())
    b.crash_restart()
    assert payloads(retained_now(client, b, "dur/ret/#")) == expect, "retained messages after a second kill -9"


# ---- 2. persistent sessions -----------------------------------------------------------------

@pytest.mark.parametrize("home", [0, 1], ids=["home0", "home1"])
@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_persistent_session_and_its_queue_survive_kill9(dbroker, client, version, home):
    b = dbroker
    sid = cid(f"sess{version}", home)
    topic = "dur/sess/t"
    sub = persistent(client, b, sid, version)
    assert not sub.session_present
    assert sub.subscribe(topic, qos=1) == [1]
    sub.disconnect()

    pub = client(b, cid("sess-pub", 1 - home), version=5)
    sent = [f"m{i}".encode() for i in range(20)]
    for p in sent:
        assert pub.publish(topic, p, qos=1) == 0, "PUBACK for a message queued for an offline session"
    pub.close()

    b.crash_restart()
    sub = persistent(client, b, sid, version)
    assert sub.session_present, f"CONNACK session present = 0 after kill -9: the {'3.1.1' if version == 4 else 'MQTT 5'} session was lost"
    got = collect(sub, set(sent))
    assert all(m.topic == topic and m.qos == 1 for m in got), [(m.topic, m.qos) for m in got]
    first_seen = list(dict.fromkeys(m.payload for m in got))
    assert first_seen == sent, f"queued messages out of publish order after restart: {first_seen}"

    # The subscription itself survived: a publish made after the restart is routed to the session.
    pub = client(b, cid("sess-pub", 1 - home), version=5)
    assert pub.publish(topic, b"after restart", qos=1) == 0
    collect(sub, {b"after restart"}, allowed=frozenset(sent))


# ---- 3. QoS 2 exactly once ------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_qos2_queued_for_offline_session_exactly_once_across_kill9(dbroker, client, version):
    b = dbroker
    sid = cid(f"q2sub{version}", 1)
    data, marker = "dur/q2/data", "dur/q2/marker"
    sub = persistent(client, b, sid, version)
    assert sub.subscribe(data, qos=2) == [2]
    assert sub.subscribe(marker, qos=2) == [2]
    sub.disconnect()

    pub = client(b, cid("q2pub", 0), version=5)
    sent = [f"x{i}".encode() for i in range(10)]
    for p in sent:
        assert pub.publish(data, p, qos=2) == 0, "PUBCOMP"  # returns once PUBCOMP arrived
    pub.close()

    b.crash_restart()
    sub = persistent(client, b, sid, version)
    assert sub.session_present, "CONNACK session present = 0 after kill -9: the QoS 2 session was lost"
    got = collect(sub, set(sent))
    # Positive marker, queued behind anything still to come for this session, then a quiet period.
    pub = client(b, cid("q2pub", 0), version=5)
    assert pub.publish(marker, b"end", qos=2) == 0
    got += sub.until(marker)
    sub.expect_none(QUIET)
    assert all(m.qos == 2 for m in got), [(m.payload, m.qos) for m in got]
    counts = Counter(m.payload for m in got)
    assert sorted(counts) == sorted(sent) and set(counts.values()) == {1}, (
        f"QoS 2 not exactly once across the restart: duplicates {sorted(p for p, n in counts.items() if n > 1)}")


def test_qos2_in_flight_to_subscriber_exactly_once_across_kill9(dbroker, client, raw):
    """Two QoS 2 deliveries are mid-flow when fluxd dies: A has had PUBREC and PUBREL (the
    subscriber's PUBCOMP is lost), B was received but not yet PUBREC'd. The raw subscriber keeps
    its side of the session like any persistent receiver (MQTT 5 Figure 4.3: store the packet id and
    deliver on PUBLISH, ignore a PUBLISH with a stored id, forget the id on PUBREL). After the
    restart, fluxd must resume with the original packet identifiers [MQTT-4.4.0-1] and never
    re-send a PUBLISH once it has sent its PUBREL (§4.3.3): every message reaches the
    application exactly once."""
    b = dbroker
    sid = cid("q2raw", 0)
    topic = "dur/q2in/t"
    expiry = prop_u32(SESSION_EXPIRY, NEVER)
    r = raw(b)
    assert r.connect(5, sid, clean=False, properties=expiry) == (False, 0)
    r.send(subscribe_packet(5, 1, topic, 2))
    _, _, body = r.expect(SUBACK)
    assert body[-1] == 2, f"SUBACK {body.hex()}"
    pub = client(b, cid("q2raw-pub", 1), version=5)

    delivered: list[bytes] = []
    held: set[int] = set()  # receiver state: packet ids whose PUBREL has not arrived

    def on_publish(flags, body):
        f = publish_fields(5, flags, body)
        assert f["qos"] == 2 and f["topic"] == topic, f
        if f["packet_id"] not in held:
            held.add(f["packet_id"])
            delivered.append(f["payload"])
        return f

    assert pub.publish(topic, b"A", qos=2) == 0
    kind, flags, body = r.expect(PUBLISH)
    pa = on_publish(flags, body)["packet_id"]
    assert delivered == [b"A"]
    r.send(packet(0x50, struct.pack("!H", pa)))  # PUBREC
    _, _, body = r.expect(PUBREL)
    assert struct.unpack("!H", body[:2])[0] == pa
    held.discard(pa)  # ... and the PUBCOMP never leaves: fluxd dies first

    assert pub.publish(topic, b"B", qos=2) == 0
    kind, flags, body = r.expect(PUBLISH)
    on_publish(flags, body)  # delivered, no PUBREC yet
    assert delivered == [b"A", b"B"]
    r.close()
    pub.close()

    b.crash_restart()
    r = raw(b)
    present, rc = r.connect(5, sid, clean=False, properties=expiry)
    assert rc == 0 and present, "CONNACK session present = 0 after kill -9: the session with QoS 2 in flight was lost"
    pub = client(b, cid("q2raw-pub", 1), version=5)
    assert pub.publish(topic, b"C", qos=2) == 0  # marker, published after the reconnect

    seen = []  # packets after the restart, for the failure message
    pc = None  # packet id of C
    done = False
    deadline = time.monotonic() + WAIT
    while True:
        p = r.next(max(0.0, deadline - time.monotonic()) if not done else QUIET)
        if p is None and done:
            break  # C completed, then a quiet period: nothing else is coming
        assert p not in (None, CLOSED), (
            f"C not completed within {WAIT}s ({p!r}); packets after the restart {seen}, delivered {delivered}, "
            f"ids held {sorted(held)} (a packet id reused while the subscriber still holds it swallows a new message)")
        kind, flags, body = p
        if kind == PUBLISH:
            f = on_publish(flags, body)
            pid = f["packet_id"]
            seen.append(("PUBLISH", pid, f["payload"], "dup" if f["dup"] else "new"))
            if f["payload"] == b"C":
                pc = pid
            r.send(packet(0x50, struct.pack("!H", pid)))  # PUBREC
        elif kind == PUBREL:
            (pid,) = struct.unpack("!H", body[:2])
            seen.append(("PUBREL", pid))
            held.discard(pid)
            r.send(packet(0x70, struct.pack("!H", pid)))  # PUBCOMP
            done = done or pid == pc
        else:
            raise AssertionError(f"unexpected packet type {kind} after the restart: {body.hex()}")
    print(f"packets after the restart: {seen}")
    assert delivered == [b"A", b"B", b"C"], (
        f"application saw {delivered}: QoS 2 must be exactly once across kill -9 (packets after restart: {seen})")
    assert not held, (f"QoS 2 flow of B (packet id {sorted(held)}) never completed after the restart: an unacknowledged "
                      f"PUBLISH must be re-sent with its original packet id [MQTT-4.4.0-1] (packets after restart: {seen})")


# ---- 4. session expiry across restarts ------------------------------------------------------

def _raw_session(raw, broker, client_id, expiry, topic):
    """An MQTT 5 session with a subscription, ended by a DISCONNECT that fluxd has processed
    (it closed the socket). Returns the time of the close."""
    r = raw(broker)
    assert r.connect(5, client_id, clean=False, properties=prop_u32(SESSION_EXPIRY, expiry)) == (False, 0)
    r.send(subscribe_packet(5, 1, topic, 1))
    r.expect(SUBACK)
    r.send(packet(0xE0, b""))  # DISCONNECT, normal: the session's expiry starts now
    r.expect_close()
    return time.monotonic()


def _check_expired(client, broker, client_id, expiry, topic, what):
    c = client(broker, client_id, version=5, clean=False, session_expiry=expiry)
    assert not c.session_present, f"CONNACK session present = 1: {what}"
    # Its subscription went with it: a publish to its old topic does not reach the new session.
    c.subscribe("dur/exp/marker", qos=1)
    pub = client(broker, cid("exp-pub"), version=5)
    pub.publish(topic, b"stale", qos=1)
    pub.publish("dur/exp/marker", b"m", qos=1)
    assert [m.payload for m in c.until("dur/exp/marker")] == [], "subscription of an expired session still routes"


def test_session_expiry_runs_while_fluxd_is_down(dbroker, client, raw):
    b = dbroker
    short_id, keep_id = cid("exp-short", 0), cid("exp-keep", 1)
    _raw_session(raw, b, keep_id, NEVER, "dur/exp/keep")
    gone = _raw_session(raw, b, short_id, 2, "dur/exp/short")
    b.kill9()
    sleep_until(gone + 3.5)  # the 2 s expiry ran out while no fluxd was running
    b.restart()
    # Control: sessions did survive the restart, so an absent one below really expired.
    keep = client(b, keep_id, version=5, clean=False, session_expiry=NEVER)
    assert keep.session_present, "control session (expiry 3600 s) lost across kill -9"
    _check_expired(client, b, short_id, 2, "dur/exp/short",
                   "a 2 s session disconnected > 3 s ago (fluxd down meanwhile) must have expired")


def test_session_expiry_not_restarted_by_recovery(dbroker, client, raw):
    """Recovered with time left, the session expires on its original schedule (4 s after its
    disconnect), not 4 s after the restart."""
    b = dbroker
    short_id, keep_id = cid("exp-short", 1), cid("exp-keep", 0)
    _raw_session(raw, b, keep_id, NEVER, "dur/exp/keep")
    gone = _raw_session(raw, b, short_id, 4, "dur/exp/short")
    b.kill9()
    sleep_until(gone + 2.5)
    b.restart()  # the short session is recovered with ~1.5 s left
    keep = client(b, keep_id, version=5, clean=False, session_expiry=NEVER)
    assert keep.session_present, "control session (expiry 3600 s) lost across kill -9"
    # Expired at gone + 4 s (+ one 500 ms housekeeping tick); a clock restarted at recovery would
    # keep it until at least gone + 6.5 s.
    sleep_until(gone + 5.5)
    _check_expired(client, b, short_id, 4, "dur/exp/short",
                   "a 4 s session disconnected 5.5 s ago must have expired; recovery restarted its expiry clock")


# ---- 5. crash loop --------------------------------------------------------------------------

CYCLES = 3


def test_crash_loop_keeps_every_acked_message_and_the_retained_value(crash_broker, client):
    seed = int(os.environ.get("FLUX_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash loop seed {seed} (FLUX_CRASH_SEED={seed} repeats the kill delays)")
    rng = random.Random(seed)
    # Generous queue: a subscriber that falls behind across restarts must not hit the drop limit.
    b = crash_broker(max_queued_messages=100_000)
    data = "dur/loop/data"
    retained = topic_on("dur/loop/ret/value", 1)  # retained owner shard 1, publisher's home shard 0
    sub_id = cid("loop-sub", 1)
    acked, attempted, r_acked, r_attempted = set(), set(), [], []
    received: Counter = Counter()

    def take(m):
        assert m.topic == data and m.qos == 1, (m.topic, m.qos)
        if m.payload == b"end":
            return True
        seq = int(m.payload)
        assert seq in attempted, f"received sequence number {seq} that was never published"
        received[seq] += 1
        return False

    sub = persistent(client, b, sub_id, 5)
    assert sub.subscribe(data, qos=1) == [1]
    next_seq = 0
    for cycle in range(CYCLES):
        pub = SeqPublisher(b, cid("loop-pub", 0), data, retained, next_seq, acked=acked, attempted=attempted,
                           retained_acked=r_acked, retained_attempted=r_attempted)
        pub.start()
        delay = rng.uniform(0.3, 1.5)
        sleep_until(time.monotonic() + delay)  # the random kill moment
        wait_until(lambda: pub.acked_this_run > 0 or pub.dropped.is_set() or not pub.is_alive(), WAIT,
                   f"cycle {cycle}: first PUBACK")
        assert pub.acked_this_run > 0, f"cycle {cycle}: no PUBACK before the kill (error {pub.error!r})"
        b.kill9()
        pub.finish()
        next_seq = pub.seq
        sub.wait_disconnected()
        sub.c.loop_stop()
        while True:
            try:
                take(sub.messages.get_nowait())
            except queue.Empty:
                break
        print(f"cycle {cycle}: killed after {delay:.2f}s; published up to {next_seq - 1}, "
              f"{len(acked)} data acked in total, {len(received)} distinct received so far")
        b.restart()
        sub = persistent(client, b, sub_id, 5)
        assert sub.session_present, f"cycle {cycle}: CONNACK session present = 0 after kill -9"

    # Drain: every PUBACKed sequence number arrives (duplicates allowed), then the subscription
    # still routes a live publish.
    deadline = time.monotonic() + 30
    while acked - set(received):
        try:
            m = sub.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            lost = sorted(acked - set(received))
            raise AssertionError(f"{len(lost)} of {len(acked)} PUBACKed messages never delivered after "
                                 f"{CYCLES} kill -9 cycles (seed {seed}): {lost[:30]}") from None
        take(m)
    marker = client(b, cid("loop-end", 0), version=5)
    assert marker.publish(data, b"end", qos=1) == 0
    deadline = time.monotonic() + WAIT
    while True:
        try:
            m = sub.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("subscription no longer routes after the crash loop") from None
        if take(m):
            break
    print(f"{len(acked)} acked, {len(received)} distinct received, {sum(received.values()) - len(received)} duplicates")

    # Retained: the value is the last acknowledged one or one published after it (unacknowledged
    # when fluxd died), never an older one and never nothing.
    assert r_acked, "no retained publish was acknowledged in the loop"
    got = retained_now(client, b, retained)
    assert retained in got, f"retained {retained} lost (last acked r{max(r_acked)}, seed {seed})"
    value = got[retained].payload.decode()
    seq = int(value[1:])
    assert seq in r_attempted, f"retained value {value!r} was never published"
    assert seq >= max(r_acked), (f"retained value went back to {value!r} although r{max(r_acked)} was "
                                 f"acknowledged later (seed {seed})")
