"""Crash support for the durability tests: a fluxd that can be SIGKILLed and restarted on the same
data directory, and a paced QoS 1 publisher thread that records which messages were PUBACKed.

Only harness.Broker's process handling is extended here; harness.py itself is not changed.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

import harness
from harness import START_DEADLINE, WAIT, Broker, shard_for


def topic_on(prefix: str, shard: int) -> str:
    """A topic name `prefix-N` whose owner shard (retained store) in fluxd is `shard`."""
    n = 0
    while shard_for(f"{prefix}-{n}") != shard:
        n += 1
    return f"{prefix}-{n}"


def wait_until(cond, timeout: float, what: str, poll: float = 0.01):
    """Polls `cond` until it returns a truthy value (returned) or `timeout` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(poll)


def sleep_until(t: float) -> None:
    """Sleeps until time.monotonic() >= t (a point in time, not a guess at how long something takes)."""
    while (left := t - time.monotonic()) > 0:
        time.sleep(left)


class CrashBroker(Broker):
    """A fluxd that `kill9()` ends with SIGKILL and `restart()` starts again on the same data dir
    (same argv, so the same shard count and config). fluxd binds port 0, so `port` changes with
    every restart: connect new clients after `restart()` returns."""

    def __init__(self, limits: dict | None = None, **kw):
        self.lives = 1
        self._argv: list[str] | None = None
        self._pumps: list[threading.Thread] = []
        super().__init__(limits, **kw)

    def _spawn(self, argv: list[str]) -> None:
        # As Broker._spawn, but keeps the argv (for restart) and the pump threads (to join them
        # after a kill, so no line of a dead process lands in the next process' line queue).
        self._argv = list(argv)
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self._pumps = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                       for s in (self.proc.stdout, self.proc.stderr)]
        for t in self._pumps:
            t.start()

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash or an OOM kill."""
        assert self.kind == "fluxd", "CrashBroker is fluxd-only"
        assert self.proc.poll() is None, f"fluxd exited by itself (rc {self.proc.returncode}) before the kill:\n{self.log()[-5000:]}"
        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=WAIT)
        assert rc == -signal.SIGKILL, f"fluxd exit status {rc} after SIGKILL"
        for t in self._pumps:
            t.join(timeout=WAIT)
        self._log.append(f"==== fluxd life {self.lives} (pid {self.proc.pid}) ended by SIGKILL ====")

    def restart(self) -> None:
        """Starts a new fluxd on the same data dir and waits for its `mqtt listener bound` line."""
        assert self._argv is not None and self.proc.poll() is not None, "restart() needs a dead fluxd"
        self.lives += 1
        self._log.append(f"==== fluxd life {self.lives}: restart on the same data dir ====")
        self._lines = queue.Queue()
        started = time.monotonic()
        self._spawn(self._argv)
        deadline = started + START_DEADLINE
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = harness._BOUND.search(line)
            if m:
                self.port = int(m.group(1))
                self.restart_secs = time.monotonic() - started
                return
        raise AssertionError(
            f"restarted fluxd (life {self.lives}, rc {self.proc.poll()}) did not report "
            f"`mqtt listener bound addr=` within {START_DEADLINE}s:\n{self.log()[-8000:]}")

    def crash_restart(self) -> None:
        self.kill9()
        self.restart()


class SeqPublisher(threading.Thread):
    """One connection's worth of paced QoS 1 publishing (MQTT 3.1.1, so a PUBACK is a plain
    acceptance). Publishes `data_topic` payloads `str(seq)` and, every `retain_every`-th sequence
    number, also `r<seq>` retained to `retained_topic`; keeps at most `window` unacknowledged.
    Runs until `stop` is set or the connection drops (the broker was killed). Everything it sent
    is in `attempted`/`retained_attempted` and everything PUBACKed in `acked`/`retained_acked`
    (shared sets/lists owned by the caller, appended in sequence order)."""

    def __init__(self, broker: Broker, client_id: str, data_topic: str, retained_topic: str,
                 next_seq: int, *, acked: set, attempted: set, retained_acked: list,
                 retained_attempted: list, window: int = 8, interval: float = 0.002,
                 retain_every: int = 4):
        super().__init__(daemon=True, name=f"pub-{client_id}")
        self.broker, self.data_topic, self.retained_topic = broker, data_topic, retained_topic
        self.seq = next_seq
        self.acked, self.attempted = acked, attempted
        self.retained_acked, self.retained_attempted = retained_acked, retained_attempted
        self.window, self.interval, self.retain_every = window, interval, retain_every
        self.stop = threading.Event()
        self.dropped = threading.Event()
        self.error: BaseException | None = None
        self.acked_this_run = 0
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, clean_session=True, reconnect_on_failure=False)
        self.c.max_inflight_messages_set(window + 2)
        connacks: queue.Queue = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: connacks.put(rc)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.dropped.set()
        self.c.connect(broker.host, broker.port, 30)
        self.c.loop_start()
        try:
            rc = connacks.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"{client_id}: no CONNACK within {WAIT}s") from None
        assert rc.value == 0, f"{client_id}: CONNACK {rc}"

    @staticmethod
    def _done(info) -> bool:
        try:
            return info.is_published()
        except (RuntimeError, ValueError):
            return False  # never sent (connection gone): not acknowledged

    def _settle(self, outstanding: list) -> None:
        still = []
        for kind, seq, info in outstanding:
            if self._done(info):
                self.acked_this_run += 1
                if kind == "data":
                    self.acked.add(seq)
                else:
                    self.retained_acked.append(seq)
            else:
                still.append((kind, seq, info))
        outstanding[:] = still

    def run(self) -> None:
        outstanding: list = []
        try:
            next_at = time.monotonic()
            while not self.stop.is_set() and not self.dropped.is_set():
                self._settle(outstanding)
                if len(outstanding) >= self.window:
                    oldest = outstanding[0][2]
                    if oldest.rc == mqtt.MQTT_ERR_SUCCESS:
                        try:
                            oldest.wait_for_publish(0.02)  # bounded; the loop re-checks stop/dropped
                        except (RuntimeError, ValueError):
                            pass
                    else:
                        time.sleep(0.005)
                    continue
                sleep_until(next_at)
                next_at = time.monotonic() + self.interval
                seq = self.seq
                self.seq += 1
                self.attempted.add(seq)
                outstanding.append(("data", seq, self.c.publish(self.data_topic, str(seq).encode(), qos=1)))
                if seq % self.retain_every == 0:
                    self.retained_attempted.append(seq)
                    outstanding.append(("retained", seq, self.c.publish(
                        self.retained_topic, f"r{seq}".encode(), qos=1, retain=True)))
        except BaseException as e:  # surfaced by the test through .error
            self.error = e
        finally:
            # Anything acknowledged before the connection went away still counts.
            self._settle(outstanding)
            self.c.loop_stop()

    def finish(self) -> None:
        """Stops the thread (if the connection is still up) and waits for it."""
        self.stop.set()
        self.join(timeout=WAIT)
        assert not self.is_alive(), f"{self.name} did not stop within {WAIT}s"
        try:
            self.c.disconnect()
        except Exception:
            pass
        if self.error is not None:
            raise self.error
