"""A free TCP port of 127.0.0.1, for the servers the tests and benchmarks start (PostgreSQL, Ray, the dashboard)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
