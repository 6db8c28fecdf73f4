"""Tensor-parallel training on an engine rank's own shards, in place: the model of one trainer rank.

An engine at tensor-parallel size N holds, on each rank, a shard of every weight (docs/layouts.md: column-
parallel weights split by output rows, row-parallel ones by input columns, the vocabulary in padded row
blocks, KV heads replicated when N exceeds them). ``build_model`` builds rank r's Hugging Face model from a
*per-rank config* whose head counts, intermediate size and vocabulary are rank r's (``rank_config``), so that
every parameter's shape is the shard's and the layout's views slot in as its parameters, exactly as
``sharing.build_hf_model`` does at TP 1. No rank ever holds another rank's shard or a full weight.

The forward and backward then run tensor-parallel over ``torch.distributed`` (NCCL on CUDA, gloo on CPU),
as Megatron-LM does (Shoeybi et al. 2019, "Megatron-LM", section 3):

- the input of each block whose first layers are column-parallel (attention, gated delta net, MLP): identity
  forward, gradient summed over the ranks in backward (``_CopyToRanks``);
- the output of each row-parallel layer (o_proj, down_proj, out_proj): summed over the ranks forward, its
  bias added once after the sum, identity backward (``_SumOverRanks``);
- the embedding: each rank looks up the ids of its vocabulary rows, zeros for the others, summed over ranks;
- the loss: vocabulary-parallel cross-entropy on each rank's rows of the output projection (``loss.VocabSlice``);
- parameters every rank holds whole but whose gradient each rank sees only part of (per-head norms inside a
  block: q_norm, k_norm, the gated delta net's norm; a KV head several ranks share): gradient summed over
  the ranks holding them, before the optimizer's hook steps them.

Why not transformers' own tensor-parallel plan (``tp_plan``, DTensor): its shards are ``torch.chunk``
blocks of the full tensor, while vLLM's vocabulary shards are blocks of the *padded* vocabulary and its KV
heads are replicated across ranks when N exceeds them, neither of which a DTensor ``Shard`` placement can
describe; its plans gather the output projection's logits (``colwise_gather_output``) and the gated delta
net's projections (Qwen3.5) instead of splitting them by head; and its parameters would be DTensors, which
the optimizer's in-place steps on the engine's memory would have to unwrap at every step.

The optimizer steps each rank's part of a parameter (livetrain.optim: ``Apollo.tensor_parallel``) with
``shards``: the projection and norms that need the whole tensor are summed over the ranks there.
"""

from __future__ import annotations

import copy
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from livetrain import _core, layout, sharing
from livetrain.loss import VocabSlice
from livetrain.optim import ParamShard

__all__ = ["RankModel", "build_model", "rank_config"]


class _CopyToRanks(torch.autograd.Function):
    """The input of a column-parallel block: the same on every rank forward; each rank's gradient of it
    covers only its heads or channels, so backward sums them over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may hand the same tensor elsewhere
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """The output of a row-parallel layer (or the embedding): each rank's is a partial sum, the full one is
    their sum; its gradient is the same on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def rank_config(config: Mapping, info: Mapping, tp_size: int, vocab_rows: int) -> dict:
    """The config.json of one rank's model: ``config`` with the sizes a rank holds a part of divided by the
    TP size (attention heads; KV heads, one when the TP size exceeds them, as vLLM replicates them;
    intermediate size; gated delta net key and value heads), ``head_dim`` written out (it defaults to
    hidden/heads, which the division would change), the vocabulary the rank's rows, and no pad token (the
    rank's embedding maps it itself, see ``build_model``). ``info`` is the layout's (livetrain.layout.build)."""
    cfg = copy.deepcopy(dict(config))
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    text["num_attention_heads"] = info["num_heads"] // tp_size
    text["num_key_value_heads"] = max(info["num_kv_heads"] // tp_size, 1)
    text["head_dim"] = info["head_dim"]
    text["intermediate_size"] = info["intermediate_size"] // tp_size
    if info["linear_num_key_heads"]:
        text["linear_num_key_heads"] = info["linear_num_key_heads"] // tp_size
        text["linear_num_value_heads"] = info["linear_num_value_heads"] // tp_size
    for c in {id(text): text, id(cfg): cfg}.values():
        if "vocab_size" in c or c is text:
            c["vocab_size"] = vocab_rows
        if c.get("pad_token_id") is not None:
            c["pad_token_id"] = None
    return cfg


class RankModel(NamedTuple):
    """One rank's model and what the trainer needs beside it: ``shards`` (each parameter's part of the full
    tensor, for the optimizer), ``vocab`` (its rows of the output projection, for the loss), the rank's
    layout and views (for the checkpoint store's regions), rank and size."""

    model: torch.nn.Module
    shards: dict
    vocab: VocabSlice
    layout: dict
    views: dict
    rank: int
    size: int


def _holders(group, mine: dict) -> tuple[dict, list]:
    """For each parameter name: the ranks (in ``group``) whose shard of it is the same as this rank's; and
    every set of two or more such ranks on any rank, sorted (``dist.new_group`` must be called by every rank
    for every subgroup, in the same order, including the subgroups this rank is not in)."""
    import torch.distributed as dist

    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)

    def holding(name, shard):
        return tuple(r for r, theirs in enumerate(every) if theirs.get(name) == shard)

    shared = sorted({g for theirs in every for n, s in theirs.items() if len(g := holding(n, s)) > 1})
    return {name: list(holding(name, shard)) for name, shard in mine.items()}, shared


def _sum_gradient(group):
    import torch.distributed as dist

    def hook(grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def build_model(attached: sharing.Attached, group, *, requires_grad: bool = True) -> RankModel:
    """The Hugging Face model of the engine rank ``attached`` (a ``vllm``-layout manifest of tp_rank r of
    tp_size N) on its own memory, tensor-parallel over ``group`` (a ``torch.distributed`` group of the N
    trainer ranks, rank r in it being this one). Every rank calls it at the same point (it runs
    collectives). Raises livetrain.Error naming the field or tensor when the engine's shards do not fit."""
    import torch.distributed as dist

    model_rec = attached.manifest["model"]
    rank, size = int(model_rec["tp_rank"]), int(model_rec["tp_size"])
    if dist.get_rank(group) != rank or dist.get_world_size(group) != size:
        raise _core.InvalidArgumentError(
            f"{attached.path}: the manifest is tensor-parallel rank {rank} of {size}, but this process is rank "
            f"{dist.get_rank(group)} of {dist.get_world_size(group)} of its process group"
        )
    if layout.engine_layout(model_rec["engine"]) != "vllm":
        raise _core.UnsupportedError(
            f"{attached.path}: engine {model_rec['engine']!r} shares whole Hugging Face tensors; tensor-parallel "
            "training needs an engine that shares its shards in vLLM's layout"
        )
    lay = layout.build(model_rec["config"], attached.tensors, engine="vllm", tp_rank=rank, tp_size=size)
    views = layout.views(lay, attached.tensors)
    by_name = {v["hf_name"]: v for v in lay["views"]}
    embed = next(v for v in lay["views"] if v["hf_name"].endswith("embed_tokens.weight"))
    (dim, [(vocab_start, vocab_rows)]) = embed["shard"]
    if vocab_rows == 0:
        raise _core.UnsupportedError(
            f"{attached.path}: tensor-parallel rank {rank} holds no vocabulary rows (a vocabulary of "
            f"{embed['hf_shape'][0]} padded to a multiple of 64 over {size} ranks); use fewer ranks"
        )
    config = rank_config(model_rec["config"], lay["info"], size, vocab_rows)
    model = sharing.build_hf_model(attached, hf_views=lambda _: views, requires_grad=requires_grad, config=config)

    # Each parameter's part of the full tensor; ranks holding the same block (a shared KV head) find each other.
    mine = {
        v["hf_name"]: (v["shard"][0], [tuple(s) for s in v["shard"][1]])
        for v in lay["views"]
        if v["shard"] is not None and v["tied_to"] is None
    }
    holders, shared = _holders(group, mine)
    params = dict(model.named_parameters())
    shards = {}
    for name, p in params.items():
        v = by_name[name]
        if v["shard"] is None:
            shards[p] = ParamShard(tuple(v["hf_shape"]))
        else:
            d, segments = v["shard"]
            shards[p] = ParamShard(tuple(v["hf_shape"]), d, tuple(tuple(s) for s in segments), holders[name][0] == rank)

    _install(model, params, shards, holders, shared, group, vocab_start, vocab_rows, model_rec["config"])
    return RankModel(model, shards, VocabSlice(vocab_start, group), lay, views, rank, size)


def _install(model, params, shards, holders, shared, group, vocab_start, vocab_rows, full_config) -> None:
    """The Megatron operators of the module's docstring, on the model's modules (their parameters and names
    stay as transformers made them)."""
    import torch.distributed as dist

    modules = dict(model.named_modules())
    owner = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters(remove_duplicate=False)}
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    row_parallel, blocks = set(), set()
    for name, p in params.items():
        sh, mod = shards[p], owner[id(p)]
        module = modules[mod]
        if sh.dim < 0 or module is embeddings or module is head or p.dim() != 2:
            continue
        if sh.dim == 1:
            row_parallel.add(mod)
        else:
            blocks.add(mod.rpartition(".")[0])  # the attention / gated delta net / MLP the layer is the input of

    def copy_input(module, args, kwargs):
        if args:
            return (_CopyToRanks.apply(args[0], group), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": _CopyToRanks.apply(kwargs["hidden_states"], group)}
        raise TypeError(f"{type(module).__name__}: no input to make tensor-parallel")

    for b in sorted(blocks):
        modules[b].register_forward_pre_hook(copy_input, with_kwargs=True)
    for r in sorted(row_parallel):
        _row_parallel(modules[r], group)
    pad = full_config.get("pad_token_id", (full_config.get("text_config") or {}).get("pad_token_id"))
    local_pad = pad - vocab_start if pad is not None and vocab_start <= pad < vocab_start + vocab_rows else None
    _vocab_parallel_embedding(embeddings, vocab_start, vocab_rows, local_pad, group)

    # Gradients each rank sees only part of: replicated parameters inside a block (not a row-parallel layer's
    # bias, added after the sum), and blocks several ranks hold.
    subgroups = {ranks: dist.new_group([dist.get_global_rank(group, r) for r in ranks]) for ranks in shared}
    for name, p in params.items():
        sh, mod = shards[p], owner[id(p)]
        inside = any(mod == b or mod.startswith(b + ".") for b in blocks) and mod not in row_parallel
        if sh.dim < 0 and inside and p.requires_grad:
            p.register_hook(_sum_gradient(group))
        elif sh.dim >= 0 and len(holders.get(name, ())) > 1 and p.requires_grad:
            p.register_hook(_sum_gradient(subgroups[tuple(holders[name])]))


def _row_parallel(module: torch.nn.Module, group) -> None:
    """A row-parallel linear layer: its partial product summed over ranks, then its (replicated) bias once."""

    def forward(x):
        y = _SumOverRanks.apply(F.linear(x, module.weight), group)
        return y if module.bias is None else y + module.bias

    module.forward = forward


def _vocab_parallel_embedding(module: torch.nn.Module, start: int, rows: int, pad: int | None, group) -> None:
    """The rank's vocabulary rows [start, start + rows): its ids looked up (the pad token's row, if it is
    here, gets no gradient, as nn.Embedding's padding_idx), zeros for the others, summed over the ranks."""

    def forward(ids):
        local = ids - start
        inside = (local >= 0) & (local < rows)
        out = F.embedding(torch.where(inside, local, 0), module.weight, padding_idx=pad)
        return _SumOverRanks.apply(out.masked_fill(~inside[..., None], 0), group)

    module.forward = forward
