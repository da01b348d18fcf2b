"""The listening socket of gradlm's two servers (`gradlm serve`, `gradlm watch`): one clear error when the
address cannot be had, and whether an address is this machine only. Imports nothing heavy (no torch), so the
watcher starts in a fraction of a second."""

from __future__ import annotations

import ipaddress
import socket

from gradlm.errors import ConfigError


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a ConfigError saying why not (port in use, unknown address)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio then sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
