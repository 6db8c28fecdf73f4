"""An engine that holds its weights in vLLM's layout (merged qkv_proj and gate_up_proj, vocabulary padded
to 64), shared through a manifest: the trainer's Hugging Face model is built on layout views of that
memory (no copy) and computes the same logits as the original model; `livetrain diagnose` agrees with the
model files, and names what differs when they do not."""

import json
import subprocess

import pytest
import torch

transformers = pytest.importorskip("transformers")

from livetrain import layout, sharing  # noqa: E402
from livetrain import safetensors as lst  # noqa: E402

import tiny_model  # noqa: E402


def tiny_llama():
    cfg = tiny_model.llama_config(100)
    torch.manual_seed(0)
    # As from_pretrained builds it: bf16 parameters, rotary buffers computed in fp32 (casting a whole
    # model with .to(bfloat16) would round inv_freq too, and change the logits).
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return cfg, model


def test_vllm_layout_engine_to_hf_model_zero_copy(tmp_path):
    cfg, ref = tiny_llama()
    config = cfg.to_dict()
    hf = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    engine_tensors = layout.merge(config, hf)  # as vLLM lays them out: qkv_proj, gate_up_proj, padded vocab
    assert "model.layers.0.self_attn.qkv_proj.weight" in engine_tensors
    assert engine_tensors["model.embed_tokens.weight"].shape[0] == 128
    exported = sharing.export_cpu(engine_tensors, tmp_path / "engine.json", config=config, engine="vllm")
    with sharing.attach(tmp_path / "engine.json") as att:
        model = sharing.build_hf_model(att, requires_grad=False).eval()
        x = torch.randint(0, 100, (2, 17))
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref(x).logits)
        spans = [(addr, addr + size) for addr, size, _ in att.buffers()]
        for name, p in model.named_parameters():
            ptr = p.data_ptr()
            assert any(lo <= ptr < hi for lo, hi in spans), f"{name} is not in shared memory"
        # A write through a view lands in the engine's merged tensor.
        k = model.model.layers[1].self_attn.k_proj.weight
        with torch.no_grad():
            k[0, 0] = 3.0
        q_rows = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
        assert float(exported.tensors["model.layers.1.self_attn.qkv_proj.weight"][q_rows, 0]) == 3.0
    del exported


def test_diagnose_agrees_and_names_differences(cli, tmp_path):
    cfg, ref = tiny_llama()
    config = cfg.to_dict()
    hf = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    lst.save_model(model_dir, hf)
    (model_dir / "config.json").write_text(json.dumps(config))
    exported = sharing.export_cpu(
        layout.merge(config, hf), tmp_path / "engine.json", config=config, engine="vllm", model_path=model_dir
    )
    r = subprocess.run(
        [cli, "diagnose", "--manifest", str(tmp_path / "engine.json")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        f"{len(hf)} matched, 0 served in another dtype, 0 only in the engine, 0 only on disk, 0 mismatched" in r.stdout
    )

    bad = dict(hf)
    bad["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)  # wrong shape
    del bad["model.layers.1.mlp.down_proj.weight"]  # missing on disk
    bad["model.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)  # unknown to the engine
    bad["mtp.fc.weight"] = torch.zeros(3, dtype=torch.bfloat16)  # outside the text model
    other = tmp_path / "other"
    other.mkdir()
    lst.save_model(other, bad)
    r = subprocess.run(
        [cli, "diagnose", "--manifest", str(tmp_path / "engine.json"), "--model-dir", str(other), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["family"] == "llama"
    assert doc["only_in_engine"] == ["model.layers.1.mlp.down_proj.weight"]
    assert doc["only_on_disk"] == ["model.extra.weight"]
    assert doc["not_served"] == ["mtp.fc.weight"]
    assert doc["mismatched"] == ["model.norm.weight: shape [64] in the engine, [32] on disk"]
    del exported


def test_multimodal_checkpoint_in_vllms_layout_is_trained_as_its_text_model(tmp_path):
    """A Qwen3_5ForConditionalGeneration served by vLLM text-only (its tensors language_model.model.*, Gated
    DeltaNet merged into in_proj_qkvz/in_proj_ba): the trainer builds transformers' text-only class on the
    views (renamed from the files' model.language_model.*), computes the original model's logits, and a
    step changes vLLM's own tensors in place."""
    from livetrain.trainer import options
    from livetrain.trainer.examples import parse_job
    from livetrain.trainer.service import Trainer

    from qwen35_model import make_qwen35_dir

    model_dir = tmp_path / "model"
    config = make_qwen35_dir(model_dir, corpus=["the capital of zorbia is quuxville", "hello how are you"])
    files = lst.load_file(model_dir / "model.safetensors")
    text = {n: t for n, t in files.items() if n.startswith("model.language_model.") or n == "lm_head.weight"}
    engine = layout.merge(config, text, engine="vllm")
    assert "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight" in engine
    before = {n: t.clone() for n, t in engine.items()}
    exported = sharing.export_cpu(engine, tmp_path / "engine.json", model_path=model_dir, config=config, engine="vllm")
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with sharing.attach(tmp_path / "engine.json") as att:
        model = sharing.build_hf_model(att, requires_grad=False).eval()
        assert type(model) is type(ref)  # the text-only class (Qwen3_5ForCausalLM)
        x = torch.randint(0, 200, (1, 9))
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref(x).logits)
    settings = options.parse(["--state-dir", str(tmp_path / "state"), "--no-store", "--lr", "1e-2"])
    trainer = Trainer(str(tmp_path / "engine.json"), str(model_dir), settings)
    try:
        job = parse_job(trainer.tokenizer, {"examples": tiny_model.FACT_EXAMPLES[:1]}, 64, 10)
        trainer.step(job["examples"])
        changed = {n for n, t in exported.tensors.items() if not torch.equal(t, before[n])}
        assert "language_model.model.layers.0.linear_attn.in_proj_qkvz.weight" in changed
        assert "language_model.model.layers.1.self_attn.qkv_proj.weight" in changed
        # The store's names are the files' (vision tower and MTP head outside: never trained).
        assert set(trainer.weights) <= set(files) and "model.language_model.embed_tokens.weight" in trainer.weights
        assert any(n.startswith("mtp.") for n in trainer.not_trained)
    finally:
        trainer.close()
        exported.close()
