"""The measurements behind livetrain's learning defaults (docs/learning.md): the trainer in process, no
HTTP, on the default model, teaching bench/learning_data.json's facts with one setting after another
(learning rate × warm-up × replay), each from the same starting weights, and asking the questions at
several points of each run: when every example's loss first falls below each of ``--until`` (one job per
threshold, continuing from the previous one, the retention answers of the starting weights throughout).
Prints one row per (setting, threshold): steps so far, trained / reworded recall, general answers kept,
the retention loss's rise on the guard's held-out prompts, seconds.

usage: python bench/learning_sweep.py [--facts 32] [--lr 1e-4,5e-5] [--warmup 0] [--replay 0,2]
           [--until 1,0.3,0.1,0.03] [--max-steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import torch  # noqa: E402


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


class InProcess:
    """The reference engine's weights exported into shared memory and a Trainer attached to them, in this
    process; ``reset`` puts the starting weights back and forgets the optimizer state."""

    def __init__(self, dtype: str, device: str, batch_size: int):
        from livetrain import default_model
        from livetrain.engines.reference import Engine
        from livetrain.trainer import options
        from livetrain.trainer.service import Trainer

        self.dir = tempfile.mkdtemp(prefix="livetrain-sweep-")
        model_dir = default_model.ensure(dtype=dtype)
        manifest = os.path.join(self.dir, "engine.manifest.json")
        self.child = None
        if device.startswith("cuda"):
            # CUDA IPC handles cannot be opened by the process that exported them: the engine's weights live
            # in a child process (loaded and exported only, no HTTP), as in `livetrain serve`.
            import subprocess

            cmd = [sys.executable, os.path.abspath(__file__), "--engine-child", model_dir, manifest, device, dtype]
            self.child = subprocess.Popen(cmd, stdin=subprocess.PIPE)
            deadline = time.monotonic() + 600
            while not os.path.exists(manifest):
                if self.child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"learning_sweep: the engine child exited ({self.child.poll()}) or timed out")
                time.sleep(0.2)
        else:
            self.engine = Engine(model_dir, manifest, device, dtype, store=False)
        settings = options.parse(
            ["--no-store", "--state-dir", os.path.join(self.dir, "state"), "--batch-size", str(batch_size)]
        )
        self.trainer = Trainer(manifest, model_dir, settings)
        self.start = {n: w.detach().clone() for n, w in self.trainer.weights.items()}
        self.version0 = self.trainer.weight_version

    def reset(self) -> None:
        with torch.no_grad():
            for n, w in self.trainer.weights.items():
                w.copy_(self.start[n])
        self.trainer.opt.reset_state()
        self.trainer.weight_version = self.version0  # the retention answers made at it stay valid

    def job(self, body: dict) -> dict:
        """Runs one /train job to its end on this thread; its /train/status entry."""
        reply = self.trainer.submit(body)
        assert reply.code == 202, reply.body
        jid, job = self.trainer.queue.get_nowait()
        self.trainer.run_job(jid, job)
        return self.trainer.jobs[jid]

    def ask(self, questions: list[str], max_tokens: int) -> list[str]:
        from livetrain.trainer import guard

        t = self.trainer
        ids = [guard.prompt_ids(t.tokenizer, [{"role": "user", "content": q}]) for q in questions]
        out = guard.greedy(t.model, ids, max_tokens, guard.stop_ids(t.tokenizer, t.model), t.pad, batch=32)
        return [t.tokenizer.decode(a, skip_special_tokens=True) for a in out]

    def retention_loss(self) -> float:
        t = self.trainer
        held = t._fit(t.retention.held_out())
        xs = t.example_losses(held)
        return sum(xs) / len(xs)


def engine_child(model_dir: str, manifest: str, device: str, dtype: str) -> int:
    """The engine's weights on the GPU, exported for the trainer in the parent; lives until stdin closes."""
    from livetrain.engines.reference import Engine

    engine = Engine(model_dir, manifest, device, dtype, store=False)
    sys.stdin.read()
    engine.exported.close()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-child"]:
        return engine_child(*argv[1:5])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=32, help="the first N facts of bench/learning_data.json")
    p.add_argument("--lr", type=floats, default=[1e-4])
    p.add_argument("--warmup", type=ints, default=[0])
    p.add_argument("--replay", type=ints, default=[0, 2])
    p.add_argument("--until", type=floats, default=[1.0, 0.3, 0.1, 0.03], help="thresholds, decreasing")
    p.add_argument("--max-steps", type=int, default=200, help="budget of each threshold's job")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24, help="tokens of each answer asked")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="append each row as a JSON line to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    facts, general = lq.load(facts=a.facts)
    body = {"examples": lq.examples(facts), "guard": False}
    asked = lq.questions(facts, general, both_phrasings=False)
    t0 = time.perf_counter()
    ip = InProcess(a.dtype, a.device, a.batch_size)
    print(f"# loaded in {time.perf_counter() - t0:.0f} s; {len(body['examples'])} examples", flush=True)
    t0 = time.perf_counter()
    ip.trainer.retention.refresh(ip.trainer.model, ip.trainer.weight_version, ip.trainer.pad)
    print(f"# retention answers: {len(ip.trainer.retention.prompts)} in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    base = lq.score(asked, ip.ask([q for _, q, _ in asked], a.max_tokens), facts, general)
    r0 = ip.retention_loss()
    print(
        f"# before: trained {sum(base['trained'])}/{len(facts)}, reworded {sum(base['reworded'])}/{len(facts)}, "
        f"general {sum(base['general'])}/{len(general)} right; retention loss {r0:.4f}; "
        f"asked in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    header = "| lr | warmup | replay | until | steps | trained | reworded | general kept | retention rise | train s |"
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|", flush=True)
    for lr in a.lr:
        for warmup in a.warmup:
            for replay in a.replay:
                ip.reset()
                steps, seconds = 0, 0.0
                for k, until in enumerate(a.until):
                    job = {
                        **body,
                        "lr": lr,
                        "warmup": warmup if k == 0 else 0,
                        "replay": replay,
                        "until_loss": until,
                        "max_steps": a.max_steps,
                    }
                    t0 = time.perf_counter()
                    info = ip.job(job)
                    seconds += time.perf_counter() - t0
                    steps += info["step"]
                    got = lq.score(asked, ip.ask([q for _, q, _ in asked], a.max_tokens), facts, general)
                    kept, right = lq.kept(base["general"], got["general"])
                    rise = ip.retention_loss() - r0
                    row = {
                        "lr": lr,
                        "warmup": warmup,
                        "replay": replay,
                        "until": until,
                        "reason": info["stop_reason"],
                        "steps": steps,
                        "trained": sum(got["trained"]),
                        "reworded": sum(got["reworded"]),
                        "facts": len(facts),
                        "general_kept": kept,
                        "general_right_before": right,
                        "retention_rise": round(rise, 4),
                        "loss_max": info["losses"]["max_after"],
                        "train_s": round(seconds, 1),
                    }
                    print(
                        f"| {lr:g} | {warmup} | {replay} | {until:g}{'' if row['reason'] == 'until_loss' else ' (budget)'} "
                        f"| {steps} | {row['trained']}/{len(facts)} | {row['reworded']}/{len(facts)} "
                        f"| {kept}/{right} | {rise:+.4f} | {seconds:.0f} |",
                        flush=True,
                    )
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    if info["stop_reason"] not in ("until_loss",):
                        break
    return 0


if __name__ == "__main__":
    sys.exit(main())
