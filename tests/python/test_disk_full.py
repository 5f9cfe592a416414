"""A full disk: fluxd refuses what it cannot store, keeps everything it acknowledged, and stays up.

The data directory is on a small ext4 file system (a 48 MiB image on a loop device, made and
mounted by the test: needs root and loop devices, as CI has). An offline persistent session
subscribes to a topic, so each QoS 1 publish to it must reach the write-ahead log before its
PUBACK. The publisher sends large messages until the log cannot grow any more, then:
- the MQTT 5 publisher gets PUBACK 0x80 (nothing it was not told is stored is acknowledged);
- an MQTT 3.1.1 publisher, which has no negative PUBACK, is disconnected;
- non-durable traffic still flows (QoS 0 and QoS 1 to topics without persistent subscribers);
- after a kill -9 and a restart on the same full disk, every acknowledged message is delivered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from crash import CrashBroker, wait_until
from harness import WAIT, cid, skip_under_mosquitto

PAYLOAD = 256 * 1024
IMAGE_MIB = 48


@pytest.fixture
def small_disk():
    skip_under_mosquitto("fluxd's write-ahead log on a full disk")
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4 to mount a small file system")
    root = Path(tempfile.mkdtemp(prefix="flux-full-"))
    image, mnt = root / "disk.img", root / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot mount a loop file system here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def publish_outcome(c, topic: str, payload: bytes):
    """QoS 1 publish: the PUBACK reason code, or "closed" if the server closed the connection."""
    info = c.publish(topic, payload, qos=1, wait=False)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with c._cv:
            if c._cv.wait_for(lambda: info.mid in c.pubacks, timeout=0.05):
                rc = c.pubacks.pop(info.mid)
                return rc.value if hasattr(rc, "value") else rc
        if not c.disconnects.empty():
            return "closed"
    raise AssertionError(f"{c.id}: neither PUBACK nor close within {WAIT}s")


def test_full_disk_refuses_durable_publishes_and_keeps_what_it_acknowledged(small_disk, client):
    config = "[durability]\nsegment_size_bytes = 4194304\n"
    limits = {"max_queued_messages": 100_000, "max_queued_bytes": 1 << 30}
    b = CrashBroker(limits, extra_config=config, data_dir=small_disk / "data")
    try:
        sub_id = cid("full-sub", 0)
        sub = client(b, sub_id, version=5, clean=False, session_expiry=3600)
        assert sub.subscribe("full/data", qos=1) == [1]
        sub.disconnect()

        pub = client(b, cid("full-pub", 1), version=5)
        acked, outcome = [], None
        # Bounded: three times what the disk can hold.
        for i in range(3 * (IMAGE_MIB << 20) // PAYLOAD):
            payload = i.to_bytes(4, "big") + bytes(PAYLOAD - 4)
            outcome = publish_outcome(pub, "full/data", payload)
            if outcome != 0:
                break
            acked.append(i)
        assert outcome in (0x80, "closed"), f"the disk never filled up, or the refusal was {outcome!r}"
        assert len(acked) > 10, f"only {len(acked)} publishes were stored before the disk was full"
        # The publish in flight when the log failed may have had its connection closed (its PUBACK
        # was already queued behind the commit); every later one is refused with 0x80.
        pub = client(b, cid("full-pub2", 1), version=5)
        assert publish_outcome(pub, "full/data", bytes(64)) == 0x80
        wait_until(lambda: "WAL" in b.log() and "failed" in b.log(), WAIT, "a log line about the failed write")

        # Still up for everything that needs no disk.
        live = client(b, cid("full-live", 0), version=5)
        assert live.subscribe("live/#", qos=1) == [1]
        other = client(b, cid("full-other", 1), version=5)
        other.publish("live/q0", b"zero", qos=0, wait=False)
        assert live.expect().payload == b"zero"
        assert other.publish("live/q1", b"one", qos=1) == 0
        assert live.expect().payload == b"one"

        # MQTT 3.1.1 cannot be told "not stored": its connection closes instead of a PUBACK.
        old = client(b, cid("full-v311", 1), version=4)
        old.publish("full/data", b"x" * 64, qos=1, wait=False)
        old.wait_disconnected()

        # Everything acknowledged is on disk: kill -9, restart on the same (full) disk.
        b.kill9()
        b.restart()
        sub = client(b, sub_id, version=5, clean=False, session_expiry=3600)
        assert sub.session_present, "the persistent session was lost"
        seen = set()
        while not set(acked) <= seen:
            m = sub.expect(WAIT, f"acknowledged message ({len(set(acked) - seen)} missing)")
            seen.add(int.from_bytes(m.payload[:4], "big"))
        assert seen <= set(acked) | {acked[-1] + 1}, "a message that was refused came back"
    finally:
        b.stop()
