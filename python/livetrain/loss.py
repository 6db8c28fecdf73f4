"""The trainer's loss without the full logits: cross-entropy over the vocabulary computed chunk by chunk.

A causal LM's logits for one 2,048-token sequence of a 152k-vocabulary model are 1.2 GB in fp32, and
autograd keeps them and their gradient (2.5 GB): for an 8B model that is more than the trainer's whole
budget beside the engine (15% of 16 GB). ``LinearCrossEntropy`` computes the same loss from the final
hidden states and the output projection, ``chunk`` tokens at a time, keeping only each token's
log-sum-exp; backward recomputes each chunk's logits and turns them into the gradients of the hidden
states and the projection at once. Peak extra memory: one chunk's logits (``chunk × vocab`` elements in
the weights' dtype). The row-wise work on each chunk (log-sum-exp; softmax minus one-hot, scaled) runs as
two fused passes of the core (include/livetrain/loss.hpp, CPU and CUDA) for bf16 and fp32 logits, and
as torch operations otherwise.

Under tensor parallelism the output projection is split by vocabulary rows (``VocabSlice``: rank r holds
ids [start, start + rows)); each rank folds its slice into per-token log-sum-exps, the ranks exchange
them (one ``all_gather`` of two floats per token: log-sum-exp and the target's logit, which only its
owner has), and each rank's gradient of its slice is the same fused pass with the slice's first column.
The hidden states' gradient is summed over the ranks; nothing vocabulary-sized crosses between them.

Numerics follow Hugging Face's path (logits from the bf16 projection, then fp32 softmax; the gradient
reaches the projection in the weights' dtype, rounded once per element). The projection's gradient is
accumulated over chunks in its own dtype (one rounding per chunk instead of one in total).

The projection's gradient is as large as the vocabulary (1.16 GiB for Qwen3-8B in bf16). Computed in the
loss's backward, it exists while every layer's saved activations still do: the trainer's peak. With an
``OutputGradient`` passed to ``causal_lm_loss``, backward leaves it out and ``OutputGradient.apply``
computes it after the rest of backward has finished (and freed the activations), by slices of the
vocabulary, each slice's rows in one product (one rounding), and hands it to the optimizer.
"""

from typing import Callable, NamedTuple

import torch

from livetrain import _core
from livetrain.safetensors import dtype_name

# Tokens per chunk: as many as make this many bytes of fp32 logits (the logits exist in the weights' dtype).
CHUNK_BYTES = 256 << 20
# OutputGradient: vocabulary rows per slice, as many as make this many bytes of fp32 logits.
SLICE_BYTES = 64 << 20

_FUSED = (torch.bfloat16, torch.float32)  # what the core's passes take


def _fused(x: torch.Tensor) -> bool:
    """Whether the core's fused passes take this block of logits (bf16/fp32 rows, CPU or CUDA)."""
    return x.dtype in _FUSED and x.dim() == 2 and x.stride(1) == 1 and x.device.type in ("cpu", "cuda")


def _check_rows(x: torch.Tensor, **rows: tuple[torch.Tensor, torch.dtype]) -> None:
    """The per-row vectors the core reads by address: one element per row, contiguous, on x's device."""
    for name, (v, dtype) in rows.items():
        if (
            v.dtype != dtype
            or v.dim() != 1
            or v.shape[0] != x.shape[0]
            or not v.is_contiguous()
            or v.device != x.device
        ):
            raise ValueError(
                f"{name} must be a contiguous {dtype} vector of {x.shape[0]} on {x.device}; got "
                f"{v.dtype} of shape {tuple(v.shape)} on {v.device}"
            )


def _rows(x: torch.Tensor) -> tuple:
    """How the core's passes take a block of logits: address, dtype name, rows, columns, row stride."""
    return x.data_ptr(), dtype_name(x.dtype), x.shape[0], x.shape[1], x.stride(0)


def _device(x: torch.Tensor) -> tuple[bool, int]:
    """Where the core's passes run: on CUDA (on the current stream), or on the CPU."""
    cuda = x.device.type == "cuda"
    return cuda, torch.cuda.current_stream(x.device).cuda_stream if cuda else 0


def logsumexp_into(x: torch.Tensor, lse: torch.Tensor) -> None:
    """lse ← log(exp(lse) + Σ_j exp(x[:, j])), in place: folds a block of logits' columns into running
    fp32 log-sum-exps (start them at −inf). One read of x (the core's pass), else torch operations."""
    _check_rows(x, lse=(lse, torch.float32))
    if _fused(x) and x.shape[0] > 0:
        _core.ce_logsumexp_rows(*_rows(x), lse.data_ptr(), *_device(x))
    else:
        torch.logaddexp(lse, torch.logsumexp(x.float(), dim=-1), out=lse)


def softmax_grad_(
    x: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, col0: int, scale: torch.Tensor
) -> torch.Tensor:
    """x ← (exp(x − lse) − onehot(target − col0)) · scale, row by row, in place, in x's dtype: the gradient
    of Σ_i scale_i · CE_i over a block of logits that holds vocabulary columns [col0, col0 + width).
    Computed in fp32 and rounded once; one read and one write of x (the core's pass)."""
    _check_rows(x, lse=(lse, torch.float32), target=(target, torch.int64), scale=(scale, torch.float32))
    if _fused(x) and x.shape[0] > 0:
        _core.ce_softmax_grad_rows(*_rows(x), lse.data_ptr(), target.data_ptr(), col0, scale.data_ptr(), *_device(x))
        return x
    grad = x.float().sub_(lse[:, None]).exp_()
    width = x.shape[1]
    inside = ((target >= col0) & (target < col0 + width)).to(torch.float32)
    grad.scatter_add_(1, (target - col0).clamp(0, width - 1)[:, None], -inside[:, None])
    return x.copy_(grad.mul_(scale[:, None]))


class VocabSlice(NamedTuple):
    """A tensor-parallel rank's rows of the output projection: vocabulary ids [start, start + rows), where
    rows is the projection's; ``group`` is the ``torch.distributed`` group of the ranks holding the others."""

    start: int
    group: object


def _over_ranks(lse: torch.Tensor, picked: torch.Tensor | None, vocab: VocabSlice | None):
    """Per-token log-sum-exps over the whole vocabulary from each rank's over its slice, and the target's
    logit from the rank that holds it (the others pass 0): one all_gather, the same result on every rank."""
    if vocab is None:
        return lse, picked
    import torch.distributed as dist

    mine = torch.stack([lse, picked if picked is not None else torch.zeros_like(lse)])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(vocab.group))]
    dist.all_gather(every, mine, group=vocab.group)
    every = torch.stack(every)  # [ranks, 2, tokens]
    return torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(0)


def _reduce_over_ranks(x: torch.Tensor, vocab: VocabSlice | None) -> torch.Tensor:
    if vocab is not None:
        import torch.distributed as dist

        dist.all_reduce(x, group=vocab.group)
    return x


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i weight_i · CE(hidden_i @ W^T, target_i) over tokens whose target is not -100; with ``vocab``,
    W is this rank's rows of the projection (VocabSlice) and the sum is over the whole vocabulary. With
    ``token_ce`` (an fp32 vector of one element per token), forward also writes each token's CE there (0
    where the target is -100): a by-product of the loss, not differentiated."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        token_weight: torch.Tensor,
        chunk: int,
        later: "OutputGradient | None" = None,
        vocab: VocabSlice | None = None,
        token_ce: torch.Tensor | None = None,
    ):
        n = hidden.shape[0]
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        picked = torch.zeros((n,), dtype=torch.float32, device=hidden.device)
        valid = target != -100
        safe_target = torch.where(valid, target, 0)
        start, rows = (vocab.start if vocab else 0), weight.shape[0]
        local = safe_target - start
        inside = (local >= 0) & (local < rows)  # the target's logit is in this rank's slice
        local = torch.where(inside, local, 0)
        for s in range(0, n, chunk):
            logits = hidden[s : s + chunk] @ weight.t()
            logsumexp_into(logits, lse[s : s + chunk])
            picked[s : s + chunk] = logits.gather(1, local[s : s + chunk, None])[:, 0].float()
            del logits
        picked *= inside
        lse, picked = _over_ranks(lse, picked, vocab)
        ce = (lse - picked) * valid
        total = (ce * token_weight).sum()
        if token_ce is not None:
            token_ce.copy_(ce)
        ctx.save_for_backward(hidden, weight, safe_target, valid, token_weight, lse)
        ctx.chunk, ctx.later, ctx.vocab = chunk, later, vocab
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, target, valid, token_weight, lse = ctx.saved_tensors
        chunk, vocab = ctx.chunk, ctx.vocab
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        scale = token_weight * valid * grad_out  # d loss / d CE_i
        later = ctx.later
        if later is not None and ctx.needs_input_grad[1]:
            later._pending = (hidden, target, scale)  # the projection's gradient: OutputGradient.apply
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] and later is None else None
        col0 = vocab.start if vocab else 0
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            # softmax - onehot, scaled: the gradient of the chunk's logits, in place
            grad = softmax_grad_(h @ weight.t(), lse[s : s + chunk], target[s : s + chunk], col0, scale[s : s + chunk])
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[s : s + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
            del grad
        if grad_hidden is not None:  # each rank's slice of the vocabulary adds its part
            _reduce_over_ranks(grad_hidden, vocab)
        return grad_hidden, grad_weight, None, None, None, None, None, None


class OutputGradient:
    """The output projection's gradient, deferred until after backward (see the module's docstring).

    Pass one to ``causal_lm_loss``; after ``loss.backward()``, ``apply(fn)`` computes the gradient and
    calls ``fn(weight, grad)`` once, then drops it. ``active`` says whether the loss deferred it (not for
    a projection tied to the input embeddings, whose two contributions autograd must add, nor for a frozen
    one, nor when the loss fell back to full logits); when inactive, autograd produced it as usual.
    """

    def __init__(self, slice_bytes: int | None = None, vocab: VocabSlice | None = None):
        self.slice_bytes = slice_bytes
        self.vocab = vocab  # tensor parallelism: this rank's rows of the projection
        self.weight = None  # the deferred projection (the model's own parameter object, as the optimizer keys it)
        self._pending = None

    @property
    def active(self) -> bool:
        return self.weight is not None

    @torch.no_grad()
    def gradient(self) -> torch.Tensor | None:
        """The deferred gradient (None when nothing was deferred or backward has not run); forgets it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        hidden, target, scale = pending
        weight = self.weight
        n, vocab = hidden.shape[0], weight.shape[0]
        col0 = self.vocab.start if self.vocab else 0
        # First, while the memory of a gradient of this size just freed (the input embeddings') is free
        # in one piece: the slices below must not split it.
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        budget = self.slice_bytes or SLICE_BYTES
        width = min(vocab, max(128, budget // (4 * max(n, 1)) // 128 * 128))
        slices = [(v, min(v + width, vocab)) for v in range(0, vocab, width)]
        # Each token's log-sum-exp from the same products as the gradient below, so that every softmax
        # sums to one exactly as computed here (the forward's token chunks may round logits differently).
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        for v0, v1 in slices:
            logsumexp_into(hidden @ weight[v0:v1].t(), lse)
        lse, _ = _over_ranks(lse, None, self.vocab)
        for v0, v1 in slices:
            grad = softmax_grad_(hidden @ weight[v0:v1].t(), lse, target, col0 + v0, scale)
            torch.mm(grad.t(), hidden, out=out[v0:v1])
            del grad
        return out

    def apply(self, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> bool:
        """Compute the deferred gradient and call ``fn(weight, gradient)``; False when there was none."""
        grad = self.gradient()
        if grad is None:
            return False
        fn(self.weight, grad)
        return True


def output_projection(model) -> torch.Tensor | None:
    """The weight of a plain linear output layer (no bias, no logit scaling or soft-capping), else None:
    then the caller computes the loss from the model's logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(text, attr, None) not in (None, 1, 1.0):
            return None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if not hasattr(model, "model"):
        return None
    return head.weight


def causal_lm_loss(
    model,
    ids: torch.Tensor,
    attn: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    later: OutputGradient | None = None,
    vocab: VocabSlice | None = None,
    per_example: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per example, the mean cross-entropy over its trained tokens (labels != -100, shifted by one),
    times the example's weight; averaged over the batch. Chunked (LinearCrossEntropy) when the model's
    output layer allows it, else from the full logits. With ``later``, the output projection's gradient
    is left to ``later.apply`` where it can be (``later.active``). ``vocab``: the model is a
    tensor-parallel rank's, whose output projection holds that slice of the vocabulary. With ``per_example``
    (fp32, one element per example), each example's mean cross-entropy, unweighted, is written there from
    the same forward: what the trainer reports per example and stops a job on, at no extra pass.
    ``hidden``: the model's final hidden states of these rows ([rows, tokens, hidden]), when the caller
    made them in a forward shared with other rows (the trainer's retention anchor: one forward and one
    backward for both); only for a model with a plain linear output layer (``output_projection``)."""
    if later is not None:
        later.weight, later._pending = None, None
    target = labels[:, 1:]
    count = (target != -100).sum(1).clamp(min=1)
    head = output_projection(model)
    if head is None and vocab is not None:
        raise ValueError("a tensor-parallel model needs a plain linear output layer (the loss cannot gather logits)")
    if head is None and hidden is not None:
        raise ValueError("hidden states given for a model without a plain linear output layer (output_projection)")
    if head is None:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        mean = tok.sum(1) / count
        if per_example is not None:
            per_example.copy_(mean.detach())
        return (mean * weights).mean()
    if hidden is None:
        hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1]
    b, t, h = hidden.shape
    token_ce = None
    if per_example is not None:
        token_ce = torch.zeros(b * t, dtype=torch.float32, device=hidden.device)
    token_weight = (weights / count / b)[:, None].expand(b, t).reshape(-1).to(torch.float32)
    chunk = max(1, CHUNK_BYTES // (4 * head.shape[0]))
    if later is not None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = embeddings is None or getattr(embeddings, "weight", None) is head
        later.weight = head if head.requires_grad and torch.is_grad_enabled() and not tied else None
    loss = LinearCrossEntropy.apply(
        hidden.reshape(b * t, h),
        head,
        target.reshape(-1),
        token_weight,
        chunk,
        later if later is not None and later.active else None,
        vocab,
        token_ce,
    )
    if per_example is not None:
        per_example.copy_(token_ce.view(b, t).sum(1) / count)
    return loss
