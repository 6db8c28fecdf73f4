"""Layouts round trip: random HF tensors are merged into vLLM's per-rank engine layout by this file's own
merge (written from vLLM's weight loaders, independently of the C++ plan), split back through livetrain
views, and compared bit for bit; every view must share the engine tensor's storage, and the shards of
TP = 1, 2, 4, 8 must reassemble the full HF tensors. Bad configs and engine tensor lists must fail with
errors that name the model_type, tensor or field."""

import copy
import json

import pytest
import torch

import livetrain
from livetrain import layout

# ---------------------------------------------------------------------------------------------------
# Small configs, odd sizes where the TP sizes tested allow them.

LLAMA = {
    "model_type": "llama",
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 3,
    "intermediate_size": 40,
    "vocab_size": 77,
    "attention_bias": True,
    "mlp_bias": True,
    "tie_word_embeddings": False,
}
MISTRAL = {
    "model_type": "mistral",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "intermediate_size": 24,
    "vocab_size": 50,
    "tie_word_embeddings": True,
}
QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 20,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 5,
    "intermediate_size": 28,
    "vocab_size": 131,
    "tie_word_embeddings": True,
}
QWEN3 = {
    "model_type": "qwen3",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 7,
    "intermediate_size": 24,
    "vocab_size": 99,
    "attention_bias": False,
    "tie_word_embeddings": False,
}
QWEN3_NEXT = {
    "model_type": "qwen3_next",
    "hidden_size": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 6,
    "intermediate_size": 20,
    "vocab_size": 70,
    "num_experts": 0,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 3,
    "linear_value_head_dim": 5,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
    "tie_word_embeddings": False,
}
QWEN3_5_TEXT = {
    "model_type": "qwen3_5_text",
    "hidden_size": 12,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 5,
    "intermediate_size": 18,
    "vocab_size": 65,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 3,
    "linear_value_head_dim": 3,
    "linear_conv_kernel_dim": 3,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "tie_word_embeddings": True,
}
QWEN3_5 = {
    "model_type": "qwen3_5",
    "tie_word_embeddings": False,
    "vision_config": {"depth": 1},
    "text_config": {
        "model_type": "qwen3_5_text",
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 3,
        "intermediate_size": 36,
        "vocab_size": 101,
        "linear_num_key_heads": 4,
        "linear_num_value_heads": 8,
        "linear_key_head_dim": 3,
        "linear_value_head_dim": 5,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 3,
    },
}

CASES = [
    ("llama", LLAMA, [1, 2, 4, 8]),
    ("mistral", MISTRAL, [1, 2, 4]),
    ("qwen2", QWEN2, [1, 2, 4]),
    ("qwen3", QWEN3, [1, 2, 4, 8]),
    ("qwen3_next", QWEN3_NEXT, [1, 2]),
    ("qwen3_5_text", QWEN3_5_TEXT, [1, 2]),
    ("qwen3_5", QWEN3_5, [1, 2, 4]),
]

# ---------------------------------------------------------------------------------------------------
# The HF model, from transformers' modeling files (names and shapes), written out by hand.


def text_config(cfg):
    return cfg.get("text_config", cfg)


def layer_types(t):
    if t["model_type"] not in ("qwen3_next", "qwen3_5_text"):
        return ["full_attention"] * t["num_hidden_layers"]
    if "layer_types" in t:
        return t["layer_types"]
    k = t.get("full_attention_interval", 4)
    return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(t["num_hidden_layers"])]


def hf_shapes(cfg) -> dict[str, tuple]:
    t = text_config(cfg)
    mt = t["model_type"]
    H, I, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    hd = t.get("head_dim") or H // nh
    body = "model.language_model." if "text_config" in cfg else "model."
    hybrid = mt in ("qwen3_next", "qwen3_5_text")
    qkv_bias = mt == "qwen2" or (mt in ("llama", "qwen3") and t.get("attention_bias", False))
    out = {body + "embed_tokens.weight": (V, H)}
    for i, kind in enumerate(layer_types(t)):
        p = f"{body}layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        if kind == "full_attention":
            a = p + "self_attn."
            q_rows = nh * hd * (2 if hybrid else 1)
            out[a + "q_proj.weight"] = (q_rows, H)
            out[a + "k_proj.weight"] = (nkv * hd, H)
            out[a + "v_proj.weight"] = (nkv * hd, H)
            if qkv_bias:
                out[a + "q_proj.bias"] = (q_rows,)
                out[a + "k_proj.bias"] = (nkv * hd,)
                out[a + "v_proj.bias"] = (nkv * hd,)
            out[a + "o_proj.weight"] = (H, nh * hd)
            if mt == "llama" and t.get("attention_bias"):
                out[a + "o_proj.bias"] = (H,)
            if mt in ("qwen3", "qwen3_next", "qwen3_5_text"):
                out[a + "q_norm.weight"] = (hd,)
                out[a + "k_norm.weight"] = (hd,)
        else:
            a = p + "linear_attn."
            nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
            kd, vd = nk * t["linear_key_head_dim"], nv * t["linear_value_head_dim"]
            if mt == "qwen3_next":
                out[a + "in_proj_qkvz.weight"] = (2 * kd + 2 * vd, H)
                out[a + "in_proj_ba.weight"] = (2 * nv, H)
            else:
                out[a + "in_proj_qkv.weight"] = (2 * kd + vd, H)
                out[a + "in_proj_z.weight"] = (vd, H)
                out[a + "in_proj_b.weight"] = (nv, H)
                out[a + "in_proj_a.weight"] = (nv, H)
            out[a + "conv1d.weight"] = (2 * kd + vd, 1, t["linear_conv_kernel_dim"])
            out[a + "dt_bias"] = (nv,)
            out[a + "A_log"] = (nv,)
            out[a + "norm.weight"] = (t["linear_value_head_dim"],)
            out[a + "out_proj.weight"] = (H, vd)
        out[p + "post_attention_layernorm.weight"] = (H,)
        m = p + "mlp."
        out[m + "gate_proj.weight"] = (I, H)
        out[m + "up_proj.weight"] = (I, H)
        out[m + "down_proj.weight"] = (H, I)
        if mt == "llama" and t.get("mlp_bias"):
            out[m + "gate_proj.bias"] = (I,)
            out[m + "up_proj.bias"] = (I,)
            out[m + "down_proj.bias"] = (H,)
    out[body + "norm.weight"] = (H,)
    out["lm_head.weight"] = (V, H)
    return out


def random_hf(cfg, seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors with every bit pattern possible: the comparisons are of bits."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        n = 1
        for d in shape:
            n *= d
        out[name] = (
            torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=gen).view(torch.bfloat16).reshape(shape)
        )
    if cfg.get("tie_word_embeddings", text_config(cfg).get("tie_word_embeddings")):
        body = "model.language_model." if "text_config" in cfg else "model."
        out["lm_head.weight"] = out[body + "embed_tokens.weight"]
    return out


# ---------------------------------------------------------------------------------------------------
# vLLM's merge, from its weight loaders (linear.py QKVParallelLinear / MergedColumnParallelLinear /
# RowParallelLinear, vocab_parallel_embedding.py, gdn_linear_attn.py, mamba_mixer2.py).


def rank_block(w: torch.Tensor, rank: int, tp: int, dim: int = 0) -> torch.Tensor:
    return w.chunk(tp, dim=dim)[rank] if w.shape[dim] else w


def vllm_engine(cfg, hf: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    t = text_config(cfg)
    mm = "text_config" in cfg
    body_hf = "model.language_model." if mm else "model."
    body_v, head_v = ("language_model.model.", "language_model.") if mm else ("model.", "")
    nkv = t["num_key_value_heads"]
    tied = cfg.get("tie_word_embeddings", t.get("tie_word_embeddings"))
    out: dict[str, torch.Tensor] = {}

    def vocab(w):
        V = w.shape[0]
        padded = (V + 63) // 64 * 64
        per = padded // tp
        lo, hi = min(rank * per, V), min((rank + 1) * per, V)
        shard = torch.zeros((per, w.shape[1]), dtype=w.dtype)
        shard[: hi - lo] = w[lo:hi]
        return shard

    def kv_block(w):
        if nkv >= tp:
            return rank_block(w, rank, tp)
        replicas = tp // nkv
        return w.chunk(nkv)[rank // replicas]

    names = list(hf)
    for name in names:
        w = hf[name]
        local = name[len(body_hf) :] if name.startswith(body_hf) else None
        if name == "lm_head.weight":
            if not tied:
                out[head_v + "lm_head.weight"] = vocab(w)
            continue
        v = body_v + local
        if local == "embed_tokens.weight":
            out[v] = vocab(w)
        elif ".q_proj." in local:
            k, vv = hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]
            out[v.replace("q_proj", "qkv_proj")] = torch.cat([rank_block(w, rank, tp), kv_block(k), kv_block(vv)])
        elif ".k_proj." in local or ".v_proj." in local or ".up_proj." in local:
            continue
        elif ".gate_proj." in local:
            up = hf[name.replace("gate_proj", "up_proj")]
            out[v.replace("gate_proj", "gate_up_proj")] = torch.cat([rank_block(w, rank, tp), rank_block(up, rank, tp)])
        elif local.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")):
            out[v] = rank_block(w, rank, tp, dim=1)
        elif local.endswith(("in_proj_qkvz.weight", "in_proj_ba.weight", "dt_bias", "A_log")):
            out[v] = rank_block(w, rank, tp)
        elif local.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            kd = t["linear_num_key_heads"] * t["linear_key_head_dim"]
            q, k, val = w.split([kd, kd, w.shape[0] - 2 * kd])
            parts = [rank_block(q, rank, tp), rank_block(k, rank, tp), rank_block(val, rank, tp)]
            if local.endswith("in_proj_qkv.weight"):
                parts.append(rank_block(hf[name.replace("in_proj_qkv", "in_proj_z")], rank, tp))
                v = v.replace("in_proj_qkv", "in_proj_qkvz")
            out[v] = torch.cat(parts)
        elif local.endswith("in_proj_z.weight") or local.endswith("in_proj_a.weight"):
            continue
        elif local.endswith("in_proj_b.weight"):
            a = hf[name.replace("in_proj_b", "in_proj_a")]
            out[v.replace("in_proj_b", "in_proj_ba")] = torch.cat([rank_block(w, rank, tp), rank_block(a, rank, tp)])
        else:  # norms, o_proj / down_proj biases: replicated
            out[v] = w
    out = {k: x.clone().contiguous() for k, x in out.items()}
    if mm:
        out["visual.blocks.0.attn.qkv.weight"] = torch.zeros((3, 4), dtype=torch.bfloat16)
    return out


# ---------------------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    if view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return False
    if view.numel() == 0:
        return True
    lo = base.untyped_storage().data_ptr()
    hi = lo + base.untyped_storage().nbytes()
    last = view.data_ptr() + sum((s - 1) * st for s, st in zip(view.shape, view.stride())) * view.element_size()
    return lo <= view.data_ptr() and last + view.element_size() <= hi


@pytest.mark.parametrize("family,cfg,tps", CASES, ids=[c[0] for c in CASES])
def test_vllm_round_trip_all_tp_sizes(family, cfg, tps):
    hf = random_hf(cfg, seed=len(family))
    for tp in tps:
        assembled: dict[str, torch.Tensor] = {}
        covered: dict[str, torch.Tensor] = {}
        for rank in range(tp):
            engine = vllm_engine(cfg, hf, rank, tp)
            # The C++ plan's merge agrees with vLLM's, tensor for tensor.
            ours = layout.merge(cfg, hf, engine="vllm", tp_rank=rank, tp_size=tp)
            assert sorted(ours) == sorted(k for k in engine if not k.startswith("visual."))
            for k, x in ours.items():
                assert torch.equal(bits(x), bits(engine[k])), (family, tp, rank, k)

            lay = layout.build(cfg, engine, tp_rank=rank, tp_size=tp)
            assert lay["info"]["family"] == family.replace("_text", "").replace("mistral", "llama")
            assert lay["unmapped"] == (["visual.blocks.0.attn.qkv.weight"] if "text_config" in cfg else [])
            vs = layout.views(lay, engine)
            assert sorted(vs) == sorted(hf)
            for v in lay["views"]:
                name, view = v["hf_name"], vs[v["hf_name"]]
                assert shares_storage(view, engine[v["engine_name"]]), (name, tp, rank)
                full = hf[name]
                assert tuple(v["hf_shape"]) == tuple(full.shape)
                if v["shard"] is None:
                    assert torch.equal(bits(view), bits(full)), (name, tp, rank)
                    assembled[name] = view.clone()
                    covered.setdefault(name, torch.ones(full.shape[:1], dtype=torch.int32))
                    continue
                dim, segments = v["shard"]
                expect = torch.cat([full.narrow(dim, s, n) for s, n in segments], dim=dim)
                assert torch.equal(bits(view), bits(expect)), (name, tp, rank)
                acc = assembled.setdefault(name, torch.zeros_like(full))
                cov = covered.setdefault(name, torch.zeros(full.shape[dim], dtype=torch.int32))
                at = 0
                for s, n in segments:
                    acc.narrow(dim, s, n).copy_(view.narrow(dim, at, n))
                    cov[s : s + n] += 1
                    at += n
        for name, full in hf.items():
            assert torch.equal(bits(assembled[name]), bits(full)), (family, tp, name)
            kv_replicated = tp > text_config(cfg)["num_key_value_heads"] and ("k_proj" in name or "v_proj" in name)
            if kv_replicated:  # each KV head on tp / num_kv_heads ranks
                assert bool((covered[name] == tp // text_config(cfg)["num_key_value_heads"]).all()), name
            else:
                assert int(covered[name].min()) >= 1, (family, tp, name)


def test_padded_vocab_rows_are_not_viewed():
    # vocab 77 pads to 128: with TP 8 each rank holds 16 rows; ranks 5..7 hold no real row at all.
    hf = random_hf(LLAMA, 1)
    counts = []
    for rank in range(8):
        engine = vllm_engine(LLAMA, hf, rank, 8)
        assert engine["model.embed_tokens.weight"].shape == (16, 24)
        v = next(
            v
            for v in layout.build(LLAMA, engine, tp_rank=rank, tp_size=8)["views"]
            if v["hf_name"] == "model.embed_tokens.weight"
        )
        counts.append(v["shape"][0])
        assert v["shard"][1] == [(min(16 * rank, 77), v["shape"][0])]
    assert counts == [16, 16, 16, 16, 13, 0, 0, 0]


def test_row_parallel_view_is_strided_and_writes_through():
    hf = random_hf(QWEN3, 2)
    engine = vllm_engine(QWEN3, hf, 1, 2)
    lay = layout.build(QWEN3, engine, tp_rank=1, tp_size=2)
    vs = layout.views(lay, engine)
    o = vs["model.layers.0.self_attn.o_proj.weight"]
    assert o.shape == (16, 28) and o.stride() == (28, 1)
    k = vs["model.layers.1.self_attn.k_proj.weight"]
    base = engine["model.layers.1.self_attn.qkv_proj.weight"]
    assert k.data_ptr() == base.data_ptr() + (8 * 7 // 2) * 16 * 2  # after this rank's 4 q heads
    k.fill_(1.5)
    assert bool((base[28:42] == 1.5).all()) and not bool((base[:28] == 1.5).all())


def test_tied_lm_head_is_the_embedding_view():
    hf = random_hf(QWEN2, 3)
    engine = vllm_engine(QWEN2, hf, 0, 2)
    assert "lm_head.weight" not in engine
    lay = layout.build(QWEN2, engine, tp_rank=0, tp_size=2)
    head = next(v for v in lay["views"] if v["hf_name"] == "lm_head.weight")
    assert head["tied_to"] == "model.embed_tokens.weight"
    vs = layout.views(lay, engine)
    assert vs["lm_head.weight"] is vs["model.embed_tokens.weight"]


@pytest.mark.parametrize("family,cfg,tps", CASES, ids=[c[0] for c in CASES])
def test_hf_engine_views_are_the_tensors(family, cfg, tps):
    hf = random_hf(cfg, 4)
    engine = {k: x.clone() for k, x in hf.items()}
    tied = cfg.get("tie_word_embeddings", text_config(cfg).get("tie_word_embeddings"))
    if tied:
        del engine["lm_head.weight"]
    lay = layout.build(cfg, engine, engine="hf")
    vs = layout.views(lay, engine)
    for name, full in hf.items():
        src = engine.get(name)
        if src is not None:
            assert vs[name].data_ptr() == src.data_ptr() and vs[name].shape == src.shape
        assert torch.equal(bits(vs[name]), bits(full))


def test_engine_layout_is_the_cores():
    # The manifest's engine names its layout in one place (the core; the CLI's diagnose asks it too).
    assert layout.engine_layout("vllm") == "vllm"
    assert layout.engine_layout("reference") == layout.engine_layout("hf") == "hf"


def test_multimodal_prefixes_detected_when_config_disagrees():
    # A text-only config served under a multimodal wrapper's names still maps (prefix auto-detection).
    hf = random_hf(QWEN3, 5)
    engine = {"language_model." + k: x for k, x in vllm_engine(QWEN3, hf, 0, 1).items()}
    lay = layout.build(QWEN3, engine)
    assert {v["engine_name"] for v in lay["views"]} == set(engine)
    assert lay["views"][0]["hf_name"] == "model.embed_tokens.weight"


# ---------------------------------------------------------------------------------------------------
# Bad input.


def error_of(fn) -> str:
    with pytest.raises(livetrain.Error) as e:
        fn()
    return str(e.value)


def test_unsupported_model_type_names_it():
    cfg = dict(LLAMA, model_type="gpt2")
    assert '"gpt2"' in error_of(lambda: layout.plan(cfg))
    moe = dict(QWEN3, model_type="qwen3_moe")
    assert "mixture-of-experts" in error_of(lambda: layout.plan(moe))
    next_moe = dict(QWEN3_NEXT, num_experts=8)
    assert "layer 0 is a mixture-of-experts layer" in error_of(lambda: layout.plan(next_moe))
    bad_types = copy.deepcopy(QWEN3_5_TEXT)
    bad_types["layer_types"][2] = "sliding_attention"
    assert "layer_types[2]" in error_of(lambda: layout.plan(bad_types))


def test_check_refuses_what_no_engine_can_train_and_passes_dense_families():
    moe = dict(QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    for cfg in (moe, dict(LLAMA, num_experts=4), dict(LLAMA, architectures=["PhiMoEForCausalLM"])):
        msg = error_of(lambda: layout.check(cfg))
        assert "mixture-of-experts" in msg and "supported: llama" in msg, msg
    assert "Qwen3MoeForCausalLM" in error_of(lambda: layout.check(moe))
    quantized = dict(LLAMA, quantization_config={"quant_method": "gptq"})
    assert 'quant_method "gptq"' in error_of(lambda: layout.check(quantized))
    layout.check(LLAMA)
    gpt2 = dict(LLAMA, model_type="gpt2")
    layout.check(gpt2)  # dense: servable under its HF names, though no layout maps it onto vLLM
    assert "has no layout" in error_of(lambda: layout.plan(gpt2))


def test_missing_and_misshapen_engine_tensors_are_named():
    hf = random_hf(QWEN3_NEXT, 6)
    engine = vllm_engine(QWEN3_NEXT, hf, 0, 2)
    missing = dict(engine)
    del missing["model.layers.0.linear_attn.in_proj_ba.weight"]
    msg = error_of(lambda: layout.build(QWEN3_NEXT, missing, tp_rank=0, tp_size=2))
    assert "model.layers.0.linear_attn.in_proj_ba.weight" in msg and "missing" in msg
    wrong = dict(engine)
    wrong["model.layers.1.self_attn.qkv_proj.weight"] = torch.zeros((5, 16), dtype=torch.bfloat16)
    msg = error_of(lambda: layout.build(QWEN3_NEXT, wrong, tp_rank=0, tp_size=2))
    assert (
        "model.layers.1.self_attn.qkv_proj.weight" in msg and "[5, 16]" in msg and "[36, 16]" in msg
    )  # 2 gated q heads (24 rows) + 1 k + 1 v head
    # TP=1 tensors given to a TP=2 layout: every shape is wrong, the first is named.
    full = vllm_engine(QWEN3_NEXT, hf, 0, 1)
    assert "model.embed_tokens.weight" in error_of(lambda: layout.build(QWEN3_NEXT, full, tp_rank=0, tp_size=2))


def test_bad_fields_and_tp_sizes_are_named():
    assert "num_attention_heads" in error_of(lambda: layout.plan(QWEN2, tp_size=8, tp_rank=0))
    assert "tp_rank 2" in error_of(lambda: layout.plan(QWEN2, tp_size=2, tp_rank=2))
    assert "tp_size must be 1" in error_of(lambda: layout.plan(QWEN2, engine="hf", tp_size=2))
    assert '"hidden_size"' in error_of(lambda: layout.plan({k: v for k, v in LLAMA.items() if k != "hidden_size"}))
    assert '"vocab_size"' in error_of(lambda: layout.plan(dict(LLAMA, vocab_size="77")))
    assert "linear_num_key_heads 4" in error_of(lambda: layout.plan(QWEN3_5, tp_size=8))
    assert '"sglang"' in error_of(lambda: layout.plan(LLAMA, engine="sglang"))
    assert "config.json" in error_of(lambda: layout.plan("{not json"))


def test_config_from_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3))
    assert layout.plan(tmp_path)["info"]["family"] == "qwen3"
    assert layout.plan(str(tmp_path / "config.json"))["info"]["num_layers"] == 2
