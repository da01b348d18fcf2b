"""What gradlm's two servers (`gradlm serve`, `gradlm watch`) share: the listening socket (one clear error when the
address cannot be had), the host policy (a warning when the address is not this machine's own and no key guards it;
on loopback without a key, only this machine's host names, against DNS rebinding), the API key check, the encoding
of a server-sent event, and running uvicorn until Ctrl-C or the parent's end. Imports nothing heavy (no torch), so
the watcher starts in a fraction of a second."""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import sys
import threading
import time

from gradlm import files as ckpt
from gradlm.errors import ConfigError

LOCAL_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a ConfigError saying why not (a bad port, a port in use, an unknown address)."""
    check_port(port)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio then sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host"
        ) from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def trusted_hosts(host: str, api_key: str) -> list[str] | None:
    """The Host headers to accept: on loopback without a key, this machine's names only (a web page elsewhere cannot
    reach the server through a name that resolves to 127.0.0.1); None (any) otherwise."""
    return LOCAL_NAMES if is_loopback(host) and not api_key else None


def open_socket(host: str, port: int, api_key: str, exposes: str) -> tuple[socket.socket, str]:
    """The listening socket and the server's base address (http://HOST:PORT, the real port when port is 0); a warning
    when anyone who can reach the machine could use it (exposes: what they could do, e.g. "use the model")."""
    sock = listen(host, port)
    if not is_loopback(host) and not api_key:
        print(
            f"warning: listening on {host} without an API key: anyone who can reach this machine can {exposes}; set "
            "--api-key or GRADLM_API_KEY",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


def bearer(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer KEY` header ('' if none)."""
    return (authorization or "").removeprefix("Bearer ").strip()


def key_problem(given: str, api_key: str) -> str:
    """'' when the request may pass (no key is required, or it sent the right one); else 'missing' or 'wrong'.
    The comparison takes the same time whatever the key sent."""
    if not api_key:
        return ""
    if not given:
        return "missing"
    return "" if hmac.compare_digest(given.encode(), api_key.encode()) else "wrong"


def sse(data, event: str = "") -> str:
    """One server-sent event: an optional event name and strict JSON (no NaN) on one data line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {ckpt.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def run(app, sock: socket.socket, on_exit=None, exit_with_parent: bool = False) -> None:
    """Serve app on sock with uvicorn until Ctrl-C (on_exit is called first, e.g. to end open streams), or, with
    exit_with_parent, until the process that started this one ends, however it ends."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    if exit_with_parent:
        parent = os.getppid()

        def orphaned() -> None:  # the parent's end makes this process a child of another (init, a subreaper)
            while os.getppid() == parent:
                time.sleep(0.5)
            if on_exit is not None:
                on_exit()
            server.should_exit = True

        threading.Thread(target=orphaned, daemon=True).start()
    server.run(sockets=[sock])
