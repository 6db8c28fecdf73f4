"""The checkpoint store with tensors served in another dtype than the model files' (issue #15: vLLM keeps
Qwen3.5's A_log in float32 while the files hold bfloat16): the base is the files converted exactly as torch
converts them, deltas are in the served dtype, restarts restore bit-exact, materialize writes back only what
the files' dtype holds exactly, export says which tensors it wrote in the served dtype, and the conversions
livetrain does not accept are refused naming the tensor and both dtypes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import livetrain
from livetrain.checkpoint import CheckpointStore, restore_latest


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Values whose conversion is easy to get wrong: ties, subnormals of both types, overflow, signed zeros."""
    text = "0 -0 1 -2.5 65504 65519 65520 1e30 -1e30 3e-8 2.98e-8 6e-8 5.96e-8 1e-40 -1e-45 6.1e-5 6.097e-5 "
    text += "1.00048828125 1.0009765625 1.00146484375 1.00390625 1.01171875 3.4e38 -3.4e38"
    f32 = torch.cat([torch.tensor([float(v) for v in text.split()]), torch.randn(997) * 4])
    bits = f32.view(torch.int32)
    bits[-200:] ^= torch.randint(0, 1 << 13, (200,), dtype=torch.int32)  # odd low bits: rounding decides
    return f32.to(dtype)


def make_model(path, tensors: dict[str, torch.Tensor]):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def commit(path) -> dict:
    return json.loads((path / ".livetrain-store" / "COMMIT").read_text())


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16])
def test_widening_is_exact_and_saved_float32_bits_come_back_bit_exact(tmp_path, file_dtype):
    files = {"w.A_log": special_values(file_dtype)[:1000].reshape(10, 100), "norm": torch.ones(7, dtype=file_dtype)}
    model = make_model(tmp_path / "model", files)
    live = {"w.A_log": files["w.A_log"].float(), "norm": files["norm"].clone()}  # as vLLM loads them
    r = restore_latest(live, model)
    assert r["created"] and not r["restored"]
    c = commit(model)
    assert c["version"] == 3 and {t["name"]: t.get("served") for t in c["tensors"]} == {"w.A_log": "F32", "norm": None}
    with CheckpointStore(model) as store:
        assert store.compare(0, live)["elements"] == 0  # the base: the files widened, exactly
        assert store.file_dtypes() == {"w.A_log": dtype_name(file_dtype)}
        live["w.A_log"] += torch.randn(10, 100) * 1e-3  # values the files' dtype cannot hold
        saved = store.save(live)
        assert saved["generation"] == 1 and saved["changed"] > 900
        trained = live["w.A_log"].clone()
        assert store.verify() == []
        # Materializing in place would round them: refused, naming the tensor and both dtypes; nothing changed.
        with pytest.raises(
            livetrain.UnsupportedError, match=r'"w\.A_log" is served as F32 .* ' + dtype_name(file_dtype)
        ):
            store.materialize(1)
        assert store.materialized == 0
        assert torch.equal(load_file(str(model / "model.safetensors"))["w.A_log"], files["w.A_log"])
        # A new directory holds it in float32 (and says so), the other tensor in the files' dtype.
        assert store.restore(1, out_dir=tmp_path / "out") == ["w.A_log"]
        out = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert out["w.A_log"].dtype == torch.float32 and torch.equal(out["w.A_log"], trained)
        assert out["norm"].dtype == file_dtype
    # A restart (the engine loads the files again, widened) restores the float32 bits.
    live = {"w.A_log": files["w.A_log"].float(), "norm": files["norm"].clone()}
    assert restore_latest(live, model)["restored"]
    assert torch.equal(live["w.A_log"].view(torch.int32), trained.view(torch.int32))
    # Values the files' dtype holds exactly are materialized in place, in the files' dtype.
    with CheckpointStore(model) as store:
        live["w.A_log"] = live["w.A_log"].to(file_dtype).float()
        store.save(live)
        store.materialize(2)
        assert torch.equal(load_file(str(model / "model.safetensors"))["w.A_log"], live["w.A_log"].to(file_dtype))
        assert store.restore(2, out_dir=tmp_path / "out2") == []
        assert load_file(str(tmp_path / "out2" / "model.safetensors"))["w.A_log"].dtype == file_dtype
        assert store.verify() == []
    fresh = {"w.A_log": live["w.A_log"].to(file_dtype).float(), "norm": files["norm"].clone()}
    assert not restore_latest(fresh, model)["restored"]  # the files hold the head generation
    assert torch.equal(fresh["w.A_log"], live["w.A_log"])


@pytest.mark.parametrize("served", [torch.bfloat16, torch.float16])
def test_narrowing_is_torchs_rounding_and_materialize_keeps_the_files_precision(tmp_path, served):
    files = {"w": special_values(torch.float32)[:1000].reshape(25, 40)}
    model = make_model(tmp_path / "model", files)
    live = {"w": files["w"].to(served)}  # an engine loading float32 files as bf16/fp16 (torch's copy_)
    restore_latest(live, model)
    with CheckpointStore(model) as store:
        assert store.compare(0, live)["elements"] == 0  # the base is torch's round-to-nearest-even, bit for bit
        live["w"][:5] += 1
        store.save(live)
        store.materialize(1)
    after = load_file(str(model / "model.safetensors"))["w"]
    assert after.dtype == torch.float32
    changed = live["w"].view(torch.int16) != files["w"].to(served).view(torch.int16)
    assert changed.sum() > 150 and not changed[5:].any()
    assert torch.equal(after[changed], live["w"].float()[changed])  # the served values, widened exactly
    assert torch.equal(after[~changed].view(torch.int32), files["w"][~changed].view(torch.int32))  # keep their bits
    again = {"w": after.to(served)}
    assert not restore_latest(again, model)["restored"] and torch.equal(again["w"], live["w"])


def test_conversions_livetrain_does_not_accept_are_refused_naming_the_tensor(tmp_path):
    model = make_model(tmp_path / "model", {"a": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(4)})
    with pytest.raises(livetrain.UnsupportedError, match=r'tensor "a" is BF16 in the model files and served as F16'):
        restore_latest({"a": torch.ones(4, dtype=torch.float16)}, model)
    with pytest.raises(livetrain.UnsupportedError, match=r'tensor "b" is F32 .* served as F64'):
        restore_latest({"b": torch.ones(4, dtype=torch.float64)}, model)
    # Generations saved in one served dtype: serving the tensor in another is refused.
    live = {"a": torch.ones(4), "b": torch.ones(4)}
    restore_latest(live, model)
    with CheckpointStore(model) as store:
        live["a"] += 0.001
        store.save(live)
    with pytest.raises(livetrain.InvalidArgumentError, match=r'"a" is served as BF16 .* saved as F32'):
        restore_latest({"a": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(4)}, model)
    assert {t["name"]: t.get("served") for t in commit(model)["tensors"]} == {"a": "F32", "b": None}


def dtype_name(d: torch.dtype) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[d]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_cuda_weights_with_a_float32_tensor_over_bf16_files_save_and_restore_like_cpu_ones(tmp_path):
    # The GPU diff over head copies of mixed served dtypes (bf16 and the float32 A_log), against the CPU save.
    g = torch.Generator().manual_seed(3)
    files = {
        "layers.0.linear_attn.A_log": torch.randn(48, generator=g).bfloat16(),
        "layers.0.mlp.weight": torch.randn(257, 129, generator=g).bfloat16(),
    }
    served = {n: t.float() if n.endswith("A_log") else t for n, t in files.items()}  # as vLLM loads them
    trained = {n: t + (torch.randn(t.shape, generator=g) * 1e-2).to(t.dtype) for n, t in served.items()}
    for device in ("cpu", "cuda"):
        model = make_model(tmp_path / device, files)
        live = {n: t.clone().to(device) for n, t in served.items()}
        restore_latest(live, model)
        with CheckpointStore(model) as store:
            for n, t in live.items():
                t.copy_(trained[n])
            saved = store.save(live)
            assert saved["generation"] == 1 and saved["changed"] > 0
        fresh = {n: t.clone().to(device) for n, t in served.items()}
        assert restore_latest(fresh, model)["restored"]
        assert all(torch.equal(fresh[n].cpu(), trained[n]) for n in files)
    cpu, cuda = (tmp_path / d / ".livetrain-store" / "gen-00000000000000000001.delta" for d in ("cpu", "cuda"))
    assert cpu.read_bytes() == cuda.read_bytes()
