"""Weights in tests: copies, bit-exact comparison, sparse random updates (as an optimizer step makes), and
a model directory's tensors read by the reference safetensors library."""

from pathlib import Path

import torch
from safetensors.torch import load_file


def snapshot(tensors: dict) -> dict:
    return {k: v.clone() for k, v in tensors.items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def perturb(tensors: dict, fraction: float, seed: int) -> None:
    """Changes about ``fraction`` of every tensor's elements, in place."""
    g = torch.Generator().manual_seed(seed)
    for t in tensors.values():
        mask = torch.rand(t.shape, generator=g) < fraction
        t[mask] = (t[mask].float() * 1.01 + 1e-3).to(t.dtype)


def load_dir(path: Path) -> dict:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def state_steps(path) -> dict[str, float]:
    """Each parameter's optimizer step count in an optimizer-state file (what a save at any TP size records)."""
    return {n: t.float().max().item() for n, t in load_file(str(path)).items() if n.endswith(".step")}
