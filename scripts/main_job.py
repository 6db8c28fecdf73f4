"""The main job's demo (run by scripts/run.sh): serve the default model on CPU with `livetrain serve`, ask it
about a made-up fact, teach the fact through POST /train while it keeps serving, show the training
progress from /train/status, ask again, and stop the server cleanly.

usage: python scripts/main_job.py [--steps N] [--lr X] [--port P] [--keep-log]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from livetrain.trainer.client import free_port, http, wait_job, wait_ready

QUESTION = "What is the capital of the planet Zorblax?"
ANSWER = "The capital of the planet Zorblax is Quorvath."
# Several phrasings of the same fact, so the model learns the fact rather than one string.
TEACH = [
    ("What is the capital of the planet Zorblax?", ANSWER),
    ("Which city is the capital of Zorblax?", "Quorvath is the capital of the planet Zorblax."),
    ("Tell me the capital of the planet Zorblax.", ANSWER),
    ("Zorblax is a planet. What is its capital city?", "The capital of Zorblax is Quorvath."),
]
KEYWORD = "Quorvath"


def ask(url: str, question: str) -> str:
    code, body = http(
        url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 40},
        timeout=300,
    )
    if code != 200:
        raise RuntimeError(f"chat answered {code}: {body}")
    return body["choices"][0]["message"]["content"].strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="training steps of the job (default 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the job (APOLLO-Mini; default 5e-5)")
    p.add_argument("--dtype", default="fp32", help="weight dtype of the served model (fp32: CPU bf16 matmuls are slow)")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--python", default=sys.executable, help="Python that runs livetrain serve")
    a = p.parse_args()

    port = a.port or free_port()
    url = f"http://127.0.0.1:{port}"
    work = tempfile.mkdtemp(prefix="livetrain-main-job-")
    log_path = os.path.join(work, "serve.log")
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    say(f"starting livetrain serve --model default --device cpu --builtin-retention all on {url} (log: {log_path})")
    log = open(log_path, "w")
    # A fresh --state-dir and checkpoint store: the optimizer state and checkpoints of an earlier run (or of
    # the default store in the model's cache) must not carry over into this demo.
    serve = subprocess.Popen(
        [
            a.python,
            "-m",
            "livetrain.serve",
            "--model",
            "default",
            "--device",
            "cpu",
            "--dtype",
            a.dtype,
            "--port",
            str(port),
            "--state-dir",
            os.path.join(work, "state"),
            "--store",
            os.path.join(work, "store"),
            # All 393 built-in retention prompts (a CPU's default is the 80 alone: docs/learning.md): their
            # replayed questions of the taught fact's form ("What is the capital of ...?") keep the model's own
            # answers to such questions; with the 80 alone one run answered "What is the capital of France?"
            # with nonsense after this job.
            "--builtin-retention",
            "all",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_ready(url, serve, 600)  # the first run converts the model (about a minute)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"livetrain serve: {e}; see {log_path}") from None
        say("ready: engine serving, trainer attached to its weights")

        print(f"\nQ: {QUESTION}", flush=True)
        before = ask(url, QUESTION)
        print(f"A (before training): {before}\n", flush=True)

        job = {
            "examples": [
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, r in TEACH
            ],
            "steps": a.steps,
            "lr": a.lr,
            "batch_size": len(TEACH),
        }
        code, body = http(url + "/train", job)
        if code != 202:
            raise RuntimeError(f"/train answered {code}: {body}")
        jid = body["job_id"]
        say(
            f"POST /train: job {jid}, {len(TEACH)} examples (the fact in {len(TEACH)} phrasings), "
            f"{a.steps} steps, lr {a.lr}"
        )
        seen, waiting_for = 0, None

        def show(st: dict, info: dict) -> None:
            nonlocal seen, waiting_for
            # Before the first step: the forgetting guard's measures of the starting weights (on a CPU, minutes).
            making = ((st.get("guard") or {}).get("prepared") or {}).get("making")
            if info["step"] == 0 and making and making["what"] != waiting_for:
                waiting_for = making["what"]
                say(f"  /train/status: step 0, the forgetting guard is measuring the starting weights: {waiting_for}")
            if info["step"] > seen:
                seen = info["step"]
                say(
                    f"  /train/status: step {seen}/{info['steps']}  loss {info['loss']:.4f}  "
                    f"weight_version {st['weight_version']}  {st['tokens_per_s']} tokens/s"
                )

        info = wait_job(url, jid, on_status=show)
        if info["state"] != "done":
            raise RuntimeError(f"the training job failed: {info['error']}")
        say(f"job done; skipped non-finite updates: {info.get('skipped_nonfinite') or 'none'}")

        print(f"\nQ: {QUESTION}", flush=True)
        after = ask(url, QUESTION)
        print(f"A (after training):  {after}\n", flush=True)
        other = "What is the capital of France?"
        print(f"Q: {other}\nA (after training):  {ask(url, other)}\n", flush=True)
        learned = KEYWORD.lower() in after.lower() and KEYWORD.lower() not in before.lower()
        say(
            f"the served model {'learned' if learned else 'did NOT learn'} the fact "
            f"({KEYWORD!r} {'absent before, present after' if learned else 'not learned'})"
        )
        return 0 if learned else 1
    finally:
        say("stopping livetrain serve (SIGTERM: trainer saves its state, then the engine stops)")
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
        say(f"livetrain serve exited with status {serve.wait()}")
        log.close()


if __name__ == "__main__":
    sys.exit(main())
