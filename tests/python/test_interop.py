"""Interoperability with the Mosquitto command line clients (mosquitto_pub / mosquitto_sub),
run as subprocesses with timeouts. Skipped only when the tools are not installed (.ci/run
installs them)."""

import shutil
import subprocess
import threading

import pytest

from harness import WAIT, cid

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto-clients not installed",
)

VERSIONS = {4: "mqttv311", 5: "mqttv5"}


def _start_sub(broker, version, topic, count):
    """mosquitto_sub in debug mode; returns once its SUBACK is printed."""
    # Line-buffered, so the SUBACK line is seen while it runs (stdio buffers a pipe fully).
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    proc = subprocess.Popen(
        [*line_buffered, "mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", VERSIONS[version],
         "-i", cid("msub"), "-t", topic, "-q", "1", "-C", str(count), "-W", str(int(WAIT)), "-d", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    subscribed = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "received suback" in line.lower():
                subscribed.set()
        subscribed.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    assert subscribed.wait(WAIT) and proc.poll() in (None, 0), f"mosquitto_sub failed: {lines}"
    return proc, lines, t


def _finish(proc, t):
    try:
        rc = proc.wait(timeout=WAIT + 5)
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(5)
    return rc


def _pub(broker, version, *args):
    return subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", VERSIONS[version],
         "-i", cid("mpub"), "-q", "1", *args],
        capture_output=True, text=True, timeout=WAIT + 5)


@pytest.mark.parametrize("version", [4, 5])
def test_interop_mosquitto_pub_to_mosquitto_sub(broker, version):
    proc, lines, t = _start_sub(broker, version, "interop/+", 2)
    for msg in ("hello", "world"):
        done = _pub(broker, version, "-t", f"interop/{msg}", "-m", msg)
        assert done.returncode == 0, done.stderr
    assert _finish(proc, t) == 0, lines
    assert [l for l in lines if l.startswith("interop/")] == ["interop/hello hello", "interop/world world"]


@pytest.mark.parametrize("version", [4, 5])
def test_interop_paho_and_mosquitto_clients_retained(broker, client, version):
    # paho publishes retained; mosquitto_sub subscribes later and gets it.
    pub = client(broker, cid("paho"), version=version)
    pub.publish("interop/retained", b"kept", qos=1, retain=True)
    proc, lines, t = _start_sub(broker, version, "interop/retained", 1)
    assert _finish(proc, t) == 0, lines
    assert "interop/retained kept" in lines
    # mosquitto_pub publishes; paho receives.
    pub.subscribe("interop/from-cli", qos=1)
    done = _pub(broker, version, "-t", "interop/from-cli", "-m", "cli says hi")
    assert done.returncode == 0, done.stderr
    m = pub.expect()
    assert (m.topic, m.payload) == ("interop/from-cli", b"cli says hi")
