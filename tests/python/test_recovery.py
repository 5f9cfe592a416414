"""Recovery of a damaged write-ahead log, as an operator meets it.

- A torn tail (garbage where the last, interrupted group commit would be) is cut off with a
  warning; fluxd starts and everything before it is there.
- Corruption before the tail stops the start with an error naming the segment file and offset;
  the documented repair (truncate the segment there, delete later segments) lets fluxd start,
  keeping what came before the damage.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from crash import CrashBroker, topic_on, wait_until
from harness import FLUXD_BIN, SHARDS, WAIT, cid, skip_under_mosquitto

FIRST_SEGMENT = "0" * 20 + ".wal"


@pytest.fixture
def rbroker():
    skip_under_mosquitto("fluxd's write-ahead log recovery")
    b = CrashBroker()
    yield b
    b.stop()


def retained_topics(client, b, filter_: str) -> dict:
    marker = "rec/marker"
    sub = client(b, cid("rec-probe"), version=5)
    assert sub.subscribe(filter_, qos=1) == [1]
    assert sub.subscribe(marker, qos=1) == [1]
    pub = client(b, cid("rec-mark"), version=5)
    pub.publish(marker, b"m", qos=1)
    out = {m.topic: m.payload for m in sub.until(marker)}
    sub.close()
    pub.close()
    return out


def publish_retained_on_shard0(client, b, n: int) -> list[str]:
    """n retained messages owned by shard 0, each its own group commit (acked one by one)."""
    pub = client(b, cid("rec-pub", 0), version=5)
    topics = [topic_on(f"rec/t{i}", 0) for i in range(n)]
    for i, t in enumerate(topics):
        assert pub.publish(t, f"v{i}".encode(), qos=1, retain=True) == 0
    pub.close()
    return topics


def start_expect_failure(data: Path) -> str:
    argv = [FLUXD_BIN, "--mqtt-listen", "127.0.0.1:0", "--shards", str(SHARDS), "--data-dir", str(data)]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT * 3)
    assert p.returncode != 0, "fluxd started on a corrupt log"
    return p.stdout + p.stderr


def test_torn_tail_is_cut_and_fluxd_starts(rbroker, client):
    b = rbroker
    topics = publish_retained_on_shard0(client, b, 3)
    b.kill9()
    seg = (b.data_dir or b.dir / "data") / "wal-shard-0" / FIRST_SEGMENT
    raw = seg.read_bytes()
    end = len(raw.rstrip(b"\0"))
    end += -end % 4096  # the block after the data: where the next group commit would have gone
    with open(seg, "r+b") as f:  # half a frame of garbage there: an interrupted write
        f.seek(end)
        f.write(b"\x50\x00\x00\x00" + b"\xa5" * 40)
    b.restart()
    wait_until(lambda: "torn tail truncated" in b.log(), WAIT, "the torn tail warning")
    got = retained_topics(client, b, "rec/#")
    assert {t: got.get(t) for t in topics} == {t: f"v{i}".encode() for i, t in enumerate(topics)}


def test_corruption_before_the_tail_stops_the_start_and_the_documented_repair_works(rbroker, client):
    b = rbroker
    topics = publish_retained_on_shard0(client, b, 4)
    b.terminate()
    data = b.data_dir or b.dir / "data"
    seg = data / "wal-shard-0" / FIRST_SEGMENT
    raw = bytearray(seg.read_bytes())
    # Frames are 16-byte aligned and each retained message is its own group: find the second
    # frame (the second record) by its topic and damage a byte of its payload.
    second = raw.find(topics[1].encode())
    assert second > 0
    raw[second] ^= 0xFF
    seg.write_bytes(bytes(raw))

    out = start_expect_failure(data)
    m = re.search(r"WAL corrupt at (\S+) offset (\d+)", out)
    assert m, f"no corruption error naming segment and offset:\n{out[-3000:]}"
    assert m.group(1).endswith(FIRST_SEGMENT), m.group(1)
    offset = int(m.group(2))
    assert 0 < offset < second, (offset, second)
    assert "truncate" in out

    # The repair the error (and README) documents: cut the segment at the offset (later segments
    # of the shard would be deleted too; there are none here).
    subprocess.run(["truncate", "-s", str(offset), str(seg)], check=True)
    b.restart()
    got = retained_topics(client, b, "rec/#")
    assert got.get(topics[0]) == b"v0", f"the record before the damage was lost: {got}"
    assert not any(t in got for t in topics[1:]), f"records from the damaged one on must be gone: {got}"
    # And the log takes new writes after the repair.
    pub = client(b, cid("rec-after", 0), version=5)
    assert pub.publish(topics[1], b"again", qos=1, retain=True) == 0
    b.kill9()
    b.restart()
    assert retained_topics(client, b, "rec/#").get(topics[1]) == b"again"
