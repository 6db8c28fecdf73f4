"""One tensor-parallel training rank for the tests, and the same steps at TP 1 for comparison.

``python tp_ranks.py DIR SIZE`` (with MASTER_ADDR / MASTER_PORT set) imports what the ranks need once and
forks SIZE rank processes (nothing has run a thread pool yet), which join one gloo group. Rank RANK builds its engine
tensors from DIR/model (vLLM's layout, ``layout.merge``), shares them (``export_cpu``) and attaches to them as
a trainer does, builds the rank's model (``tensor_parallel.build_model``), then on DIR/batch.json: one
backward without a step (the gradients), then DIR/job.json's number of APOLLO-Mini steps from backward hooks,
the output projection's gradient made after backward, as the trainer runs them. Writes DIR/rank-RANK.safetensors
(``grad.NAME`` and ``weight.NAME`` of its parts), DIR/rank-RANK.json (losses and each parameter's shard),
DIR/rank-RANK.optim.safetensors (its optimizer state).

``run_tp1(DIR)`` does the same in this process on the whole model, the path that TP 1 trains on.
"""

import json
import os
import sys
from pathlib import Path

import torch

from livetrain import layout, sharing
from livetrain import safetensors as lst
from livetrain.loss import OutputGradient, causal_lm_loss
from livetrain.optim import ApolloMini, param_groups


def _batch(d: Path):
    b = json.loads((d / "batch.json").read_text())
    ids = torch.tensor(b["ids"])
    return ids, torch.ones_like(ids), torch.tensor(b["labels"]), torch.tensor(b["weights"], dtype=torch.float32)


def _export(d: Path, rank: int, size: int):
    config = json.loads((d / "model" / "config.json").read_text())
    full = lst.load_file(d / "model" / "model.safetensors")
    engine = layout.merge(config, full, engine="vllm", tp_rank=rank, tp_size=size)
    manifest = d / f"engine-{size}-{rank}.json"
    exported = sharing.export_cpu(engine, manifest, config=config, engine="vllm", tp_rank=rank, tp_size=size)
    return exported, sharing.attach(manifest)


def _train(d: Path, model, shards, group, vocab, out_name: str, extra: dict) -> None:
    """The gradients of one backward, then the job's steps; saves both and the losses."""
    ids, attn, labels, weights = _batch(d)
    job = json.loads((d / "job.json").read_text())
    names = {p: n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    losses = []

    later = OutputGradient(vocab=vocab)
    loss = causal_lm_loss(model, ids, attn, labels, weights, later=later, vocab=vocab)
    loss.backward()
    later.apply(lambda w, g: setattr(w, "grad", g))
    losses.append(float(loss.detach()))
    for p, n in names.items():
        out[f"grad.{n}"] = p.grad.detach().clone().contiguous()
        p.grad = None

    opt = ApolloMini(param_groups(model, embeddings=job.get("embeddings", "apollo")), lr=job["lr"])
    if group is not None:
        opt.tensor_parallel(group, shards)
    opt.attach_hooks()
    for _ in range(job["steps"]):
        later = OutputGradient(vocab=vocab)
        loss = causal_lm_loss(model, ids, attn, labels, weights, later=later, vocab=vocab)
        loss.backward()
        later.apply(opt.step_param)
        losses.append(float(loss.detach()))
    report = opt.report()
    opt.save_state(d / f"{out_name}.optim.safetensors", names=names)
    for p, n in names.items():
        out[f"weight.{n}"] = p.detach().clone().contiguous()
    lst.save_file(out, d / f"{out_name}.safetensors")
    info = {"losses": losses, "skipped": report["skipped_nonfinite_grad"] + report["nonfinite_update"], **extra}
    (d / f"{out_name}.json").write_text(json.dumps(info))


def run_tp1(d: Path) -> None:
    exported, attached = _export(d, 0, 1)
    model = sharing.build_hf_model(attached)
    model.train()
    _train(d, model, None, None, None, "rank-tp1", {})
    attached.close()
    exported.close()


def main(d: Path, rank: int, size: int) -> None:
    import torch.distributed as dist

    from livetrain import tensor_parallel

    dist.init_process_group("gloo", rank=rank, world_size=size)
    exported, attached = _export(d, rank, size)
    job = json.loads((d / "job.json").read_text())
    rm = tensor_parallel.build_model(attached, dist.group.WORLD, sequence_parallel=job.get("sequence_parallel", True))
    rm.model.train()
    if job.get("grad_checkpointing"):
        rm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = []  # the second decoder layer's input at each forward: the residual stream as each layer keeps it
    rm.model.model.layers[1].register_forward_pre_hook(lambda _m, args: seen.append(list(args[0].shape)))
    names = {p: n for n, p in rm.model.named_parameters()}
    shards = {
        names[p]: [list(s.full_shape), s.dim, [list(x) for x in s.segments], s.primary] for p, s in rm.shards.items()
    }
    _train(d, rm.model, rm.shards, dist.group.WORLD, rm.vocab, f"rank-{rank}", {"shards": shards, "stream": seen})
    dist.barrier()
    attached.close()
    exported.close()
    dist.destroy_process_group()


def fork_ranks(d: Path, size: int) -> int:
    """The SIZE ranks as children of this process; the number of ranks that failed."""
    import traceback

    import torch.distributed  # noqa: F401  (imported once, before the fork)

    from livetrain import tensor_parallel  # noqa: F401

    pids = []
    for rank in range(size):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                torch.set_num_threads(1)
                main(d, rank, size)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    return sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)


if __name__ == "__main__":
    sys.exit(fork_ranks(Path(sys.argv[1]), int(sys.argv[2])))
