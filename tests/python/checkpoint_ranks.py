"""One tensor-parallel rank of the sharded checkpoint tests (test_checkpoint_shards.py), run as one process per
rank joined by torch.distributed (gloo, file rendezvous). The rank's engine tensors are vLLM's layout of the
model's text tensors (layout.merge: merged qkv_proj / in_proj_qkvz / gate_up_proj, padded vocabulary, this
rank's shards); the store sees them through the layout views as regions of the Hugging Face tensors.

usage: python checkpoint_ranks.py save|restore --model DIR --rank R --ranks N --init FILE [--steps K]
                                  [--check DIR:G:A ...] [--base DIR]

save:    K generations: the same seeded step on every rank (qwen35_model.step, seed = generation) applied to
         the full text tensors, copied into the engine tensors in place, saved with save_distributed; then a
         rollback: every rank's regions restored to generation 1 and saved as generation K + 1.
restore: for each --check, opens the store of DIR without a head copy (held=[]) and restores generation G
         into zeroed engine tensors; prints whether they equal the layout of the tensors of --base (the
         files at generation 0) after steps 1..A.
Prints one JSON line.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from livetrain import checkpoint, layout

from qwen35_model import step


def text_tensors(model: str, config: dict, ranks: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    names = {t["name"] for t in layout.plan(config, engine="vllm", tp_size=ranks)["hf_tensors"]}
    return {n: t for n, t in load_file(str(Path(model) / "model.safetensors")).items() if n in names}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("--model", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check", action="append", default=[], help="restore: STORE_MODEL_DIR:GENERATION:STEPS_APPLIED")
    p.add_argument("--base", help="restore: the model files at generation 0 (default --model)")
    a = p.parse_args()
    dist.init_process_group("gloo", init_method=f"file://{a.init}", rank=a.rank, world_size=a.ranks)
    config = json.loads((Path(a.model) / "config.json").read_text())
    full = text_tensors(a.model, config, a.ranks)
    kw = dict(engine="vllm", tp_rank=a.rank, tp_size=a.ranks)
    engine = layout.merge(config, full, **kw)
    lay = layout.build(config, engine, **kw)
    shards = checkpoint.shards(lay, layout.views(lay, engine), a.rank)
    out: dict = {"rank": a.rank}
    if a.mode == "save":
        # Rank 0 opens first: it finishes a leftover journal and removes uncommitted files.
        if a.rank != 0:
            dist.barrier()
        store = checkpoint.CheckpointStore(a.model, rank=a.rank, ranks=a.ranks, held=shards, group="test-engine")
        if a.rank == 0:
            dist.barrier()
        results = []
        for g in range(store.head + 1, store.head + 1 + a.steps):
            step(full, g, 0.05 if g % 2 else 0.5)
            for name, t in layout.merge(config, full, **kw).items():
                engine[name].copy_(t)
            results.append(checkpoint.save_distributed(store, shards, weight_version=g))
        store.restore(1, shards)
        results.append(checkpoint.save_distributed(store, shards, weight_version=99))
        out["generations"] = [r["generation"] for r in results]
        out["bytes"] = [r["bytes"] for r in results]
        store.close()
    else:
        base = text_tensors(a.base or a.model, config, a.ranks)
        out["equal"], out["differ"] = [], []
        for check in a.check:
            store_model, generation, applied = check.rsplit(":", 2)
            for t in engine.values():
                t.zero_()
            with checkpoint.CheckpointStore(store_model, rank=a.rank, ranks=a.ranks, held=[]) as store:
                store.restore(int(generation), shards)
            full = {n: t.clone() for n, t in base.items()}
            for g in range(1, int(applied) + 1):
                step(full, g, 0.05 if g % 2 else 0.5)
            want = layout.merge(config, full, **kw)
            differ = sorted(
                n for n in engine if not torch.equal(engine[n].view(torch.int16), want[n].view(torch.int16))
            )
            out["equal"].append(not differ)
            out["differ"].append(differ[:5])
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
