"""Weight-space interpolation after a job (issue #14: "general kept" >= 95%, "reworded" >= 80%).

WiSE-FT (Wortsman et al. 2022) / task vectors (Ilharco et al. 2023): after a job, w = w_before + a * (w_after -
w_before) with a < 1 often keeps most of what the job taught and gives back some of what it lost. On the default
model, in process (bench/learning_sweep.py's InProcess): one job from the starting weights, then for each ``a``
of ``--alphas`` the weights set to that mix and asked everything (each trained phrasing, the reworded question
per fact, the general questions), and each training example's loss (the mean cross-entropy over its trained
tokens, as ``until_loss`` reads it) measured teacher-forced. A measurement, not a feature.

``--noise R,...`` instead: no job, the starting weights moved by a random direction of relative size R in each
tensor, the general answers kept (the floor under "general kept" for a move of that size).

usage: python bench/learning_interp.py [--facts 4] [--alphas 1,0.8,0.6,0.5] [--job JSON] [--json FILE]
       python bench/learning_interp.py --noise 1e-4,3e-4,1e-3 [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import learning_questions as lq  # noqa: E402
import learning_sweep as ls  # noqa: E402
import torch  # noqa: E402


def noise(ip: ls.InProcess, a, asked, before, facts, general) -> int:
    """The floor under "general kept": the starting weights moved by a random direction of each relative size, in
    each tensor (Gaussian, scaled to R × the tensor's norm), and the general questions asked again."""
    rows = []
    print("| relative move R | seed | general kept | lost |")
    print("|---|---|---|---|")
    for r in [float(x) for x in a.noise.split(",")]:
        for seed in range(a.seeds):
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n, w in ip.trainer.weights.items():
                    w0 = ip.start[n].float()
                    d = torch.randn(w0.shape, generator=gen).to(w0.device)  # the same draws on any device
                    w.copy_(w0 + d * (r * w0.norm() / d.norm().clamp_min(1e-30)))
            got = lq.score(asked, ip.ask([q for _, q, _ in asked], a.max_tokens), facts, general)
            kept, right = lq.kept(before["general"], got["general"])
            lost = lq.lost(before["general"], got["general"])
            rows.append({"r": r, "seed": seed, "kept": kept, "right_before": right, "lost": lost})
            print(f"| {r:g} | {seed} | {kept}/{right} | {lost} |", flush=True)
    ip.reset()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"noise": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=4)
    p.add_argument("--alphas", default="1,0.8,0.6,0.5")
    p.add_argument("--job", default="{}", help="the job's options over examples (JSON; {}: the defaults)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--retention", default="", help="all or core: the built-in retention prompts (default: the trainer's)"
    )
    p.add_argument(
        "--noise",
        default="",
        help="R,R,...: no job; instead the weights moved by a random direction of relative size R in each tensor "
        "(|delta| = R |w|), --seeds directions each: how many general answers any small move costs",
    )
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="write everything here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    facts, general = lq.load(facts=a.facts)
    examples = lq.examples(facts)
    asked = lq.questions(facts, general)
    t0 = time.perf_counter()
    ip = ls.InProcess(a.dtype, a.device, a.batch_size)
    t = ip.trainer
    print(f"# loaded in {time.perf_counter() - t0:.0f} s; {len(examples)} examples", flush=True)
    if a.retention:
        ip.retention(a.retention)
    before = lq.score(asked, ip.ask([q for _, q, _ in asked], a.max_tokens), facts, general)
    print(
        f"# before: trained {sum(before['trained'])}/{len(before['trained'])}, reworded "
        f"{sum(before['reworded'])}/{len(facts)}, general {sum(before['general'])}/{len(general)} right",
        flush=True,
    )
    if a.noise:
        return noise(ip, a, asked, before, facts, general)
    body = {"examples": examples, **json.loads(a.job)}
    ip.reset()
    if body.get("guard", True):
        ip.refresh()
    t0 = time.perf_counter()
    info = ip.job(body)
    job_s = time.perf_counter() - t0
    g = info.get("guard") or {}
    print(
        f"# job {a.job}: {info['step']} steps ({info['stop_reason']}), {job_s:.0f} s, KL {g.get('kl')}, loss "
        f"{info['loss_before']} -> {info['loss_after']}",
        flush=True,
    )
    trained = {n: w.detach().clone() for n, w in t.weights.items()}
    rows = []
    print("| a | trained | reworded | general kept | lost | examples' loss max / mean | under until_loss | KL | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    until = info.get("until_loss") or 0.1
    for alpha in [float(x) for x in a.alphas.split(",")]:
        row = ip.mixed(trained, alpha, examples, asked, before, facts, general, a.max_tokens, until)
        rows.append(row)
        print(
            f"| {alpha} | {row['trained']}/{row['trained_asked']} | {row['reworded']}/{len(facts)} "
            f"| {row['general_kept']}/{row['general_right_before']} | {sorted(row['general_lost'])} "
            f"| {row['loss_max']} / {row['loss_mean']} | {row['below_until']}/{row['examples']} | {row['kl']} "
            f"| {row['seconds']} |",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "facts": a.facts,
                    "job": a.job,
                    "steps": info["step"],
                    "stop_reason": info["stop_reason"],
                    "kl": g.get("kl"),
                    "job_s": round(job_s, 1),
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
