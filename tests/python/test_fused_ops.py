"""The trainer's fused layer operations (livetrain.kernels.fuse): which of a model's operations can run as
Liger-Kernel's fused kernels (Llama-formula RMSNorms, SiLU-gated MLPs, the rotary embedding of the Llama,
Qwen2, Qwen3 and Mistral modeling modules), the PyTorch forms they are checked against being transformers'
own, each checked before it replaces anything (a stand-in implementation that is wrong, raises or gives NaN
is refused, naming why), nothing changed on CPU, a missing package warned about on a GPU. The GPU tests
(skipped without a GPU and liger-kernel) compare the fused model with transformers' on a Qwen3 and a Llama
model: loss and every gradient."""

import copy
import importlib.util

import pytest
import torch
import transformers

from livetrain import kernels

import tiny_model

has_liger = importlib.util.find_spec("liger_kernel") is not None
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and has_liger), reason="needs a GPU and liger-kernel")


def qwen3(**kw):
    config = transformers.AutoConfig.for_model("qwen3", vocab_size=300, head_dim=16, **tiny_model.TINY, **kw)
    return transformers.AutoModelForCausalLM.from_config(config)


def llama():
    return transformers.AutoModelForCausalLM.from_config(tiny_model.llama_config(300))


def qwen35():
    config = transformers.Qwen3_5TextConfig(**tiny_model.tiny_sizes(128, **tiny_model.QWEN35_LINEAR))
    return transformers.AutoModelForCausalLM.from_config(config)


def counts(model):
    return {op: len(where) for op, where in kernels._fused_sites(model).items()}


def test_the_operations_each_model_has():
    layers = tiny_model.TINY["num_hidden_layers"]
    # Qwen3: input and post-attention norms, q_norm and k_norm per layer, and the final norm.
    assert counts(qwen3()) == {"rms_norm": 4 * layers + 1, "silu_mul": layers, "rotary": layers}
    assert counts(llama()) == {"rms_norm": 2 * layers + 1, "silu_mul": layers, "rotary": layers}
    # Qwen3.5: (1 + weight) and gated norms, a partial rotary embedding: only its MLPs.
    assert counts(qwen35())["rms_norm"] == 0 and counts(qwen35())["rotary"] == 0
    assert counts(qwen35())["silu_mul"] > 0
    # Another activation: not a SiLU-gated MLP.
    assert counts(qwen3(hidden_act="gelu"))["silu_mul"] == 0


def test_the_pytorch_forms_are_transformers_own():
    """What fuse() checks a fused kernel against computes exactly what transformers computes."""
    g = torch.Generator().manual_seed(1)
    ref = kernels._torch_ops()
    model = qwen3().to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g))
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(ref["rms_norm"](x, norm.weight, norm.variance_epsilon), norm(x))
    q, k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    cos, sin = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    from transformers.models.qwen3 import modeling_qwen3

    for got, want in zip(ref["rotary"](q, k, cos, sin), modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)
    mlp = model.model.layers[0].mlp
    a, b = torch.randn(4, 96, generator=g).to(torch.bfloat16), torch.randn(4, 96, generator=g).to(torch.bfloat16)
    assert torch.equal(ref["silu_mul"](a, b), mlp.act_fn(a) * b)


def test_on_cpu_nothing_changes():
    model = qwen3()
    assert kernels.fuse(model, torch.device("cpu")) == []
    assert kernels.fused_report(model) == {op: "torch (on cpu)" for op in kernels.FUSED_OPS}
    assert not any("forward" in vars(m) for m in model.modules())  # no module's forward replaced
    assert kernels.fuse_off(model) == []
    assert kernels.fused_report(model) == {op: "torch (--fused-ops off)" for op in kernels.FUSED_OPS}
    # A model without any (a bare module): nothing reported.
    assert kernels.fused_report(torch.nn.Linear(2, 2)) == {}


@pytest.mark.skipif(has_liger, reason="liger-kernel is installed")
def test_without_the_package_a_gpu_warns_naming_it():
    model = qwen3()
    # Only the device's kind is read before the import fails: no GPU needed.
    warned = kernels.fuse(model, torch.device("cuda", 0))
    assert len(warned) == 1 and warned[0].startswith("liger-kernel is not installed: rms_norm, rotary, silu_mul run")
    assert kernels.fused_report(model) == {op: "torch (install liger-kernel)" for op in kernels.FUSED_OPS}
    assert not any("forward" in vars(m) for m in model.modules())


def test_each_operation_is_checked_before_it_replaces_anything():
    """fuse_with (fuse()'s check, on any device) with stand-ins: a wrong norm, a raising MLP activation, a NaN
    one; the exact rotary form is installed."""
    from transformers.models.qwen3 import modeling_qwen3

    ref = kernels._torch_ops()
    original = modeling_qwen3.apply_rotary_pos_emb
    model = qwen3()
    ids = torch.tensor([[5, 9, 17, 3, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits

    def boom(a, b):
        raise RuntimeError("no kernel image for this device\nmore")

    stand_in = {
        "rms_norm": lambda x, w, eps: ref["rms_norm"](x, w, eps) * 1.1,
        "silu_mul": boom,
        "rotary": ref["rotary"],
    }
    try:
        messages = kernels.fuse_with(model, torch.device("cpu"), stand_in, "stand-in 1.0")
        assert messages[0].startswith("rms_norm: stand-in 1.0 failed on cpu: differs from the PyTorch operations")
        assert messages[1] == (
            "silu_mul: stand-in 1.0 failed on cpu: RuntimeError: no kernel image for this device; "
            "the PyTorch operations are used"
        )
        assert len(messages) == 2
        report = kernels.fused_report(model)
        assert report["rotary"] == "stand-in 1.0" and report["rms_norm"].startswith("torch (stand-in 1.0 failed")
        # The refused ones were left alone; the rotary function is wrapped once, and CPU tensors take the
        # PyTorch path through it: the model computes what it did.
        assert not any("forward" in vars(m) for m in model.modules())
        assert modeling_qwen3.apply_rotary_pos_emb.__livetrain_torch__ is original
        other = qwen3()
        kernels.fuse_with(other, torch.device("cpu"), stand_in, "stand-in 1.0")  # again: not wrapped twice
        assert modeling_qwen3.apply_rotary_pos_emb.__livetrain_torch__ is original
        # Each model its own report; the function stays wrapped while one model still uses it fused.
        kernels.fuse_off(other)
        assert kernels.fused_report(other)["rotary"] == "torch (--fused-ops off)"
        assert kernels.fused_report(model)["rotary"] == "stand-in 1.0"
        assert modeling_qwen3.apply_rotary_pos_emb.__livetrain_torch__ is original
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)
        # NaN never passes.
        nan = dict(stand_in, silu_mul=lambda a, b: ref["silu_mul"](a, b) * float("nan"))
        assert any(
            m.startswith("silu_mul: stand-in 1.0 failed")
            for m in kernels.fuse_with(qwen3(), "cpu", nan, "stand-in 1.0")
        )
        # An exact stand-in for every operation is installed everywhere, and computes the same.
        exact = qwen3()
        exact.load_state_dict(model.state_dict())
        assert kernels.fuse_with(exact, torch.device("cpu"), ref, "exact 1.0") == []
        assert (
            sum("forward" in vars(m) for m in exact.modules()) == counts(exact)["rms_norm"] + counts(exact)["silu_mul"]
        )
        with torch.no_grad():
            assert torch.equal(exact(input_ids=ids).logits, before)
        kernels.fuse_off(exact)
    finally:
        kernels.fuse_off(model)
    assert modeling_qwen3.apply_rotary_pos_emb is original  # fuse_off gives the modeling module its function back


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


@gpu
@pytest.mark.parametrize("make", [qwen3, llama], ids=["qwen3", "llama"])
def test_fused_model_equals_transformers_on_a_gpu(make):
    torch.manual_seed(0)
    model = make().to(device="cuda", dtype=torch.bfloat16)
    fused = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 37), device="cuda")  # odd length
    # transformers' first: the rotary embedding, once fused, is the modeling module's for every model.
    loss, grads = _loss_and_grads(model, ids)
    module = __import__(type(model).__module__, fromlist=["x"])
    try:
        assert kernels.fuse(fused, torch.device("cuda")) == []
        assert all(v.startswith("liger_kernel ") for v in kernels.fused_report(fused).values())
        assert hasattr(module.apply_rotary_pos_emb, "__livetrain_torch__")
        loss_f, grads_f = _loss_and_grads(fused, ids)
        assert torch.isfinite(loss_f) and abs(float(loss_f - loss)) <= 1e-2 * float(loss)
        for name, g in grads.items():
            err = float((grads_f[name] - g).norm() / g.norm().clamp_min(1e-12))
            assert err <= 3e-2, (name, err)  # bf16 activations and gradients: ~1e-2 apart
    finally:
        kernels.fuse_off(fused)
    assert not hasattr(module.apply_rotary_pos_emb, "__livetrain_torch__")


def test_the_trainer_reports_its_choice_and_the_option_travels(tmp_path):
    """--fused-ops reaches the trainer process's command line (options.argv) and the Trainer: auto on CPU
    leaves the PyTorch operations (said so in fused_ops), off says it was asked."""
    from livetrain.engines.reference import Engine
    from livetrain.trainer import options
    from livetrain.trainer.service import Trainer

    ns = options.parse(["--state-dir", str(tmp_path / "s"), "--fused-ops", "off"])
    assert options.parse(options.argv(ns)).fused_ops == "off"
    assert options.parse(["--state-dir", str(tmp_path / "s")]).fused_ops == "auto"
    model = tmp_path / "model"
    tiny_model.make_model_dir(model, ["the capital of zorbia is quuxville", "hello how are you"], "llama")
    for choice, want in (("auto", "torch (on cpu)"), ("off", "torch (--fused-ops off)")):
        manifest = str(tmp_path / f"engine-{choice}.json")  # one engine each: a trainer holds its engine's lease
        engine = Engine(str(model), manifest, "cpu", store=False)
        try:
            settings = options.parse(["--state-dir", str(tmp_path / choice), "--no-store", "--fused-ops", choice])
            trainer = Trainer(manifest, str(model), settings)
            assert trainer.status()["fused_ops"] == {op: want for op in kernels.FUSED_OPS}
            trainer.close()
        finally:
            engine.close()
