"""Attach time of a trainer to an engine's CUDA weights (zero copy, CUDA IPC), against copying the same
bytes as weight-sync systems do: device-to-device within the GPU (the floor of any copy) and through
pinned host memory (a transfer between processes without IPC). One run, same tensors.

The engine is a separate process holding Llama-shaped bf16 weights; the trainer attaches through the
manifest and checks that an in-place write is seen by the engine.

usage: python bench/attach.py [--size 8b] [--json out.json]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(__file__))
from result_json import write_result  # noqa: E402  (bench/result_json.py, beside this file)

SIZES = {"1b": (2048, 8192, 16, 512, 128256), "8b": (4096, 14336, 32, 1024, 128256)}


def llama_tensors(size: str) -> dict[str, tuple[int, ...]]:
    h, inter, layers, kv, vocab = SIZES[size]
    out = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return out


def engine(size: str, manifest: str) -> None:
    from livetrain import sharing

    torch.manual_seed(0)
    tensors = {n: torch.randn(s, device="cuda", dtype=torch.bfloat16) for n, s in llama_tensors(size).items()}
    exp = sharing.export_cuda(tensors, manifest, engine="bench")
    print("ready", flush=True)
    sys.stdin.readline()  # the trainer wrote to the first element of lm_head: report what we see
    print(float(tensors["lm_head.weight"][0, 0]), flush=True)
    sys.stdin.readline()
    del exp


def median_ms(fn, reps=5) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8b")
    ap.add_argument("--json")
    ap.add_argument("--role", default="trainer", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "engine":
        engine(a.size, a.manifest)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/attach.py needs a CUDA GPU")
    from livetrain import sharing

    tmp = tempfile.mkdtemp()
    manifest = os.path.join(tmp, "engine.json")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "engine", "--size", a.size, "--manifest", manifest],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    torch.cuda.init()
    torch.empty(1, device="cuda")  # context creation stays out of the timing

    t = time.perf_counter()
    att = sharing.attach(manifest)
    attach_ms = (time.perf_counter() - t) * 1e3
    tensors = att.tensors
    nbytes = sum(x.numel() * x.element_size() for x in tensors.values())
    handles = len(att.buffers())
    tensors["lm_head.weight"][0, 0] = 1024.0  # exact in bf16
    torch.cuda.synchronize()
    proc.stdin.write("\n")
    proc.stdin.flush()
    seen = float(proc.stdout.readline())

    # The alternatives: copy the same bytes.
    dst = {n: torch.empty_like(x) for n, x in tensors.items()}
    d2d_ms = median_ms(lambda: [dst[n].copy_(x) for n, x in tensors.items()])
    host = {n: torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for n, x in tensors.items()}
    via_host_ms = median_ms(
        lambda: (
            [host[n].copy_(x, non_blocking=True) for n, x in tensors.items()],
            torch.cuda.synchronize(),
            [dst[n].copy_(host[n], non_blocking=True) for n in tensors],
        ),
        reps=3,
    )
    att.close()
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=60)

    rows = [
        ("livetrain attach (CUDA IPC, zero copy)", attach_ms),
        ("copy device-to-device", d2d_ms),
        ("copy through pinned host memory", via_host_ms),
    ]
    print(
        f"\n{torch.cuda.get_device_name()}: {len(tensors)} tensors, {nbytes / 2**30:.2f} GiB bf16, "
        f"{handles} IPC allocations; engine saw the trainer's write: {seen == 1024.0}"
    )
    print("| method | ms | × attach |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / attach_ms:.1f} |")
    write_result(
        a.json,
        {
            "bytes": nbytes,
            "tensors": len(tensors),
            "allocations": handles,
            "write_seen_by_engine": seen == 1024.0,
            "rows": [{"method": n, "ms": ms} for n, ms in rows],
        },
    )


if __name__ == "__main__":
    main()
