"""The reference engine at tensor-parallel size N: N engine processes, rank r holding its shard of every
weight in vLLM's layout (docs/layouts.md) in its own shared memory, exported as its own manifest, and
generating tensor-parallel with the others. docs/tensor-parallel.md, "The reference engine at TP N".

Rank 0 takes the HTTP requests and runs the scheduler of livetrain.engines.batching (continuous batching
as at TP 1). Every model call and every change of the batch's KV cache it makes is first sent to the other
ranks (``Driven``, ``TPScheduler``), which make the same call on their own shards and their own cache
(``follow``): the model's collectives (livetrain.tensor_parallel: the Megatron operators) then line up on
every rank. Each rank's logits are its vocabulary rows; rank 0 gathers them into the whole vocabulary and
samples, so sampling, seeds and stop strings are exactly as at TP 1.

The ranks are one ``torch.distributed`` group (gloo on CPU, NCCL on CUDA, one GPU per rank), commands
travel over a gloo group of their own, as the trainer's ranks do (livetrain.trainer.ranks.Ranks, reused
here with ``role="engine"``). A rank that dies makes rank 0's next command or collective fail: rank 0 then
answers generation requests with 503 and which rank died, and ``livetrain serve`` stops (as it does when
the TP 1 engine dies).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from types import SimpleNamespace

import torch

from livetrain.engines import batching
from livetrain.trainer.ranks import RankFailure, Ranks

__all__ = ["Driven", "RankWeights", "TPScheduler", "follow", "gather_logits", "load", "serve_rank", "start"]

# Seconds between two checks whether rank 0, idle, must send the others a no-op (Ranks.heartbeat).
HEARTBEAT_CHECK_S = 10.0


def start(device: str, run_dir: str, env=os.environ) -> Ranks | None:
    """This engine process's place among the engine's ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    set by ``livetrain serve``), its process group joined; None at TP 1. At TP > 1 rank r runs on
    ``cuda:r`` when ``device`` is cuda."""
    ranks = Ranks.from_env(state_dir=run_dir, env=env)
    if ranks is None:
        return None
    ranks.role = "engine"
    ranks.start(rank_device(device, ranks.rank))
    return ranks


def rank_device(device: str, rank: int) -> torch.device:
    d = torch.device(device)
    return torch.device("cuda", rank) if d.type == "cuda" else d


class RankWeights:
    """One rank's weights: its shards in vLLM's layout, set to the head generation of the model's checkpoint
    store (``checkpoint``, restore_latest's answer), shared (``exported``, a manifest of its own naming the
    engine's ``group``), and this rank's Hugging Face model on them (``model``, tensor-parallel over the
    ranks' group), plus every rank's number of vocabulary rows (``vocab_rows``), which rank 0 gathers."""

    def __init__(self, model, exported, checkpoint, vocab_rows: list[int]):
        self.model, self.exported, self.checkpoint, self.vocab_rows = model, exported, checkpoint, vocab_rows


def load(
    ranks: Ranks, model_dir: str, manifest: str, device: torch.device, dtype, *, store: bool, store_dir: str | None
) -> RankWeights:
    """Loads the model's files, cuts this rank's shards (``layout.merge``: copies of its own part only, the
    full tensors freed after), restores the store's head generation into them (rank 0 first: it creates the
    store when missing), shares them and builds the rank's model. Every rank calls it at once."""
    import torch.distributed as dist
    import transformers

    from livetrain import _core, checkpoint, layout, sharing, tensor_parallel

    rank, size = ranks.rank, ranks.size
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    for name, p in loaded.named_parameters():  # served as vLLM serves them (Gated DeltaNet's A_log in float32)
        if layout.served_in_fp32(name):
            p.data = p.data.float()
    # Under the files' names (a multimodal checkpoint's text model: model.language_model.*), as the layout's
    # plan names the HF tensors.
    full = checkpoint.by_file_names({n: p.data for n, p in loaded.named_parameters()}, model_dir)
    layout.load_fp32_exactly(full, model_dir)  # a float32 A_log in the files: its values, not bf16's
    tensors = layout.merge(config, full, engine="vllm", tp_rank=rank, tp_size=size)
    del full, loaded
    tensors = {n: t.to(device) for n, t in tensors.items()}
    lay = layout.build(config, tensors, engine="vllm", tp_rank=rank, tp_size=size)
    restored = None
    for turn in (0, 1):  # rank 0 first: it recovers or creates the store, then the others read it
        if store and (rank == 0) == (turn == 0):
            regions = checkpoint.shards(lay, layout.views(lay, tensors), rank)
            restored = checkpoint.restore_latest(regions, model_dir, store_dir, create=rank == 0, rank=rank, ranks=size)
        dist.barrier(group=ranks.control)
    model_args = dict(
        model_path=model_dir,
        config=config,
        engine="vllm",  # the manifest's engine kind names its layout (livetrain.layout.engine_layout)
        tp_rank=rank,
        tp_size=size,
        group=os.path.dirname(os.path.abspath(manifest)),  # the run directory: one per server
    )
    if device.type == "cpu":
        exported = sharing.export_cpu(tensors, manifest, **model_args)
    else:
        exported = sharing.export_cuda(tensors, manifest, **model_args)
    own = SimpleNamespace(
        path=manifest,
        manifest=json.loads(_core.manifest_read(manifest)),
        tensors=exported.tensors,
        config=config,
    )
    rank_model = tensor_parallel.build_model(own, ranks.group, requires_grad=False)
    rows = [None] * size
    dist.all_gather_object(rows, rank_model.model.get_output_embeddings().weight.shape[0], group=ranks.control)
    return RankWeights(rank_model.model.eval(), exported, restored, rows)


def gather_logits(logits: torch.Tensor, ranks: Ranks, rows: list[int]) -> torch.Tensor | None:
    """Each rank's logits of its vocabulary rows [B, T, rows[r]] -> on rank 0 the whole vocabulary's
    [B, T, sum(rows)] in float32 (None on the others). The rows of rank r follow those of rank r - 1: vLLM
    pads the vocabulary at its end and splits it in equal blocks, whose real rows are each a prefix."""
    import torch.distributed as dist

    width = max(rows)
    x = torch.nn.functional.pad(logits.float(), (0, width - logits.shape[-1])).contiguous()
    if ranks.rank != 0:
        dist.gather(x, None, dst=0, group=ranks.group)
        return None
    parts = [torch.empty_like(x) for _ in rows]
    dist.gather(x, parts, dst=0, group=ranks.group)
    return torch.cat([p[..., :n] for p, n in zip(parts, rows)], dim=-1)


def _tensors(kwargs: dict, device=None) -> dict:
    """A model call's keyword arguments to send (tensors on the CPU) or as received (on ``device``)."""
    return {
        k: (v.to(device) if device is not None else v.cpu()) if torch.is_tensor(v) else v for k, v in kwargs.items()
    }


class Driven:
    """Rank 0's model as the scheduler sees it: each call is first sent to the other ranks (with whether it
    runs on the batch's cache or a new one, and the rows' starts of a batched decode step), then run here;
    its logits are the whole vocabulary's. Attributes are the model's. ``command`` sends the cache changes.
    After any failure every call raises RankFailure with which rank died or failed."""

    def __init__(self, model, ranks: Ranks, rows: list[int]):
        self._model, self._ranks, self._rows = model, ranks, rows
        self._lock = threading.Lock()  # one command and its collectives at a time (the heartbeat's no-op too)
        self._closed = False
        threading.Thread(target=self._heartbeat, name="livetrain-engine-heartbeat", daemon=True).start()

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def failure(self) -> str | None:
        return self._ranks.failure

    def command(self, op: str, *args) -> None:
        with self._lock:
            self._ranks.lead(op, *args)

    def __call__(self, **kwargs):
        cache = kwargs.pop("past_key_values", None)
        with self._lock:
            self._ranks.lead("forward", _tensors(kwargs), cache is not None, batching._ROWS.starts)
            try:
                out = self._model(past_key_values=cache, **kwargs)
                out.logits = gather_logits(out.logits[:, -1:], self._ranks, self._rows)
            except Exception as e:  # the others are inside this call's collectives, or gone
                raise self._ranks.fail(e) from e
        return out

    def _heartbeat(self) -> None:
        while not self._closed and self._ranks.failure is None:
            time.sleep(HEARTBEAT_CHECK_S)
            with self._lock:
                if not self._closed:
                    self._ranks.heartbeat()

    def close(self) -> None:
        """Tells the other ranks to stop (they close their sharing and exit)."""
        with self._lock:
            if not self._closed and self._ranks.failure is None:
                try:
                    self._ranks.lead("stop")
                except RankFailure:
                    pass
            self._closed = True


class TPScheduler(batching.Scheduler):
    """The scheduler of rank 0 at TP N: batching.Scheduler on ``Driven``, which also sends the changes of
    the batch's cache (a prefilled row joining it, rows leaving it) so that every rank's cache holds the
    same rows at the same positions."""

    def __init__(self, model: Driven, eos: set[int], **kw):
        if kw.get("attention") == "static":  # its cache is one process's (options.check refuses it first)
            raise ValueError("attention 'static' is not supported with tensor parallelism")
        if kw.get("attention", "auto") == "auto":  # auto at TP N: rows (static is one process's)
            kw["attention"] = "rows"
        super().__init__(model, eos, **kw)
        model.command("setup", self.base)  # the others' attention: rows of a batch as rank 0's

    def _join(self, row: batching._Row, cache) -> None:
        if not self._rows:
            self.model.command("join", None, None)
        else:
            length = max(self._length, row.length)
            self.model.command("join", length - self._length, length - row.length)
        super()._join(row, cache)

    def _leave(self, keep: list[int]) -> None:
        kept = [self._rows[i].start for i in keep]
        self.model.command("leave", keep, min(kept) if kept else 0)
        super()._leave(keep)


def follow(ranks: Ranks, model, device: torch.device, rows: list[int]) -> None:
    """Ranks > 0: runs rank 0's model calls and cache changes on this rank's model until rank 0 says stop
    (or is gone: then this process's failure is recorded and it exits)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # a thread starts on GPU 0; this rank's collectives and kernels are on its GPU
    state = {"new": None, "batch": None}  # the cache of the row being prefilled, the batch's

    @torch.inference_mode()
    def forward(kwargs: dict, on_batch: bool, starts) -> None:
        batching._ROWS.starts = starts
        try:
            out = model(past_key_values=state["batch"] if on_batch else None, **_tensors(kwargs, device))
        finally:
            batching._ROWS.starts = None
        if not on_batch:
            state["new"] = out.past_key_values
        gather_logits(out.logits[:, -1:], ranks, rows)

    def setup(base: str | None) -> None:
        if base is not None:
            batching._use_row_attention(model)

    @torch.inference_mode()
    def join(grow: int | None, start: int | None) -> None:
        if grow is None:
            state["batch"] = state["new"]
        else:
            batching.merge_cache(state["batch"], state["new"], grow, start)
        state["new"] = None

    @torch.inference_mode()
    def leave(keep: list[int], trim: int) -> None:
        if keep:
            batching.select_rows(state["batch"], keep, trim)
        else:
            state["batch"] = None

    ops = {"forward": forward, "setup": setup, "join": join, "leave": leave}
    ranks.run_commands(ops, fatal=set(ops))


def serve_rank(ranks: Ranks, weights: RankWeights, device: torch.device) -> None:
    """A rank > 0's process: follows rank 0 in a thread while the main thread waits for it or for SIGTERM
    (a blocking collective would delay the signal's handler); then removes its shared memory and exits."""
    import signal

    done = threading.Event()

    def run():
        try:
            follow(ranks, weights.model, device, weights.vocab_rows)
        except SystemExit:
            pass
        finally:
            done.set()

    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=run, name="livetrain-engine-rank", daemon=True).start()
    print(
        f"livetrain engine: tensor-parallel rank {ranks.rank} of {ranks.size} follows rank 0",
        file=sys.stderr,
        flush=True,
    )
    while not done.wait(1.0):
        pass
    weights.exported.close()
    sys.stdout.flush()
    os._exit(0)  # the follower thread may still sit in a collective of a group that is gone
