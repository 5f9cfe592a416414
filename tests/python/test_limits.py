"""Limits configured through fluxd's `[limits]` table (core/src/limits.rs); the connect
timeout is in test_connect.py. Those without a Mosquitto setting are skipped under Mosquitto,
never under fluxd."""

import os
import re
import socket
import time

from harness import (CLOSED, CONNACK, PUBACK, SUBACK, Raw, cid, connect_packet, disconnect_code, publish_packet,
                     skip_under_mosquitto, subscribe_packet)


def test_mqtt5_3_2_2_23_max_packet_size_advertised_and_oversize_closed_0x95(broker_with, client, raw):
    b = broker_with(max_packet_size_bytes=1024)
    c = client(b, cid("mps-adv"))
    assert getattr(c.connack_props, "MaximumPacketSize", None) == 1024
    c.subscribe("lim/ok", qos=1)
    r = raw(b)
    r.connect(5, cid("too-big"))
    r.send(publish_packet(5, "lim/big", b"x" * 2048, qos=1, packet_id=1))
    seen = r.expect_close()
    code = disconnect_code(seen)
    if b.kind == "fluxd" or code is not None:
        assert code == 0x95, f"want DISCONNECT 0x95 Packet too large, got {seen}"
    # Only that connection is gone.
    c.publish("lim/ok", b"still here", qos=1)
    assert c.expect().payload == b"still here"


def test_flux_max_subscriptions_per_session_suback_0x97(broker_with, client):
    skip_under_mosquitto("max_subscriptions_per_session has no Mosquitto setting")
    b = broker_with(max_subscriptions_per_session=2)
    c = client(b, cid("subs"))
    assert c.subscribe("s/1", qos=1) == [1]
    assert c.subscribe("s/2", qos=1) == [1]
    assert c.subscribe("s/3", qos=1) == [0x97]
    # The refused one is not active; the accepted ones are.
    c.publish("s/3", b"no", qos=1)
    c.publish("s/2", b"yes", qos=1)
    assert c.expect().payload == b"yes"


def test_flux_max_topic_levels(broker_with, client, raw):
    skip_under_mosquitto("max_topic_levels has no Mosquitto setting")
    b = broker_with(max_topic_levels=3)
    watcher = client(b, cid("levels-watch", 0))
    watcher.subscribe("#", qos=1)
    c = client(b, cid("levels", 1))
    assert c.subscribe("a/b/c", qos=1) == [1]
    assert c.subscribe("a/b/c/d", qos=1) == [0x8F], "a filter deeper than the limit is Topic Filter invalid"
    r = raw(b)
    r.connect(5, cid("levels-raw", 0))
    r.send(publish_packet(5, "a/b/c/d", b"deep", qos=1, packet_id=9))
    p = r.next()
    assert p not in (None, CLOSED), f"no answer to a too-deep PUBLISH: {p}"
    # Refused either in the PUBACK or by closing with DISCONNECT; both use 0x90 Topic Name invalid.
    if p[0] == PUBACK:
        assert p[2][:2] == b"\x00\x09" and p[2][2] == 0x90, f"PUBACK {p}"
    else:
        assert disconnect_code([p] + r.expect_close()) == 0x90, f"got {p}"
    c.publish("a/b/c", b"shallow", qos=1)
    m = watcher.expect()
    assert (m.topic, m.payload) == ("a/b/c", b"shallow"), "the too-deep message was delivered"


def test_flux_max_connections(broker_with, raw):
    skip_under_mosquitto("Mosquitto refuses by closing without CONNACK 0x97")
    limit = 4
    b = broker_with(max_connections=limit)
    accepted, refused = [], []
    for i in range(limit + 4):
        r = raw(b)
        r.send(connect_packet(5, cid(f"conn{i}")))
        kind, _, body = r.expect(CONNACK)
        (accepted if body[1] == 0 else refused).append(body[1])
    # Each of the 2 shards enforces its share (rounded up); never more than the limit in total.
    assert 1 <= len(accepted) <= limit, f"accepted {len(accepted)} with max_connections={limit}"
    assert refused and set(refused) == {0x97}, f"refusals must be CONNACK 0x97 Quota exceeded: {refused}"



def test_flux_flood_towards_a_stalled_subscriber_keeps_broker_memory_bounded(broker):
    """200 MB of QoS 0 publishes to a subscriber on the other shard that never reads. The slow
    consumer's buffer is capped (max_outbound_buffer_bytes) and the cross-shard ring pauses the
    publisher's reads when congested, so the broker's memory does not follow the flood (it did:
    ~2 bytes of RSS per byte flooded, before the ring counted messages in flight)."""
    skip_under_mosquitto("measures fluxd's own memory bound")
    rss_mb = lambda: int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{broker.proc.pid}/status").read()).group(1)) // 1024
    stalled = Raw(broker)
    stalled.connect(4, cid("stalled", 1))
    stalled.send(subscribe_packet(4, 1, "flood", 0))
    stalled.expect(SUBACK)
    before = rss_mb()
    flooder = Raw(broker)
    flooder.connect(4, cid("flooder", 0))
    chunk = publish_packet(4, "flood", b"x" * 1024) * 100
    peak = before
    for i in range(2000):
        flooder.send(chunk)
        if i % 100 == 0:
            peak = max(peak, rss_mb())
    peak = max(peak, rss_mb())
    assert peak - before < 150, f"RSS grew {peak - before} MB during a 200 MB flood"


def test_flux_closing_a_stalled_client_frees_its_socket(broker_with):
    """A subscriber that stops reading, then goes silent past its keep alive: the server closes it
    while its send buffer is full. The final flush is bounded (close_flush_timeout_secs), so the
    connection's socket is released even though the client never reads again."""
    skip_under_mosquitto("counts fluxd's own file descriptors")
    b = broker_with(close_flush_timeout_secs=1)
    fds = lambda: len(os.listdir(f"/proc/{b.proc.pid}/fd"))
    b.admin_addr()  # fluxd opens its admin listener after the MQTT one: count from there
    baseline = fds()
    stalled = Raw(b)
    stalled.connect(4, cid("stalled-ka", 1), keepalive=1)
    stalled.send(subscribe_packet(4, 1, "fill", 0))
    stalled.expect(SUBACK)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flooder = Raw(b)
    flooder.connect(4, cid("filler", 0))
    chunk = publish_packet(4, "fill", b"x" * 1024) * 100
    for _ in range(100):  # 10 MB: far more than the socket buffers hold
        flooder.send(chunk)
    flooder.close()
    # Keep alive (1.5 s) + sweep (0.5 s) + bounded flush (1 s): the fd goes, without reading.
    deadline = time.monotonic() + 15
    while fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= baseline, f"fluxd still holds {fds() - baseline} more fds than before the stalled client"
    stalled.close()


def test_flux_client_that_never_reads_cannot_grow_its_replies_without_bound(broker_with):
    """A client streams PINGREQs and never reads the PINGRESPs. Once its unwritten replies exceed
    max_outbound_buffer_bytes the broker stops reading from it (TCP pushes back), so its sends
    stall instead of the broker buffering a reply for every request."""
    skip_under_mosquitto("measures fluxd's own memory bound")
    b = broker_with(max_outbound_buffer_bytes=65536)
    rss_mb = lambda: int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{b.proc.pid}/status").read()).group(1)) // 1024
    r = Raw(b)
    r.connect(4, cid("pinger", 0), keepalive=0)
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = rss_mb()
    pings = b"\xc0\x00" * 32768  # 64 KB of PINGREQ
    sent = 0
    r.sock.settimeout(2.0)
    try:
        while sent < 64 * 1024 * 1024:  # give up after 64 MB
            r.sock.sendall(pings)
            sent += len(pings)
    except socket.timeout:
        pass  # the broker stopped reading: what this test expects
    grown = rss_mb() - before
    assert sent < 64 * 1024 * 1024, "the broker read 64 MB of requests from a client that reads nothing"
    assert grown < 32, f"broker RSS grew {grown} MB for replies nobody reads"
    r.close()
