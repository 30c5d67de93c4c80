"""Shared by the server tests: a free loopback port, and an app behind a real uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time

from moeyard.runtime.server import build_app, make_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(allm, model: str = "tiny", app_kw: dict | None = None, **server_kw):
    """``allm`` (an AsyncLLM) served on a free loopback port in a thread: (server, thread, url). Stop it with
    ``server.should_exit = True; thread.join(...)``."""
    port = free_port()
    kw = {"log_level": "warning", "graceful_timeout": 5, **server_kw}
    srv = make_server(build_app(allm, model, **(app_kw or {})), "127.0.0.1", port, **kw)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 30 and th.is_alive(), "server did not start"
        time.sleep(0.05)
    return srv, th, f"http://127.0.0.1:{port}"
