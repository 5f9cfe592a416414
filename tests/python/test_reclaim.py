"""The write-ahead log does not grow without bound: checkpoints rewrite the live state and delete
older segments, and a session that holds a few old messages does not pin the segments they were
first written to (its messages are copied forward). What the checkpoints kept survives kill -9.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crash import CrashBroker, wait_until
from harness import WAIT, cid, skip_under_mosquitto

SEGMENT = 256 * 1024
PAYLOAD = 8192
MESSAGES = 1500  # 12 MiB through the log, 48 segments' worth


def segments(data: Path) -> dict:
    return {d.name: sorted(p.name for p in d.glob("*.wal")) for d in sorted(data.glob("wal-shard-*"))}


@pytest.fixture
def rbroker():
    skip_under_mosquitto("fluxd's write-ahead log reclamation")
    b = CrashBroker(extra_config=f"[durability]\nsegment_size_bytes = {SEGMENT}\n")
    yield b
    b.stop()


def test_checkpoints_bound_the_log_and_copy_old_live_messages_forward(rbroker, client):
    b = rbroker
    data = b.data_dir or b.dir / "data"
    # A session that goes offline holding three messages, written at the very start of the log.
    stuck_id = cid("rc-stuck", 0)
    stuck = client(b, stuck_id, version=5, clean=False, session_expiry=3600)
    assert stuck.subscribe("rc/stuck", qos=1) == [1]
    stuck.disconnect()
    pub = client(b, cid("rc-pub", 1), version=5)
    for i in range(3):
        assert pub.publish("rc/stuck", f"old-{i}".encode(), qos=1) == 0

    # A busy persistent session that keeps up: its messages come and go.
    busy_id = cid("rc-busy", 0)
    busy = client(b, busy_id, version=5, clean=False, session_expiry=3600)
    assert busy.subscribe("rc/busy", qos=1) == [1]
    got = 0
    for i in range(MESSAGES):
        assert pub.publish("rc/busy", i.to_bytes(4, "big") + bytes(PAYLOAD - 4), qos=1) == 0
        while not busy.messages.empty():
            busy.messages.get_nowait()
            got += 1
    while got < MESSAGES:
        busy.expect(WAIT, f"busy message ({MESSAGES - got} left)")
        got += 1

    wait_until(lambda: "WAL checkpoint done" in b.log(), WAIT, "a checkpoint")
    wait_until(lambda: "0" * 20 + ".wal" not in str(segments(data)), WAIT,
               f"the first segments deleted (now {segments(data)})")
    # 12 MiB went through; what is live is three small messages and two sessions: the next
    # checkpoint leaves a handful of segments.
    wait_until(lambda: all(len(v) <= 8 for v in segments(data).values()), WAIT,
               f"the log reclaimed to a few segments (now {segments(data)})")
    per_shard = segments(data)
    total_mib = sum(len(v) for v in per_shard.values()) * SEGMENT / (1 << 20)
    print(f"log after {MESSAGES} x {PAYLOAD} B: {per_shard} ({total_mib:.2f} MiB)")

    b.kill9()
    b.restart()
    stuck = client(b, stuck_id, version=5, clean=False, session_expiry=3600)
    assert stuck.session_present
    old = {stuck.expect(WAIT, "an old message").payload for _ in range(3)}
    assert old == {b"old-0", b"old-1", b"old-2"}
    busy = client(b, busy_id, version=5, clean=False, session_expiry=3600)
    assert busy.session_present
    pub = client(b, cid("rc-pub2", 1), version=5)
    assert pub.publish("rc/busy", b"after", qos=1) == 0
    while (m := busy.expect(WAIT, "the message published after the restart")).payload != b"after":
        pass  # QoS 1 redeliveries of messages whose PUBACK was in flight at the kill
