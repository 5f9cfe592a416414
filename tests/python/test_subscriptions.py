"""Subscription options, subscription identifiers, retained messages (MQTT 5 and 3.1.1)."""

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from harness import cid, props


def test_mqtt5_3_8_3_3_no_local(broker, client):
    me = client(broker, cid("nolocal", 0))
    me.subscribe("nl/t", options=SubscribeOptions(qos=1, noLocal=True))
    other = client(broker, cid("other", 1))
    other.subscribe("nl/t", qos=1)
    me.publish("nl/t", b"own", qos=1)
    assert other.expect().payload == b"own", "others still get it"
    other.publish("nl/t", b"theirs", qos=1)
    m = me.expect()
    assert m.payload == b"theirs", f"No Local subscriber got its own message first: {m.payload!r}"


def test_mqtt5_3_8_3_4_retain_as_published(broker, client):
    keep = client(broker, cid("rap1", 0))
    keep.subscribe("rap/t", options=SubscribeOptions(qos=1, retainAsPublished=True))
    clear = client(broker, cid("rap0", 1))
    clear.subscribe("rap/t", options=SubscribeOptions(qos=1, retainAsPublished=False))
    pub = client(broker, cid("rap-pub", 1))
    pub.publish("rap/t", b"live", qos=1, retain=True)
    assert keep.expect().retain, "Retain As Published must keep RETAIN on live forwards"
    assert not clear.expect().retain, "without Retain As Published RETAIN is cleared on live forwards"


def _retained_then_subscribe(broker, client, handling, tag):
    pub = client(broker, cid(f"rh{handling}-pub", 0))
    topic = f"rh/{tag}"
    pub.publish(topic, b"stored", qos=1, retain=True)
    sub = client(broker, cid(f"rh{handling}", 1))
    opts = SubscribeOptions(qos=1, retainHandling=handling)

    def subscribe_and_collect():
        sub.subscribe(topic, options=opts)
        pub.publish(topic, b"live", qos=1)  # the marker: retained replay comes before it
        got = []
        while True:
            m = sub.expect(what="live marker")
            if m.payload == b"live":
                return got
            got.append((m.payload, m.retain))

    first = subscribe_and_collect()
    again = subscribe_and_collect()
    return first, again


def test_mqtt5_3_3_1_9_retain_handling_0_sends_on_every_subscribe(broker, client):
    first, again = _retained_then_subscribe(broker, client, 0, "zero")
    assert first == [(b"stored", True)] and again == [(b"stored", True)]


def test_mqtt5_3_3_1_10_retain_handling_1_sends_only_for_new_subscription(broker, client):
    first, again = _retained_then_subscribe(broker, client, 1, "one")
    assert first == [(b"stored", True)] and again == []


def test_mqtt5_3_3_1_11_retain_handling_2_never_sends(broker, client):
    first, again = _retained_then_subscribe(broker, client, 2, "two")
    assert first == [] and again == []


def test_mqtt5_3_3_4_subscription_identifiers_delivered(broker, client):
    sub = client(broker, cid("subid", 1))
    sub.subscribe("si/+", qos=1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    sub.subscribe("si/#", qos=1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=9))
    sub.subscribe("solo/t", qos=1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=3))
    pub = client(broker, cid("subid-pub", 0))
    pub.publish("solo/t", b"s", qos=1)
    m = sub.expect()
    assert getattr(m.properties, "SubscriptionIdentifier", None) == [3]
    # Overlapping subscriptions: one copy with both ids, or one copy per subscription.
    pub.publish("si/a", b"o", qos=1)
    pub.publish("solo/t", b"marker", qos=1)
    copies = [getattr(m.properties, "SubscriptionIdentifier", []) for m in sub.until("solo/t")]
    assert sorted(i for ids in copies for i in ids) == [7, 9], f"identifiers per copy: {copies}"
    assert all(copies), f"a copy without its subscription identifier: {copies}"


@pytest.mark.parametrize("version", [4, 5])
def test_mqtt_3_3_1_5_retained_set_replayed_deleted_and_wildcards(broker, client, version):
    pub = client(broker, cid("ret-pub", 0), version=version)
    for topic in ("ret/a/1", "ret/b/1", "ret/a/2"):
        pub.publish(topic, topic.encode(), qos=1, retain=True)

    def replay(filter_):
        sub = client(broker, cid("ret-sub", 1), version=version)
        sub.subscribe(filter_, qos=1)
        sub.subscribe("retmarker", qos=1)
        pub.publish("retmarker", b"m", qos=1)  # live, after the replay
        got = sub.until("retmarker")
        assert all(m.retain for m in got), "replayed retained messages carry RETAIN"
        return sorted(m.topic for m in got)

    assert replay("ret/+/1") == ["ret/a/1", "ret/b/1"]
    assert replay("ret/#") == ["ret/a/1", "ret/a/2", "ret/b/1"]
    assert replay("ret/a/2") == ["ret/a/2"]
    pub.publish("ret/a/2", b"", qos=1, retain=True)  # empty payload deletes
    assert replay("ret/#") == ["ret/a/1", "ret/b/1"]
