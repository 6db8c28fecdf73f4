"""Diagnoses a mismatch between the batched APOLLO-Mini step on CUDA (Apollo.step -> apollo_step_many_cuda)
and stepping each parameter alone (step_param -> apollo_step_cuda): the scenario of tests/python/
test_optim.py::test_cuda_batched_step_equals_one_by_one (test_optim.batched_and_one_by_one: 70 matrices, a
vector and a rank-4 matrix, three steps) under several launch shapes (tuning knobs) and repeats, so that a
mismatch shows whether it is deterministic, which stage it comes from (m/v: the moments; prev_norm/step: the
tail; weights alone: the update's rounding or scalars) and which knob it follows.

    python scripts/optim_batch_diag.py [--repeats N]   # prints a table; also writes $OUT/optim-batch-diag.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))  # the test's scenario

from livetrain import _core  # noqa: E402

from test_optim import batched_and_one_by_one  # noqa: E402

# (label, knobs): the default launch shapes and the knobs that change how the batch or the update runs.
CONFIGS = [
    ("defaults", {}),
    ("batch=1", {"apollo.batch": 1}),
    ("streams=2", {"apollo.streams": 2}),
    ("update_fast_round=0", {"apollo.update_fast_round": 0}),
    ("split_projection=0", {"apollo.split_projection": 0}),
]


def run_once() -> list[dict]:
    """One run of the test's scenario; per parameter, where the batched and one-by-one results differ."""
    first_step: dict[int, int] = {}

    def record(step, pa, pb):
        for i, (x, y) in enumerate(zip(pa, pb)):
            if i not in first_step and not torch.equal(x.detach(), y.detach()):
                first_step[i] = step

    oa, ob, pa, pb = batched_and_one_by_one(on_step=record)
    rows = []
    for i, (x, y) in enumerate(zip(pa, pb)):
        xd, yd = x.detach(), y.detach()
        states = [
            k
            for k in ("m", "v", "prev_norm", "step")
            if k in oa.state[x] and not torch.equal(oa.state[x][k], ob.state[y][k])
        ]
        if torch.equal(xd, yd) and not states:
            continue
        diff = xd != yd
        if xd.dtype == torch.bfloat16:  # distance in bf16 units in the last place
            ulps = (
                (xd.contiguous().view(torch.int16).int() - yd.contiguous().view(torch.int16).int()).abs().max().item()
            )
        else:
            ulps = (
                (xd.contiguous().view(torch.int32).long() - yd.contiguous().view(torch.int32).long()).abs().max().item()
            )
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
    lines.append(
        f"{'config':<20} {'run':>3} {'idx':>4} {'shape':<12} {'dtype':<9} {'contig':<6} {'elems':>7} "
        f"{'max_ulps':>8} {'first_at':<12} {'step':>4} states"
    )
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
