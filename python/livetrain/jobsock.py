"""The engine↔trainer control channel: one JSON object per line over a Unix socket (docs/serve.md).

A client connects, writes one request line, reads one reply line, and closes. Replies carry the HTTP
status the engine should answer with and the body, so the engine forwards without knowing the jobs.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from typing import Callable

# A training request may carry many examples; anything longer than this is refused, not buffered.
MAX_LINE = 64 << 20


class TrainerUnavailable(OSError):
    """The trainer's socket is missing or does not answer."""


def call(path: str, request: dict, timeout: float = 30.0) -> dict:
    """Send one request, return the reply ``{"code": int, "body": dict}``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline(MAX_LINE)
    except OSError as e:
        raise TrainerUnavailable(f"trainer socket {path}: {e}") from e
    if not line:
        raise TrainerUnavailable(f"trainer socket {path}: closed without a reply")
    return json.loads(line)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return
        try:
            if len(line) > MAX_LINE:
                raise ValueError(f"request longer than {MAX_LINE} bytes")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
            reply = self.server.handler(request)
        except ValueError as e:
            reply = {"code": 400, "body": {"error": {"message": str(e), "param": "body"}}}
        except Exception as e:  # a bug in a handler must not take the trainer down
            reply = {"code": 500, "body": {"error": {"message": f"{type(e).__name__}: {e}"}}}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handler: Callable[[dict], dict]):
        if os.path.exists(path):
            os.unlink(path)  # left by a trainer that was killed
        self.handler = handler
        super().__init__(path, _Handler)
        os.chmod(path, 0o600)
        self.path = path

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="jobsock", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
