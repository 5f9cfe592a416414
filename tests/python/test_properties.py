"""MQTT 5 PUBLISH properties: message expiry, and the ones the server forwards unchanged."""

import time

from paho.mqtt.packettypes import PacketTypes

from harness import cid, props


def test_mqtt5_3_3_2_5_message_expiry_drops_expired_and_decrements_remaining(broker, client):
    ident = cid("mexp", 1)
    sub = client(broker, ident, session_expiry=60)
    sub.subscribe("mexp/+", qos=1)
    sub.disconnect()
    pub = client(broker, cid("mexp-pub", 0))
    pub.publish("mexp/short", b"s", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    pub.publish("mexp/long", b"l", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    queued_at = time.monotonic()
    # The rule is about elapsed time: let the short interval run out while the session is offline.
    time.sleep(2.5)
    sub = client(broker, ident, clean=False, session_expiry=60)
    assert sub.session_present
    elapsed = time.monotonic() - queued_at
    pub.publish("mexp/marker", b"m", qos=1)
    got = sub.until("mexp/marker")
    assert [m.topic for m in got] == ["mexp/long"], f"expired message delivered: {[m.topic for m in got]}"
    remaining = getattr(got[0].properties, "MessageExpiryInterval", None)
    assert remaining is not None, "the forwarded message must carry its remaining expiry"
    assert remaining <= 60 - int(elapsed) + 1 and remaining >= 60 - int(elapsed) - 3, \
        f"remaining expiry {remaining} after {elapsed:.1f}s queued (sent with 60)"


def test_mqtt5_3_3_2_application_properties_forwarded_unchanged(broker, client):
    sub = client(broker, cid("fwd", 0))
    sub.subscribe("fwd/t", qos=1)
    pub = client(broker, cid("fwd-pub", 1))
    sent = props(PacketTypes.PUBLISH,
                 ResponseTopic="fwd/reply/42",
                 CorrelationData=b"\x00\x01\xfe\xff",
                 ContentType="application/json; charset=utf-8",
                 PayloadFormatIndicator=1,
                 UserProperty=[("k", "1"), ("k", "2"), ("other", "ü")])
    pub.publish("fwd/t", b'{"a":1}', qos=1, properties=sent)
    m = sub.expect()
    p = m.properties
    assert m.payload == b'{"a":1}'
    assert p.ResponseTopic == "fwd/reply/42"
    assert p.CorrelationData == b"\x00\x01\xfe\xff"
    assert p.ContentType == "application/json; charset=utf-8"
    assert p.PayloadFormatIndicator == 1
    # Order and duplicates of user properties are preserved [MQTT-3.3.2-18].
    assert p.UserProperty == [("k", "1"), ("k", "2"), ("other", "ü")]
