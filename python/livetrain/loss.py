"""The trainer's loss without the full logits: cross-entropy over the vocabulary computed chunk by chunk.

A causal LM's logits for one 2,048-token sequence of a 152k-vocabulary model are 1.2 GB in fp32, and
autograd keeps them and their gradient (2.5 GB): for an 8B model that is more than the trainer's whole
budget beside the engine (15% of 16 GB). ``LinearCrossEntropy`` computes the same loss from the final
hidden states and the output projection, ``chunk`` tokens at a time, keeping only each token's
log-sum-exp; backward recomputes each chunk's logits and turns them into the gradients of the hidden
states and the projection at once. Peak extra memory: one chunk's logits (``chunk × vocab × 4`` bytes).

Numerics follow Hugging Face's path (logits from the bf16 projection, then fp32 softmax; the gradient
reaches the projection in the weights' dtype). The projection's gradient is accumulated over chunks in
its own dtype (one rounding per chunk instead of one in total).
"""

import torch

# Logits of at most this many bytes exist at once (fp32).
CHUNK_BYTES = 256 << 20


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i weight_i · CE(hidden_i @ W^T, target_i) over tokens whose target is not -100."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor,
                chunk: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = target != -100
        safe_target = torch.where(valid, target, 0)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_target[s:s + chunk, None])[:, 0]
            ce = (lse[s:s + chunk] - picked) * valid[s:s + chunk]
            total += (ce * token_weight[s:s + chunk]).sum()
            del logits
        ctx.save_for_backward(hidden, weight, safe_target, valid, token_weight, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, target, valid, token_weight, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        scale = token_weight * valid * grad_out  # d loss / d CE_i
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = (h @ weight.t()).float()
            # softmax - onehot, scaled: the gradient of the chunk's logits, in place
            grad = logits.sub_(lse[s:s + chunk, None]).exp_()
            grad.scatter_add_(1, target[s:s + chunk, None], -torch.ones_like(lse[s:s + chunk, None]))
            grad.mul_(scale[s:s + chunk, None])
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[s:s + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
            del logits, grad
        return grad_hidden, grad_weight, None, None, None


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


def causal_lm_loss(model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Per example, the mean cross-entropy over its trained tokens (labels != -100, shifted by one),
    times the example's weight; averaged over the batch. Chunked (LinearCrossEntropy) when the model's
    output layer allows it, else from the full logits."""
    target = labels[:, 1:]
    count = (target != -100).sum(1).clamp(min=1)
    head = output_projection(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        return ((tok.sum(1) / count) * weights).mean()
    hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[:, :-1]
    b, t, h = hidden.shape
    token_weight = (weights / count / b)[:, None].expand(b, t).reshape(-1).to(torch.float32)
    chunk = max(1, CHUNK_BYTES // (4 * head.shape[0]))
    return LinearCrossEntropy.apply(hidden.reshape(b * t, h), head, target.reshape(-1), token_weight, chunk)
