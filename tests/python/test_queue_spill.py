"""Queue backlogs bounded by disk, not memory: past `queue_memory_bytes` a queue writes runs of
messages to its shard's spill files and reads them back when consumers get there; checkpoints
refer to spilled runs instead of copying them; kill -9 loses nothing acknowledged; spill files
go once consumed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crash import CrashBroker, wait_until
from harness import WAIT, cid, fluxd_queue, skip_under_mosquitto

N = 20_000
BUDGET = 256 * 1024


def queue_stats(b, name: str) -> dict:
    rc, out = fluxd_queue(b, "stats", name)
    assert rc == 0, out
    return out


def spill_files(b) -> list[Path]:
    return sorted(Path(b.data_dir or b.dir / "data").glob("spill-shard-*/*.spill"))


@pytest.fixture
def spill_broker():
    skip_under_mosquitto("Flux durable queues")
    b = CrashBroker({"queue_memory_bytes": BUDGET},
                    extra_config="[durability]\nsegment_size_bytes = 1048576\n")
    yield b
    b.stop()


def publish_all(pub, topic: str, n: int, size: int = 100) -> None:
    for i in range(n - 1):
        pub.publish(topic, b"%08d" % i + b"x" * (size - 8), qos=1, wait=False)
    # PUBACKs come in order: the last one covers every earlier publish.
    assert pub.publish(topic, b"%08d" % (n - 1) + b"x" * (size - 8), qos=1) == 0


def test_backlog_beyond_memory_spills_survives_kill9_and_drains_in_order(spill_broker, client):
    b = spill_broker
    pub = client(b, cid("spill-p", 0), version=5)
    publish_all(pub, "$queue/big", N)
    s = queue_stats(b, "big")
    assert s["depth"] == N, s
    # 20,000 messages cost ~6 MB resident; the queue keeps about its budget.
    assert s["runs_on_disk"] > 0 and s["spilled_runs"] > 0, s
    wait_until(lambda: queue_stats(b, "big")["resident_bytes"] <= BUDGET + 3 * 1024 * 300,
               WAIT, "resident messages back within the budget")
    assert spill_files(b), "no spill file written"
    # Let a checkpoint run (1 MiB segments: the backlog alone is several), so the restart
    # replays spilled runs by reference.
    wait_until(lambda: "WAL checkpoint done" in b.log(), WAIT * 2, "a WAL checkpoint")
    b.kill9()
    b.restart()
    s = queue_stats(b, "big")
    assert s["depth"] == N, s
    assert s["runs_on_disk"] > 0, f"the restart did not keep spilled runs on disk: {s}"
    c = client(b, cid("spill-c", 1), version=5)
    assert c.subscribe("$queue/big", qos=1) == [1]
    seen = []
    deadline = time.monotonic() + WAIT * 6
    while len(set(seen)) < N and time.monotonic() < deadline:
        try:
            seen.append(int(c.messages.get(timeout=1).payload[:8]))
        except Exception:
            pass
    firsts = list(dict.fromkeys(seen))
    assert len(firsts) == N, f"{N - len(firsts)} messages missing after the restart"
    assert firsts == sorted(firsts), "backlog not delivered in order"
    wait_until(lambda: queue_stats(b, "big")["depth"] == 0, WAIT, "the queue drained")
    s = queue_stats(b, "big")
    assert s["loaded_runs"] > 0, s
    # Consumed runs are released; every file but the one being written goes.
    wait_until(lambda: len(spill_files(b)) <= 1, WAIT * 2, "spill files deleted once consumed")
    assert "spill write failed" not in b.log() and "cannot be read back" not in b.log(), b.log()[-3000:]
