"""Checkpoint cost on a random bf16 model (GPU), in one run on the same data:

  (a) the original algorithm "repaired for bf16": for every tensor, copy the live weights to host, compare
      4 KiB blocks with the model file, rewrite the changed blocks in place, fsync each file
  (b) livetrain: CheckpointStore.save on the CUDA tensors: the GPU diffs them against the store's page-locked
      host copy of the last generation, only bitmaps and changed values come back, the CPU entropy-codes
      them (blocks encoding) into one delta file, temp -> fsync -> rename -> COMMIT
  (c) for scale: writing the whole model as safetensors (from pinned host copies) + fsync

each after no change and after one dense update mimicking an APOLLO step (w += lr * N(0,1) in fp32,
stochastic rounding back to bf16, every element). The floor of (b) is the largest of: the GPU scan of
now + old at the measured device copy bandwidth, the delta over PCIe at the measured pinned bandwidth, and
the delta to disk at the measured sequential write + fsync bandwidth (the issue's definition). The diff
also reads the host copy of the head over PCIe; that time is printed beside the table. The first save
after opening a store page-locks its host copy; it is measured as its own row.

usage: python bench/checkpoint.py [--gib 8|16] [--lr 1e-5] [--dir /local/tmp] [--json out.json] [--keep]
"""

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

BLOCK = 4096


def log(msg: str) -> None:
    print(f"[checkpoint bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_shapes(gib: float):
    """Llama-3.1-8B-shaped bf16 matrices (embeddings, then layers) until `gib` GiB."""
    h, inter, kv, vocab = 4096, 14336, 1024, 128256
    target = int(gib * 2**30)
    out, total = [("model.embed_tokens.weight", (vocab, h))], vocab * h * 2
    layer = 0
    while total < target:
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))]:
            out.append((f"model.layers.{layer}.{name}.weight", shape))
            total += shape[0] * shape[1] * 2
        out.append((f"model.layers.{layer}.input_layernorm.weight", (h,)))
        total += h * 2
        layer += 1
    return out


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def device_copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 10 * a.numel() / (time.perf_counter() - t)


def pinned_d2h_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    h = torch.empty(a.numel(), dtype=torch.uint8, pin_memory=True)
    h.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        h.copy_(a, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * a.numel() / (time.perf_counter() - t)


def disk_write_bandwidth(directory: str, nbytes: int = 2**30) -> float:
    """Sequential write + fsync of one new file, bytes per second."""
    path = os.path.join(directory, "bw.tmp")
    buf = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // len(buf)):
            f.write(buf)
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    os.unlink(path)
    return nbytes / dt


def tensor_locations(model_dir: str):
    """{name: (file path, absolute offset, nbytes)} from the safetensors headers."""
    loc = {}
    for fn in sorted(os.listdir(model_dir)):
        if not fn.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, fn)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            loc[name] = (path, 8 + n + b, e - b)
    return loc


def evict(paths) -> None:
    """Drops the files' pages from the page cache, so the baseline reads from disk as after a while."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def baseline_block_sync(live: dict, loc: dict) -> dict:
    """The original checkpoint_sync, repaired for bf16 (views as int16 instead of tensor.numpy())."""
    written = 0
    fds = {}
    t = time.perf_counter()
    try:
        for name, w in live.items():
            path, off, nbytes = loc[name]
            if path not in fds:
                fds[path] = os.open(path, os.O_RDWR)
            fd = fds[path]
            now = w.detach().view(torch.int16).cpu().numpy().view(np.uint8).reshape(-1)  # pageable, as the original
            old = np.frombuffer(os.pread(fd, nbytes, off), dtype=np.uint8)
            nblocks = (nbytes + BLOCK - 1) // BLOCK
            pad = nblocks * BLOCK - nbytes
            a = np.pad(now, (0, pad)).reshape(nblocks, BLOCK)
            b = np.pad(old, (0, pad)).reshape(nblocks, BLOCK)
            changed = np.nonzero((a != b).any(axis=1))[0]
            for k in changed:
                start = int(k) * BLOCK
                chunk = now[start:start + BLOCK]
                os.pwrite(fd, chunk.tobytes(), off + start)
                written += chunk.size
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"seconds": time.perf_counter() - t, "bytes_written": written}


def livetrain_save(store, live: dict) -> dict:
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = store.save(live)
    return {"seconds": time.perf_counter() - t, "bytes_written": r["bytes"] if r["written"] else 0,
            "changed": r["changed"], "elements": r["elements"], "diff_seconds": r["diff_seconds"],
            "encode_seconds": r["encode_seconds"], "write_seconds": r["write_seconds"]}


def full_write(staging: dict, live: dict, directory: str) -> dict:
    """The whole model as safetensors (pinned host copies of the live weights), fsynced."""
    from livetrain import safetensors as lst

    os.makedirs(directory)
    t = time.perf_counter()
    for name, w in live.items():
        staging[name].copy_(w, non_blocking=True)
    torch.cuda.synchronize()
    lst.save_model(directory, staging, max_shard_bytes=5 * 2**30)  # atomic writes: temp, fsync, rename
    seconds = time.perf_counter() - t
    written = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    shutil.rmtree(directory)
    return {"seconds": seconds, "bytes_written": written}


@torch.no_grad()
def apollo_like_step(live: dict, lr: float, seed: int) -> None:
    """w += lr * N(0,1) per element, fp32, stochastically rounded to bf16 (the optimizer's rounding)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for w in live.values():
        flat = w.view(-1)
        for s in range(0, flat.numel(), 2**26):  # bounded temporaries
            part = flat[s:s + 2**26]
            x = part.float() + lr * torch.randn(part.shape, device="cuda", generator=g)
            bits = x.view(torch.int32)
            noise = torch.randint(0, 1 << 16, part.shape, device="cuda", dtype=torch.int32, generator=g)
            rounded = ((bits + noise) & ~0xFFFF).view(torch.float32)  # exact in bf16 after masking
            part.copy_(rounded.to(torch.bfloat16))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0, help="model size in GiB (8 by default; 16 also sensible)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (local disk; default $TMPDIR)")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/checkpoint.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 2
    from livetrain import safetensors as lst
    from livetrain.checkpoint import CheckpointStore

    shapes = model_shapes(a.gib)
    model_bytes = sum(2 * (s[0] * (s[1] if len(s) > 1 else 1)) for _, s in shapes)
    work = tempfile.mkdtemp(prefix="livetrain-checkpoint-bench-", dir=a.dir)
    free = shutil.disk_usage(work).free
    need = int(model_bytes * 2.7) + 2**31  # files + deltas + the whole-model write + the bandwidth probe
    if free < need:
        shutil.rmtree(work, ignore_errors=True)
        print(f"bench/checkpoint.py: {work}: {free / 2**30:.1f} GiB free, needs about {need / 2**30:.1f} GiB", file=sys.stderr)
        return 2
    log(f"{len(shapes)} tensors, {model_bytes / 2**30:.2f} GiB bf16, in {work}")
    rows = []
    try:
        bw_dev, bw_pcie, bw_disk = device_copy_bandwidth(), pinned_d2h_bandwidth(), disk_write_bandwidth(work)
        log(f"bandwidths: device copy {bw_dev / 1e9:.0f} GB/s, pinned D2H {bw_pcie / 1e9:.1f} GB/s, "
            f"disk write+fsync {bw_disk / 1e9:.2f} GB/s")

        torch.manual_seed(0)
        live, staging = {}, {}
        for name, shape in shapes:
            live[name] = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
            staging[name] = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
            staging[name].copy_(live[name])
        model_dir = os.path.join(work, "model")
        os.mkdir(model_dir)
        log("writing the model files")
        lst.save_model(model_dir, staging, max_shard_bytes=5 * 2**30)
        loc = tensor_locations(model_dir)
        files = sorted({p for p, _, _ in loc.values()})
        log("creating the checkpoint store (hashes the files, loads the head copy)")
        store = CheckpointStore.create(model_dir)
        try:
            log("first save after open (page-locks the host copy of the head; nothing changed)")
            r = livetrain_save(store, live)
            rows.append({"scenario": "first save after open", "method": "livetrain store save", **r,
                         "floor_seconds": 2 * model_bytes / bw_dev})
            for scenario in ("no change", f"dense step lr {a.lr:g}"):
                if scenario != "no change":
                    log("applying the APOLLO-like dense update on the GPU")
                    apollo_like_step(live, a.lr, seed=1)
                    torch.cuda.synchronize()
                log(f"{scenario}: livetrain save")
                r = livetrain_save(store, live)
                delta = r["bytes_written"]
                floor = max(2 * model_bytes / bw_dev, delta / bw_pcie, delta / bw_disk)
                rows.append({"scenario": scenario, "method": "livetrain store save", **r, "floor_seconds": floor})
                log(f"{scenario}: block-diff baseline (page cache evicted first)")
                evict(files)
                b = baseline_block_sync(live, loc)
                rows.append({"scenario": scenario, "method": "4 KiB block sync (bf16-repaired)", **b, "floor_seconds": None})
            log("whole model written as safetensors, for scale")
            rows.append({"scenario": "any", "method": "whole model to safetensors + fsync",
                         **full_write(staging, live, os.path.join(work, "full")), "floor_seconds": None})
        finally:
            store.close()
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel {model_bytes / 2**30:.2f} GiB bf16 ({len(shapes)} tensors), {torch.cuda.get_device_name()}; "
          f"device copy {bw_dev / 1e9:.0f} GB/s, pinned D2H {bw_pcie / 1e9:.1f} GB/s, disk write+fsync {bw_disk / 1e9:.2f} GB/s; "
          f"reading the head copy over PCIe at that rate: {model_bytes / bw_pcie:.3f} s\n")
    print("| scenario | method | wall s | diff / encode / write s | bytes written | % of model | elements changed | floor s | wall / floor |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        changed = f"{r['changed'] / r['elements']:.1%}" if "changed" in r else "-"
        floor = f"{r['floor_seconds']:.3f}" if r["floor_seconds"] is not None else "-"
        ratio = f"{r['seconds'] / r['floor_seconds']:.1f}x" if r["floor_seconds"] else "-"
        phases = f"{r['diff_seconds']:.2f} / {r['encode_seconds']:.2f} / {r['write_seconds']:.2f}" if "diff_seconds" in r else "-"
        print(f"| {r['scenario']} | {r['method']} | {r['seconds']:.2f} | {phases} | {r['bytes_written']:,} | "
              f"{r['bytes_written'] / model_bytes:.1%} | {changed} | {floor} | {ratio} |")
    by = {(r["scenario"], r["method"]): r for r in rows}
    for scenario in ("no change", f"dense step lr {a.lr:g}"):
        ours, base = by[(scenario, "livetrain store save")], by[(scenario, "4 KiB block sync (bf16-repaired)")]
        print(f"{scenario}: livetrain {base['seconds'] / ours['seconds']:.1f}x faster than the baseline, "
              f"{ours['bytes_written'] / model_bytes:.1%} of the model's bytes written")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "model_bytes": model_bytes, "tensors": len(shapes),
                       "lr": a.lr, "device_copy_bandwidth": bw_dev, "pinned_d2h_bandwidth": bw_pcie,
                       "disk_write_bandwidth": bw_disk, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
