"""What livetrain refuses from the outside before it does any work: request bodies over the size limit,
cross-site requests when no API key is set (a web page the user visits must not retrain or roll back
their model: CSRF, DNS rebinding), API keys where ``ps`` shows them, and run directories or key files
that another local user could have planted or can read. Used by the reference engine, the training
routes (so the vLLM plugin too) and the launchers; docs/serve.md ("Security") describes the rules.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import sys
from urllib.parse import urlsplit

from livetrain.trainer import protocol

DEFAULT_MAX_BODY_MIB = 16
# How much of an oversized body is read and dropped so the client can read its 413 (see read_body).
DRAIN_BYTES = 64 << 20
# Methods that change something: they need the same-origin checks below.
MUTATING = ("POST", "PUT", "PATCH", "DELETE")
API_KEY_ENV = "LIVETRAIN_API_KEY"


class TooLarge(ValueError):
    """A request body over the limit (answered 413)."""

    def __init__(self, limit: int):
        super().__init__(f"request body is over the limit of {limit} bytes (--max-body-mib)")
        self.limit = limit

    def reply(self) -> protocol.Reply:
        return protocol.error(413, str(self), "body")


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette request, refused (``TooLarge``) once it is known to exceed ``limit`` bytes,
    never held beyond it. The rest of an oversized body is read and dropped (up to ``DRAIN_BYTES`` more)
    before the 413 goes out: a client still sending when the server answers and closes gets a broken pipe
    instead of the answer (urllib, requests). Beyond that the connection is simply closed."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.strip().isdigit() else None
    if declared is not None and declared > limit + DRAIN_BYTES:
        raise TooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + DRAIN_BYTES:
            raise TooLarge(limit)
        if size > limit or (declared is not None and declared > limit):
            chunks = []  # draining
            continue
        chunks.append(chunk)
    if size > limit or (declared is not None and declared > limit):
        raise TooLarge(limit)
    return b"".join(chunks)


def _own_names() -> set[str]:
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return names


_OWN_NAMES = _own_names()


def _split_host(host: str) -> tuple[str, int | None]:
    """(name, port or None) of a Host header (IPv6 brackets removed, lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, port = host.split(":")
    else:
        name, port = host, ""
    return name, int(port) if port.isdigit() else None


def host_is_ours(host: str) -> bool:
    """Whether a Host header names this machine in a way no other site can: an IP address, localhost, or
    this machine's own host name. A DNS-rebinding page reaches the server under its own domain name."""
    name = _split_host(host)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in _OWN_NAMES or name.endswith(".localhost")


def same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header names the server the Host header names (scheme default ports; a Host
    without a port, as a proxy on a default port sends it, is compared by name)."""
    try:
        u = urlsplit(origin)
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return False
    name, host_port = _split_host(host)
    return bool(u.hostname) and u.hostname.lower() == name and (host_port is None or port == host_port)


def cross_site(method: str, headers) -> protocol.Reply | None:
    """The refusal of a request that a web page could have sent on the user's behalf (None: none), for a
    server without an API key: a Host that is not this machine's (DNS rebinding); and for methods that
    change something, an Origin other than the server's own, or a body that is not application/json
    (what a cross-site form or "simple" fetch can send without a CORS preflight). Clients other than
    browsers send no Origin and pass. Reads (GET) are checked for the Host alone: a rebound page reads
    what its GETs return, while a GET sent with a foreign Origin is answered without CORS headers, which
    keeps the answer from the page; so a Prometheus scraper of /metrics (no Origin, the Host of its
    target) passes whenever it names the server by address, localhost or this machine's name."""
    host = headers.get("host")
    if host is not None and not host_is_ours(host):
        return protocol.error(
            403,
            f"Host {host!r} is not this server's address; without --api-key only requests to an IP address, "
            "localhost or this machine's name are served (a web page could otherwise reach the server through "
            "its own domain name)",
            "Host",
        )
    if method.upper() not in MUTATING:
        return None
    origin = headers.get("origin")
    if origin is not None and not (host is not None and same_origin(origin, host)):
        return protocol.error(
            403,
            f"cross-origin request (Origin {origin!r}) refused: without --api-key, requests that change "
            "something must come from the server's own origin or from a client that is not a browser",
            "Origin",
        )
    ctype = headers.get("content-type")
    media = ctype.split(";", 1)[0].strip().lower() if ctype is not None else None
    if media is not None and media != "application/json":
        return protocol.error(415, f"Content-Type {ctype!r}: request bodies must be application/json", "Content-Type")
    if media is None and headers.get("content-length", "0").strip() not in ("", "0"):
        return protocol.error(415, "a request body needs Content-Type: application/json", "Content-Type")
    return None


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(_split_host(host)[0]).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print at start for a server reachable from other machines without a key."""
    if api_key or is_loopback(host):
        return None
    return (
        f"listening on {host} without an API key: anyone who can reach this address can train, roll back or "
        "checkpoint the model; set --api-key-file (or $LIVETRAIN_API_KEY)"
    )


def check_private(path: str, what: str, *, directory: bool) -> None:
    """Refuses (ValueError naming ``path``) a file or directory that is not ours alone: a symlink, another
    owner, or a mode that lets others in, so that nothing planted or swapped by another local user is
    trusted."""
    st = os.lstat(path)
    kind = "directory" if directory else "file"
    if stat.S_ISLNK(st.st_mode) or (stat.S_ISDIR(st.st_mode) != directory):
        raise ValueError(f"{what} {path} is not a {kind} (a symbolic link or another kind of file)")
    if st.st_uid != os.getuid():
        raise ValueError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if st.st_mode & 0o077:
        raise ValueError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; others could read or change it "
            f"(chmod {'700' if directory else '600'} {path})"
        )


def private_dir(path: str, what: str = "run directory") -> str:
    """``path`` created with mode 0700, or checked with ``check_private`` when it exists."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path, what, directory=True)
    return path


def add_api_key_options(parser, what: str = "every route") -> None:
    """``--api-key-file FILE`` (preferred) and ``--api-key KEY`` (visible to every local user in ``ps``)."""
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"require 'Authorization: Bearer KEY' on {what}, KEY being the first line of FILE (mode 0600, "
        f"owned by you); or set ${API_KEY_ENV}",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the same with KEY on the command line, where any local user sees it in ps: prefer --api-key-file or ${API_KEY_ENV}",
    )


def api_key(ns, env=os.environ) -> str | None:
    """The API key from ``--api-key-file``, ``--api-key`` (with a warning) or ``$LIVETRAIN_API_KEY``;
    ValueError for a key file that others can read or that holds no key, and for an empty ``--api-key`` or
    ``$LIVETRAIN_API_KEY`` (which would otherwise turn authentication off without a word)."""
    if ns.api_key is not None and not ns.api_key.strip():
        raise ValueError("--api-key is empty: give a key, or leave the option out to serve without one")
    if ns.api_key_file and ns.api_key:
        raise ValueError("give --api-key-file or --api-key, not both")
    if ns.api_key_file:
        check_private(ns.api_key_file, "API key file", directory=False)
        with open(ns.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise ValueError(f"API key file {ns.api_key_file} holds no key on its first line")
        return key
    if ns.api_key:
        print(
            f"livetrain: warning: --api-key on the command line is visible to every local user (ps); use "
            f"--api-key-file or ${API_KEY_ENV}",
            file=sys.stderr,
            flush=True,
        )
        return ns.api_key
    key = env.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"${API_KEY_ENV} is set but empty: set a key, or unset it to serve without one")
    return key


def private_files() -> None:
    """From now on this process creates files 0600 and directories 0700 (umask 077): state, store, run
    files and sockets name or hold the model's weights and optimizer state."""
    os.umask(0o077)
