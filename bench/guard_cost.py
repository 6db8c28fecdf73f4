"""What the forgetting guard adds to a job's wall time (issue #14's target: at most 30% of the job's), with its
measures of the starting weights made on the job's path (``--guard-prepare job``, the trainer before) or
between jobs (``--guard-prepare idle``, the default): the trainer in process on the default model, the same
guarded job (bench/learning_data.json's first ``--facts`` facts, ``--steps`` fixed steps, the learning
defaults otherwise: replay 2, anchor 1) from the same starting weights, the ways interleaved round by round
so that a busy machine slows each alike:

- ``job``: the guard makes every measure at the job's start (the retention answers, the held-out reference
  distributions and answers, the anchor's reference) and measures the KL and the answers kept after it;
- ``idle``: the training thread made those measures while it had nothing queued (``Trainer._idle``, timed
  here as "off the path"), the job reuses them; after it the KL decides, and the answers kept are measured
  at the next idle moment (timed as off the path too);
- ``plain``: the same steps without the guard (no replay, no anchor, no measures): the training alone.

Before each guarded job the weight version is moved on, as a previous job would have: no measure of an
earlier version is reused. Prints a markdown table of the median seconds: the job's wall time, the guard's
time on its path (``/train/status`` ``guard.seconds``) and its share of the job, the guard's time off the
path, and the job's time against ``plain``'s (the anchor's extra training included).

usage: python bench/guard_cost.py [--facts 4] [--steps 2] [--rounds 2] [--threads 0] [--retention-prompts N]
           [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import torch  # noqa: E402
from learning_sweep import InProcess  # noqa: E402

WAYS = ("job", "idle", "plain")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=4, help="the first N facts (2 examples each) make the job")
    p.add_argument("--steps", type=int, default=2, help="fixed steps of each job")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--retention-prompts",
        type=int,
        default=0,
        help="the first N built-in alternating retention prompts only, without the replay-only ones (0: all of "
        "them; fewer measure faster on a busy CPU, and the guard's time scales with them)",
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    facts, _ = lq.load(facts=a.facts)
    examples = lq.examples(facts)
    t0 = time.perf_counter()
    ip = InProcess(a.dtype, a.device, a.batch_size)
    t = ip.trainer
    if a.retention_prompts:
        t.retention.builtin = t.retention.builtin[: a.retention_prompts]
        t.retention.builtin_replay = []
    print(
        f"# loaded in {time.perf_counter() - t0:.0f} s; {len(examples)} examples, {a.steps} steps per job, "
        f"{len(t.retention.prompts)} retention prompts",
        flush=True,
    )
    rows: dict[str, list[dict]] = {w: [] for w in WAYS}
    fresh = t.weight_version + 1000  # weight versions no measure was made at
    for r in range(a.rounds):
        for way in WAYS:
            ip.reset()
            # A version above every one used so far (each job's steps made new ones): the weights "changed"
            # since any measure (a previous job), and no measure of trained weights is taken for these.
            fresh = max(fresh, t.weight_version) + 1
            t.weight_version = fresh
            t.settings.guard_prepare = "idle" if way == "idle" else "job"
            off = 0.0
            if way == "idle":
                t0 = time.perf_counter()
                while t.status()["guard"]["prepared"]["made"] != ["kept", "answers", "reference", "anchor"]:
                    t._idle()
                off += time.perf_counter() - t0
            body = {"examples": examples, "steps": a.steps, "guard": way != "plain"}
            if way == "plain":
                body["replay"] = 0
            info = ip.job(body)
            if way == "idle":
                t0 = time.perf_counter()
                t._idle()  # the answers kept, measured after the verdict
                off += time.perf_counter() - t0
            g = t.jobs[info["id"]]["guard"] or {}
            row = {
                "job_s": info["seconds"],
                "guard_s": g.get("seconds") or 0.0,
                "off_s": off,
                "kl": g.get("kl"),
                "kept": g.get("answers_kept"),
                "compared": g.get("answers_compared"),
                "when": g.get("answers_kept_when"),
            }
            rows[way].append(row)
            print(f"# round {r + 1} {way}: {row}", flush=True)

    def med(way: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[way])

    plain = med("plain", "job_s")
    print(
        "| guard measures made | job s | guard s on the job's path | guard / job | guard s off the path | job / plain |"
    )
    print("|---|---|---|---|---|---|")
    for way in WAYS:
        job_s, guard_s = med(way, "job_s"), med(way, "guard_s")
        print(
            f"| {'at the job (before)' if way == 'job' else 'between jobs (now)' if way == 'idle' else 'none (plain)'} "
            f"| {job_s:.1f} | {guard_s:.1f} | {guard_s / job_s:.0%} | {med(way, 'off_s'):.1f} | {job_s / plain:.2f}x |",
            flush=True,
        )
    same = all(x["kl"] == y["kl"] and x["kept"] == y["kept"] for x, y in zip(rows["job"], rows["idle"]))
    print(f"# the guard's measures (KL, answers kept) the same both ways: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
