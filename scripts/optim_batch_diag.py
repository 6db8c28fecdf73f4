"""Diagnoses a mismatch between the batched APOLLO-Mini step on CUDA (Apollo.step -> apollo_step_many_cuda)
and stepping each parameter alone (step_param -> apollo_step_cuda), as tests/python/test_optim.py::
test_cuda_batched_step_equals_one_by_one checks it: the same 70 matrices, vector and rank-4 matrix, three
steps, under several launch shapes (tuning knobs) and repeats, so that a mismatch shows whether it is
deterministic, which stage it comes from (m/v: the moments; prev_norm/step: the tail; weights alone: the
update's rounding or scalars) and which knob it follows.

    python scripts/optim_batch_diag.py [--repeats N]   # prints a table; also writes $OUT/optim-batch-diag.txt
"""

from __future__ import annotations

import argparse
import os

import torch

from livetrain import _core
from livetrain.optim import ApolloMini

SHAPES = [(257, 129), (129, 257), (1, 1000), (1000, 1), (64, 64), (4096, 96), (96, 4096), (300, 1031)]

# (label, knobs): the default launch shapes and the knobs that change how the batch or the update runs.
CONFIGS = [
    ("defaults", {}),
    ("batch=1", {"apollo.batch": 1}),
    ("streams=2", {"apollo.streams": 2}),
    ("update_unroll=2", {"apollo.update_unroll": 2}),
    ("update_unroll=4", {"apollo.update_unroll": 4}),
    ("split_projection=0", {"apollo.split_projection": 0}),
]


def make_params(gen: torch.Generator) -> list[torch.nn.Parameter]:
    """The test's 70 matrices: tall, wide, odd, strided (misaligned views), bf16 and fp32 mixed."""
    ps = []
    for i in range(70):
        r, c = SHAPES[i % len(SHAPES)]
        dt = torch.bfloat16 if i % 3 else torch.float32
        if i % 5 == 0 and c > 8:
            base = torch.randn(r, c + 8, generator=gen).to(dt).cuda()
            ps.append(torch.nn.Parameter(base[:, 3 : 3 + c]))
        else:
            ps.append(torch.nn.Parameter(torch.randn(r, c, generator=gen).to(dt).cuda()))
    return ps


def run_once() -> list[dict]:
    """One run of the test's scenario; per parameter, where the batched and one-by-one results differ."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    a = make_params(gen)
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    vec_a = torch.nn.Parameter(torch.randn(33).cuda())
    vec_b = torch.nn.Parameter(vec_a.detach().clone())
    r4_a = torch.nn.Parameter(torch.randn(80, 40).cuda())
    r4_b = torch.nn.Parameter(r4_a.detach().clone())
    groups = lambda ps, v, r4: [{"params": ps}, {"params": [v]}, {"params": [r4], "rank": 4, "scaling": "channel"}]  # noqa: E731
    oa = ApolloMini(groups(a, vec_a, r4_a), lr=1e-2, seed=2)
    ob = ApolloMini(groups(b, vec_b, r4_b), lr=1e-2, seed=2)
    pa, pb = a + [vec_a, r4_a], b + [vec_b, r4_b]
    first_step: dict[int, int] = {}
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype).cuda() for p in pa]
        for p, g in zip(pa, grads):
            p.grad = g
        for p, g in zip(pb, grads):
            p.grad = g.clone()
        if step == 1:
            a[7].grad[0, 0] = float("nan")
            b[7].grad[0, 0] = float("nan")
        oa.step()
        for p in pb:
            ob.step_param(p)
        torch.cuda.synchronize()
        for i, (x, y) in enumerate(zip(pa, pb)):
            if i not in first_step and not torch.equal(x.detach(), y.detach()):
                first_step[i] = step
    rows = []
    for i, (x, y) in enumerate(zip(pa, pb)):
        xd, yd = x.detach(), y.detach()
        states = [k for k in ("m", "v", "prev_norm", "step") if k in oa.state[x] and not torch.equal(oa.state[x][k], ob.state[y][k])]
        if torch.equal(xd, yd) and not states:
            continue
        diff = xd != yd
        if xd.dtype == torch.bfloat16:  # distance in bf16 units in the last place
            ulps = (xd.contiguous().view(torch.int16).int() - yd.contiguous().view(torch.int16).int()).abs().max().item()
        else:
            ulps = (xd.contiguous().view(torch.int32).long() - yd.contiguous().view(torch.int32).long()).abs().max().item()
        where = diff.nonzero()
        rows.append(
            {
                "index": i,
                "shape": tuple(x.shape),
                "dtype": str(x.dtype).replace("torch.", ""),
                "contiguous": x.is_contiguous(),
                "elements": int(diff.sum()),
                "max_ulps": int(ulps),
                "first_at": tuple(where[0].tolist()) if len(where) else None,
                "first_step": first_step.get(i),
                "states": ",".join(states) or "-",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="runs per launch shape (a race shows as varying rows)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("optim_batch_diag: needs a CUDA device")
    lines = [f"device: {torch.cuda.get_device_name()}  repeats: {args.repeats}", ""]
    lines.append(f"{'config':<20} {'run':>3} {'idx':>4} {'shape':<12} {'dtype':<9} {'contig':<6} {'elems':>7} "
                 f"{'max_ulps':>8} {'first_at':<12} {'step':>4} states")
    for label, knobs in CONFIGS:
        for run in range(args.repeats):
            _core.tuning_reset()
            try:
                for name, value in knobs.items():
                    _core.tuning_set(name, value)
                rows = run_once()
            finally:
                _core.tuning_reset()
            if not rows:
                lines.append(f"{label:<20} {run:>3}  all 72 parameters equal (weights, m, v, prev_norm, step)")
            for r in rows:
                lines.append(
                    f"{label:<20} {run:>3} {r['index']:>4} {str(r['shape']):<12} {r['dtype']:<9} {str(r['contiguous']):<6} "
                    f"{r['elements']:>7} {r['max_ulps']:>8} {str(r['first_at']):<12} {str(r['first_step']):>4} {r['states']}"
                )
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "optim-batch-diag.txt"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
