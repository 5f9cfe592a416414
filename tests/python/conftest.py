"""Fixtures: one broker per test (cheap), a factory for brokers with limits, and client cleanup."""

import pytest

from harness import Broker, Client, Raw


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.stop()


@pytest.fixture
def broker_with():
    """Factory: broker_with(max_packet_size_bytes=1024, ...) starts a broker with [limits]."""
    started = []

    def make(**limits):
        b = Broker(limits)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def client():
    """Factory: client(broker, client_id, version=5, ...) -> connected Client, closed at teardown."""
    made = []

    def make(broker, *args, **kw):
        c = Client(broker, *args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def raw():
    """Factory: raw(broker) -> Raw socket, closed at teardown."""
    made = []

    def make(broker):
        r = Raw(broker)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
