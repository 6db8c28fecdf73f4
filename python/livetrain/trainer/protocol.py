"""The trainer's socket protocol (docs/serve.md), and the one error reply every livetrain route answers with.

Per connection on a Unix stream socket: the client writes a JSON header line ``{"op": OP, "length": N}``
and then N bytes of body (an HTTP request's body exactly as it arrived); the trainer writes a header line
``{"code": HTTP status, "length": N}`` and N bytes of JSON body, and closes. Engines forward both bodies
as bytes: a request body is parsed once, by the trainer, and a reply serialised once, by the trainer.
"""

from __future__ import annotations

import json
import math
import os
import socket
import socketserver
import threading
from typing import Callable, NamedTuple

# A training request may carry many examples; a longer body is refused, not buffered.
MAX_BODY = 64 << 20
# A header line is a few dozen bytes; anything longer is not this protocol.
_MAX_HEADER = 4096

# The OpenAI-style error ``type`` of each status livetrain answers with.
KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable",
    504: "timeout",
}


class Reply(NamedTuple):
    """An HTTP status and the JSON body to answer with."""

    code: int
    body: dict


def error(code: int, message: str, param: str | None = None) -> Reply:
    """The one error reply: ``{"error": {"message", "type", "param"}}``, ``type`` from the status and
    ``param`` naming the offending field (``examples[1].messages[0].role``, ``body``, ...), answered by the
    trainer, the routes and the reference engine alike."""
    return Reply(code, {"error": {"message": message, "type": KINDS[code], "param": param}})


class Invalid(ValueError):
    """A request is wrong; ``param`` names the field. Answered with 400 wherever it is raised."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    def reply(self) -> Reply:
        return error(400, str(self), self.param)


class TrainerUnavailable(OSError):
    """The trainer's socket is missing or does not answer."""


class TrainerTimeout(TrainerUnavailable):
    """The trainer took the request but did not answer in time: it may still act on it."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_strings(body) -> None:
    """Every key and string of a parsed body encodes as UTF-8: JSON's \\ud800 escapes can carry lone
    UTF-16 surrogates, which no tokenizer, file or reply can take. Iterative: nesting depth costs no stack."""
    todo = [("body", body)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                _check_string(where, k)
                todo.append((f"{where}.{k}" if where != "body" else k, x))
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, str):
            _check_string(where, v)


def _check_string(where: str, s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(where, f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None


def parse_body(raw: bytes, empty_ok: bool) -> dict:
    """A request body that must be a JSON object; an empty one is ``{}`` when ``empty_ok``. Strict JSON:
    no NaN/Infinity, no lone surrogates, nesting no deeper than Python's parser can go (each a 400)."""
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except ValueError as e:
        raise Invalid("body", f"request body is not JSON: {e}") from None
    except RecursionError:
        raise Invalid("body", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise Invalid("body", "request body must be a JSON object")
    _check_strings(body)
    return body


def finite(body):
    """``body`` with every non-finite number (a loss of inf or NaN) replaced by null, and each object that
    held one given ``"nonfinite": [the names of those members]``: JSON has no inf or NaN, and a reply must
    never fail because training produced one. Returns ``body`` itself when there is none."""

    def walk(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None, True
        if isinstance(v, dict):
            out, bad, changed = {}, [], False
            for k, x in v.items():
                y, c = walk(x)
                out[k] = y
                if c:
                    changed = True
                    if y is None:
                        bad.append(k)
            if bad:
                out["nonfinite"] = sorted(set(out.get("nonfinite") or []) | set(bad))
            return (out, True) if changed else (v, False)
        if isinstance(v, (list, tuple)):
            items = [walk(x) for x in v]
            return ([y for y, _ in items], True) if any(c for _, c in items) else (v, False)
        return v, False

    return walk(body)[0]


def encode(body: dict) -> bytes:
    """A reply body as the routes answer it (the bytes FastAPI's JSONResponse would write for it), with
    non-finite numbers as null (``finite``)."""
    return json.dumps(finite(body), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _read_header(f, what: str) -> dict:
    line = f.readline(_MAX_HEADER)
    if not line.endswith(b"\n"):
        raise ValueError(f"{what}: no header line")
    header = json.loads(line)
    length = header.get("length", 0) if isinstance(header, dict) else None
    if not isinstance(length, int) or not 0 <= length <= MAX_BODY:
        raise ValueError(f"{what}: bad header {line[:80]!r}")
    return header


def _read_exactly(f, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{what}: body ends after {len(data)} of {n} bytes")
    return data


def call(
    path: str, op: str, body: bytes = b"", timeout: float = 30.0, idempotency_key: str | None = None
) -> tuple[int, bytes]:
    """Sends one request; returns the reply's status and its JSON body as bytes. ``idempotency_key`` (an
    HTTP ``Idempotency-Key``) travels in the header line. TrainerTimeout when the request was sent but no
    reply came in ``timeout`` seconds (the trainer may still act on it)."""
    if len(body) > MAX_BODY:
        raise Invalid("body", f"request body is {len(body)} bytes, over the limit of {MAX_BODY}")
    header = {"op": op, "length": len(body)}
    if idempotency_key is not None:
        header["idempotency_key"] = idempotency_key
    sent = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(header).encode() + b"\n" + body)
            sent = True
            with s.makefile("rb") as f:
                header = _read_header(f, "reply")
                if not isinstance(header.get("code"), int):
                    raise ValueError(f"reply header without a status: {header}")
                return header["code"], _read_exactly(f, header["length"], "reply")
    except TimeoutError as e:
        if sent:
            raise TrainerTimeout(f"trainer socket {path}: no reply in {timeout:.0f} s") from e
        raise TrainerUnavailable(f"trainer socket {path}: {e}") from e
    except (OSError, ValueError) as e:
        raise TrainerUnavailable(f"trainer socket {path}: {e}") from e


def down_path(path: str) -> str:
    """Where a trainer's launcher records why the trainer at socket ``path`` is not running."""
    return path + ".down"


def write_down(path: str, reason: str | None) -> None:
    """Records (or, with None, clears) why the trainer at socket ``path`` is not running, for the routes'
    503 answers."""
    down = down_path(path)
    if reason is None:
        try:
            os.unlink(down)
        except FileNotFoundError:
            pass
        return
    tmp = down + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(reason)
    os.replace(tmp, down)


def read_down(path: str) -> str | None:
    """What ``write_down`` recorded for the trainer at socket ``path`` (None: nothing)."""
    try:
        with open(down_path(path), encoding="utf-8") as f:
            return f.read(4096).strip() or None
    except OSError:
        return None


def weight_version(path: str, timeout: float = 10.0, *, after: int | None = None, wait_s: float = 0.0) -> int | None:
    """The trainer's weight version through the light ``version`` op (None while it cannot say). With
    ``after``, the trainer answers once its version is no longer ``after`` or ``wait_s`` seconds have passed."""
    body = b"" if after is None else json.dumps({"after": after, "wait_s": wait_s}).encode()
    code, reply = call(path, "version", body, timeout=timeout + wait_s)
    return json.loads(reply).get("weight_version") if code == 200 else None


# handler(op, body bytes, idempotency_key or None) -> Reply
Handler = Callable[[str, bytes, "str | None"], Reply]


class _Connection(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        try:
            header = _read_header(self.rfile, "request")
            op, body = header.get("op"), _read_exactly(self.rfile, header["length"], "request")
            key = header.get("idempotency_key")
            if key is not None and not isinstance(key, str):
                raise ValueError("request: idempotency_key must be a string")
        except ValueError as e:
            self._send(error(400, str(e), "body"))
            return
        try:
            reply = self.server.handler(op, body, key)
        except Invalid as e:
            reply = e.reply()
        except Exception as e:  # a bug in a handler must not take the trainer down
            reply = error(500, f"{type(e).__name__}: {e}")
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        try:
            body = encode(reply.body)
        except ValueError as e:  # a non-finite number (a loss): JSON has none
            reply = error(500, f"the reply cannot be written as JSON: {e}")
            body = encode(reply.body)
        self.wfile.write(json.dumps({"code": reply.code, "length": len(body)}).encode() + b"\n" + body)


class Server(socketserver.ThreadingUnixStreamServer):
    """The trainer's end: ``handler(op, body bytes, idempotency key) -> Reply`` on a thread per
    connection; an ``Invalid`` it raises is answered with 400 naming the field."""

    daemon_threads = True

    def __init__(self, path: str, handler: Handler):
        if os.path.exists(path):
            os.unlink(path)  # left by a trainer that was killed
        self.handler = handler
        super().__init__(path, _Connection)
        os.chmod(path, 0o600)
        self.path = path

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="trainer-socket", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
