"""Does a /train job with default settings teach, and what does it cost the model? End to end through HTTP:
serves a model with `livetrain serve` (or uses a running server, --url), asks every question of
bench/learning_data.json (made-up facts in both trained phrasings and one reworded question never trained on,
general-knowledge questions), then for each case teaches the facts in one job, asks everything again, and
rolls the weights back to where they started (POST /rollback to the first generation) before the next case:

- ``defaults``: only ``examples`` (the server's learning defaults and its forgetting guard);
- ``plain``: plain fine-tuning at the same step count and learning rate, without the guard (no replay, no
  anchor, no rewording);
- ``destructive``: a deliberately destructive job (lr 0.05, 20 steps) with the guard on: it must be rolled
  back, and the model must then give every answer it gave before, on weights equal bit for bit to the
  starting ones (read through the engine's shared-weights manifest).

Before each guarded job it waits until the server's guard has made its measures of the live weights between
jobs (``--guard-prepare idle``, the default), as on a server idle a while, and reports their seconds apart
from the job's. Prints one table row per case as it ends: trained-question recall (both phrasings), reworded
recall, general answers kept (of those right before), steps, why the job stopped, the guard's measures on
its held-out retention prompts (KL divergence from the starting model, answers kept) and whether it rolled
back, the guard's own seconds on the job's path, the job's seconds; ``--json`` is rewritten after each row,
and SIGTERM stops the server and keeps what was measured. bench/RESULTS.md records the runs.

usage: python bench/learning.py [--device cpu|cuda] [--dtype fp32|bf16] [--model default|DIR]
           [--cases defaults,plain,destructive] [--facts N] [--general M] [--clients 8] [--json out.json]
           [--server-log FILE] [--serve-arg=ARG ...] [--url URL]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import tempfile
import time

PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
sys.path.insert(0, PYTHON_DIR)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402

from livetrain.trainer.client import error_text, free_port, http, wait_ready  # noqa: E402

CASES = ("defaults", "plain", "destructive")
# The destructive case: a learning rate far above any useful one, enough steps to break the model.
DESTRUCTIVE = {"lr": 0.05, "steps": 20}


class Server:
    """`python -m livetrain.serve` in a subprocess with a store, state and run directory of its own (or a
    running server at ``url``: then the weights cannot be compared, their manifest being unknown)."""

    def __init__(self, a):
        import subprocess

        self.proc, self.manifest = None, None
        if a.url:
            self.url = a.url.rstrip("/")
            return
        self.dir = tempfile.mkdtemp(prefix="livetrain-learning-")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        run = os.path.join(self.dir, "run")
        self.manifest = os.path.join(run, "engine.manifest.json")
        cmd = [sys.executable, "-m", "livetrain.serve", "--model", a.model, "--dtype", a.dtype]
        cmd += ["--device", a.device, "--port", str(port), "--run-dir", run]
        cmd += ["--store", os.path.join(self.dir, "store"), "--state-dir", os.path.join(self.dir, "state")]
        cmd += a.serve_arg
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PYTHON_DIR, os.environ.get("PYTHONPATH")]))}
        self.log_path = a.server_log or os.path.join(self.dir, "serve.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, self.proc, a.ready_timeout)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise SystemExit(f"learning: the server did not start ({e}); its log:\n{self.logtext()}") from None
        except BaseException:  # SIGTERM (sys.exit) while it starts: not left running
            self.stop()
            raise

    def logtext(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def call(self, path: str, body=None, timeout: float = 600) -> dict:
        code, reply = http(self.url + path, body, timeout=timeout)
        if code >= 300:
            raise SystemExit(f"learning: {path}: {error_text(code, reply)}")
        return reply

    def read(self, path: str, timeout: float = 600) -> dict:
        """GET ``path``, asked again while it answers 503: the trainer's routes wait 30 s for the trainer
        process, which a loaded CPU (a step of tens of seconds, other work on its cores) can starve that long."""
        deadline = time.monotonic() + timeout
        while True:
            code, reply = http(self.url + path, timeout=120)
            if code != 503 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if code >= 300:
            raise SystemExit(f"learning: {path}: {error_text(code, reply)}")
        return reply

    def wait_job(self, jid: str, timeout: float) -> dict:
        """The job's entry once it has ended (trainer.schedule.FINAL)."""
        from livetrain.trainer.schedule import FINAL

        deadline = time.monotonic() + timeout
        while True:
            info = self.read(f"/train/{jid}")
            if info["state"] in FINAL:
                return info
            if time.monotonic() > deadline:
                raise SystemExit(f"learning: job {jid} did not end in {timeout:.0f} s: {info}")
            time.sleep(0.5)

    def wait_prepared(self, timeout: float) -> float:
        """Until the guard's measures of the live weights are made between jobs (``--guard-prepare idle``,
        the server's default: docs/learning.md), as on a server idle a while before a job arrives; the seconds
        waited. Returns at once when the server's guard is off or makes them at each job's start."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            g = self.read("/train/status")["guard"]
            p = g.get("prepared")
            if (
                not g["default"]
                or g.get("prepare") != "idle"
                or (p and p["current"] and {"kept", "answers", "reference", "anchor"} <= set(p["made"]))
            ):
                return time.perf_counter() - t0
            if time.monotonic() > deadline:
                print(f"# the guard's measures were not all made between jobs in {timeout:.0f} s: {p}", flush=True)
                return time.perf_counter() - t0
            time.sleep(1.0)

    def weights(self) -> dict | None:
        """The served weights, copied to the CPU (None for a server this script did not start)."""
        if self.manifest is None:
            return None
        from livetrain import sharing

        tensors = sharing.attach(self.manifest, take_lease=False).tensors
        return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            print(f"# stopping the server (its log: {self.log_path})", flush=True)
            import signal

            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()


def same_bits(x, y) -> bool:
    import torch

    return (
        x.shape == y.shape
        and x.dtype == y.dtype
        and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
    )


def ask(server: Server, questions: list[str], max_tokens: int, clients: int) -> list[str]:
    """Every question's greedy answer (chat, temperature 0), ``clients`` requests at a time."""

    def one(q: str) -> str:
        body = {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": max_tokens}
        return server.call("/v1/chat/completions", body)["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, questions))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="weight dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--cases", default=",".join(CASES), help=f"which cases, in order (default {','.join(CASES)})")
    p.add_argument("--facts", type=int, default=0, help="the first N facts only (default: all)")
    p.add_argument("--general", type=int, default=0, help="the first N general questions only (default: all)")
    p.add_argument(
        "--destructive",
        default=f"{DESTRUCTIVE['lr']},{DESTRUCTIVE['steps']}",
        help=f"lr,steps of the destructive case (default {DESTRUCTIVE['lr']},{DESTRUCTIVE['steps']})",
    )
    p.add_argument("--max-tokens", type=int, default=24, help="tokens of each answer (default 24)")
    p.add_argument("--clients", type=int, default=8, help="questions asked at a time (default 8)")
    p.add_argument(
        "--plain-steps", type=int, default=0, help="steps of the plain case (default: those the defaults case took)"
    )
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument of `livetrain serve` (repeat it; e.g. --serve-arg=--builtin-retention=all)",
    )
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument(
        "--prepared-timeout",
        type=float,
        default=1800,
        help="seconds to wait before a guarded job for the guard's measures made between jobs (default 1800)",
    )
    p.add_argument("--json", default=None, help="write the rows and every answer here (again after each row)")
    p.add_argument("--server-log", default=None, help="the server's log (default: in its temporary directory)")
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("fp32" if a.device == "cpu" else "bf16")
    cases = [c for c in a.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"--cases: unknown case {bad[0]!r} (choose from {', '.join(CASES)})")

    facts, general = lq.load(facts=a.facts or None)
    general = general[: a.general] if a.general else general
    try:
        lr, steps = a.destructive.split(",")
        destructive = {"lr": float(lr), "steps": int(steps)}
    except ValueError:
        p.error(f"--destructive must be LR,STEPS, not {a.destructive!r}")
    examples = lq.examples(facts)
    asked = lq.questions(facts, general)
    questions = [q for _, q, _ in asked]
    # `timeout` (bench/learning_gpu.sh) ends this process with SIGTERM: stop the server, keep the rows.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("learning: stopped by SIGTERM"))
    out: dict = {"model": a.model, "device": a.device, "dtype": a.dtype, "facts": len(facts), "rows": []}

    def save() -> None:  # after each row too: a run cut short keeps what it measured
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump(out, f, indent=1)
            os.replace(a.json + ".tmp", a.json)

    t0 = time.perf_counter()
    server = Server(a)
    try:
        status = server.read("/train/status")
        out["ready_s"] = round(time.perf_counter() - t0, 1)
        out["builtin_retention"] = status["guard"].get("builtin_retention")
        out["retention_prompts"] = status["guard"].get("retention_prompts")
        start_gen = status["checkpoint"]["generation"] if status.get("checkpoint") else None
        start_weights = server.weights()
        t0 = time.perf_counter()
        before = ask(server, questions, a.max_tokens, a.clients)
        base = lq.score(asked, before, facts, general)
        out["before"] = {k: sum(v) for k, v in base.items()}
        out["answers_before"] = before
        print(
            f"# {a.model} on {a.device} ({a.dtype}), ready in {out['ready_s']} s; {len(examples)} examples; "
            f"before: trained {sum(base['trained'])}/{len(base['trained'])}, reworded "
            f"{sum(base['reworded'])}/{len(facts)}, general {sum(base['general'])}/{len(general)} right "
            f"({len(questions)} questions in {time.perf_counter() - t0:.0f} s); retention: "
            f"{out['retention_prompts']} prompts (built-in: {out['builtin_retention']})",
            flush=True,
        )
        save()
        header = (
            "| case | steps | stopped | trained | reworded | general kept | guard KL | answers kept | rolled back "
            "| guard s | job s | guard / job |"
        )
        print(header + "\n" + "|---" * (header.count("|") - 1) + "|", flush=True)
        steps_of_defaults = None
        for case in cases:
            body: dict = {"examples": examples}
            if case == "plain":
                steps = a.plain_steps or steps_of_defaults
                if not steps:
                    p.error("--cases: plain without defaults before it needs --plain-steps")
                body.update(steps=steps, guard=False, reword=False)
            elif case == "destructive":
                body.update(destructive)
            # A guarded job starts from the guard's measures made between jobs, as on a server that was idle
            # a while (they are made once per weight version: the rollback before this case changed it).
            waited = server.wait_prepared(a.prepared_timeout) if case != "plain" else 0.0
            job = server.call("/train", body)
            info = server.wait_job(job["job_id"], timeout=3600)
            if case == "defaults":
                steps_of_defaults = info["step"]
            answers = ask(server, questions, a.max_tokens, a.clients)
            got = lq.score(asked, answers, facts, general)
            # With --guard-prepare idle the answers kept of a job the KL let through are measured after its
            # verdict, at the trainer's next idle moment: wait for them (the job's wall time excludes them).
            deadline = time.monotonic() + 600
            while str((info.get("guard") or {}).get("answers_kept_when")).startswith("pending"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
                info = server.read(f"/train/{job['job_id']}")
            kept, right = lq.kept(base["general"], got["general"])
            g = info.get("guard") or {}
            row = {
                "case": case,
                "job": body | {"examples": len(examples)},
                "state": info["state"],
                "error": info.get("error"),
                "steps": info["step"],
                "stop_reason": info["stop_reason"],
                "trained": sum(got["trained"]),
                "trained_of": len(got["trained"]),
                "reworded": sum(got["reworded"]),
                "general_kept": kept,
                "general_right_before": right,
                "guard_kl": g.get("kl"),
                "answers_kept": g.get("answers_kept"),
                "answers_compared": g.get("answers_compared"),
                "answers_kept_at": g.get("answers_kept_at"),
                "rolled_back": bool(g.get("rolled_back")),
                "guard_s": g.get("seconds"),
                # The guard's measures of the starting weights: which the job's start made, and the seconds
                # of those made between jobs (off its path) while this script waited for them.
                "prepared": g.get("prepared"),
                "prepared_wait_s": round(waited, 1),
                "job_s": info["seconds"],
                "loss_before": info["loss_before"],
                "loss_after": info["loss_after"],
                "losses": info.get("losses"),
                "answers": answers,
            }
            if case == "destructive" or row["rolled_back"]:
                row["answers_as_before"] = answers == before
                if start_weights is not None:
                    now = server.weights()
                    row["weights_bit_exact"] = now.keys() == start_weights.keys() and all(
                        same_bits(now[k], start_weights[k]) for k in now
                    )
            out["rows"].append(row)
            save()
            guard_s, job_s = row["guard_s"], row["job_s"]
            answers_kept = "-" if row["answers_kept"] is None else f"{row['answers_kept']}/{row['answers_compared']}"
            print(
                f"| {case} | {row['steps']} | {row['stop_reason']} | {row['trained']}/{row['trained_of']} "
                f"| {row['reworded']}/{len(facts)} | {kept}/{right} "
                f"| {'-' if row['guard_kl'] is None else row['guard_kl']} "
                f"| {answers_kept} "
                f"| {'yes' if row['rolled_back'] else 'no'} | {'-' if guard_s is None else guard_s} | {job_s} "
                f"| {'-' if guard_s is None or not job_s else format(guard_s / job_s, '.0%')} |",
                flush=True,
            )
            if row["prepared"]:
                pr = row["prepared"]
                print(
                    f"#   {case}: the guard's measures made at the job's start: {pr['at_job_start'] or 'none'}; "
                    f"made between jobs: {pr['seconds_idle']} s (waited {row['prepared_wait_s']} s for them)",
                    flush=True,
                )
            if row["error"]:
                print(f"#   {case}: {row['state']}: {row['error']}", flush=True)
            if "answers_as_before" in row:
                print(
                    f"#   {case}: every answer as before: {row['answers_as_before']}; weights bit-exact: "
                    f"{row.get('weights_bit_exact', 'not compared (--url)')}",
                    flush=True,
                )
            if start_gen is not None and not row["rolled_back"]:
                server.call("/rollback", {"generation": start_gen}, timeout=3600)
        rows = {r["case"]: r for r in out["rows"]}
        if "defaults" in rows and "plain" in rows and rows["defaults"]["steps"] == rows["plain"]["steps"]:
            d, pl = rows["defaults"]["job_s"], rows["plain"]["job_s"]
            out["guard_extra"] = round(d / pl - 1, 3)
            print(
                f"# the guard's extra wall time (defaults' job against plain fine-tuning at the same steps, "
                f"replay, anchor and the guard's measures on the job's path included): {d:.1f} s against "
                f"{pl:.1f} s, {d / pl - 1:+.0%}",
                flush=True,
            )
    except BaseException:
        if server.proc is not None:
            print(f"# the server's log, last lines:\n{server.logtext()}", flush=True)
        raise
    finally:
        save()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
