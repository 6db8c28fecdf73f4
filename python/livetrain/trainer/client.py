"""The HTTP client of a livetrain server (standard library only): ``livetrain train``, which sends a
JSON-lines file of examples as one /train job and follows it, and the helpers that the scripts, benchmarks
and tests use to talk to a server they started (``http``, ``free_port``, ``wait_ready``, ``wait_job``).

usage: python -m livetrain.trainer.client --url http://127.0.0.1:8000 FILE.jsonl [--lr X] [--steps N] ...
Each line of FILE is one example: {"messages": [...]} or {"prompt": ..., "completion": ...}, optionally
with "weight".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from livetrain.trainer.examples import JOB_OPTIONS
from livetrain.trainer.options import REPLAY_SELECT, TRAIN
from livetrain.trainer.routes import API_KEY_ENV
from livetrain.trainer.schedule import FINAL, STOP_REASONS


def http(
    url: str,
    body: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    timeout: float = 120.0,
    method: str | None = None,
) -> tuple[int, Any]:
    """(status, the parsed JSON body, or its text when it is not JSON) of one request: POST with ``body`` as
    JSON (or ``raw`` bytes as they are), GET without, unless ``method`` says otherwise (DELETE, PUT); ``key``
    is sent as ``Authorization: Bearer KEY``. A server that does not answer raises OSError."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url,
        data=data,
        method=method or ("POST" if data is not None else "GET"),
        headers={"Content-Type": "application/json"},
    )
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode(errors="replace")
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text


def error_text(code: int, body: Any) -> str:
    """``HTTP 400 (examples[0].completion): message`` for an error answer."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"HTTP {code}: {body}"
    where = f" ({err['param']})" if err.get("param") else ""
    return f"HTTP {code}{where}: {err.get('message', body)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a server about to start."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(
    url: str, proc=None, timeout: float = 180.0, *, key: str | None = None, path: str = "/train/status"
) -> None:
    """Waits until GET ``url + path`` answers 200. RuntimeError when ``proc`` (anything with ``poll()``)
    exits first, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.poll()} before {url}{path} answered")
        try:
            if http(url + path, key=key, timeout=5)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}{path} did not answer 200 in {timeout:.0f} s")
        time.sleep(0.3)


def wait_job(
    url: str,
    job_id: str,
    *,
    key: str | None = None,
    timeout: float | None = None,
    interval: float = 0.5,
    on_status: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Follows a /train job through /train/status until it has ended (done, failed, cancelled or
    rolled_back: trainer.schedule.FINAL); returns its entry. ``on_status(status, job)`` sees every status
    read."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        code, status = http(url + "/train/status", key=key)
        if code != 200:
            raise RuntimeError(f"/train/status: {error_text(code, status)}")
        job = next((j for j in status["jobs"] if j["id"] == job_id), None)
        if job is None:
            raise RuntimeError(f"job {job_id} is no longer listed")
        if on_status is not None:
            on_status(status, job)
        if job["state"] in FINAL:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="livetrain train",
        description="Send a JSON-lines file of training examples to a running `livetrain serve` and follow the job.",
        epilog="exit status: 0 the job is done (with --no-wait: it was queued); 1 the server cannot be reached, "
        "refused the job, or the job ended otherwise than done; 2 bad input found before anything is sent "
        "(an option, a file that cannot be read, a line that is not JSON, no examples)",
    )
    p.add_argument("file", help="JSON lines, one example per line")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"default ${API_KEY_ENV}")
    p.add_argument("--lr", type=float, help="learning rate (default: the server's --lr)")
    p.add_argument("--steps", type=int, help="exactly this many steps (default: until the examples are learned)")
    p.add_argument("--epochs", type=int, help="exactly this many passes over the examples")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--until-loss", type=float, help="learned when every example's loss is below this")
    p.add_argument("--max-steps", type=int, help="the step budget of a job that trains until learned")
    p.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up")
    p.add_argument("--replay", type=int, help="retention examples trained on at every step")
    p.add_argument("--anchor", type=float, help="> 0: train the replayed ones by KL to the model before the job")
    p.add_argument(
        "--replay-select",
        choices=REPLAY_SELECT,
        help="which replayed rows join each step: in turn, or half of them those most like the step's prompts",
    )
    p.add_argument(
        "--train",
        choices=TRAIN,
        help="which parameters the job trains: all, layers (not the embeddings nor the output projection) or "
        "mlp (the layers' MLPs alone) (default: the server's)",
    )
    p.add_argument(
        "--reword",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model rewords each question once and the job trains those too (default: the server's)",
    )
    p.add_argument(
        "--restate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the job also trains each answer as plain text, without its question (default: the server's)",
    )
    p.add_argument(
        "--guard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure what the model already does and roll the job back when it drops (default: the server's)",
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    a = p.parse_args(argv)
    try:
        base = server_url(a.url)
        examples = read_examples(a.file)
    except ValueError as e:
        print(f"livetrain train: {e}", file=sys.stderr)
        return 2
    job = {"examples": examples}
    for k in JOB_OPTIONS:
        if getattr(a, k) is not None:
            job[k] = getattr(a, k)
    try:
        return _send(base, job, a)
    except OSError as e:  # URLError, a refused or reset connection, a timeout
        print(f"livetrain train: {base} cannot be reached: {getattr(e, 'reason', None) or e}", file=sys.stderr)
        return 1


def server_url(url: str) -> str:
    """``--url`` without its trailing slash; ValueError unless it is http(s)://HOST[:PORT][/PATH]."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- ValueError for a port that is not a number or out of range
    except ValueError as e:
        raise ValueError(f"--url {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r}: expected http://HOST:PORT (or https://)")
    return url.rstrip("/")


def read_examples(path: str) -> list:
    """The examples of a JSON-lines file, one a line (blank lines skipped); ValueError naming the file (and
    the line) when it cannot be read, a line is not JSON, or it holds none."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        examples.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not examples:
        raise ValueError(f"{path}: no examples (JSON lines, one example per line)")
    return examples


def _send(base: str, job: dict, a: argparse.Namespace) -> int:
    """Sends the job and follows it (``main``'s exit status); OSError when the server cannot be reached."""
    code, body = http(base + "/train", job, key=a.api_key, timeout=60)
    if code != 202:
        print(f"livetrain train: {error_text(code, body)}", file=sys.stderr)
        return 1
    until = f" (at most; until every example's loss < {body['until_loss']:g})" if body.get("until_loss") else ""
    print(f"job {body['job_id']}: {body['examples']} examples, {body['steps']} steps{until}", flush=True)
    if a.no_wait:
        return 0
    last = None

    def show(status: dict, info: dict) -> None:
        nonlocal last
        line = (
            f"{info['state']:8} step {info['step']}/{info['steps']}  loss "
            f"{info['loss'] if info['loss'] is None else round(info['loss'], 4)}  "
            f"{status['tokens_per_s']} tok/s  weight version {status['weight_version']}"
        )
        if line != last:
            print(line, flush=True)
            last = line

    try:
        info = wait_job(base, body["job_id"], key=a.api_key, on_status=show)
    except RuntimeError as e:
        print(f"livetrain train: {e}", file=sys.stderr)
        return 1
    g = info.get("guard")
    if g and g.get("passed") is not None:
        print(
            f"guard: KL {g['kl']} nats/token (threshold {g['threshold']}), answers kept {g['answers_kept']}/"
            f"{g['answers_compared']} (at least {g['min_kept']:.0%}): "
            f"{'kept' if g['passed'] else 'rolled back' if g['rolled_back'] else g['rollback']}",
            flush=True,
        )
    reason = info.get("stop_reason")
    print(  # last: the job's outcome
        f"{info['state']}: {info['step']} steps, {STOP_REASONS.get(reason, reason)}; examples' loss "
        f"{info.get('loss_before')} -> {info.get('loss_after')}",
        flush=True,
    )
    if info["error"]:
        print(f"livetrain train: job failed: {info['error']}", file=sys.stderr)
    return 0 if info["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
