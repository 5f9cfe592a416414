"""Will messages (MQTT 3.1.1 and 5). "Not sent" is proven with a marker published afterwards."""

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from harness import QUIET, WAIT, cid, props


def _will(topic, payload=b"gone", qos=1, **will_props):
    w = dict(topic=topic, payload=payload, qos=qos, retain=False)
    if will_props:
        w["properties"] = props(PacketTypes.WILLMESSAGE, **will_props)
    return w


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_3_1_2_8_will_sent_on_abrupt_close(broker, client, version):
    watcher = client(broker, cid("watch", 0), version=version)
    watcher.subscribe("will/#", qos=1)
    dying = client(broker, cid("dying", 1), version=version, will=_will("will/abrupt"))
    dying.kill()
    m = watcher.expect(what="the will")
    assert (m.topic, m.payload, m.qos) == ("will/abrupt", b"gone", 1)


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_3_1_2_10_no_will_after_normal_disconnect(broker, client, version):
    watcher = client(broker, cid("watch", 1), version=version)
    watcher.subscribe("will/#", qos=1)
    polite = client(broker, cid("polite", 0), version=version, will=_will("will/normal"))
    polite.disconnect()
    other = client(broker, cid("other", 1), version=version)
    other.publish("will/marker", b"m", qos=1)
    early = watcher.until("will/marker")
    assert early == [], f"will sent after a normal DISCONNECT: {[(m.topic, m.payload) for m in early]}"
    watcher.expect_none(QUIET)


def test_mqtt5_3_1_3_2_will_delay_interval_honoured(broker, client):
    delay = 2
    watcher = client(broker, cid("watch", 0))
    watcher.subscribe("will/#", qos=1)
    dying = client(broker, cid("delayed", 1), session_expiry=30,
                   will=_will("will/delayed", WillDelayInterval=delay))
    dying.kill()
    killed = time.monotonic()
    other = client(broker, cid("other", 0))
    other.publish("will/marker", b"m", qos=1)
    assert watcher.until("will/marker") == [], "will sent before its delay"
    m = watcher.expect(timeout=delay + WAIT, what="the delayed will")
    waited = time.monotonic() - killed
    assert m.topic == "will/delayed"
    assert waited >= delay - 0.5, f"will arrived {waited:.2f}s after the close, delay is {delay}s"


def test_mqtt5_3_1_3_2_will_delay_cancelled_by_reconnect(broker, client):
    watcher = client(broker, cid("watch", 1))
    watcher.subscribe("will/#", qos=1)
    ident = cid("comeback", 0)
    dying = client(broker, ident, session_expiry=30, will=_will("will/cancelled", WillDelayInterval=2))
    dying.kill()
    client(broker, ident, clean=False, session_expiry=30)
    # Wait past the delay, then prove with a marker that the will never came.
    time.sleep(3)
    other = client(broker, cid("other", 1))
    other.publish("will/marker", b"m", qos=1)
    assert watcher.until("will/marker") == [], "will sent although the client came back within the delay"


def test_mqtt5_3_14_2_1_disconnect_0x04_sends_will(broker, client):
    watcher = client(broker, cid("watch", 0))
    watcher.subscribe("will/#", qos=1)
    c = client(broker, cid("with-will", 1), will=_will("will/asked"))
    c.disconnect(reasoncode=0x04)
    m = watcher.expect(what="the will after DISCONNECT 0x04")
    assert (m.topic, m.payload) == ("will/asked", b"gone")
