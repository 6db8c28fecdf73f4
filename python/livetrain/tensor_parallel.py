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

For training (``sequence_parallel=True``, what the trainer builds) the residual stream between the blocks is
split by tokens as well (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4.2.2): rank r holds rows [r·c, (r+1)·c) of the batch's B·T tokens (c = ceil(B·T / N), the
last rows zero padding), so the norms, residual additions and the checkpoint each decoder layer keeps for
recomputation are 1/N of the replicated ones. Then the input of a column-parallel block is gathered over the
ranks (``GATHER``: all-gather forward, reduce-scatter backward), a row-parallel layer's partial sums
are reduce-scattered to the token rows (``REDUCE_SCATTER``), the first decoder layer takes its rows of
the embeddings' output (``SPLIT``) and the final norm's output is gathered for the vocabulary-parallel
loss (``GATHER_REPLICATED``). The same bytes cross as with the all-reduces (an all-reduce is a
reduce-scatter and an all-gather), and every parameter every rank holds whole (the layer norms too) sees only
its tokens: its gradient is summed over the ranks. Everything outside the blocks must be per token (norms,
residual additions), as in every decoder the layouts take; the reference engine's generation (one token at
a time) builds the model without it.

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

from livetrain import _core, kernels, layout, sharing
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


class _Tokens:
    """The token split of one forward (sequence parallelism): the batch's shape [B, T, H], its B·T rows and
    each rank's c of them. Set by the first decoder layer's ``split``, read by the collectives after
    it; a recomputed layer (gradient checkpointing) finds the same values (the same step's batch)."""

    def __init__(self, group):
        import torch.distributed as dist

        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)
        self.shape: tuple = ()
        self.rows = self.chunk = 0

    def set(self, shape) -> None:
        self.shape = tuple(shape)
        self.rows = self.shape[0] * self.shape[1]
        self.chunk = -(-self.rows // self.size)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """[1, c, H] of every rank -> the batch's [B, T, H] (one all_gather_into_tensor)."""
        import torch.distributed as dist

        h = local.shape[-1]
        full = torch.empty((self.size * self.chunk, h), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(full, local.reshape(self.chunk, h).contiguous(), group=self.group)
        return full[: self.rows].view(*self.shape[:2], h)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] partial sums on every rank -> this rank's rows of their sum, [1, c, H]."""
        import torch.distributed as dist

        h = x.shape[-1]
        flat = x.reshape(self.rows, h)
        if self.size * self.chunk != self.rows:
            flat = F.pad(flat, (0, 0, 0, self.size * self.chunk - self.rows))
        out = torch.empty((self.chunk, h), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, flat.contiguous(), group=self.group)
        return out.view(1, self.chunk, h)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """The first layer's input [B, T, H]: sets the split (``set``), then this rank's rows (``mine``)."""
        self.set(x.shape)
        return self.mine(x)

    def mine(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of [B, T, H] (the same on every rank), in memory of their own, [1, c, H]."""
        h = x.shape[-1]
        start = self.rank * self.chunk
        take = max(0, min(self.chunk, self.rows - start))
        out = x.new_zeros((self.chunk, h))
        out[:take] = x.reshape(self.rows, h)[start : start + take]
        return out.view(1, self.chunk, h)


class _AlongTokens(torch.autograd.Function):
    """A sequence-parallel operator: ``x`` -> ``tokens.<forward>(x)``, its gradient -> ``tokens.<backward>``
    (the operators are the pairs below)."""

    @staticmethod
    def forward(ctx, x, tokens, forward, backward):
        ctx.tokens, ctx.backward_op = tokens, backward
        return getattr(tokens, forward)(x)

    @staticmethod
    def backward(ctx, grad):
        return getattr(ctx.tokens, ctx.backward_op)(grad), None, None, None


# The embeddings' output (the same on every rank) -> this rank's token rows; backward gathers the rows'
# gradients (each rank's is whole for its rows) into the batch's.
SPLIT = ("split", "gather")
# The input of a column-parallel block: every rank's rows gathered into the batch; each rank's gradient of
# it covers only its heads or channels, so backward sums them and keeps the rank's rows (a reduce-scatter).
GATHER = ("gather", "reduce_scatter")
# The output of a row-parallel layer: each rank's is a partial sum of the batch; the rank keeps its rows of
# the sum; backward gathers the rows' gradients.
REDUCE_SCATTER = ("reduce_scatter", "gather")
# The final norm's output gathered for the loss, whose backward hands every rank the same gradient of the
# whole batch (the vocabulary-parallel loss sums its parts over the ranks): backward keeps the rank's rows.
GATHER_REPLICATED = ("gather", "mine")


def _along_tokens(x, tokens, op):
    return _AlongTokens.apply(x, tokens, *op)


class _RMSNorm(torch.autograd.Function):
    """transformers' Llama RMSNorm, the same operations forward, keeping for backward only its input and
    the per-row 1/rms: autograd over the module's operations keeps the input in fp32 and the normalized
    rows in the input's dtype, three times the input's bytes, for every norm of the layer being recomputed
    (input, post-attention, q_norm, k_norm: ~150 MiB of a TP-2 rank's peak at 4,096 tokens of an 8B model).
    Backward recomputes the normalized rows (one more pass over the input)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        xf = x.to(torch.float32)
        normed = (xf * r).to(x.dtype)
        grad_weight = (grad * normed).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)  # d/d(normalized rows), through the cast back to fp32
            # y = x·r with r = (mean(x²) + eps)^-1/2: dx = g·r − x·r³·mean(g·x)
            grad_x = (g * r - xf * r.pow(3) * (g * xf).mean(-1, keepdim=True)).to(x.dtype)
        return grad_x, grad_weight, None


def _lean_norms(model: torch.nn.Module) -> None:
    """Every Llama-formula RMSNorm of the model computed by _RMSNorm (the same forward, less kept for
    backward)."""
    for module in model.modules():
        if type(module).__name__ in kernels.LLAMA_RMS_NORMS and hasattr(module, "variance_epsilon"):

            def forward(x, module=module):
                return _RMSNorm.apply(x, module.weight, module.variance_epsilon)

            module.forward = forward


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


def build_model(
    attached: sharing.Attached, group, *, requires_grad: bool = True, sequence_parallel: bool = False
) -> RankModel:
    """The Hugging Face model of the engine rank ``attached`` (a ``vllm``-layout manifest of tp_rank r of
    tp_size N) on its own memory, tensor-parallel over ``group`` (a ``torch.distributed`` group of the N
    trainer ranks, rank r in it being this one). ``sequence_parallel``: the residual stream split by tokens
    too (the module's docstring; for training: the model then takes whole sequences, no KV cache). Every
    rank calls it at the same point (it runs collectives). Raises livetrain.Error naming the field or tensor
    when the engine's shards do not fit."""
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

    tokens = None
    if sequence_parallel:
        decoder = getattr(model, "model", None)
        if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) or not hasattr(decoder, "norm"):
            raise _core.UnsupportedError(
                f"{attached.path}: {type(model).__name__} has no decoder layers and final norm at model.layers / "
                "model.norm: sequence parallelism does not know where its residual stream is"
            )
        tokens = _Tokens(group)
    _install(model, params, shards, holders, shared, group, vocab_start, vocab_rows, model_rec["config"], tokens)
    if requires_grad:
        _lean_norms(model)
    return RankModel(model, shards, VocabSlice(vocab_start, group), lay, views, rank, size)


def _install(model, params, shards, holders, shared, group, vocab_start, vocab_rows, full_config, tokens) -> None:
    """The Megatron operators of the module's docstring, on the model's modules (their parameters and names
    stay as transformers made them); with ``tokens`` (a _Tokens), those of sequence parallelism."""
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

    def on_input(fn, *extra):
        def hook(module, args, kwargs):
            if args:
                return (fn(args[0], *extra), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"], *extra)}
            raise TypeError(f"{type(module).__name__}: no input to make tensor-parallel")

        return hook

    for b in sorted(blocks):
        if tokens is None:
            modules[b].register_forward_pre_hook(on_input(_CopyToRanks.apply, group), with_kwargs=True)
        else:
            modules[b].register_forward_pre_hook(on_input(_along_tokens, tokens, GATHER), with_kwargs=True)
    for r in sorted(row_parallel):
        _row_parallel(modules[r], group, tokens)
    if tokens is not None:
        model.model.layers[0].register_forward_pre_hook(on_input(_along_tokens, tokens, SPLIT), with_kwargs=True)
        model.model.norm.register_forward_hook(lambda _m, _a, out: _along_tokens(out, tokens, GATHER_REPLICATED))
    pad = full_config.get("pad_token_id", (full_config.get("text_config") or {}).get("pad_token_id"))
    local_pad = pad - vocab_start if pad is not None and vocab_start <= pad < vocab_start + vocab_rows else None
    _vocab_parallel_embedding(embeddings, vocab_start, vocab_rows, local_pad, group)

    # Gradients each rank sees only part of: replicated parameters inside a block (not a row-parallel layer's
    # bias, added after the sum) or, under sequence parallelism, every replicated one (each rank's tokens);
    # and blocks several ranks hold.
    subgroups = {ranks: dist.new_group([dist.get_global_rank(group, r) for r in ranks]) for ranks in shared}
    for name, p in params.items():
        sh, mod = shards[p], owner[id(p)]
        inside = any(mod == b or mod.startswith(b + ".") for b in blocks) and mod not in row_parallel
        if sh.dim < 0 and (inside or tokens is not None) and p.requires_grad:
            p.register_hook(_sum_gradient(group))
            shards[p] = sh._replace(summed=True)  # the optimizer's step then needs no collective of its own
        elif sh.dim >= 0 and len(holders.get(name, ())) > 1 and p.requires_grad:
            p.register_hook(_sum_gradient(subgroups[tuple(holders[name])]))


def _row_parallel(module: torch.nn.Module, group, tokens=None) -> None:
    """A row-parallel linear layer: its partial product summed over ranks (with ``tokens``: reduce-scattered
    to the rank's token rows), then its (replicated) bias once."""

    def forward(x):
        y = F.linear(x, module.weight)
        y = _SumOverRanks.apply(y, group) if tokens is None else _along_tokens(y, tokens, REDUCE_SCATTER)
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
