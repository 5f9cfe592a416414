"""CONNECT/CONNACK, sessions, keep alive and authentication (MQTT 3.1.1 and 5)."""

import time

from harness import (CLOSED, PINGRESP, cid, connect_packet, disconnect_code, packet, prop_str,
                     prop_u32, skip_under_mosquitto)


def test_mqtt311_3_2_2_connack_accepted_without_session(broker, client):
    c = client(broker, cid("v311"), version=4)
    assert c.connack_rc.value == 0
    assert not c.session_present


def test_mqtt5_3_2_2_connack_accepted_without_session(broker, client):
    c = client(broker, cid("v5"), version=5)
    assert c.connack_rc.value == 0
    assert not c.session_present


def test_mqtt311_3_2_2_2_session_present_with_clean_session_0(broker, client):
    ident = cid("persist4")
    c = client(broker, ident, version=4, clean=False)
    assert not c.session_present
    c.disconnect()
    c = client(broker, ident, version=4, clean=False)
    assert c.session_present, "persistent 3.1.1 session not resumed"
    c.disconnect()
    c = client(broker, ident, version=4, clean=True)
    assert not c.session_present, "clean session must discard the old session"


def test_mqtt5_3_1_2_4_clean_start_and_session_present(broker, client):
    ident = cid("persist5")
    c = client(broker, ident, clean=False, session_expiry=60)
    assert not c.session_present
    c.disconnect()
    c = client(broker, ident, clean=False, session_expiry=60)
    assert c.session_present, "session with expiry 60 not resumed"
    c.disconnect()
    c = client(broker, ident, clean=True, session_expiry=60)
    assert not c.session_present, "Clean Start must discard the old session"


def test_mqtt5_3_1_2_11_session_expiry_keeps_subscriptions_and_queues(broker, client):
    ident = cid("expiry-sub", 1)
    sub = client(broker, ident, clean=True, session_expiry=60)
    assert sub.subscribe("se/+", qos=2) == [2]
    sub.disconnect()
    pub = client(broker, cid("expiry-pub", 0))
    assert pub.publish("se/one", b"q1", qos=1) == 0
    assert pub.publish("se/two", b"q2", qos=2) == 0
    sub = client(broker, ident, clean=False, session_expiry=60)
    assert sub.session_present
    got = {}
    for _ in range(2):
        m = sub.expect(what="queued message")
        got[m.topic] = (m.payload, m.qos)
    assert got == {"se/one": (b"q1", 1), "se/two": (b"q2", 2)}


def test_mqtt5_3_1_2_11_session_gone_after_expiry_interval(broker, client):
    ident = cid("expiring", 0)
    sub = client(broker, ident, clean=True, session_expiry=1)
    sub.subscribe("gone/t", qos=1)
    sub.disconnect()
    # The rule is about elapsed time: wait out the 1 s interval with a margin.
    time.sleep(2.5)
    pub = client(broker, cid("gone-pub", 1))
    pub.publish("gone/t", b"late", qos=1)
    sub = client(broker, ident, clean=False, session_expiry=1)
    assert not sub.session_present, "session outlived its expiry interval"
    sub.subscribe("gone/marker", qos=1)
    pub.publish("gone/marker", b"m", qos=1)
    assert sub.until("gone/marker") == [], "expired session still received queued messages"


def test_mqtt5_3_2_2_16_assigned_client_identifier(broker, client):
    c = client(broker, "", version=5)
    assigned = getattr(c.connack_props, "AssignedClientIdentifier", None)
    assert assigned, "empty client id needs an Assigned Client Identifier in CONNACK"
    # The assigned id is a usable identity.
    assert c.subscribe("assigned/t") == [1]
    c.publish("assigned/t", b"x", qos=1)
    assert c.expect().payload == b"x"


def _silent_after_pings(raw, broker, version, keepalive):
    r = raw(broker)
    r.send(connect_packet(version, cid("ka", version % 2), keepalive=keepalive))
    r.expect(2)
    # Packets within the keep alive keep the connection open.
    for _ in range(3):
        r.send(packet(0xC0, b""))
        r.expect(PINGRESP)
        last_answered = time.monotonic()
        time.sleep(keepalive / 2)
    return r, last_answered


def test_mqtt5_3_1_2_22_keep_alive_enforced_at_one_and_a_half(broker, raw):
    keepalive = 2
    for version in (4, 5):
        r, silent_since = _silent_after_pings(raw, broker, version, keepalive)
        seen = r.expect_close(timeout=keepalive * 1.5 + 5)
        waited = time.monotonic() - silent_since
        # MQTT 3.1.2.10: the server closes after 1.5 x keep alive of silence, not before (the
        # 0.1 s covers the ping's own trip: the silence starts when the server read it).
        assert waited >= keepalive * 1.5 - 0.1, f"v{version}: closed after {waited:.2f}s, before 1.5 x keep alive"
        if version == 5:
            code = disconnect_code(seen)
            if broker.kind == "fluxd" or code is not None:
                assert code == 0x8D, f"v5: want DISCONNECT 0x8D Keep Alive timeout, got {seen}"
        else:
            assert seen == [], f"v3.1.1: unexpected packets before close: {seen}"


def test_mqtt5_3_2_2_21_server_keep_alive(broker_with, client):
    b = broker_with(max_keep_alive_secs=10)
    c = client(b, cid("ska"), keepalive=60)
    assert getattr(c.connack_props, "ServerKeepAlive", None) == 10
    c.disconnect()
    c = client(b, cid("ska0"), keepalive=0)
    assert getattr(c.connack_props, "ServerKeepAlive", None) == 10, "keep alive 0 must be capped as well"


def test_mqtt5_4_12_0_1_unsupported_auth_method_refused_0x8c(broker, raw):
    r = raw(broker)
    r.send(connect_packet(5, cid("auth"), properties=prop_str(0x15, "SCRAM-SHA-1")))
    p = r.next()
    assert p not in (None, CLOSED), f"no CONNACK: {p}"
    kind, _, body = p
    assert kind == 2 and body[1] == 0x8C, f"want CONNACK 0x8C Bad authentication method, got {p}"
    assert r.expect_close() == []


def test_flux_connect_timeout_closes_silent_socket(broker_with, raw):
    skip_under_mosquitto("connect_timeout_secs has no Mosquitto setting")
    b = broker_with(connect_timeout_secs=1)
    r = raw(b)
    start = time.monotonic()
    assert r.expect_close(timeout=1 + 5) == [], "nothing may be sent before CONNECT"
    assert time.monotonic() - start >= 0.5


def test_mqtt5_3_1_4_2_connect_with_session_expiry_property_round_trip(broker, raw):
    """A v5 CONNECT with properties (session expiry) is accepted by hand-built bytes too."""
    r = raw(broker)
    present, rc = r.connect(5, cid("rawprops"), properties=prop_u32(0x11, 30))
    assert (present, rc) == (False, 0)
    r.send(packet(0xE0, b"\x00\x00"))  # DISCONNECT 0x00, no properties
    assert r.expect_close() == []


def test_mqtt5_4_13_graceful_shutdown_disconnects_with_0x8b(broker, raw):
    v5 = raw(broker)
    v5.connect(5, cid("shut5", 0))
    v4 = raw(broker)
    v4.connect(4, cid("shut4", 1))
    rc = broker.terminate()
    assert rc == 0, f"graceful shutdown exited with {rc}"
    seen = v5.expect_close()
    code = disconnect_code(seen)
    if broker.kind == "fluxd" or code is not None:
        assert code == 0x8B, f"v5: want DISCONNECT 0x8B Server shutting down, got {seen}"
    assert v4.expect_close() == [], "MQTT 3.1.1 has no server DISCONNECT"
