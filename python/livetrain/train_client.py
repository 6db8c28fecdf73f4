"""`livetrain train`: sends a JSON-lines file of examples to a running `livetrain serve` as one /train job
and shows its progress until it finishes (standard library only).

usage: python -m livetrain.train_client --url http://127.0.0.1:8000 FILE.jsonl [--lr X] [--steps N] ...
Each line of FILE is one example: {"messages": [...]} or {"prompt": ..., "completion": ...}, optionally
with "weight".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def request(url: str, body: dict | None, api_key: str | None, timeout: float = 60) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": {"message": raw.decode(errors="replace")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="livetrain train", description="Send a JSON-lines file of training examples to "
                                "a running `livetrain serve` and follow the job.")
    p.add_argument("file", help="JSON lines, one example per line")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("LIVETRAIN_API_KEY"))
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    a = p.parse_args(argv)

    examples = []
    with open(a.file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except ValueError as e:
                    print(f"livetrain train: {a.file}:{n}: not JSON: {e}", file=sys.stderr)
                    return 2
    job = {"examples": examples}
    for k in ("lr", "steps", "epochs", "batch_size"):
        if getattr(a, k) is not None:
            job[k] = getattr(a, k)
    base = a.url.rstrip("/")
    code, body = request(base + "/train", job, a.api_key)
    if code != 202:
        err = body.get("error", {})
        where = f" ({err['param']})" if err.get("param") else ""
        print(f"livetrain train: HTTP {code}{where}: {err.get('message', body)}", file=sys.stderr)
        return 1
    jid = body["job_id"]
    print(f"job {jid}: {body['examples']} examples, {body['steps']} steps", flush=True)
    if a.no_wait:
        return 0
    last = None
    while True:
        code, status = request(base + "/train/status", None, a.api_key)
        if code != 200:
            print(f"livetrain train: status HTTP {code}: {status}", file=sys.stderr)
            return 1
        info = next((j for j in status["jobs"] if j["id"] == jid), None)
        if info is None:
            print(f"livetrain train: job {jid} is no longer listed", file=sys.stderr)
            return 1
        line = (f"{info['state']:8} step {info['step']}/{info['steps']}  loss "
                f"{info['loss'] if info['loss'] is None else round(info['loss'], 4)}  "
                f"{status['tokens_per_s']} tok/s  weight version {status['weight_version']}")
        if line != last:
            print(line, flush=True)
            last = line
        if info["state"] in ("done", "failed"):
            if info["error"]:
                print(f"livetrain train: job failed: {info['error']}", file=sys.stderr)
            return 0 if info["state"] == "done" else 1
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
