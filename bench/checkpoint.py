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

--sweep instead times store saves under a grid of the save's internal tuning knobs (docs/tuning.md: the
pipeline overlapping encode with the GPU diff, the one-pass staged diff, device-resident chunk digests,
group sizes, encode batches) on two shapes, "8b" (Llama-3.1-8B) and "27b" (Qwen3.5-27B's text model), each
cut to --gib: per setting, a dense step at --lr then a save, then a save after no change; one table per
shape, each row against its floor from the bandwidths measured in the same run; every save's changed-element
count is checked against the step's own count, and at the end the store is reopened (replaying every
delta) and compared with the live weights.

usage: python bench/checkpoint.py [--gib 8|16] [--lr 1e-5] [--dir /local/tmp] [--json out.json] [--keep]
       python bench/checkpoint.py --sweep [--shapes 8b,27b] [--gib 8] [--lr 1e-5] [--settings 'A|B'] [--json out.json]
                                  [--no-chain-check]
       python bench/checkpoint.py --writeback-host N [--gib 1] [--lr 1e-5]     # no GPU: writeback_mib 0 vs default
       python bench/checkpoint.py --encoder-host N [--gib 1] [--lr 1e-5]      # no GPU: checkpoint.encoder 0-4
       python bench/checkpoint.py --encoder-host N --host-shapes qwen3.5-27b [--row-scale 64] [--lr 1.3e-6]
"""

import argparse
import json
import math
import os
import resource
import shutil
import struct
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from result_json import write_result  # noqa: E402  (bench/result_json.py, beside this file)

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
        for name, shape in [
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (inter, h)),
            ("mlp.up_proj", (inter, h)),
            ("mlp.down_proj", (h, inter)),
        ]:
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


def pinned_both_ways_bandwidth() -> float:
    """Host-to-device and device-to-host copies of pinned memory at once, on two streams: bytes moved (both
    directions together) per second. The GPU diff moves the head copy both ways (staged in, written back)."""
    n = 2**30
    d_in, d_out = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    h_in, h_out = torch.empty(n, dtype=torch.uint8, pin_memory=True), torch.empty(n, dtype=torch.uint8, pin_memory=True)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    d_in.copy_(h_in)
    h_out.copy_(d_out)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        with torch.cuda.stream(s1):
            d_in.copy_(h_in, non_blocking=True)
        with torch.cuda.stream(s2):
            h_out.copy_(d_out, non_blocking=True)
    torch.cuda.synchronize()
    return 2 * 3 * n / (time.perf_counter() - t)


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
                chunk = now[start : start + BLOCK]
                os.pwrite(fd, chunk.tobytes(), off + start)
                written += chunk.size
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"seconds": time.perf_counter() - t, "bytes_written": written}


def cpu_threads() -> str:
    """The core's CPU threads against what Python sees: every online CPU, and the ones this process may use."""
    from livetrain import _core

    return (
        f"CPU threads of the core {_core.num_threads()} (CPUs online {os.cpu_count()}, "
        f"in this process's affinity mask {len(os.sched_getaffinity(0))})"
    )


def minor_faults() -> int:
    """The process's minor page faults so far (getrusage): each a page touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def livetrain_save(store, live: dict) -> dict:
    import save_usage  # beside this script

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    f = minor_faults()
    r, seconds, host = save_usage.timed_save(lambda: store.save(live))
    return {
        "seconds": seconds,
        "minor_faults": minor_faults() - f,
        "usage": r.get("usage"),
        "host": host,
        "bytes_written": r["bytes"] if r["written"] else 0,
        "changed": r["changed"],
        "elements": r["elements"],
        "diff_seconds": r["diff_seconds"],
        "encode_seconds": r["encode_seconds"],
        "write_seconds": r["write_seconds"],
        "sync_seconds": r.get("sync_seconds", 0.0),
    }


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
def apollo_like_step(live: dict, lr: float, seed: int) -> int:
    """w += lr * N(0,1) per element, fp32, stochastically rounded to bf16 (the optimizer's rounding); fp32
    tensors exactly. Returns how many elements changed bits."""
    dev = next(iter(live.values())).device
    g = torch.Generator(device=dev).manual_seed(seed)
    changed = torch.zeros((), dtype=torch.int64, device=dev)
    for w in live.values():
        flat = w.view(-1)
        for s in range(0, flat.numel(), 2**26):  # bounded temporaries
            part = flat[s : s + 2**26]
            x = part.float() + lr * torch.randn(part.shape, device=dev, generator=g)
            if part.dtype == torch.float32:
                changed += (x.view(torch.int32) != part.view(torch.int32)).sum()
                part.copy_(x)
                continue
            bits = x.view(torch.int32)
            noise = torch.randint(0, 1 << 16, part.shape, device=dev, dtype=torch.int32, generator=g)
            rounded = ((bits + noise) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # exact after masking
            changed += (rounded.view(torch.int16) != part.view(torch.int16)).sum()
            part.copy_(rounded)
    return int(changed)


# ---- saves from host memory (no GPU needed): the model both host modes save ----
def host_model(gib: float, work: str, tensors=None):
    """Random tensors (N(0, 0.02)) on the host and their model directory in `work`: bf16 Llama-shaped ones of
    `gib` GiB, or `tensors` [(name, shape, dtype)]. Returns (live tensors, model bytes, model directory)."""
    from livetrain import safetensors as lst

    if tensors is None:
        tensors = [(name, shape, torch.bfloat16) for name, shape in model_shapes(gib)]
    torch.manual_seed(0)
    live = {name: (torch.randn(shape) * 0.02).to(dt) for name, shape, dt in tensors}
    model_dir = os.path.join(work, "model")
    os.mkdir(model_dir)
    lst.save_model(model_dir, live, max_shard_bytes=5 * 2**30)
    return live, sum(w.numel() * w.element_size() for w in live.values()), model_dir


def median(xs):
    return sorted(xs)[len(xs) // 2]


# ---- --writeback-host: checkpoint.writeback_mib on a save from host memory (no GPU needed) ----
def writeback_host(gib: float, lr: float, parent: str | None, repeats: int) -> int:
    """Saves of host tensors after a dense step, alternating checkpoint.writeback_mib 0 and its default, in
    one run on the same model: the CPU diff and encode (the GPU save's encode and writer are the same code),
    then the writer's tail, and of it the delta file's fsync (what the knob shortens; on this path the tail
    also XORs the head copy). Prints one row per setting (medians) and the disk's own write + fsync rate."""
    from livetrain import _core
    from livetrain.checkpoint import CheckpointStore

    default = _core.tuning()["checkpoint.writeback_mib"]["default"]
    work = tempfile.mkdtemp(prefix="livetrain-checkpoint-writeback-", dir=parent)
    try:
        bw_disk = disk_write_bandwidth(work, 2**29)
        live, model_bytes, model_dir = host_model(gib, work)
        store = CheckpointStore.create(model_dir)
        rows = {0: [], default: []}
        try:
            store.save(live)  # the first save after open builds the head copy; nothing changed, nothing written
            for k in range(repeats):
                for mib in (0, default) if k % 2 == 0 else (default, 0):
                    _core.tuning_reset()
                    _core.tuning_set("checkpoint.writeback_mib", mib)
                    apollo_like_step(live, lr, seed=1000 + 2 * k + (mib != 0))
                    r = livetrain_save(store, live)
                    rows[mib].append(r)
                    log(
                        f"writeback {mib} MiB: {r['seconds']:.2f} s, write tail {r['write_seconds']:.3f} s, "
                        f"of it the delta's fsync {r['sync_seconds']:.3f} s"
                    )
        finally:
            _core.tuning_reset()
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nhost save after a dense step (lr {lr:g}), {model_bytes / 2**30:.2f} GiB, {repeats} saves per setting "
        f"(medians), disk write + fsync {bw_disk / 1e9:.2f} GB/s\n"
    )
    print(
        "| checkpoint.writeback_mib | save s | diff / encode / write s | of write: the delta's fsync s "
        "| bytes written | the delta at the disk's rate s |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for mib, rs in rows.items():
        b = median([r["bytes_written"] for r in rs])
        print(
            f"| {mib} | {median([r['seconds'] for r in rs]):.2f} | {median([r['diff_seconds'] for r in rs]):.2f} / "
            f"{median([r['encode_seconds'] for r in rs]):.2f} / {median([r['write_seconds'] for r in rs]):.3f} | "
            f"{median([r['sync_seconds'] for r in rs]):.3f} | {b:,} | {b / bw_disk:.3f} |"
        )
    return 0


# ---- --encoder-host: checkpoint.encoder on a save from host memory (no GPU needed) ----
ENCODERS = {
    0: "0: the coder before, records copied",
    1: "1: word-wise coder, records copied",
    2: "2: word-wise coder, records as pieces, checksums by the writer, gap sizes measured per block",
    3: "3: as 2, gap sizes measured only where they could win (by the thread assembling the record)",
    4: "4 (default): as 3, a record's gaps measured and written block by block on the pool's threads",
}


def encoder_host(
    gib: float, lr: float, parent: str | None, repeats: int, shape_set: str = "8b", row_scale: int = 1
) -> int:
    """The encode phase of host-tensor saves under each checkpoint.encoder setting, on the same data in one
    run: one store per setting, all of one model, each saving the same tensors after each dense step (the
    order of the stores rotates), so all encode the same diff; their delta files must be identical. Prints
    the medians of the encode phase and of its input (bitmaps + values) per second and thread. The model:
    the Llama-8B shapes cut to `gib` ("8b"), or Qwen3.5-27B's whole text model with every tensor's rows
    divided by `row_scale` ("qwen3.5-27b"); for the latter also what the encode would take on the whole
    model's bytes at 16 threads, if the time per element and thread stayed what it is here. Also the minor page
    faults of each save (getrusage: pages the process touched for the first time)."""
    from livetrain import _core
    from livetrain.checkpoint import CheckpointStore

    threads = _core.num_threads()
    work = tempfile.mkdtemp(prefix="livetrain-checkpoint-encoder-", dir=parent)
    rows = {c: [] for c in ENCODERS}
    same = []
    tensors = qwen35_shapes(1000, row_scale) if shape_set == "qwen3.5-27b" else None
    try:
        live, model_bytes, model_dir = host_model(gib, work, tensors)
        stores = {c: CheckpointStore.create(model_dir, os.path.join(work, f"store-{c}")) for c in ENCODERS}
        try:
            for store in stores.values():
                store.save(live)  # the first save after open builds the head copy; nothing changed, nothing written
            order = list(ENCODERS)
            for k in range(repeats):
                apollo_like_step(live, lr, seed=2000 + k)
                files = []
                for c in order[k % len(order) :] + order[: k % len(order)]:
                    _core.tuning_reset()
                    _core.tuning_set("checkpoint.encoder", c)
                    r = livetrain_save(stores[c], live)
                    r["coded_input"] = r["elements"] // 8 + 2 * r["changed"]  # bitmaps + bf16 values
                    rows[c].append(r)
                    log(f"encoder {c}: save {r['seconds']:.2f} s, encode {r['encode_seconds']:.3f} s")
                    with open(os.path.join(work, f"store-{c}", f"gen-{stores[c].head:020d}.delta"), "rb") as f:
                        files.append(f.read())
                same.append(all(f == files[0] for f in files))
        finally:
            _core.tuning_reset()
            for store in stores.values():
                store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    elements = sum(w.numel() for w in live.values())
    whole = shape_set == "qwen3.5-27b"
    what = f"Qwen3.5-27B's {len(live)} text-model tensors, rows / {row_scale}" if whole else "Llama-8B shapes"
    changed = median([r["changed"] / r["elements"] for r in rows[2]])
    print(
        f"\nhost save after a dense step (lr {lr:g}, {changed:.1%} of the elements changed), {what}, "
        f"{model_bytes / 2**30:.2f} GiB, {repeats} saves per setting on the same diffs (medians); {cpu_threads()}; "
        f"delta files identical: {'yes' if all(same) else 'NO'}\n"
    )
    whole_elements = sum(math.prod(shape) for _, shape, _ in qwen35_shapes(1000)) if whole else 0  # 851 tensors
    scaled = " | the whole model's encode at 16 threads s" if whole else ""
    print(
        f"| checkpoint.encoder | save s | diff / encode / write s | encode input MB/s per thread | bytes written "
        f"| minor faults{scaled} |"
    )
    print("|---|---:|---|---:|---:|---:|" + ("---:|" if whole else ""))
    enc = {}
    for c, label in ENCODERS.items():
        rs = rows[c]
        enc[c] = median([r["encode_seconds"] for r in rs])
        rate = median([r["coded_input"] / r["encode_seconds"] / threads for r in rs])
        extra = f" | {enc[c] * whole_elements / elements * threads / 16:.2f}" if whole else ""
        print(
            f"| {label} | {median([r['seconds'] for r in rs]):.2f} | {median([r['diff_seconds'] for r in rs]):.2f} / "
            f"{enc[c]:.3f} / {median([r['write_seconds'] for r in rs]):.3f} | {rate / 1e6:.0f} | "
            f"{median([r['bytes_written'] for r in rs]):,} | {median([r['minor_faults'] for r in rs]):,}{extra} |"
        )
    print(
        f"\nencode phase against setting 0: setting 1 {enc[0] / enc[1]:.2f}x as fast, setting 2 {enc[0] / enc[2]:.2f}x, "
        f"setting 3 {enc[0] / enc[3]:.2f}x; setting 3 against 2: {enc[2] / enc[3]:.2f}x"
    )
    return 0 if all(same) else 1


# ---- --sweep: the store's save under its internal tuning knobs ----
def qwen35_shapes(gib: float, row_scale: int = 1):
    """Qwen3.5-27B's text-model tensors (Qwen/Qwen3.5-27B config.json: hidden 5120, 64 layers, every 4th
    full attention with an output gate, Gated DeltaNet otherwise, MLP 17408, vocabulary 248320) in model
    order until `gib` GiB, with the final norm and the untied lm_head once all 64 layers are in (the whole
    model: 851 tensors, 50.10 GiB, bench/serve.py's qwen3.5-27b): (name, shape, dtype). `row_scale` > 1
    divides every tensor's first dimension by it (rounded up): the same tensors and proportions, smaller."""
    out = _qwen35_full_shapes(gib)
    if row_scale > 1:
        out = [(n, (-(-s[0] // row_scale),) + tuple(s[1:]), dt) for n, s, dt in out]
    return out


def _qwen35_full_shapes(gib: float):
    h, inter, vocab, hd, ld = 5120, 17408, 248320, 256, 128
    target = int(gib * 2**30)
    out, total = [("model.embed_tokens.weight", (vocab, h), torch.bfloat16)], vocab * h * 2
    layer = 0
    while total < target and layer < 64:
        p = f"model.layers.{layer}."
        if layer % 4 == 3:
            t = [
                (p + "self_attn.q_proj.weight", (2 * 24 * hd, h)),
                (p + "self_attn.k_proj.weight", (4 * hd, h)),
                (p + "self_attn.v_proj.weight", (4 * hd, h)),
                (p + "self_attn.o_proj.weight", (h, 24 * hd)),
                (p + "self_attn.q_norm.weight", (hd,)),
                (p + "self_attn.k_norm.weight", (hd,)),
            ]
        else:
            qkv = 2 * 16 * ld + 48 * ld
            t = [
                (p + "linear_attn.in_proj_qkv.weight", (qkv, h)),
                (p + "linear_attn.in_proj_z.weight", (48 * ld, h)),
                (p + "linear_attn.in_proj_b.weight", (48, h)),
                (p + "linear_attn.in_proj_a.weight", (48, h)),
                (p + "linear_attn.conv1d.weight", (qkv, 1, 4)),
                (p + "linear_attn.dt_bias", (48,)),
                (p + "linear_attn.norm.weight", (ld,)),
                (p + "linear_attn.out_proj.weight", (h, 48 * ld)),
            ]
        t += [
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        for name, shape in t:
            out.append((name, shape, torch.bfloat16))
            total += 2 * math.prod(shape)
        if layer % 4 != 3:
            out.append((p + "linear_attn.A_log", (48,), torch.float32))  # kept in fp32, as published
            total += 4 * 48
        layer += 1
    if layer == 64:
        out += [("model.norm.weight", (h,), torch.bfloat16), ("lm_head.weight", (vocab, h), torch.bfloat16)]
    return out


# (label, knobs); the first is the save path that shipped before the first H200 sweep, the second the
# shipped defaults (pipelined one-pass diff with digests, its copies in and out overlapped, the delta written
# from the first record on with early writeback, the word-wise entropy coder with records handed on as pieces,
# gap sizes only where they could win), "(again)" repeats them (the run's noise). Only what that sweep left undecided is here (docs/tuning.md
# has its numbers), and the encoder before its changes (same bytes).
BEFORE = {
    "checkpoint.pipeline": 0,
    "checkpoint.diff": 0,
    "checkpoint.digests": 0,
    "checkpoint.writeback_mib": 0,
    "checkpoint.encoder": 0,
    "checkpoint.early_writer": 0,
    "checkpoint.group_mib": 256,
}
# The GPU diff as it shipped before its copies in and out overlapped (sixth session of 2026-12-01): two
# groups of 256 MiB alternating over two streams, each stream's copies one direction at a time.
DIFF_ONE_WAY = {"checkpoint.diff": 1, "checkpoint.group_mib": 256}
SWEEP_GRID = [
    ("before: two-pass diff, then encode", BEFORE),
    ("shipped", {}),
    ("shipped, the diff's copies one way at a time (checkpoint.diff=1)", DIFF_ONE_WAY),
    ("shipped, 3 diff slots of 256 MiB", {"checkpoint.diff_slots": 3, "checkpoint.group_mib": 256}),
    ("shipped, 8 diff slots of 64 MiB", {"checkpoint.diff_slots": 8, "checkpoint.group_mib": 64}),
    # The overlapped diff reached three quarters of the pinned both-ways rate with the encoder beside it; here
    # the encoder waits for the diff's end, so the diff has the host's cores (and memory) to itself.
    ("shipped, encode after the diff (checkpoint.pipeline=0)", {"checkpoint.pipeline": 0}),
    ("gap sizes measured per block, as before (checkpoint.encoder=2)", {"checkpoint.encoder": 2}),
    ("shipped without early writeback", {"checkpoint.writeback_mib": 0}),
    ("shipped, writeback every 64 MiB", {"checkpoint.writeback_mib": 64}),
    ("shipped without digests", {"checkpoint.digests": 0}),
    ("shipped, 64 MiB groups", {"checkpoint.group_mib": 64}),
    ("shipped, encode batch 2", {"checkpoint.encode_batch": 2}),
    ("shipped, encode batch 32", {"checkpoint.encode_batch": 32}),
    ("shipped, a record's gaps by one thread (checkpoint.encoder=3)", {"checkpoint.encoder": 3}),
    ("shipped, the encoder before (checkpoint.encoder=0)", {"checkpoint.encoder": 0}),
    ("shipped, word-wise coder, records copied (checkpoint.encoder=1)", {"checkpoint.encoder": 1}),
    ("shipped (again)", {}),
    ("shipped without the early writer (checkpoint.early_writer=0)", {"checkpoint.early_writer": 0}),
]


def set_knobs(knobs: dict) -> None:
    from livetrain import _core

    _core.tuning_reset()
    for name, value in knobs.items():
        _core.tuning_set(name, value)


def byte_check(tensors: list, lr: float, parent: str | None) -> dict:
    """Every sweep setting against the CPU save, byte for byte: a small model of the set's first tensors of
    at most 128 MiB (about 256 MiB, an fp32 one included) in two stores, one saved from host tensors (the CPU diff), one
    from CUDA tensors (the GPU save under the setting); after the same dense step their delta files must
    be identical, and after no change neither may write. Returns {label: "ok" | "FAILED: ..."}."""
    from livetrain import safetensors as lst
    from livetrain.checkpoint import CheckpointStore

    small, total = [], 0
    for name, shape, dt in tensors:
        nbytes = math.prod(shape) * torch.finfo(dt).bits // 8
        if nbytes > 2**27:  # the embedding: too slow for the CPU save, and nothing it alone would show
            continue
        if total < 2**28 or dt == torch.float32 and not any(d == torch.float32 for _, _, d in small):
            small.append((name, shape, dt))
            total += nbytes
    work = tempfile.mkdtemp(prefix="livetrain-checkpoint-bytes-", dir=parent)
    out = {}
    try:
        torch.manual_seed(5)
        live = {name: (torch.randn(shape, device="cuda") * 0.02).to(dt) for name, shape, dt in small}
        model_dir = os.path.join(work, "model")
        os.mkdir(model_dir)
        lst.save_model(model_dir, {n: w.cpu() for n, w in live.items()}, max_shard_bytes=2**30)
        host = CheckpointStore.create(model_dir, os.path.join(work, "host"))
        gpu = CheckpointStore.create(model_dir, os.path.join(work, "gpu"))
        try:
            for k, (label, knobs) in enumerate(SWEEP_GRID):
                try:
                    set_knobs(knobs)
                    apollo_like_step(live, lr, seed=500 + k)
                    a = host.save({n: w.cpu() for n, w in live.items()})
                    b = gpu.save(live)
                    name = f"gen-{a['generation']:020d}.delta"
                    with (
                        open(os.path.join(work, "host", name), "rb") as fa,
                        open(os.path.join(work, "gpu", name), "rb") as fb,
                    ):
                        same = a["generation"] == b["generation"] and fa.read() == fb.read()
                    again = gpu.save(live)
                    out[label] = (
                        "ok"
                        if same and not again["written"]
                        else (
                            "FAILED: delta differs from the CPU save's" if not same else "FAILED: wrote after no change"
                        )
                    )
                except Exception as e:
                    out[label] = f"FAILED: {type(e).__name__}: {e}"[:200]
                log(f"byte check {label}: {out[label]}")
        finally:
            host.close()
            gpu.close()
    finally:
        set_knobs({})
        shutil.rmtree(work, ignore_errors=True)
    return out


def gpu_loop_ms(until) -> list[float]:
    """Milliseconds of each step of a GPU loop (a 4096² bf16 matmul, synchronized), run until `until()`."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    out = []
    while not until():
        t = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def prepare_gpu_probe(model_dir: str, store_dir: str, live: dict, first_before: float, shape_set: str) -> dict:
    """A second store of the same model (nothing changed yet): prepare_gpu page-locks its head copy on the store's
    thread while this one runs a GPU loop (does the page-locking hold up other GPU work?), then its first save,
    against the first save of the sweep's store, which page-locked in the save (`first_before`, same run)."""
    from livetrain.checkpoint import CheckpointStore

    row = {"shape": shape_set, "setting": "prepare_gpu probe", "first_save_before": first_before}
    t = time.perf_counter()
    b = CheckpointStore.create(model_dir, store_dir)
    row["create_seconds"] = time.perf_counter() - t
    try:
        t0 = time.perf_counter()
        alone = gpu_loop_ms(lambda: time.perf_counter() - t0 > 1.0)
        t = time.perf_counter()
        b.prepare_gpu(0)
        row["prepare_call_seconds"] = time.perf_counter() - t
        during = gpu_loop_ms(lambda: b.gpu_prepared or time.perf_counter() - t > 60)
        row["prepare_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        r = b.save(live)
        row["first_save_after"] = time.perf_counter() - t
        row["first_save_wrote"] = r["written"]
        for k, ms in (("alone", alone), ("during", during)):
            ms = sorted(ms) or [0.0]
            row[f"loop_{k}"] = {"steps": len(ms), "median_ms": ms[len(ms) // 2], "max_ms": ms[-1]}
    finally:
        t = time.perf_counter()
        b.close()
        row["close_seconds"] = time.perf_counter() - t
    log(
        f"sweep {shape_set}: prepare_gpu probe: first save {first_before:.2f} s before, "
        f"{row['first_save_after']:.2f} s after prepare_gpu ({row['prepare_seconds']:.2f} s on its thread, the call "
        f"{row['prepare_call_seconds'] * 1e3:.1f} ms); GPU loop alone {row['loop_alone']}, during {row['loop_during']}; "
        f"store create {row['create_seconds']:.1f} s, close {row['close_seconds']:.1f} s"
    )
    return row


def sweep_shape(
    shape_set: str,
    gib: float,
    lr: float,
    parent: str | None,
    bands: tuple,
    on_row=lambda rows: None,
    chain_check: bool = True,
    prepare_probe: bool = False,
) -> list[dict]:
    """The sweep on one shape set; on_row(rows so far) after each setting (the caller saves them, so a run
    cut short keeps what it measured). Without `chain_check` the store is not reopened and compared at the
    end (at tens of GiB that takes longer than the rows: reading the files, decoding every delta)."""
    from livetrain import safetensors as lst
    from livetrain.checkpoint import CheckpointStore

    bw_dev, bw_pcie, bw_disk = bands
    if shape_set == "8b":
        tensors = [(name, shape, torch.bfloat16) for name, shape in model_shapes(gib)]
    else:
        tensors = qwen35_shapes(gib)
    model_bytes = sum(math.prod(s) * torch.finfo(dt).bits // 8 for _, s, dt in tensors)
    bytes_ok = byte_check(tensors, lr, parent)
    work = tempfile.mkdtemp(prefix=f"livetrain-checkpoint-sweep-{shape_set}-", dir=parent)
    rows = []
    log(f"sweep {shape_set}: {len(tensors)} tensors, {model_bytes / 2**30:.2f} GiB, in {work}")
    try:
        torch.manual_seed(0)
        live = {}
        for name, shape, dt in tensors:
            live[name] = (torch.randn(shape, device="cuda") * 0.02).to(dt)
        model_dir = os.path.join(work, "model")
        os.mkdir(model_dir)
        log(f"sweep {shape_set}: writing the model files")
        staging = {name: w.cpu() for name, w in live.items()}
        lst.save_model(model_dir, staging, max_shard_bytes=5 * 2**30)
        del staging
        store = CheckpointStore.create(model_dir)
        try:
            set_knobs({})
            t = time.perf_counter()
            store.save(live)
            first = time.perf_counter() - t
            log(f"sweep {shape_set}: first save after open (page-locks the head copy): {first:.2f} s")
            probe = None
            if prepare_probe:
                try:
                    probe = prepare_gpu_probe(model_dir, os.path.join(work, "prepared"), live, first, shape_set)
                except Exception as e:  # reported; the rows still run
                    log(f"sweep {shape_set}: prepare_gpu probe failed: {type(e).__name__}: {e}")
            for k, (label, knobs) in enumerate(SWEEP_GRID):
                row = {
                    "shape": shape_set,
                    "setting": label,
                    "knobs": knobs,
                    "model_bytes": model_bytes,
                    "tensors": len(tensors),
                    "bytes_check": bytes_ok.get(label, "-"),
                }
                try:
                    set_knobs(knobs)
                    expected = apollo_like_step(live, lr, seed=100 + k)
                    torch.cuda.synchronize()
                    r = livetrain_save(store, live)
                    row.update(
                        dense=r,
                        expected_changed=expected,
                        check="ok"
                        if r["changed"] == expected
                        else f"FAILED: {r['changed']} changed, expected {expected}",
                        floor_seconds=max(
                            2 * model_bytes / bw_dev, r["bytes_written"] / bw_pcie, r["bytes_written"] / bw_disk
                        ),
                    )
                    row["no_change"] = livetrain_save(store, live)
                    if row["no_change"]["bytes_written"]:
                        row["check"] = "FAILED: a save after no change wrote a generation"
                except Exception as e:  # a failing setting is reported and the sweep goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                on_row(rows)
                if "error" in row:
                    log(f"sweep {shape_set} {label}: {row['error']}")
                else:
                    d = row["dense"]
                    log(
                        f"sweep {shape_set} {label}: dense {d['seconds']:.2f} s ({d['seconds'] / row['floor_seconds']:.2f}x floor), "
                        f"no change {row['no_change']['seconds']:.3f} s; {row['check']}"
                    )
            set_knobs({})
            if chain_check:
                log(f"sweep {shape_set}: chain check (reopen: replays every delta; then compare with the live weights)")
                store.close()
                t = time.perf_counter()
                store = CheckpointStore(model_dir)
                diff = store.compare(store.head, live)
                problems = store.verify()
                chain = "ok" if diff["elements"] == 0 and not problems else f"FAILED: {diff}, {problems[:3]}"
                log(f"sweep {shape_set}: chain check {chain} ({time.perf_counter() - t:.1f} s)")
            else:
                chain = "not run (--no-chain-check)"
            for row in rows:
                row["chain_check"] = chain
                if probe:
                    row["prepare_probe"] = probe
        finally:
            store.close()
    finally:
        set_knobs({})
        shutil.rmtree(work, ignore_errors=True)
        torch.cuda.empty_cache()
    return rows


def print_sweep(rows: list[dict], bands: tuple, lr: float, both_ways: float | None = None) -> None:
    bw_dev, bw_pcie, bw_disk = bands
    print(
        f"\nbandwidths: device copy {bw_dev / 1e9:.0f} GB/s, pinned D2H {bw_pcie / 1e9:.1f} GB/s, "
        f"disk write+fsync {bw_disk / 1e9:.2f} GB/s; dense step at lr {lr:g}; {cpu_threads()}"
    )
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        mb = mine[0]["model_bytes"]
        print(
            f"\n### checkpoint save, {shape} shapes, {mb / 2**30:.2f} GiB ({mine[0]['tensors']} tensors); "
            f"chain check {mine[0].get('chain_check', '-')}\n"
        )
        print(
            "| setting | dense s | vs before | diff / encode / write s | changed | bytes written | % of model | floor s "
            "| × floor | no change s | s per 10 GB | minor faults | check | = CPU save's bytes |"
        )
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        before = mine[0].get("dense", {}).get("seconds")
        for r in mine:
            if "error" in r:
                print(
                    f"| {r['setting']} | - | - | - | - | - | - | - | - | - | - | - | {r['error']} | {r['bytes_check']} |"
                )
                continue
            d, nc = r["dense"], r["no_change"]
            vs = f"{before / d['seconds']:.2f}x" if before else "-"
            print(
                f"| {r['setting']} | {d['seconds']:.2f} | {vs} | {d['diff_seconds']:.2f} / {d['encode_seconds']:.2f} / "
                f"{d['write_seconds']:.2f} | {d['changed'] / max(d['elements'], 1):.1%} | {d['bytes_written']:,} | "
                f"{d['bytes_written'] / mb:.1%} | "
                f"{r['floor_seconds']:.3f} | {d['seconds'] / r['floor_seconds']:.2f} | {nc['seconds']:.3f} | "
                f"{nc['seconds'] / mb * 1e10:.3f} | {d.get('minor_faults', 0):,} | {r['check']} | {r['bytes_check']} |"
            )
        used = [r for r in mine if "error" not in r and r["dense"].get("usage")]
        if used:
            import save_usage

            print(f"\nWhere the dense saves' time went ({shape}): {save_usage.LEGEND}\n")
            print(save_usage.HEADER)
            for r in used:
                d = r["dense"]
                print(save_usage.row(r["setting"], d["seconds"], d, d["host"]))
        p = mine[0].get("prepare_probe")
        if p:
            print(
                f"\nfirst save after open: {p['first_save_before']:.2f} s page-locking in the save (the sweep's store); "
                f"a second store of the set: {p['first_save_after']:.2f} s after prepare_gpu, which took "
                f"{p['prepare_seconds']:.2f} s on the store's thread (the call {p['prepare_call_seconds'] * 1e3:.1f} ms); "
                f"a 4096² bf16 matmul meanwhile: median {p['loop_during']['median_ms']:.2f} ms, max "
                f"{p['loop_during']['max_ms']:.1f} ms over {p['loop_during']['steps']} steps (alone: median "
                f"{p['loop_alone']['median_ms']:.2f} ms, max {p['loop_alone']['max_ms']:.1f} ms)"
            )
        good = [r for r in mine if "error" not in r and r["check"] == "ok" and r["bytes_check"] in ("ok", "-")]
        if good:
            b = min(good, key=lambda r: r["dense"]["seconds"] / r["floor_seconds"])
            n = min(good, key=lambda r: r["no_change"]["seconds"])
            print(
                f"\nbest dense ({shape}): {b['setting']}: {b['dense']['seconds']:.2f} s = "
                f"{b['dense']['seconds'] / b['floor_seconds']:.2f}x floor (target <= 2x, <= 12% of the bytes: "
                f"{b['dense']['bytes_written'] / mb:.1%})"
            )
            print(
                f"best no change ({shape}): {n['setting']}: {n['no_change']['seconds']:.3f} s = "
                f"{n['no_change']['seconds'] / mb * 1e10:.3f} s per 10 GB (target <= 0.1)"
            )
        # After a dense step every chunk of the head copy is staged in and written back: the diff's bytes
        # over PCIe are twice the model's, against pinned copies both ways at once in the same run.
        rates = [
            f"{r['setting']}: {2 * mb / r['dense']['diff_seconds'] / 1e9:.1f}"
            for r in mine
            if "error" not in r and r["dense"]["diff_seconds"] > 0
        ]
        if rates:
            ref = f" (pinned H2D and D2H at once: {both_ways / 1e9:.1f} GB/s)" if both_ways else ""
            print(f"GPU diff of the dense step, head copy in and out, GB/s in all{ref}: " + "; ".join(rates))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0, help="model size in GiB (8 by default; 16 also sensible)")
    ap.add_argument("--sweep", action="store_true", help="time saves under a grid of the save's tuning knobs instead")
    ap.add_argument(
        "--shapes",
        default="8b,27b",
        help="with --sweep: shape sets, 8b (Llama-3.1-8B) and/or 27b (Qwen3.5-27B text model), each cut to --gib",
    )
    ap.add_argument(
        "--settings",
        default=None,
        help="with --sweep: only these rows of the grid, their labels separated by '|' (default: every row)",
    )
    ap.add_argument(
        "--writeback-host",
        type=int,
        default=0,
        metavar="N",
        help="instead: N saves of host tensors per setting of checkpoint.writeback_mib (0, the default); no GPU",
    )
    ap.add_argument(
        "--encoder-host",
        type=int,
        default=0,
        metavar="N",
        help="instead: N dense steps, each saved from host tensors under every checkpoint.encoder setting; no GPU",
    )
    ap.add_argument(
        "--host-shapes",
        default="8b",
        choices=["8b", "qwen3.5-27b"],
        help="--encoder-host: the Llama-8B shapes cut to --gib, or Qwen3.5-27B's whole text model, rows / --row-scale",
    )
    ap.add_argument("--row-scale", type=int, default=64, help="--host-shapes qwen3.5-27b: every tensor's rows / this")
    ap.add_argument(
        "--no-chain-check",
        dest="chain_check",
        action="store_false",
        help="--sweep: skip the reopen-and-compare at the end of each set (slow at tens of GiB; the byte check stays)",
    )
    ap.add_argument(
        "--prepare-probe",
        action="store_true",
        help="--sweep: also open a second store of the set and time its first save after prepare_gpu (see the log)",
    )
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (local disk; default $TMPDIR)")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    if a.writeback_host:
        return writeback_host(a.gib, a.lr, a.dir, a.writeback_host)
    if a.encoder_host:
        return encoder_host(a.gib, a.lr, a.dir, a.encoder_host, a.host_shapes, a.row_scale)
    if not torch.cuda.is_available():
        print(
            "bench/checkpoint.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
            file=sys.stderr,
        )
        return 2
    from livetrain import safetensors as lst
    from livetrain.checkpoint import CheckpointStore

    if a.sweep:
        if a.settings:
            labels = [x.strip() for x in a.settings.split("|")]
            known = [label for label, _ in SWEEP_GRID]
            for x in labels:
                if x not in known:
                    ap.error(f"--settings: unknown row {x!r} (one of: {'; '.join(known)})")
            SWEEP_GRID[:] = [row for row in SWEEP_GRID if row[0] in labels]
        shape_sets = a.shapes.split(",")
        for x in shape_sets:
            if x not in ("8b", "27b"):
                ap.error(f"--shapes: unknown set {x!r} (8b, 27b)")
        probe = tempfile.mkdtemp(prefix="livetrain-checkpoint-bw-", dir=a.dir)
        try:
            # Per set: the files, the rows' deltas (~10% of the bytes each after the bench's step at lr 1e-5, ~3%
            # at 1.3e-6), the bandwidth probe and the byte check's small model.
            share = 0.11 if a.lr >= 5e-6 else 0.04
            need = int(a.gib * 2**30 * (1 + share * len(SWEEP_GRID))) + 2**31
            if shutil.disk_usage(probe).free < need:
                print(
                    f"bench/checkpoint.py: {probe}: {shutil.disk_usage(probe).free / 2**30:.1f} GiB free, needs about "
                    f"{need / 2**30:.1f} GiB",
                    file=sys.stderr,
                )
                return 2
            bands = (device_copy_bandwidth(), pinned_d2h_bandwidth(), disk_write_bandwidth(probe))
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        both = pinned_both_ways_bandwidth()
        log(
            f"bandwidths: device copy {bands[0] / 1e9:.0f} GB/s, pinned D2H {bands[1] / 1e9:.1f} GB/s, "
            f"disk write+fsync {bands[2] / 1e9:.2f} GB/s; pinned H2D and D2H at once {both / 1e9:.1f} GB/s "
            f"(both directions together; the diff moves the head copy both ways)"
        )
        rows = []

        def save(partial: list) -> None:
            write_result(
                a.json,
                {
                    "lr": a.lr,
                    "gib": a.gib,
                    "device_copy_bandwidth": bands[0],
                    "pinned_d2h_bandwidth": bands[1],
                    "disk_write_bandwidth": bands[2],
                    "pinned_both_ways_bandwidth": both,
                    "sweep": rows + partial,
                },
            )

        for x in shape_sets:
            try:
                rows += sweep_shape(
                    x, a.gib, a.lr, a.dir, bands, on_row=save, chain_check=a.chain_check, prepare_probe=a.prepare_probe
                )
            except Exception as e:  # a shape that cannot even be set up is reported; the next one runs
                log(f"sweep {x}: {type(e).__name__}: {e}")
        save([])
        print_sweep(rows, bands, a.lr, both)
        return 0

    shapes = model_shapes(a.gib)
    model_bytes = sum(2 * (s[0] * (s[1] if len(s) > 1 else 1)) for _, s in shapes)
    work = tempfile.mkdtemp(prefix="livetrain-checkpoint-bench-", dir=a.dir)
    free = shutil.disk_usage(work).free
    need = int(model_bytes * 2.7) + 2**31  # files + deltas + the whole-model write + the bandwidth probe
    if free < need:
        shutil.rmtree(work, ignore_errors=True)
        print(
            f"bench/checkpoint.py: {work}: {free / 2**30:.1f} GiB free, needs about {need / 2**30:.1f} GiB",
            file=sys.stderr,
        )
        return 2
    log(f"{len(shapes)} tensors, {model_bytes / 2**30:.2f} GiB bf16, in {work}")
    rows = []
    try:
        bw_dev, bw_pcie, bw_disk = device_copy_bandwidth(), pinned_d2h_bandwidth(), disk_write_bandwidth(work)
        log(
            f"bandwidths: device copy {bw_dev / 1e9:.0f} GB/s, pinned D2H {bw_pcie / 1e9:.1f} GB/s, "
            f"disk write+fsync {bw_disk / 1e9:.2f} GB/s"
        )

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
            rows.append(
                {
                    "scenario": "first save after open",
                    "method": "livetrain store save",
                    **r,
                    "floor_seconds": 2 * model_bytes / bw_dev,
                }
            )
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
                rows.append(
                    {"scenario": scenario, "method": "4 KiB block sync (bf16-repaired)", **b, "floor_seconds": None}
                )
            log("whole model written as safetensors, for scale")
            rows.append(
                {
                    "scenario": "any",
                    "method": "whole model to safetensors + fsync",
                    **full_write(staging, live, os.path.join(work, "full")),
                    "floor_seconds": None,
                }
            )
        finally:
            store.close()
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nmodel {model_bytes / 2**30:.2f} GiB bf16 ({len(shapes)} tensors), {torch.cuda.get_device_name()}; "
        f"device copy {bw_dev / 1e9:.0f} GB/s, pinned D2H {bw_pcie / 1e9:.1f} GB/s, disk write+fsync {bw_disk / 1e9:.2f} GB/s; "
        f"reading the head copy over PCIe at that rate: {model_bytes / bw_pcie:.3f} s\n"
    )
    print(
        "| scenario | method | wall s | diff / encode / write s | bytes written | % of model | elements changed | floor s | wall / floor |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        changed = f"{r['changed'] / r['elements']:.1%}" if "changed" in r else "-"
        floor = f"{r['floor_seconds']:.3f}" if r["floor_seconds"] is not None else "-"
        ratio = f"{r['seconds'] / r['floor_seconds']:.1f}x" if r["floor_seconds"] else "-"
        phases = (
            f"{r['diff_seconds']:.2f} / {r['encode_seconds']:.2f} / {r['write_seconds']:.2f}"
            if "diff_seconds" in r
            else "-"
        )
        print(
            f"| {r['scenario']} | {r['method']} | {r['seconds']:.2f} | {phases} | {r['bytes_written']:,} | "
            f"{r['bytes_written'] / model_bytes:.1%} | {changed} | {floor} | {ratio} |"
        )
    by = {(r["scenario"], r["method"]): r for r in rows}
    for scenario in ("no change", f"dense step lr {a.lr:g}"):
        ours, base = by[(scenario, "livetrain store save")], by[(scenario, "4 KiB block sync (bf16-repaired)")]
        print(
            f"{scenario}: livetrain {base['seconds'] / ours['seconds']:.1f}x faster than the baseline, "
            f"{ours['bytes_written'] / model_bytes:.1%} of the model's bytes written"
        )
    write_result(
        a.json,
        {
            "model_bytes": model_bytes,
            "tensors": len(shapes),
            "lr": a.lr,
            "device_copy_bandwidth": bw_dev,
            "pinned_d2h_bandwidth": bw_pcie,
            "disk_write_bandwidth": bw_disk,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
