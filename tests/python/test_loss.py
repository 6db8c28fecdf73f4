"""livetrain.loss: the chunked linear cross-entropy equals the full-logits loss (value and gradients of
every parameter), with ignored tokens, per-example weights, chunks that do not divide the tokens, fp32
and bf16; and models whose output layer it cannot take fall back to the logits."""

import pytest
import torch
import transformers

from livetrain import loss

import tiny_model


def tiny(dtype, tied=False):
    torch.manual_seed(0)
    config = tiny_model.llama_config(300, intermediate_size=112, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 17), generator=g)
    attn = torch.ones_like(ids)
    attn[2, 12:] = 0
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens are not trained
    labels[2, 12:] = -100
    labels[1, 3] = -100
    return ids, attn, labels, torch.tensor([1.0, 2.5, 0.5])


def reference(model, ids, attn, labels, weights):
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    return ((tok.sum(1) / (target != -100).sum(1).clamp(min=1)) * weights).mean()


def grads(model, fn):
    model.zero_grad()
    value = fn()
    value.backward()
    return value.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
def test_chunked_equals_full_logits(dtype, tied, chunk_tokens, monkeypatch):
    model = tiny(dtype, tied)
    assert loss.output_projection(model) is not None
    monkeypatch.setattr(loss, "CHUNK_BYTES", chunk_tokens * 4 * 300)
    b = batch()
    want, want_grads = grads(model, lambda: reference(model, *b))
    got, got_grads = grads(model, lambda: loss.causal_lm_loss(model, *b))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    for name, g in want_grads.items():
        assert torch.isfinite(got_grads[name]).all(), name
        # bf16: the projection's gradient is rounded once per chunk instead of once
        torch.testing.assert_close(got_grads[name].float(), g.float(), **tol, msg=name)


def test_models_it_cannot_take_use_the_logits():
    model = tiny(torch.float32)
    model.config.final_logit_softcapping = 30.0
    assert loss.output_projection(model) is None
    b = batch()
    torch.testing.assert_close(loss.causal_lm_loss(model, *b), reference(model, *b))


@pytest.mark.parametrize("softcap", [False, True])
def test_per_example_losses_come_from_the_same_forward(softcap, monkeypatch):
    """What the trainer stops a job on: each example's mean CE over its trained tokens, unweighted, written
    by the loss's own forward, chunked (chunks of 7 tokens, not dividing the rows) or from the logits."""
    model = tiny(torch.float32)
    if softcap:
        model.config.final_logit_softcapping = 30.0
    monkeypatch.setattr(loss, "CHUNK_BYTES", 7 * 4 * 300)
    ids, attn, labels, weights = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        want = tok.sum(1) / (target != -100).sum(1)
    got = torch.full((3,), float("nan"))
    value = loss.causal_lm_loss(model, ids, attn, labels, weights, per_example=got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.detach(), (want * weights).mean(), rtol=1e-5, atol=1e-6)


def test_no_trained_token_gives_zero_loss_and_gradients():
    model = tiny(torch.float32)
    ids, attn, labels, weights = batch()
    labels[:] = -100
    value, g = grads(model, lambda: loss.causal_lm_loss(model, ids, attn, labels, weights))
    assert value.item() == 0.0
    assert all(float(t.abs().max()) == 0.0 for t in g.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slice_bytes", [1, 4 * 48 * 256, 1 << 30])  # slices of 128 rows (the last 44), 256, all 300
def test_output_gradient_is_deferred_and_equal(dtype, slice_bytes):
    model = tiny(dtype)
    b = batch()
    want, want_grads = grads(model, lambda: reference(model, *b))
    model.zero_grad()
    later = loss.OutputGradient(slice_bytes=slice_bytes)
    got = loss.causal_lm_loss(model, *b, later=later)
    assert later.active and later.weight is model.lm_head.weight
    got.backward()
    head = model.lm_head.weight
    assert head.grad is None  # backward left it out
    calls = []
    assert later.apply(lambda w, g: calls.append((w, g)))
    assert len(calls) == 1 and calls[0][0] is head
    assert not later.apply(lambda w, g: calls.append((w, g)))  # made once, then forgotten
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got.detach(), want, **tol)
    torch.testing.assert_close(calls[0][1].float(), want_grads["lm_head.weight"].float(), **tol)
    for name, p in model.named_parameters():
        if name != "lm_head.weight":
            torch.testing.assert_close(p.grad.float(), want_grads[name].float(), **tol, msg=name)


def test_output_gradient_stays_with_autograd_when_tied_or_frozen():
    b = batch()
    tied = tiny(torch.float32, tied=True)
    later = loss.OutputGradient()
    _, g = grads(tied, lambda: loss.causal_lm_loss(tied, *b, later=later))
    assert not later.active and not later.apply(lambda w, grad: pytest.fail("nothing was deferred"))
    _, want = grads(tied, lambda: reference(tied, *b))
    torch.testing.assert_close(g["model.embed_tokens.weight"], want["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6)
    frozen = tiny(torch.float32)
    frozen.lm_head.weight.requires_grad_(False)
    later = loss.OutputGradient()
    loss.causal_lm_loss(frozen, *b, later=later).backward()
    assert not later.active and frozen.lm_head.weight.grad is None
    assert not later.apply(lambda w, grad: pytest.fail("nothing was deferred"))


def test_output_gradient_steps_the_head_beside_the_hooks():
    """As the trainer runs it: every other parameter stepped from its hook during backward, the head by
    apply afterwards with the optimizer's step_param; each parameter is stepped exactly once and the head
    moves as far as stepping it from a hook would (fp32, same gradient to rounding)."""
    from livetrain import optim

    b = batch()
    moved = {}
    for deferred in (False, True):
        model = tiny(torch.float32)
        before = model.lm_head.weight.detach().clone()
        opt = optim.ApolloMini(optim.param_groups(model), lr=1e-3, rank=1)
        opt.attach_hooks()
        later = loss.OutputGradient() if deferred else None
        loss.causal_lm_loss(model, *b, later=later).backward()
        if deferred:
            assert later.apply(opt.step_param)
        report = opt.report()
        assert report["ok"] == len(list(model.parameters())) and set(report["steps"].values()) == {1}
        moved[deferred] = model.lm_head.weight.detach() - before
    assert moved[True].abs().max() > 0
    torch.testing.assert_close(moved[True], moved[False], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_block_passes_equal_torch(dtype, device, monkeypatch):
    """The core's fused passes (bf16, fp32; CPU and CUDA) against the same math in torch operations (which
    fp16 always takes), on a block that is a column slice of a wider tensor (row stride > width), folded
    in two parts."""
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(37, 1029, generator=g) * 4).to(dtype).to(device)
    block = wide[:, 5:1000]  # 995 columns of a vocabulary starting at column 5; rows strided by 1029
    target = torch.randint(0, 1100, (37,), generator=g).to(device)  # some outside the block
    scale = torch.rand(37, generator=g).to(device)

    def run():
        lse = torch.full((37,), float("-inf"), device=device)
        loss.logsumexp_into(block[:, :400], lse)
        loss.logsumexp_into(block[:, 400:], lse)
        grad = loss.softmax_grad_(block.clone(), lse, target, 5, scale)
        return lse, grad

    fused_lse, fused_grad = run()
    monkeypatch.setattr(loss, "_fused", lambda x: False)
    ref_lse, ref_grad = run()
    want = torch.logsumexp(block.float(), dim=-1)
    torch.testing.assert_close(fused_lse, want, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(ref_lse, want, rtol=2e-6, atol=1e-5)
    assert fused_grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(fused_grad.float(), ref_grad.float(), **tol)
    rows = torch.arange(37, device=device)
    inside = (target >= 5) & (target < 1000)
    assert (fused_grad.float()[rows[inside], target[inside] - 5] < 0).all()  # minus one where the target is


def test_block_passes_nonfinite_rows_are_nan():
    x = torch.randn(3, 300).to(torch.bfloat16)
    x[0, 7], x[1, 299] = float("nan"), float("inf")
    x[2] = float("-inf")
    lse = torch.full((3,), float("-inf"))
    loss.logsumexp_into(x, lse)
    assert lse[0].isnan() and lse[1].isnan() and lse[2] == float("-inf")
    grad = loss.softmax_grad_(x.clone(), lse, torch.zeros(3, dtype=torch.long), 0, torch.ones(3))
    assert grad[0].isnan().all() and grad[1].isnan().all()  # the optimizer refuses such gradients


def test_block_passes_refuse_vectors_they_cannot_read():
    x = torch.randn(4, 10)
    ok = dict(lse=torch.zeros(4), target=torch.zeros(4, dtype=torch.long), scale=torch.ones(4))
    for name, bad in (
        ("lse", torch.zeros(4, dtype=torch.float64)),
        ("target", torch.zeros(4, dtype=torch.int32)),
        ("scale", torch.ones(8)[::2]),
        ("lse", torch.zeros(3)),
    ):
        args = {**ok, name: bad}
        with pytest.raises(ValueError, match=name):
            loss.softmax_grad_(x.clone(), args["lse"], args["target"], 0, args["scale"])
    with pytest.raises(ValueError, match="lse"):
        loss.logsumexp_into(x, torch.zeros(4, 1))
