"""Reruns issue #13's probes against `livetrain serve` (which this script starts, without an API key, as
the review did) and prints a table of the issue's targets:

  deadlock     one streaming completion left unread, then 45 plain completions at once: all answered and
               /train/status answering (the engine used to hang for good)
  malformed    hostile /train, /v1/completions and /v1/chat/completions bodies (nesting, NaN, 2^64 seeds,
               lone surrogates, wrong types, oversized bodies, non-JSON): count of 5xx answers
  cross-site   POST /train, /rollback, /checkpoint as a web page could send them (text/plain, a foreign
               Origin, a rebound Host): count of those that were not refused
  load         16 clients (a third streaming) x --requests completions while a training job runs: count
               of requests not answered 200
  version      SIGKILL of the trainer in the middle of a job: the weight version read after the
               supervisor restarted it, against the one before (must not decrease)
  segments     --kills starts of a server whose engine is then SIGKILLed: shared-memory segments left
               in /dev/shm afterwards

usage: python scripts/probe_serve.py [--model default|DIR] [--requests 200] [--kills 20] [--only a,b]
Exit status 0 when every target is met. Each probe's servers log under a temporary directory, kept and
named when a probe fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import http.client as httpclient
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from livetrain.trainer.client import free_port, http, wait_ready  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"),
    "TOKENIZERS_PARALLELISM": "false",
}
JOB = {
    "examples": [
        {"prompt": "The capital of Zorbia is", "completion": " Quuxville."},
        {"messages": [{"role": "user", "content": "What is the capital of Zorbia?"}, {"role": "assistant", "content": "Quuxville."}]},
    ],
    "lr": 1e-5,
}


class Serve:
    """`python -m livetrain.serve` in its own run dir, no API key."""

    def __init__(self, a, tmp: str, name: str, extra: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run = os.path.join(tmp, name)
        self.log = open(os.path.join(tmp, f"{name}.log"), "w")
        self.p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "livetrain.serve",
                "--model",
                a.model,
                "--port",
                str(self.port),
                "--run-dir",
                self.run,
                "--state-dir",
                os.path.join(tmp, f"{name}-state"),
                "--no-store",
                *extra,
            ],
            env=ENV,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_ready(self.url, self.p, 600)

    def manifest(self) -> dict:
        with open(os.path.join(self.run, "engine.manifest.json")) as f:
            return json.load(f)

    def trainer_pid(self) -> int | None:
        """The trainer's pid: the supervisor's child that is not the engine."""
        engine = self.manifest()["owner"]["pid"]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.split("/")[2])
            if int(fields[1]) == self.p.pid and pid != engine:
                return pid
        return None

    def stop(self, sig: int | None = signal.SIGTERM) -> None:
        """Sends ``sig`` to the supervisor (None: nothing, it is stopping already), waits 120 s for it to
        exit, then kills its whole session."""
        if sig is not None and self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
        self.log.close()


def post(url: str, path: str, body: bytes, headers: dict, timeout: float = 120) -> int:
    req = urllib.request.Request(url + path, body, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1  # no answer


def probe_deadlock(s: Serve) -> tuple[bool, str]:
    conn = httpclient.HTTPConnection("127.0.0.1", s.port, timeout=300)
    body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 32, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    stream = conn.getresponse()
    stream.readline()  # then left unread
    t0 = time.monotonic()
    plain = {"prompt": "Hello, how are", "max_tokens": 8, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(45) as pool:
        codes = list(pool.map(lambda _: _code(s.url + "/v1/completions", plain, 240), range(45)))
    status = _code(s.url + "/train/status", None, 60)
    rest = stream.read().decode(errors="replace")
    conn.close()
    ok = codes == [200] * 45 and status == 200 and rest.rstrip().endswith("[DONE]")
    return ok, f"45 completions: {codes.count(200)} answered 200 in {time.monotonic() - t0:.0f} s; /train/status {status}; stream ended: {rest.rstrip().endswith('[DONE]')}"


def _code(url: str, body, timeout: float) -> int:
    try:
        return http(url, body, timeout=timeout)[0]
    except OSError:
        return -1


def malformed_bodies() -> list[tuple[str, bytes]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    out = []
    for path, base in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ("/train", JOB),
    ):
        raw = [
            deep,
            b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
            b"",
            b"{",
            b"null",
            b"[]",
            b'"text"',
            b"\xff\xfe\x00",
            b'{"prompt": "\\ud800"}',
            b'{"\\ud83d": 1}',
            b'{"temperature": NaN}',
            b'{"lr": Infinity}',
            b" " * (17 << 20),  # over the default 16 MiB body limit
        ]
        fields = {
            "seed": [1 << 64, -(1 << 63) - 1, "x", 1.5],
            "max_tokens": [1e400, 10**30, -1, 0, "8", True, None],
            "temperature": [-1, 3, "hot", 1e308],
            "top_p": [0, 2, []],
            "stop": [[1], ["\udfff"], "x" * 100_000, ["a"] * 10_000],
            "stream": ["yes", 1],
            "stream_options": [{"include_usage": "yes"}, []],
            "examples": [[], [{}], [{"prompt": 1}], [{"prompt": "a", "completion": "b", "weight": 1e300}], "x"],
            "steps": [-1, 1e9, "5", 10**20],
            "lr": [-1, 1e300, "x"],
            "batch_size": [0, 10**9, 1.5],
            "messages": [[], [{"role": "x", "content": "y"}], [{"role": "user", "content": "\udfff"}], "hi"],
        }
        for name, values in fields.items():
            for v in values:
                try:
                    raw.append(json.dumps({**base, name: v}).encode())
                except ValueError:
                    raw.append(json.dumps({**base, name: str(v)}).encode())
        out += [(path, r) for r in raw]
    return out


def probe_malformed(s: Serve) -> tuple[bool, str]:
    codes, fives = {}, []
    for path, raw in malformed_bodies():
        code = post(s.url, path, raw, {"Content-Type": "application/json"}, 300)
        codes[code] = codes.get(code, 0) + 1
        if code >= 500 or code < 0:
            fives.append(f"{path} {raw[:60]!r} -> {code}")
    # The job with an example weighted 1e300 (a loss of inf) must not break /train/status afterwards.
    time.sleep(2)
    status = _code(s.url + "/train/status", None, 60)
    if status != 200:
        fives.append(f"/train/status after the 1e300 weight -> {status}")
    n = sum(codes.values())
    return not fives, f"{n} bodies: answers {dict(sorted(codes.items()))}; 5xx or none: {len(fives)} {fives[:3]}"


def probe_cross_site(s: Serve) -> tuple[bool, str]:
    job = json.dumps(JOB).encode()
    tries = [
        {"Content-Type": "text/plain"},
        {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"},
        {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"},
        {"Content-Type": "application/json", "Origin": "http://evil.example"},
        {"Content-Type": "application/json", "Host": f"rebound.example:{s.port}"},
        {"Content-Type": "application/json", "Origin": "null"},
    ]
    accepted = []
    for path in ("/train", "/rollback", "/checkpoint"):
        for h in tries:
            code = post(s.url, path, job if path == "/train" else b'{"generation": 1}', h)
            if 200 <= code < 300:
                accepted.append(f"{path} {h} -> {code}")
    return not accepted, f"{3 * len(tries)} cross-site writes: {len(accepted)} accepted {accepted[:2]}"


def probe_load(s: Serve, requests: int) -> tuple[bool, str]:
    code, job = http(s.url + "/train", {**JOB, "steps": 100000})
    if code != 202:
        return False, f"the training job was refused: {code} {job}"
    bad, lock, done = [], threading.Lock(), [0]

    def client(c: int):
        for i in range(requests):
            body = {"prompt": f"Question {c}-{i}: what is {i} plus {c}?", "max_tokens": 8, "temperature": 0}
            if c % 3 == 0:
                req = urllib.request.Request(
                    s.url + "/v1/completions",
                    json.dumps({**body, "stream": True}).encode(),
                    {"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=300) as r:
                        ok = r.status == 200 and r.read().rstrip().endswith(b"[DONE]")
                except OSError as e:
                    ok = repr(e)
            else:
                ok = _code(s.url + "/v1/completions", body, 300) == 200
            with lock:
                done[0] += 1
                if ok is not True:
                    bad.append(ok)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    _, st = http(s.url + "/train/status")
    job_state = next((j["state"] for j in st.get("jobs", []) if j["id"] == job["job_id"]), "?")
    return not bad, f"{done[0]} requests in {took:.0f} s, {len(bad)} not answered 200; the job was {job_state} at the end"


def probe_version(s: Serve) -> tuple[bool, str]:
    code, job = http(s.url + "/train", {**JOB, "steps": 100000})
    if code != 202:
        return False, f"the training job was refused: {code} {job}"
    deadline = time.monotonic() + 300
    while http(s.url + "/train/status")[1].get("weight_version", 0) < 3:
        if time.monotonic() > deadline:
            return False, "the job did not take 3 steps in 300 s"
        time.sleep(0.5)
    pid = s.trainer_pid()
    before = http(s.url + "/train/status")[1]["weight_version"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    while True:  # the supervisor restarts the trainer after a back-off
        code, st = http(s.url + "/train/status")
        if code == 200:
            break
        if time.monotonic() > deadline + 300:
            return False, f"the trainer was not restarted: {code} {st}"
        time.sleep(0.5)
    after = st["weight_version"]
    serving = _code(s.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}, 60)
    return after >= before and serving == 200, (
        f"weight version {before} before the trainer's SIGKILL, {after} after its restart; completions {serving}"
    )


def probe_segments(a, tmp: str) -> tuple[bool, str]:
    named, pids = [], []
    for k in range(a.kills):
        s = Serve(a, tmp, f"kill{k}")
        m = s.manifest()
        named += ["/dev/shm/" + b["name"].lstrip("/") for b in m["buffers"] if b.get("kind") == "shm"]
        pids.append(m["owner"]["pid"])
        os.kill(m["owner"]["pid"], signal.SIGKILL)
        s.stop(None)  # the supervisor stops when its engine dies
    left = [n for n in named if os.path.exists(n)]
    # Any other object these engines created (named /livetrain-<pid>-...); other users' are not counted.
    others = [n for pid in pids for n in glob.glob(f"/dev/shm/livetrain-{pid}-*") if n not in named]
    return not left and not others, (
        f"{a.kills} engine SIGKILLs: {len(left)} of the {len(named)} segments their manifests named left in "
        f"/dev/shm, {len(others)} other objects of theirs"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model directory or 'default'")
    p.add_argument("--requests", type=int, default=200, help="completions per client in the load probe")
    p.add_argument("--kills", type=int, default=20, help="engine SIGKILLs in the segments probe")
    p.add_argument("--only", default="", help="comma-separated probes to run (default all)")
    a = p.parse_args()
    only = set(filter(None, a.only.split(",")))
    if a.model == "default":
        from livetrain import default_model

        a.model = default_model.resolve("default", "bf16")
    tmp = tempfile.mkdtemp(prefix="probe-serve-")
    rows, keep = [], False

    def run(name: str, target: str, fn):
        nonlocal keep
        if only and name not in only:
            return
        t0 = time.monotonic()
        try:
            ok, detail = fn()
        except Exception as e:  # a probe that crashed is a failed target, not a lost line
            ok, detail = False, f"{type(e).__name__}: {e}"
        keep |= not ok
        rows.append((name, target, "met" if ok else "NOT MET", detail, time.monotonic() - t0))
        print(f"{name}: {'met' if ok else 'NOT MET'}: {detail}", file=sys.stderr, flush=True)

    s = None
    if not only or only - {"segments"}:
        s = Serve(a, tmp, "serve")
    try:
        run("deadlock", "0 deadlocks", lambda: probe_deadlock(s))
        run("malformed", "0 5xx on malformed input", lambda: probe_malformed(s))
        run("cross-site", "0 cross-origin writes", lambda: probe_cross_site(s))
        run("load", f"16 clients x {a.requests} requests all answered during a job", lambda: probe_load(s, a.requests))
    finally:
        if s is not None:
            s.stop()
    if not only or "version" in only:
        v = Serve(a, tmp, "version")
        try:
            run("version", "weight version never decreases across a trainer SIGKILL", lambda: probe_version(v))
        finally:
            v.stop()
    run("segments", f"0 leaked segments after {a.kills} engine SIGKILLs", lambda: probe_segments(a, tmp))
    print("| probe | target | result | measured | s |\n|---|---|---|---|---|")
    for name, target, result, detail, secs in rows:
        print(f"| {name} | {target} | {result} | {detail.replace('|', '/')} | {secs:.0f} |")
    if keep:
        print(f"logs: {tmp}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r[2] == "met" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
