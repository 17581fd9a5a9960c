"""The port picking the Redis fixtures start their servers on."""
from __future__ import annotations

import socket

from tests.support.redisproc import HOST, RESERVED_PORT, free_ports


def test_free_ports_are_different_free_and_never_the_machines_redis() -> None:
    ports = free_ports(64)

    assert len(set(ports)) == 64
    assert RESERVED_PORT not in ports
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, port))
