"""Harness for the Python loopback suite: starts a real broker process (fluxd, or Mosquitto when
BROKER=mosquitto), wraps paho-mqtt clients so every wait is a condition with a deadline, and
offers a tiny raw MQTT codec for bytes no client library would send.

fluxd is started as `fluxd --mqtt-listen 127.0.0.1:0 --shards 2 --data-dir <tmp> [--config f]`
and its port is read from the `mqtt listener bound addr=127.0.0.1:PORT` log line.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

REPO = Path(__file__).resolve().parents[2]
BROKER_KIND = "mosquitto" if os.environ.get("BROKER") == "mosquitto" else "fluxd"
FLUXD_BIN = os.environ.get("FLUXD_BIN", str(REPO / "target" / "debug" / "fluxd"))
SHARDS = 2
START_DEADLINE = 20.0
# Deadline for one expected event (CONNACK, delivery, close).
WAIT = 10.0
# Quiet period used only after a positive marker, to catch stragglers that must not exist.
QUIET = 0.5

MOSQUITTO_LIMITS = {
    "max_packet_size_bytes": "max_packet_size",
    "max_queued_messages": "max_queued_messages",
    "max_queued_bytes": "max_queued_bytes",
    "max_inflight_messages": "max_inflight_messages",
    "max_keep_alive_secs": "max_keepalive",
    "max_topic_aliases": "max_topic_alias",
}

_BOUND = re.compile(r"mqtt listener bound.*?addr\W{1,3}(?:\d{1,3}\.){3}\d{1,3}:(\d+)")
_ADMIN = re.compile(r"admin listener bound.*?addr\W{1,3}(?:\d{1,3}\.){3}\d{1,3}:(\d+)")
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def skip_under_mosquitto(why: str) -> None:
    """Skips a Flux-specific test under Mosquitto; never skips under fluxd."""
    if BROKER_KIND == "mosquitto":
        pytest.skip(f"Flux-specific: {why}")


def shard_for(client_id: str, shards: int = SHARDS) -> int:
    """fluxd's home shard: FNV-1a 64 of the client id bytes modulo the shard count."""
    h = 0xCBF29CE484222325
    for b in client_id.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % shards


_ids = itertools.count()
_run = uuid.uuid4().hex[:6]


def cid(prefix: str, shard: int | None = None) -> str:
    """A unique client id; with `shard`, one whose fluxd home shard is `shard`."""
    while True:
        c = f"{prefix}-{_run}-{next(_ids)}"
        if shard is None or shard_for(c) == shard:
            return c


class Broker:
    """One broker process on a loopback port. `limits` are `[limits]` keys of fluxd's config."""

    def __init__(self, limits: dict | None = None, *, extra_config: str = "", data_dir: Path | None = None):
        """`extra_config`: more fluxd.toml sections (e.g. `[durability]`); `data_dir`: where fluxd
        keeps its data (default: a fresh directory under this broker's temp dir)."""
        self.limits = dict(limits or {})
        self.extra_config = extra_config
        self.data_dir = data_dir
        self.kind = BROKER_KIND
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix=f"flux-pytest-{self.kind}-"))
        self._log: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_fluxd()

    def _spawn(self, argv: list[str]) -> None:
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            self._log.append(line)
            self._lines.put(line)

    def _start_fluxd(self) -> None:
        if not os.path.exists(FLUXD_BIN):
            raise RuntimeError(f"fluxd binary not found at {FLUXD_BIN}; build it (cargo build --bin fluxd) or set FLUXD_BIN")
        data = self.data_dir or self.dir / "data"
        data.mkdir(exist_ok=True)
        argv = [FLUXD_BIN, "--mqtt-listen", "127.0.0.1:0", "--shards", str(SHARDS), "--data-dir", str(data),
                "--admin-listen", "127.0.0.1:0"]
        if self.limits or self.extra_config:
            conf = self.dir / "fluxd.toml"
            text = "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in self.limits.items())
            conf.write_text(text + "\n" + self.extra_config)
            argv += ["--config", str(conf)]
        self._spawn(argv)
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = _BOUND.search(line)
            if m:
                self.port = int(m.group(1))
                return
        self.stop()
        raise RuntimeError("fluxd did not report `mqtt listener bound addr=`:\n" + self.log())

    def _start_mosquitto(self) -> None:
        for _attempt in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            conf = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false",
                    "log_dest stderr", "log_type all"]
            for key, value in self.limits.items():
                if key == "max_connections":
                    conf.append(f"max_connections {value}")
                elif key in MOSQUITTO_LIMITS:
                    conf.append(f"{MOSQUITTO_LIMITS[key]} {value}")
                else:
                    raise AssertionError(f"limit {key} has no Mosquitto equivalent: skip this test under mosquitto")
            path = self.dir / "mosquitto.conf"
            path.write_text("\n".join(conf) + "\n")
            self._spawn(["mosquitto", "-c", str(path)])
            deadline = time.monotonic() + START_DEADLINE
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection((self.host, self.port), timeout=1).close()
                    return
                except OSError:
                    time.sleep(0.02)
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError("mosquitto did not start:\n" + self.log())

    def admin_addr(self) -> str:
        """host:port of fluxd's admin endpoint (from its `admin listener bound addr=` line)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for line in reversed(self._log):
                if line.startswith("==== fluxd life"):
                    break  # a restarted fluxd (crash.py): only its own lines count
                m = _ADMIN.search(line)
                if m:
                    return f"127.0.0.1:{m.group(1)}"
            time.sleep(0.02)
        raise AssertionError("fluxd did not report `admin listener bound addr=`:\n" + self.log()[-3000:])

    def terminate(self, timeout: float = WAIT) -> int:
        """SIGTERM (graceful shutdown); returns the exit code once the process is gone."""
        self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return "\n".join(self._log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        # Captured by pytest and shown only when the test failed.
        print(f"---- {self.kind} log (port {getattr(self, 'port', '?')}) ----\n{self.log()[-20000:]}")
        shutil.rmtree(self.dir, ignore_errors=True)


def props(packet_type, **values) -> Properties:
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class Client:
    """A paho-mqtt client on its own network thread. Callbacks feed queues; every wait has a
    deadline. Never reconnects by itself (a takeover must not turn into a reconnect loop)."""

    def __init__(self, broker: Broker, client_id: str | None = None, version: int = 5, *,
                 clean: bool = True, session_expiry: int | None = None, keepalive: int = 30,
                 manual_ack: bool = False, will: dict | None = None, connect_props: dict | None = None,
                 expect_rc: int = 0):
        self.broker = broker
        self.version = version
        self.id = cid("py") if client_id is None else client_id
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.id,
                      protocol=proto, reconnect_on_failure=False, manual_ack=manual_ack)
        if version != 5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(**kwargs)
        self.messages: queue.Queue = queue.Queue()
        self.connacks: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        self.subacks: dict = {}
        self.pubacks: dict = {}
        self._cv = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        if will:
            self.c.will_set(**will)
        cp = None
        if version == 5:
            values = dict(connect_props or {})
            if session_expiry is not None:
                values["SessionExpiryInterval"] = session_expiry
            cp = props(PacketTypes.CONNECT, **values) if values else None
        if version == 5:
            self.c.connect(broker.host, broker.port, keepalive, clean_start=clean, properties=cp)
        else:
            self.c.connect(broker.host, broker.port, keepalive)
        self.c.loop_start()
        try:
            flags, rc, p = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"{self.id}: no CONNACK within {WAIT}s") from None
        self.session_present = flags.session_present
        self.connack_rc = rc
        self.connack_props = p
        assert rc.value == expect_rc, f"{self.id}: CONNACK {rc} (0x{rc.value:02x}), want 0x{expect_rc:02x}"

    def _on_connect(self, c, u, flags, rc, p):
        self.connacks.put((flags, rc, p))

    def _on_subscribe(self, c, u, mid, rcs, p):
        with self._cv:
            self.subacks[mid] = rcs
            self._cv.notify_all()

    def _on_publish(self, c, u, mid, rc, p):
        with self._cv:
            self.pubacks[mid] = rc
            self._cv.notify_all()

    def _wait_key(self, table: dict, mid: int, what: str):
        with self._cv:
            ok = self._cv.wait_for(lambda: mid in table, timeout=WAIT)
            assert ok, f"{self.id}: no {what} for mid {mid} within {WAIT}s"
            return table.pop(mid)

    def subscribe(self, topic, qos: int = 1, options=None, properties=None) -> list[int]:
        """Subscribes and waits for the SUBACK; returns the reason codes as ints."""
        if options is not None:
            rc, mid = self.c.subscribe(topic, options=options, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos=qos, properties=properties)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"{self.id}: subscribe failed locally: {rc}"
        return [r.value if isinstance(r, ReasonCode) else int(r) for r in self._wait_key(self.subacks, mid, "SUBACK")]

    def publish(self, topic: str, payload=b"", qos: int = 0, retain: bool = False, properties=None, wait: bool = True):
        """Publishes; for QoS 1/2 with `wait`, returns the PUBACK/PUBCOMP reason code as int."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"{self.id}: publish failed locally: {info.rc}"
        if not wait:
            return info
        rc = self._wait_key(self.pubacks, info.mid, "PUBACK/PUBCOMP")
        return rc.value if isinstance(rc, ReasonCode) else rc

    def expect(self, timeout: float = WAIT, what: str = "message") -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.id}: no {what} within {timeout}s") from None

    def expect_none(self, timeout: float = QUIET) -> None:
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"{self.id}: unexpected message on {m.topic}: {m.payload!r}")

    def until(self, topic: str, timeout: float = WAIT) -> list:
        """Collects messages up to and including the first one on `topic`; returns those before it."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            m = self.expect(max(0.0, deadline - time.monotonic()), f"message on {topic}")
            if m.topic == topic:
                return before
            before.append(m)

    def wait_disconnected(self, timeout: float = WAIT):
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.id}: still connected after {timeout}s") from None

    def disconnect(self, reasoncode: int | None = None) -> None:
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reasoncode) if reasoncode is not None else None
        self.c.disconnect(reasoncode=rc)
        self.wait_disconnected()
        self.c.loop_stop()

    def kill(self) -> None:
        """Ends the connection without DISCONNECT, as a crashed client would."""
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.wait_disconnected()
        self.c.loop_stop()

    def close(self) -> None:
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()


# ---- raw MQTT over a socket -------------------------------------------------------------------

CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 5, 6, 7, 9, 13, 14
CLOSED = "closed"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(version: int, client_id: str, keepalive: int = 30, clean: bool = True,
                   properties: bytes = b"", flags_extra: int = 0) -> bytes:
    body = mqtt_str("MQTT") + bytes([version, (0x02 if clean else 0) | flags_extra]) + struct.pack("!H", keepalive)
    if version == 5:
        body += varint(len(properties)) + properties
    return packet(0x10, body + mqtt_str(client_id))


def prop_u32(ident: int, v: int) -> bytes:
    return bytes([ident]) + struct.pack("!I", v)


def prop_str(ident: int, v: str) -> bytes:
    return bytes([ident]) + mqtt_str(v)


def subscribe_packet(version: int, packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if version == 5 else b"") + mqtt_str(topic) + bytes([qos])
    return packet(0x82, body)


def publish_packet(version: int, topic: str, payload: bytes, qos: int = 0, packet_id: int | None = None,
                   retain: bool = False) -> bytes:
    body = mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + (b"\x00" if version == 5 else b"")
    return packet(0x30 | (qos << 1) | int(retain), body + payload)


class Raw:
    """A blocking socket speaking hand-built MQTT packets."""

    def __init__(self, broker: Broker):
        self.version = 4
        self.sock = socket.create_connection((broker.host, broker.port), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # Already closed by the server; the next read shows it.

    def _parse(self):
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(self.buf) < i + length:
            return None
        first, body = self.buf[0], self.buf[i:i + length]
        self.buf = self.buf[i + length:]
        return (first >> 4, first & 0x0F, body)

    def next(self, timeout: float = WAIT):
        """(type, flags, body), CLOSED, or None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._parse()
            if p:
                return p
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return CLOSED
            if not chunk:
                return CLOSED
            self.buf += chunk

    def expect(self, kind: int, timeout: float = WAIT):
        p = self.next(timeout)
        assert p not in (None, CLOSED) and p[0] == kind, f"want packet type {kind}, got {p!r}"
        return p

    def expect_close(self, timeout: float = WAIT) -> list:
        """Packets received before the server closed the connection."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            p = self.next(max(0.0, deadline - time.monotonic()))
            if p is None:
                raise AssertionError(f"server did not close the connection within {timeout}s; saw {seen}")
            if p == CLOSED:
                return seen
            seen.append(p)

    def connect(self, version: int, client_id: str, **kw) -> tuple[bool, int]:
        """Sends CONNECT; returns (session_present, reason code) from the CONNACK."""
        self.version = version
        self.send(connect_packet(version, client_id, **kw))
        _, _, body = self.expect(CONNACK)
        return bool(body[0] & 1), body[1]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def disconnect_code(packets: list) -> int | None:
    """Reason code of the DISCONNECT among `packets` (0 when its body is empty), or None."""
    for kind, _, body in packets:
        if kind == DISCONNECT:
            return body[0] if body else 0
    return None


def publish_fields(version: int, flags: int, body: bytes) -> dict:
    """Decodes a PUBLISH body (properties skipped)."""
    (tlen,) = struct.unpack("!H", body[:2])
    topic = body[2:2 + tlen].decode()
    i = 2 + tlen
    qos = (flags >> 1) & 3
    pid = None
    if qos:
        (pid,) = struct.unpack("!H", body[i:i + 2])
        i += 2
    if version == 5:
        plen, mult = 0, 1
        while True:
            b = body[i]
            i += 1
            plen += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        i += plen
    return dict(topic=topic, qos=qos, dup=bool(flags & 8), retain=bool(flags & 1), packet_id=pid, payload=body[i:])


def fluxd_queue(b, *args) -> tuple[int, object]:
    """Runs `fluxd queue ARGS --admin <b's admin endpoint>`; (exit code, parsed JSON output)."""
    import json
    p = subprocess.run([FLUXD_BIN, "queue", "--admin", b.admin_addr(), *args],
                       capture_output=True, text=True, timeout=WAIT)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        out = p.stdout + p.stderr
    return p.returncode, out
