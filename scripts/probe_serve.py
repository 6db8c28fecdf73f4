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
  crash        --trainer-kills SIGKILLs of the trainer, alternately in the middle of a job's steps and
               of a POST /checkpoint, on servers with a checkpoint store (--restarts kills per server,
               then a new server on the same store and state): the weight version rises across each,
               completions are answered while the trainer is down, the store verifies at the end
  segments     --kills starts of a server whose engine is then SIGKILLed: shared-memory segments left
               in /dev/shm afterwards

The defaults are the issue's full size (200 requests per client, 20 trainer and 20 engine SIGKILLs): about
an hour on a busy 2-core CPU with the default model; `--requests 10 --kills 3 --trainer-kills 4` is a quick run.

usage: python scripts/probe_serve.py [--model default|tiny|DIR] [--requests 200] [--kills 20] [--trainer-kills 20]
                                     [--restarts 4] [--only deadlock,malformed,cross-site,load,version,crash,segments]
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

from livetrain.trainer.client import free_port, http, wait_ready  # noqa: E402
from livetrain.trainer.process import stop_process  # noqa: E402

import tiny_model  # noqa: E402  (the tiny model, the --model option)

ENV = {
    **os.environ,
    # The repo's python/ first, the caller's path kept (it may hold fastapi/uvicorn).
    "PYTHONPATH": os.pathsep.join(
        filter(
            None,
            [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"), os.environ.get("PYTHONPATH")],
        )
    ),
    "TOKENIZERS_PARALLELISM": "false",
}
JOB = {
    "examples": [
        {"prompt": "The capital of Zorbia is", "completion": " Quuxville."},
        {
            "messages": [
                {"role": "user", "content": "What is the capital of Zorbia?"},
                {"role": "assistant", "content": "Quuxville."},
            ]
        },
    ],
    "lr": 1e-5,
}


class Serve:
    """`python -m livetrain.serve` in its own run dir, no API key."""

    def __init__(self, a, tmp: str, name: str, extra: tuple = (), store: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run = os.path.join(tmp, name)
        self.log = open(os.path.join(tmp, f"{name}.log"), "a")  # a server started again on the same state appends
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
                *(("--store", store) if store else ("--no-store",)),
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
        stop_process(self.p, sig, 120, session=True)
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
    return (
        ok,
        f"45 completions: {codes.count(200)} answered 200 in {time.monotonic() - t0:.0f} s; /train/status {status}; stream ended: {rest.rstrip().endswith('[DONE]')}",
    )


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
                if done[0] % (16 * requests // 10 or 1) == 0:  # a long probe says how far it got
                    print(
                        f"load: {done[0]} of {16 * requests} answered, {len(bad)} not 200", file=sys.stderr, flush=True
                    )

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    _, st = http(s.url + "/train/status")
    job_state = next((j["state"] for j in st.get("jobs", []) if j["id"] == job["job_id"]), "?")
    return (
        not bad,
        f"{done[0]} requests in {took:.0f} s, {len(bad)} not answered 200; the job was {job_state} at the end",
    )


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


def _status(s: Serve, timeout: float = 60) -> tuple[int, dict]:
    try:
        return http(s.url + "/train/status", timeout=timeout)
    except OSError as e:
        return -1, {"error": repr(e)}


def _trainer_back(s: Serve, old_pid: int, deadline: float) -> dict:
    """/train/status once a trainer other than ``old_pid`` answers it; while none does, a completion must
    still be answered (serving goes on without the trainer). RuntimeError past ``deadline``."""
    served = False
    while True:
        code, st = _status(s)
        pid = s.trainer_pid()
        if code == 200 and pid is not None and pid != old_pid:
            return {**st, "served_while_down": served}
        if not served and code != 200:
            served = _code(s.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2}, 120) == 200
        if time.monotonic() > deadline:
            raise RuntimeError(f"the trainer was not back in time: /train/status {code} {st}")
        time.sleep(0.5)


def _steps(s: Serve, n: int, kill: int) -> str:
    """Starts a long job and waits until it has taken ``n`` steps; its id."""
    # Unguarded: the guard's retention answers would take most of the probe's time on a CPU.
    code, job = http(s.url + "/train", {**JOB, "steps": 100000, "guard": False})
    if code != 202:
        raise RuntimeError(f"kill {kill}: the job was refused: {code} {job}")
    start = _status(s)[1]["weight_version"]
    deadline = time.monotonic() + 600
    while _status(s)[1].get("weight_version", 0) < start + n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"kill {kill}: the job did not take {n} steps in 600 s")
        time.sleep(0.2)
    return job["job_id"]


def _cancel(s: Serve, jid: str) -> None:
    """Cancels job ``jid`` and waits until it has ended."""
    # urllib would call an empty body a form (which a server without a key refuses, 415): say JSON.
    code = post(s.url, f"/train/{jid}/cancel", b"", {"Content-Type": "application/json"})
    if code not in (200, 202, 409):  # 409: it had ended already
        raise RuntimeError(f"POST /train/{jid}/cancel answered {code}")
    deadline = time.monotonic() + 600
    while http(s.url + f"/train/{jid}")[1].get("state") in ("queued", "running"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {jid} did not stop in 600 s after its cancel")
        time.sleep(0.2)


def probe_crash(a, tmp: str) -> tuple[bool, str]:
    """SIGKILLs of the trainer, alternately in the middle of a job's steps and in the middle of a
    POST /checkpoint (of weights changed by a job, at 20-80% of the time one takes), on servers with a
    checkpoint store; ``a.restarts`` kills per server (the supervisor's back-off doubles per death in a
    row), then the server is stopped and started again on the same store and state. Checked after each
    kill: the weight version is above the one before (a killed step may have changed the weights: they
    need a new number), completions were answered while the trainer was down, /train answers again; at
    the end, the store verifies (every generation's files against their hashes) and its weight versions
    increase with the generations."""
    store, problems, rows = os.path.join(tmp, "crash-store"), [], []
    kills = mid_checkpoint = mid_job = 0
    seen = 0  # the highest weight version read so far, across servers
    seconds = None  # how long one checkpoint takes
    while kills < a.trainer_kills:
        s = Serve(a, tmp, "crash", store=store)
        try:
            code, st = _status(s)
            if code != 200 or st["weight_version"] < seen:
                problems.append(f"restart: /train/status {code}, weight version {st.get('weight_version')} < {seen}")
            for _ in range(min(a.restarts, a.trainer_kills - kills)):
                jid = _steps(s, 2, kills + 1)
                pid = s.trainer_pid()
                answered = None
                if kills % 2 == 1:  # in the middle of a checkpoint (no step running: the checkpoint starts at once)
                    _cancel(s, jid)
                    if seconds is None:  # how long a checkpoint takes here, measured on one not killed
                        t0 = time.monotonic()
                        code = post(s.url, "/checkpoint", b"{}", {"Content-Type": "application/json"}, 600)
                        seconds = time.monotonic() - t0
                        if code != 200:
                            problems.append(f"kill {kills + 1}: POST /checkpoint answered {code}")
                        _cancel(s, _steps(s, 1, kills + 1))  # changes for the killed checkpoint to write
                    before = _status(s)[1]["weight_version"]  # no step runs: it stays until the kill
                    done = threading.Event()

                    def checkpoint():
                        post(s.url, "/checkpoint", b"{}", {"Content-Type": "application/json"}, 600)
                        done.set()

                    threading.Thread(target=checkpoint, daemon=True).start()
                    done.wait(seconds * (0.2 + 0.6 * ((kills // 2) % 4) / 3))  # at 20%, 40%, 60%, 80% of it
                    answered = done.is_set()
                else:
                    before = _status(s)[1]["weight_version"]
                os.kill(pid, signal.SIGKILL)
                kills += 1
                if answered is None:
                    mid_job += 1
                elif not answered:
                    mid_checkpoint += 1
                st = _trainer_back(s, pid, time.monotonic() + 600)
                after = st["weight_version"]
                seen = max(seen, after)
                rows.append((before, after))
                if after < before or (answered is None and after == before):
                    # A step killed half-way may have changed the weights: they need a number of their own.
                    problems.append(f"kill {kills}: weight version {before} before, {after} after")
                if not st["served_while_down"]:
                    problems.append(f"kill {kills}: no completion answered while the trainer was down")
        finally:
            s.stop()
    with_store = __import__("livetrain.checkpoint", fromlist=["CheckpointStore"]).CheckpointStore
    with with_store(a.model, store) as cs:
        bad = cs.verify()
        gens = cs.list()
    versions = [g["weight_version"] for g in gens]
    if bad:
        problems.append(f"store verify: {bad[:3]}")
    if versions != sorted(versions) or len(set(versions)) != len(versions):
        problems.append(f"store weight versions not increasing: {versions}")
    return not problems, (
        f"{kills} trainer SIGKILLs ({mid_job} mid-job, {mid_checkpoint} mid-checkpoint, "
        f"{kills - mid_job - mid_checkpoint} just after a checkpoint) on "
        f"{-(-kills // a.restarts)} servers sharing one store: weight version before -> after "
        f"{', '.join(f'{b}->{x}' for b, x in rows)}; store: {len(gens)} generations, verify "
        f"{'OK' if not bad else 'FAILED'}; problems: {len(problems)} {problems[:3]}"
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


def tiny_model_dir(path: str) -> str:
    """A 2-layer Llama with random weights and a word-level tokenizer over this script's prompts
    (tests/python/tiny_model.py): the probes' mechanics at a fraction of the default model's CPU time."""
    words = [JOB["examples"][0]["prompt"] + JOB["examples"][0]["completion"], "Tell me a long story about a dragon."]
    words += ["Hello, how are you", "Question what is plus ? hi", " ".join(str(i) for i in range(200))]
    tiny_model.make_model_dir(path, words, intermediate_size=128, max_position_embeddings=512)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tiny_model.add_model_option(p, "tiny", "a 2-layer random Llama: a loaded CPU")
    p.add_argument("--requests", type=int, default=200, help="completions per client in the load probe")
    p.add_argument("--kills", type=int, default=20, help="engine SIGKILLs in the segments probe")
    p.add_argument(
        "--trainer-kills", type=int, default=20, help="trainer SIGKILLs in the crash probe (mid-job and mid-checkpoint)"
    )
    p.add_argument("--restarts", type=int, default=4, help="trainer SIGKILLs per server in the crash probe")
    p.add_argument(
        "--checkpoint-delay",
        type=float,
        default=0.5,
        help="seconds between POST /checkpoint and the trainer's SIGKILL in the crash probe",
    )
    p.add_argument("--only", default="", help="comma-separated probes to run (default all)")
    a = p.parse_args()
    only = set(filter(None, a.only.split(",")))
    tmp = tempfile.mkdtemp(prefix="probe-serve-")
    a.model = tiny_model.resolve_model(a.model, "tiny", lambda: tiny_model_dir(os.path.join(tmp, "tiny-llama")), "bf16")
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
    if not only or only - {"segments", "crash", "version"}:
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
    run(
        "crash",
        f"{a.trainer_kills} trainer SIGKILLs mid-job/mid-checkpoint: versions up, serving on, store verifies",
        lambda: probe_crash(a, tmp),
    )
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
