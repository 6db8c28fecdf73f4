"""Servers and processes for the end-to-end tests: the environment a child Python process needs, and
`python -m livetrain.serve` in a subprocess (free port, wait until /train/status answers, stop with a
signal, or SIGKILL every process). HTTP goes through livetrain.trainer.client, as `livetrain train` does."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from livetrain.trainer.client import free_port, http, wait_job, wait_ready

ROOT = Path(__file__).resolve().parents[2]
# For child Python processes: this checkout's package first, and no tokenizer threads fighting the tests'.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")])),
    "TOKENIZERS_PARALLELISM": "false",
}


class ServeProcess:
    """Runs ``python -m livetrain.serve --port PORT *args``; its output goes to ``log`` (a path in which
    "{port}" is replaced). ``key``: the API key every request of this class sends."""

    def __init__(
        self, args: list[str], log: str | Path, env: dict = ENV, key: str | None = None, wait_s: float | None = 180
    ):
        port = free_port()
        self.url, self.key = f"http://127.0.0.1:{port}", key
        self.log = open(str(log).replace("{port}", str(port)), "w")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "livetrain.serve", "--port", str(port), *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if wait_s is not None:
            self.wait_ready(wait_s)

    def wait_ready(self, seconds: float) -> None:
        try:
            wait_ready(self.url, self.p, seconds, key=self.key)
        except (RuntimeError, TimeoutError) as e:
            self.kill()
            pytest.fail(f"serve did not become ready ({e}): {self.logtext()}")

    def logtext(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def http(self, path: str, body=None, raw: bytes | None = None, key: str | None = "", timeout: float = 120):
        """One request to this server, with its key unless ``key`` says otherwise (None: no key)."""
        return http(self.url + path, body, key=self.key if key == "" else key, raw=raw, timeout=timeout)

    def status(self) -> dict:
        code, body = self.http("/train/status")
        assert code == 200, body
        return body

    def wait_job(self, jid: str, timeout: float = 240) -> dict:
        return wait_job(self.url, jid, key=self.key, timeout=timeout, interval=0.2)

    def complete_during_job(
        self, jid: str, request: dict, *, clients: int = 1, pause: float = 0.0, timeout: float = 240
    ) -> tuple[dict, list, list[int]]:
        """Sends ``request`` to /v1/completions from ``clients`` threads (each waiting ``pause`` s between
        requests) until job ``jid`` ends. Returns the job's entry, the status of every answer (or the repr
        of what a request raised, not lost in its thread), and the weight version read before each."""
        codes, versions, finished = [], [], threading.Event()

        def client():
            while not finished.is_set():
                try:
                    versions.append(self.status()["weight_version"])
                    codes.append(self.http("/v1/completions", request)[0])
                except Exception as e:
                    codes.append(repr(e))
                time.sleep(pause)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        try:
            return self.wait_job(jid, timeout), codes, versions
        finally:
            finished.set()
            for t in threads:
                t.join()

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
        children = children_of(self.p.pid)
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


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (a supervisor's engine and trainer, which run in sessions of their own)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    """Whether a killed process has released everything (its files, so its locks): reaped, or a zombie
    whose other threads have exited too (a thread-group leader turns zombie before the rest of it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z" and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True
