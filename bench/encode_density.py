"""Does the same number of changed elements cost the checkpoint encoder more when they lie in fewer tensors? Host
saves (no GPU) of bench/checkpoint.py's Llama-shaped bf16 model cut to --gib, alternating in one store: the sweep's
synthetic step on every tensor at lr 1.3e-6 (uniform, ~4.1% changed everywhere, as bench/checkpoint.py's sweep) and on
every other tensor at --lr-half (concentrated: about twice the density in half the tensors, as a real step whose
changes differ by tensor). Prints each save's encoder time and CPU time (the store's "usage": CPU time is less
sensitive than wall time to other processes on a shared machine).

usage: python bench/encode_density.py [--gib 1] [--rounds 3] [--lr-half 1.85e-6]
"""

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import checkpoint as ck  # noqa: E402  (bench/checkpoint.py, beside this file)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lr-half", type=float, default=1.85e-6)
    a = ap.parse_args()
    from livetrain.checkpoint import CheckpointStore

    work = tempfile.mkdtemp(prefix="livetrain-encode-density-")
    try:
        live, _, model_dir = ck.host_model(a.gib, work)
        half = {n: live[n] for n in list(live)[::2]}
        store = CheckpointStore.create(model_dir, os.path.join(work, "store"))
        print(
            "| step | changed | bytes written | encode busy s | encoder CPU s (user / sys) | encoder thread s | "
            "encoder minor faults |\n|---|---:|---:|---:|---|---:|---:|"
        )
        steps = (
            ("uniform: every tensor at lr 1.3e-6", live, 1.3e-6),
            (f"concentrated: every other tensor at lr {a.lr_half:g}", half, a.lr_half),
        )
        cpu = {label: [] for label, _, _ in steps}
        for k in range(a.rounds):
            for j, (label, part, lr) in enumerate(steps):
                ck.apollo_like_step(part, lr, seed=100 * k + j)
                d = ck.livetrain_save(store, live)
                e = d["usage"]["encode"]
                cpu[label].append(e["user_seconds"] + e["system_seconds"])
                print(
                    f"| {label} | {d['changed'] / d['elements']:.2%} | {d['bytes_written']:,} | "
                    f"{d['encode_seconds']:.3f} | {e['user_seconds']:.3f} / {e['system_seconds']:.3f} | "
                    f"{e['wall_seconds']:.3f} | {e['minor_faults']:,} |",
                    flush=True,
                )
        store.close()
        (u, uv), (c, cv) = cpu.items()
        print(f"\nencoder CPU s, median: {u}: {sorted(uv)[len(uv) // 2]:.3f}; {c}: {sorted(cv)[len(cv) // 2]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
