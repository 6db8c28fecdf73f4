"""Does the same number of changed elements cost the checkpoint encoder more when they lie in fewer tensors? Host
saves (no GPU) of bench/checkpoint.py's Llama-shaped bf16 model cut to --gib, alternating in one store: the sweep's
synthetic step on every tensor at lr 1.3e-6 (uniform, ~4.1% changed everywhere, as bench/checkpoint.py's sweep) and on
every other tensor at --lr-half (concentrated: about twice the density in half the tensors, as a real step whose
changes differ by tensor). Prints each save's encoder time and CPU time (the store's "usage": CPU time is less
sensitive than wall time to other processes on a shared machine).

With --embedding-rows N instead: a step as a real one lies (bench/serve.py --save-probe on the H200: the 27B's
embedding and lm_head, 9.5% of its elements, at <= 0.1% changed): the synthetic step on every tensor but the
embedding, and on N of the embedding's rows only, saved under checkpoint.encoder=3 (a record's gaps measured and
written by the one thread that assembles it) and 4 (block by block on the pool's threads), alternating; "encoder
threads" (its chunks' thread-seconds / its busy time) is the parallelism the encoder kept, out of the pool's.

usage: python bench/encode_density.py [--gib 1] [--rounds 3] [--lr-half 1.85e-6]
       python bench/encode_density.py --embedding-rows 64 [--gib 2] [--rounds 3]
"""

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import checkpoint as ck  # noqa: E402  (bench/checkpoint.py, beside this file)


def sparse_embedding(a) -> int:
    import torch

    from livetrain import _core
    from livetrain.checkpoint import CheckpointStore

    work = tempfile.mkdtemp(prefix="livetrain-encode-density-")
    try:
        live, _, model_dir = ck.host_model(a.gib, work)
        emb = next(n for n in live if "embed" in n)
        rest = {n: t for n, t in live.items() if n != emb}
        store = CheckpointStore.create(model_dir, os.path.join(work, "store"))
        print(
            f"{emb}: {live[emb].numel():,} of {sum(t.numel() for t in live.values()):,} elements; {a.embedding_rows} "
            f"of its {live[emb].shape[0]:,} rows stepped\n"
        )
        print(
            "| checkpoint.encoder | changed | bytes written | encode busy s | encoder threads | encoder CPU s (user / sys) |\n"
            "|---|---:|---:|---:|---:|---|"
        )
        threads = {3: [], 4: []}
        for k in range(a.rounds):
            for enc in (3, 4):
                ck.apollo_like_step(rest, 1.3e-6, seed=10 * k + enc)
                g = torch.Generator().manual_seed(10 * k + enc)
                rows = torch.randperm(live[emb].shape[0], generator=g)[: a.embedding_rows]
                part = live[emb][rows]
                ck.apollo_like_step({"e": part}, 1.3e-6, seed=10 * k + enc)
                live[emb][rows] = part
                was = _core.tuning()["checkpoint.encoder"]["value"]
                _core.tuning_set("checkpoint.encoder", enc)
                try:
                    d = ck.livetrain_save(store, live)
                finally:
                    _core.tuning_set("checkpoint.encoder", was)  # not tuning_reset: LIVETRAIN_TUNING's other knobs stay
                e = d["usage"]["encode"]
                threads[enc].append(e["wall_seconds"] / max(d["encode_seconds"], 1e-9))
                print(
                    f"| {enc} | {d['changed'] / d['elements']:.2%} | {d['bytes_written']:,} | {d['encode_seconds']:.3f} | "
                    f"{threads[enc][-1]:.2f} | {e['user_seconds']:.3f} / {e['system_seconds']:.3f} |",
                    flush=True,
                )
        store.close()
        med = {k: sorted(v)[len(v) // 2] for k, v in threads.items()}
        print(f"\nencoder threads, median, of {_core.num_threads()}: encoder 3 {med[3]:.2f}, encoder 4 {med[4]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lr-half", type=float, default=1.85e-6)
    ap.add_argument("--embedding-rows", type=int, default=0)
    a = ap.parse_args()
    if a.embedding_rows:
        return sparse_embedding(a)
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
