"""Which implementation a model's Gated DeltaNet functions got (livetrain.kernels), as transformers chose it
when the modeling module was imported: reported by the trainer at start and in /train/status, warned about
(naming the package) when a GPU would run the torch path, never a crash. flash-linear-attention is not
installed here (it has no CPU path; CI tests the fallback): the "installed" case is transformers' own
decorator over a stand-in package."""

import importlib.util
import json
import sys
import types

import pytest
import torch
import transformers

from livetrain import kernels
from livetrain.engines.reference import Engine
from livetrain.trainer import options
from livetrain.trainer.examples import parse_job
from livetrain.trainer.service import Trainer

import tiny_model

GDN = ["causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
no_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="flash-linear-attention is installed")
no_conv = pytest.mark.skipif(importlib.util.find_spec("causal_conv1d") is not None, reason="causal-conv1d is installed")


def qwen35_text_model():
    config = transformers.Qwen3_5TextConfig(**tiny_model.tiny_sizes(128, **tiny_model.QWEN35_LINEAR))
    return transformers.AutoModelForCausalLM.from_config(config)


@no_fla
@no_conv
def test_qwen35_reports_the_torch_path_and_warns_only_on_a_gpu():
    model = qwen35_text_model()
    assert kernels.report(model) == {
        "causal_conv1d_fn": "torch (install causal-conv1d)",
        "causal_conv1d_update": "torch (install causal-conv1d)",
        "chunk_gated_delta_rule": "torch (install flash-linear-attention)",
        "fused_recurrent_gated_delta_rule": "torch (install flash-linear-attention)",
    }
    assert kernels.warnings(model, torch.device("cpu")) == []  # the torch path is the only one on CPU
    # On a GPU (only the device's kind is read: no GPU needed), one warning per package, naming it.
    warned = kernels.warnings(model, torch.device("cuda", 0))
    assert len(warned) == 2
    assert warned[0].startswith("causal-conv1d is not installed: causal_conv1d_fn, causal_conv1d_update run")
    assert warned[1].startswith("flash-linear-attention is not installed: chunk_gated_delta_rule, ")
    assert "bench/gdn.py" in warned[1]


def test_a_model_without_kernel_functions_reports_none():
    model = transformers.AutoModelForCausalLM.from_config(tiny_model.llama_config(64))
    assert kernels.report(model) == {}
    assert kernels.warnings(model, torch.device("cuda", 0)) == []


@pytest.fixture
def stand_in_fla(monkeypatch):
    """A package ``fla`` with ``ops.gated_delta_rule.chunk_gated_delta_rule`` (where transformers looks for
    it), and a modeling module whose function transformers' real decorator resolves against it."""
    from transformers.integrations import use_kernel_func_from_hub_with_fallback

    fla = types.ModuleType("fla")
    fla.__version__ = "9.9.1"
    ops = types.ModuleType("fla.ops")
    rule = types.ModuleType("fla.ops.gated_delta_rule")

    def chunk_gated_delta_rule(q, k, v, g, beta, **_):
        return "kernel"

    chunk_gated_delta_rule.__module__ = "fla.ops.gated_delta_rule.chunk"
    rule.chunk_gated_delta_rule = chunk_gated_delta_rule
    fla.ops, ops.gated_delta_rule = ops, rule
    for name, mod in (("fla", fla), ("fla.ops", ops), ("fla.ops.gated_delta_rule", rule)):
        monkeypatch.setitem(sys.modules, name, mod)

    modeling = types.ModuleType("livetrain_test_modeling")
    monkeypatch.setitem(sys.modules, modeling.__name__, modeling)

    @use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")
    def torch_chunk_gated_delta_rule(q, k, v, g, beta, **_):
        return "torch"

    @use_kernel_func_from_hub_with_fallback("fused_recurrent_gated_delta_rule", "fla_missing_package")
    def torch_recurrent_gated_delta_rule(q, k, v, g, beta, **_):
        return "torch"

    class Layer(torch.nn.Module):
        pass

    Layer.__module__ = modeling.__name__
    modeling.torch_chunk_gated_delta_rule = torch_chunk_gated_delta_rule
    modeling.torch_recurrent_gated_delta_rule = torch_recurrent_gated_delta_rule
    modeling.Layer = Layer
    return Layer


def test_an_installed_package_is_reported_with_its_version(stand_in_fla):
    model = torch.nn.Sequential(stand_in_fla())
    # The layer's module calls the package's function: what the report says is what runs.
    assert sys.modules["livetrain_test_modeling"].torch_chunk_gated_delta_rule(1, 2, 3, 4, 5) == "kernel"
    assert kernels.report(model) == {
        "chunk_gated_delta_rule": "fla 9.9.1",
        "fused_recurrent_gated_delta_rule": "torch (install fla_missing_package)",
    }
    warned = kernels.warnings(model, torch.device("cuda", 0))
    assert warned == [
        "fla_missing_package is not installed: fused_recurrent_gated_delta_rule run as PyTorch code, so the "
        "PyTorch reference path is slower"
    ]


@no_fla
def test_trainer_reports_kernels_in_status_and_trains_the_gdn_layers_on_cpu(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_model.make_model_dir(model, ["the capital of zorbia is quuxville", "hello how are you"], "qwen3_5_text")
    manifest = str(tmp_path / "engine.json")
    engine = Engine(str(model), manifest, "cpu", store=False)
    settings = options.parse(["--state-dir", str(tmp_path / "state"), "--no-store", "--lr", "1e-2"])
    trainer = Trainer(manifest, str(model), settings)
    try:
        assert engine.kernels == trainer.kernels
        status = json.loads(json.dumps(trainer.status()))  # what /train/status sends
        assert status["kernels"]["chunk_gated_delta_rule"] == "torch (install flash-linear-attention)"
        assert set(status["kernels"]) == set(GDN)
        assert "warning" not in capsys.readouterr().err  # CPU: nothing to warn about
        linear = trainer.model.model.layers[0].linear_attn
        before = linear.in_proj_qkv.weight.detach().clone()
        job = parse_job(trainer.tokenizer, {"examples": tiny_model.FACT_EXAMPLES[:1]}, 64, 10)
        loss, ntok, _ = trainer.step(job["examples"])
        assert loss > 0 and ntok > 0
        served = dict(engine.model.named_parameters())["model.layers.0.linear_attn.in_proj_qkv.weight"]
        assert not torch.equal(served.detach(), before)  # the engine's GDN weights changed in place
    finally:
        trainer.close()
        engine.exported.close()


def make_kernel_module(monkeypatch, kernel):
    """A stand-in ``fla`` whose ``chunk_gated_delta_rule`` is ``kernel``, and a modeling module whose
    transformers-decorated function falls back to transformers' real torch delta rule."""
    from transformers.integrations import use_kernel_func_from_hub_with_fallback
    from transformers.models.qwen3_5 import modeling_qwen3_5

    fla = types.ModuleType("fla")
    fla.__version__ = "9.9.2"
    ops = types.ModuleType("fla.ops")
    rule = types.ModuleType("fla.ops.gated_delta_rule")
    kernel.__module__ = "fla.ops.gated_delta_rule.chunk"
    rule.chunk_gated_delta_rule = kernel
    fla.ops, ops.gated_delta_rule = ops, rule
    for name, mod in (("fla", fla), ("fla.ops", ops), ("fla.ops.gated_delta_rule", rule)):
        monkeypatch.setitem(sys.modules, name, mod)
    reference = modeling_qwen3_5.torch_chunk_gated_delta_rule.__closure__[
        modeling_qwen3_5.torch_chunk_gated_delta_rule.__code__.co_freevars.index("torch_function")
    ].cell_contents

    modeling = types.ModuleType("livetrain_test_modeling_verify")
    monkeypatch.setitem(sys.modules, modeling.__name__, modeling)

    @use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")
    def torch_chunk_gated_delta_rule(
        query,
        key,
        value,
        g,
        beta,
        chunk_size=64,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        **kwargs,
    ):
        return reference(
            query, key, value, g, beta, chunk_size, initial_state, output_final_state, use_qk_l2norm_in_kernel
        )

    class Layer(torch.nn.Module):
        pass

    Layer.__module__ = modeling.__name__
    modeling.torch_chunk_gated_delta_rule = torch_chunk_gated_delta_rule
    modeling.Layer = Layer
    monkeypatch.setattr(kernels, "_refused", {})
    return torch.nn.Sequential(Layer()), modeling, reference


class Refused(torch.autograd.Function):
    """Forward as the torch path; backward raises as flash-linear-attention 0.6.0 does on Hopper with an
    older Triton."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results (see #640).")


def fla_kernel(holder, output=lambda out: out):
    """A stand-in for fla's ``chunk_gated_delta_rule``, with its signature: transformers' torch delta rule
    (``holder["reference"]``, set from make_kernel_module's result), its output passed through ``output``."""

    def kernel(
        q,
        k,
        v,
        g,
        beta,
        scale=None,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=None,
    ):
        out, state = holder["reference"](
            q, k, v, g, beta, 64, initial_state, output_final_state, use_qk_l2norm_in_kernel
        )
        return output(out), state

    return kernel


def test_verify_replaces_a_kernel_whose_backward_raises_and_the_layers_run_the_torch_path(monkeypatch):
    holder = {}
    kernel = fla_kernel(holder, Refused.apply)
    model, modeling, holder["reference"] = make_kernel_module(monkeypatch, kernel)
    assert kernels.report(model) == {"chunk_gated_delta_rule": "fla 9.9.2"}
    # The engine decodes without a backward pass: the kernel's forward is right, so it is kept there.
    assert kernels.verify(model, torch.device("cpu"), backward=False) == []
    messages = kernels.verify(model, torch.device("cpu"), backward=True)
    assert len(messages) == 1 and messages[0].startswith("chunk_gated_delta_rule: fla 9.9.2 failed on cpu: ")
    assert "RuntimeError: Triton >= 3.4.0" in messages[0] and "torch path is used instead" in messages[0]
    assert kernels.report(model)["chunk_gated_delta_rule"].startswith("torch (fla 9.9.2 failed on cpu: Runtime")
    assert kernels.warnings(model, torch.device("cuda", 0)) == []  # said once, by verify, not as "install"
    # The layers' call now runs the torch path, gradients included (cu_seqlens still accepted).
    q = torch.randn(1, 64, 2, 16, requires_grad=True)
    out, _ = modeling.torch_chunk_gated_delta_rule(
        q,
        torch.randn(1, 64, 2, 16),
        torch.randn(1, 64, 2, 16),
        g=-torch.rand(1, 64, 2),
        beta=torch.rand(1, 64, 2),
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=None,
    )
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_verify_keeps_a_kernel_that_agrees_and_replaces_one_that_differs(monkeypatch):
    holder = {}
    model, _, holder["reference"] = make_kernel_module(monkeypatch, fla_kernel(holder))
    assert kernels.verify(model, torch.device("cpu")) == []
    assert kernels.report(model) == {"chunk_gated_delta_rule": "fla 9.9.2"}

    model, _, holder["reference"] = make_kernel_module(monkeypatch, fla_kernel(holder, lambda out: out * 1.5))
    messages = kernels.verify(model, torch.device("cpu"))
    assert len(messages) == 1 and "differs from the torch path (relative error 1.25 > 0.05)" in messages[0]

    gives_nan = fla_kernel(holder, lambda out: out * float("nan"))
    model, _, holder["reference"] = make_kernel_module(monkeypatch, gives_nan)
    assert "differs from the torch path (relative error nan" in kernels.verify(model, torch.device("cpu"))[0]
    assert kernels.prepare(model, torch.device("cpu")) == []  # on CPU nothing is probed or said
