"""Sharded checkpoint save (docs/checkpoint.md, "Generations written by several processes"): N rank processes
joined by torch.distributed each hold a block of rows of every matrix of a random bf16 model (the 1-d norms
replicated, saved by rank 0), as tensor-parallel ranks do. After one dense step (19.8% of the elements moved by
one ulp: the footprint of an APOLLO step at lr 1e-5 with stochastic rounding, DESIGN.md), in one run, on the
same data:

  (a) each rank's own save: save_part on every rank at once (diff, encode, write and fsync of its part), the
      part then left uncommitted and the head copies put back (refresh);
  (b) the sharded save of the same step: save_distributed, end to end on rank 0 from a barrier (every rank's
      part, the gather of descriptors, rank 0 reading every part back against its hash and writing COMMIT,
      the broadcast, every rank's refresh).

Target (issue #16): (b) <= 1.2 x the slowest rank's (a). Each is the median of --trials runs.

CPU (CI machine, gloo):   python bench/checkpoint_sharded.py --ranks 2 --gib 1
GPU (two GPUs, rank r on cuda:r; descriptors still gathered over gloo):
                          python bench/checkpoint_sharded.py --ranks 2 --gib 8 --device cuda --dir /local/tmp
Writes --json FILE (and prints a table).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint import model_shapes  # noqa: E402  (bench/checkpoint.py: the same Llama-8B-shaped set)


def log(msg: str) -> None:
    print(f"[sharded checkpoint bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_model(directory: str, gib: float) -> None:
    from livetrain import safetensors as lst

    g = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in model_shapes(gib)}
    os.makedirs(directory, exist_ok=True)
    lst.save_model(directory, tensors, max_shard_bytes=2 * 2**30)


def rank_shards(model: str, rank: int, ranks: int, device: str):
    """This rank's rows of every matrix (vLLM's column-parallel split) and the replicated norms."""
    from safetensors import safe_open

    from livetrain.checkpoint import Shard

    shards = []
    for f in sorted(p for p in os.listdir(model) if p.endswith(".safetensors")):
        with safe_open(os.path.join(model, f), "pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape = sl.get_shape()
                if len(shape) == 1:
                    t = st.get_tensor(name).to(device)
                    shards.append(Shard(name, (0,), t, rank == 0))
                    continue
                rows = shape[0] // ranks
                lo = rank * rows
                hi = shape[0] if rank == ranks - 1 else lo + rows
                shards.append(Shard(name, (lo, 0), sl[lo:hi].contiguous().to(device), True))
    return shards


def dense_step(shards, seed: int, fraction: float = 0.198) -> None:
    """Moves a `fraction` of every saved tensor's elements by one ulp up or down (bf16 bits +-1)."""
    g = torch.Generator(device=shards[0].tensor.device).manual_seed(seed)
    for s in shards:
        if not s.saved:
            continue
        flat = s.tensor.view(torch.int16).view(-1)
        for lo in range(0, flat.numel(), 1 << 24):  # in chunks: the random draws are 8 bytes per element
            bits = flat[lo : lo + (1 << 24)]
            r = torch.rand(bits.shape, generator=g, device=bits.device)
            bits += (r < fraction / 2).to(torch.int16) - ((r >= fraction / 2) & (r < fraction)).to(torch.int16)


def rank_main(a) -> None:
    import torch.distributed as dist

    from livetrain import checkpoint

    rank = int(os.environ["RANK"])
    device = f"cuda:{rank}" if a.device == "cuda" else "cpu"
    if a.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo", init_method=f"file://{a.rendezvous}", rank=rank, world_size=a.ranks)
    shards = rank_shards(a.model, rank, a.ranks, device)
    if rank != 0:
        dist.barrier()  # rank 0 opens the store first
    store = checkpoint.CheckpointStore(a.model, rank=rank, ranks=a.ranks, held=shards, group="bench")
    if rank == 0:
        dist.barrier()
    rows = []
    for trial in range(a.trials):
        dense_step(shards, 1000 * rank + trial)
        if device != "cpu":
            torch.cuda.synchronize()
        # (a) every rank's own save of the step, at once; then put back (rank 0 does not commit it).
        dist.barrier()
        t = time.perf_counter()
        part = store.save_part(shards)
        own = time.perf_counter() - t
        dist.barrier()
        store.refresh()
        # (b) the same step saved as a generation by every rank.
        dist.barrier()
        t = time.perf_counter()
        result = checkpoint.save_distributed(store, shards)
        sharded = time.perf_counter() - t
        mine = {
            "rank": rank,
            "own_s": own,
            "own_diff_s": part["diff_seconds"],
            "own_encode_s": part["encode_seconds"],
            "own_write_s": part["write_seconds"],
            "part_bytes": part["bytes"],
            "elements": part["elements"],
            "model_bytes": part["model_bytes"],
            "sharded_s": sharded,
            "generation": result["generation"],
            "bytes": result["bytes"],
        }
        gathered = [None] * a.ranks
        dist.all_gather_object(gathered, mine)
        rows.append(gathered)
    store.close()
    dist.destroy_process_group()
    if rank == 0:
        with open(a.result, "w") as f:
            json.dump(rows, f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gib", type=float, default=1.0, help="model size in GiB (all ranks together)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (local disk; default $TMPDIR)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--rendezvous", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_process:
        rank_main(a)
        return 0
    import subprocess

    from livetrain.checkpoint import CheckpointStore

    if a.device == "cuda" and torch.cuda.device_count() < a.ranks:
        print(f"--device cuda needs {a.ranks} GPUs; {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="livetrain-sharded-bench-", dir=a.dir)
    try:
        model = os.path.join(work, "model")
        log(f"writing a {a.gib:g} GiB bf16 model to {model}")
        write_model(model, a.gib)
        CheckpointStore.create(model).close()
        result = os.path.join(work, "result.json")
        base = [
            sys.executable,
            __file__,
            "--rank-process",
            "--ranks",
            str(a.ranks),
            "--device",
            a.device,
            "--trials",
            str(a.trials),
            "--model",
            model,
            "--rendezvous",
            os.path.join(work, "rendezvous"),
            "--result",
            result,
        ]
        log(f"{a.ranks} rank processes, {a.trials} trials")
        procs = [subprocess.Popen(base, env=dict(os.environ, RANK=str(r))) for r in range(a.ranks)]
        codes = [p.wait() for p in procs]
        if any(codes):
            print(f"a rank process failed: exit codes {codes}", file=sys.stderr)
            return 1
        with open(result) as f:
            rows = json.load(f)
        own = [max(r["own_s"] for r in trial) for trial in rows]
        sharded = [trial[0]["sharded_s"] for trial in rows]
        ratio = [s / o for s, o in zip(sharded, own)]
        per_rank = {
            k: [statistics.median(trial[r][k] for trial in rows) for r in range(a.ranks)]
            for k in ("own_s", "own_diff_s", "own_encode_s", "own_write_s", "part_bytes", "model_bytes")
        }
        print(
            f"\nsharded checkpoint save, {a.ranks} ranks on {a.device}, {a.gib:g} GiB bf16 model, 19.8% of the "
            f"elements moved by one ulp; medians of {a.trials} trials\n"
        )
        print(f"{'':34s}" + "".join(f"{'rank ' + str(r):>12s}" for r in range(a.ranks)))
        for label, key, scale, fmt in (
            ("rank's bytes (GiB)", "model_bytes", 2**-30, "{:12.3f}"),
            ("(a) own save: diff (s)", "own_diff_s", 1, "{:12.3f}"),
            ("            encode (s)", "own_encode_s", 1, "{:12.3f}"),
            ("            write + fsync (s)", "own_write_s", 1, "{:12.3f}"),
            ("            total (s)", "own_s", 1, "{:12.3f}"),
            ("part file (MiB)", "part_bytes", 2**-20, "{:12.1f}"),
        ):
            print(f"{label:34s}" + "".join(fmt.format(v * scale) for v in per_rank[key]))
        print(f"\n{'slowest rank own save (a), s':34s}{statistics.median(own):12.3f}")
        print(f"{'sharded save (b), s':34s}{statistics.median(sharded):12.3f}")
        print(f"{'(b) / (a)':34s}{statistics.median(ratio):12.3f}   target <= 1.2")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(
                    {
                        "ranks": a.ranks,
                        "device": a.device,
                        "gib": a.gib,
                        "trials": rows,
                        "ratio_median": statistics.median(ratio),
                        "own_median_s": statistics.median(own),
                        "sharded_median_s": statistics.median(sharded),
                    },
                    f,
                    indent=1,
                )
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
