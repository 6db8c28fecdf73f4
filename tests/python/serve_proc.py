"""`python -m livetrain.serve` in a subprocess for the end-to-end tests (test14, test15): a free port, one
HTTP helper, start and wait until /train/status answers, stop with a signal, or SIGKILL every process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")])),
       "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body=None, key: str | None = None, raw: bytes | None = None, timeout: float = 120):
    """(status, parsed JSON or text) of one request; POST when there is a body (``raw``: sent as is)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text


class ServeProcess:
    """Runs ``python -m livetrain.serve --port PORT *args``; its output goes to ``log`` (a path in which
    "{port}" is replaced). ``key``: the API key every request of this class sends."""

    def __init__(self, args: list[str], log: str | Path, env: dict = ENV, key: str | None = None,
                 wait_s: float | None = 180):
        port = free_port()
        self.url, self.key = f"http://127.0.0.1:{port}", key
        self.log = open(str(log).replace("{port}", str(port)), "w")
        self.p = subprocess.Popen([sys.executable, "-m", "livetrain.serve", "--port", str(port), *args], env=env,
                                  stdout=self.log, stderr=subprocess.STDOUT)
        if wait_s is not None:
            self.wait_ready(wait_s)

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.p.poll() is None, f"serve exited with {self.p.returncode}: {self.logtext()}"
            try:
                if http(self.url + "/train/status", key=self.key, timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail(f"serve did not become ready: {self.logtext()}")

    def logtext(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def status(self) -> dict:
        code, body = http(self.url + "/train/status", key=self.key)
        assert code == 200, body
        return body

    def stop(self, sig=signal.SIGTERM) -> int:
        """Sends ``sig`` (a clean stop) and returns the exit status."""
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout=120)
        finally:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL to the supervisor, the engine and the trainer (the two run in their own sessions, so
        they are found by parent pid), then waits until they are gone."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.p.pid:  # fields: state, ppid, ...
                children.append(int(stat.parent.name))
        for pid in [self.p.pid] + children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in children):
            assert time.monotonic() < deadline, children
            time.sleep(0.1)
        self.log.close()


def _gone(pid: int) -> bool:
    """Whether a killed process has released everything (its files, so its locks): reaped, or a zombie
    whose other threads have exited too (a thread-group leader turns zombie before the rest of it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True
