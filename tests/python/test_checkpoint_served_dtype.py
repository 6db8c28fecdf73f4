"""The checkpoint store with tensors served in another dtype than the model files' (issue #15: vLLM keeps
Qwen3.5's A_log in float32 while the files hold bfloat16): the base is the files converted exactly as torch
converts them, deltas are in the served dtype, restarts restore bit-exact, materialize writes in place what
the files' dtype holds exactly and rewrites the file of a tensor whose trained values it cannot hold with
that tensor in the served dtype (crash-safe, named), export says which tensors it wrote in the served dtype,
every tensor-parallel rank uses the dtypes it serves (a store written at TP 2 restores at TP 1 and back),
and the conversions livetrain does not accept are refused naming the tensor and both dtypes."""

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
        # A new directory holds it in float32 (and says so), the other tensor in the files' dtype.
        assert store.restore(1, out_dir=tmp_path / "out") == ["w.A_log"]
        out = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert out["w.A_log"].dtype == torch.float32 and torch.equal(out["w.A_log"], trained)
        assert out["norm"].dtype == file_dtype
    # A restart (the engine loads the files again, widened) restores the float32 bits.
    live = {"w.A_log": files["w.A_log"].float(), "norm": files["norm"].clone()}
    assert restore_latest(live, model)["restored"]
    assert torch.equal(live["w.A_log"].view(torch.int32), trained.view(torch.int32))


def test_values_the_files_dtype_holds_are_materialized_in_place_in_the_files_dtype(tmp_path):
    files = {"w.A_log": special_values(torch.bfloat16)[:1000].reshape(10, 100), "norm": torch.ones(7).bfloat16()}
    model = make_model(tmp_path / "model", files)
    live = {"w.A_log": files["w.A_log"].float(), "norm": files["norm"].clone()}
    restore_latest(live, model)
    size = (model / "model.safetensors").stat().st_size
    with CheckpointStore(model) as store:
        live["w.A_log"] = (live["w.A_log"] * 2).bfloat16().float()  # trained, but every value a bf16 one
        store.save(live)
        assert store.materialize(1) == []
        assert (model / "model.safetensors").stat().st_size == size  # in place: the header did not change
        assert torch.equal(load_file(str(model / "model.safetensors"))["w.A_log"], live["w.A_log"].bfloat16())
        assert store.restore(1, out_dir=tmp_path / "out2") == []
        assert load_file(str(tmp_path / "out2" / "model.safetensors"))["w.A_log"].dtype == torch.bfloat16
        assert store.verify() == []
    fresh = {"w.A_log": live["w.A_log"].bfloat16().float(), "norm": files["norm"].clone()}
    assert not restore_latest(fresh, model)["restored"]  # the files hold the head generation
    assert torch.equal(fresh["w.A_log"], live["w.A_log"])


def trained_qwen35_like(tmp_path, file_dtype=torch.bfloat16):
    """A model directory of two files whose first holds a Gated DeltaNet A_log: a float32 A_log trained past
    what the files' dtype holds, saved as generation 1 (the other tensors changed too)."""
    g = torch.Generator().manual_seed(5)
    model = tmp_path / "model"
    model.mkdir()
    first = {
        "model.layers.0.linear_attn.A_log": torch.randn(16, generator=g).to(file_dtype),
        "model.layers.0.mlp.weight": torch.randn(24, 8, generator=g).to(file_dtype),
    }
    second = {"model.norm.weight": torch.ones(8, dtype=file_dtype)}
    save_file(first, str(model / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(model / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files = {**first, **second}
    live = {n: t.float() if n.endswith("A_log") else t.clone() for n, t in files.items()}  # as vLLM serves them
    restore_latest(live, model)
    with CheckpointStore(model) as store:
        for t in live.values():
            t += (torch.randn(t.shape, generator=g) * 1e-2).to(t.dtype)
        assert store.save(live)["generation"] == 1
    return model, files, live


def read_model(model) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_materialize_writes_a_trained_float32_tensor_as_float32_and_names_it(tmp_path):
    # Issue #15: vLLM serves Qwen3.5's A_log in float32 over bf16 files; after training its values are not bf16
    # ones. materialize rewrites the file that holds it (new header), names it, and the store follows.
    model, files, trained = trained_qwen35_like(tmp_path)
    second = model / "model-00002-of-00002.safetensors"
    size, ino = second.stat().st_size, second.stat().st_ino
    with CheckpointStore(model) as store:
        assert store.materialize(1) == ["model.layers.0.linear_attn.A_log"]
        assert store.materialized == 1 and store.verify() == []
        assert store.file_dtypes() == {}  # the files now hold it in the dtype it is served in
    after = read_model(model)
    assert after["model.layers.0.linear_attn.A_log"].dtype == torch.float32
    assert all(torch.equal(after[n].view(torch.uint8), trained[n].view(torch.uint8)) for n in files)
    assert after["model.layers.0.mlp.weight"].dtype == torch.bfloat16
    assert (second.stat().st_size, second.stat().st_ino) == (size, ino)  # the other file written in place
    assert not list(model.glob(".*.livetrain-materialize"))
    c = commit(model)
    assert c["version"] == 2 and all("served" not in t for t in c["tensors"])
    assert {t["name"]: t["dtype"] for t in c["tensors"]}["model.layers.0.linear_attn.A_log"] == "F32"
    # A restart serves the files (float32 A_log as they hold it): nothing to restore; back to generation 0 and
    # forward again, exact, in the files' new dtype.
    fresh = {n: t.clone() for n, t in after.items()}
    assert not restore_latest(fresh, model)["restored"]
    with CheckpointStore(model) as store:
        assert store.compare(1, fresh)["elements"] == 0
        assert store.materialize(0) == []
        back = read_model(model)
        assert back["model.layers.0.linear_attn.A_log"].dtype == torch.float32
        assert torch.equal(back["model.layers.0.linear_attn.A_log"], files["model.layers.0.linear_attn.A_log"].float())
        store.materialize(1)
        store.gc(1)
        assert store.verify() == []
    assert torch.equal(
        read_model(model)["model.layers.0.linear_attn.A_log"], trained["model.layers.0.linear_attn.A_log"]
    )


CRASH_POINTS = ["rewritten-prepared", "journal-written", "apply-half", "materialize-committed"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_while_rewriting_a_file_leaves_either_state(tmp_path, point):
    import signal
    import subprocess
    import sys

    model, files, trained = trained_qwen35_like(tmp_path)
    before = read_model(model)
    code = "import sys; from livetrain.checkpoint import CheckpointStore; CheckpointStore(sys.argv[1]).materialize(1)"
    from servers import ENV

    env = dict(ENV, LIVETRAIN_CHECKPOINT_CRASH_AT=point)
    p = subprocess.run([sys.executable, "-c", code, str(model)], env=env, capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    with CheckpointStore(model) as store:  # the next open recovers
        assert store.verify() == []
        now = read_model(model)
        if store.materialized == 1:
            assert point != "rewritten-prepared"
            assert all(torch.equal(now[n].view(torch.uint8), trained[n].view(torch.uint8)) for n in files)
        else:
            assert point == "rewritten-prepared"
            assert all(torch.equal(now[n].view(torch.uint8), before[n].view(torch.uint8)) for n in files)
        assert not list(model.glob(".*.livetrain-materialize"))
        store.materialize(1)
    assert all(torch.equal(read_model(model)[n].view(torch.uint8), trained[n].view(torch.uint8)) for n in files)


def test_cli_materialize_names_the_tensors_written_in_their_served_dtype(tmp_path, cli):
    import subprocess

    model, _, _ = trained_qwen35_like(tmp_path)
    p = subprocess.run(
        [cli, "checkpoint", "materialize", str(model), "1", "--json", "-q"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["written_as_served"] == ["model.layers.0.linear_attn.A_log"]
    p = subprocess.run([cli, "checkpoint", "list", str(model)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


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


# ---- tensor parallelism (issue #16's sharded side): every rank uses the dtypes it serves ----

A_LOG = "model.layers.0.linear_attn.A_log"


def tp_model(tmp_path):
    """bf16 files: a Gated DeltaNet A_log (vLLM serves it in float32, sharded by heads), a column-parallel
    weight and a replicated norm."""
    g = torch.Generator().manual_seed(11)
    files = {
        A_LOG: torch.randn(8, generator=g).bfloat16(),
        "model.layers.0.mlp.weight": torch.randn(24, 8, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(8).bfloat16(),
    }
    return make_model(tmp_path / "model", files), files


def served(files) -> dict[str, torch.Tensor]:
    return {n: t.float() if n == A_LOG else t.clone() for n, t in files.items()}


def rank_shards(full: dict[str, torch.Tensor], rank: int, ranks: int) -> list:
    """One rank's regions: A_log and the weight split by rows, the norm replicated (saved by rank 0)."""
    from livetrain.checkpoint import Shard

    out = []
    for name, t in full.items():
        if name == "model.norm.weight":
            out.append(Shard(name, (0,), t.clone(), rank == 0))
            continue
        rows = t.shape[0] // ranks
        part = t[rank * rows : (rank + 1) * rows].clone()
        out.append(Shard(name, (rank * rows,) + (0,) * (t.dim() - 1), part, True))
    return out


def train(tensors, seed):
    """A deterministic change of every tensor given (Shards: those the rank saves)."""
    g = torch.Generator().manual_seed(seed)
    for t in tensors:
        if getattr(t, "saved", True):
            t = getattr(t, "tensor", t)
            t.add_((torch.randn(t.shape, generator=g) * 1e-2).to(t.dtype))


def assemble(parts: list[list]) -> dict[str, torch.Tensor]:
    out = {}
    for shards in parts:
        for s in shards:
            if s.name == "model.norm.weight":
                out.setdefault(s.name, s.tensor.clone())
            else:
                out.setdefault(s.name, []).append(s.tensor)
    return {n: torch.cat(v) if isinstance(v, list) else v for n, v in out.items()}


def test_a_rank_restores_its_float32_shards_before_rank_0_recorded_the_served_dtype(tmp_path):
    # vLLM's TP workers restore at once; rank 1 must not depend on rank 0 having recorded A_log as float32.
    model, files = tp_model(tmp_path)
    CheckpointStore.create(model, held=[]).close()  # as the vLLM endpoint creates it before the workers start
    ranks = [rank_shards(served(files), r, 2) for r in range(2)]
    for rank in (1, 0):
        r = restore_latest(ranks[rank], model, create=False, rank=rank, ranks=2)
        assert not r["restored"]
        assert ranks[rank][0].tensor.dtype == torch.float32
    assert {t["name"]: t.get("served") for t in commit(model)["tensors"]}[A_LOG] == "F32"  # rank 0 recorded it


def test_a_store_written_at_tp2_with_a_float32_tensor_restores_and_materializes_at_tp1(tmp_path):
    model, files = tp_model(tmp_path)
    CheckpointStore.create(model, held=[]).close()
    ranks = [rank_shards(served(files), r, 2) for r in range(2)]
    # The trainer's ranks: each declares its own served dtypes through the Shards it holds (nobody recorded
    # them before); rank 1 opens first here.
    stores = [None, CheckpointStore(model, rank=1, ranks=2, held=ranks[1])]
    stores[0] = CheckpointStore(model, rank=0, ranks=2, held=ranks[0])
    try:
        for rank in (0, 1):
            train(ranks[rank], seed=rank)
        parts = [stores[r].save_part(ranks[r]) for r in range(2)]
        assert parts[0]["served"] == [(A_LOG, "F32")] and parts[1]["served"] == [(A_LOG, "F32")]
        assert stores[0].commit(1, parts)["generation"] == 1
        for s in stores:
            s.refresh()
    finally:
        for s in stores:
            s.close()
    trained = assemble(ranks)
    c = commit(model)
    assert c["version"] == 3 and {t["name"]: t.get("served") for t in c["tensors"]}[A_LOG] == "F32"
    # TP 1: whole tensors, A_log's float32 bits.
    whole = served(files)
    assert restore_latest(whole, model)["restored"]
    assert all(torch.equal(whole[n].view(torch.uint8), t.view(torch.uint8)) for n, t in trained.items())
    with CheckpointStore(model) as store:
        assert store.verify() == []
        assert store.materialize(1) == [A_LOG]
    after = load_file(str(model / "model.safetensors"))
    assert after[A_LOG].dtype == torch.float32
    assert all(torch.equal(after[n].view(torch.uint8), t.view(torch.uint8)) for n, t in trained.items())
    # And back at TP 2 from the materialized files: nothing to restore, the shards are the trained ones.
    again = [rank_shards({n: after[n].clone() for n in files}, r, 2) for r in range(2)]
    for rank in (1, 0):
        assert not restore_latest(again[rank], model, create=False, rank=rank, ranks=2)["restored"]


def test_a_store_written_at_tp1_with_a_float32_tensor_restores_at_tp2_rank_1_first(tmp_path):
    model, files = tp_model(tmp_path)
    live = served(files)
    restore_latest(live, model)
    with CheckpointStore(model) as store:
        train(live.values(), seed=3)
        store.save(live)
    ranks = [rank_shards(served(files), r, 2) for r in range(2)]
    for rank in (1, 0):
        assert restore_latest(ranks[rank], model, create=False, rank=rank, ranks=2)["restored"]
    back = assemble(ranks)
    assert all(torch.equal(back[n].view(torch.uint8), t.view(torch.uint8)) for n, t in live.items())


def test_ranks_serving_a_tensor_in_different_dtypes_are_refused_at_commit_naming_it(tmp_path):
    model, files = tp_model(tmp_path)
    CheckpointStore.create(model, held=[]).close()
    ranks = [rank_shards(served(files), 0, 2), rank_shards(files, 1, 2)]  # rank 1 serves A_log in bf16
    stores = [CheckpointStore(model, rank=r, ranks=2, held=ranks[r]) for r in range(2)]
    try:
        for rank in (0, 1):
            train(ranks[rank], seed=rank)
        parts = [stores[r].save_part(ranks[r]) for r in range(2)]
        with pytest.raises(livetrain.Error, match=r"rank 1's part: .*A_log\" is saved as BF16 .* recorded as F32"):
            stores[0].commit(1, parts)
        assert stores[0].head == 0
    finally:
        for s in stores:
            s.close()


def test_engines_load_a_float32_A_log_of_the_files_exactly(tmp_path):
    # Published Qwen3.5 files (and materialized ones) hold A_log in float32: the reference engine loads the
    # model in bf16 with transformers, which rounds it; the files' values are put back, as vLLM loads them.
    from livetrain import layout

    exact = special_values(torch.float32)[:64]
    model = make_model(tmp_path / "model", {A_LOG: exact, "model.norm.weight": torch.ones(4).bfloat16()})
    loaded = {A_LOG: exact.bfloat16().float(), "model.norm.weight": torch.ones(4).bfloat16()}
    assert not torch.equal(loaded[A_LOG], exact)
    layout.load_fp32_exactly(loaded, model)
    assert torch.equal(loaded[A_LOG].view(torch.int32), exact.view(torch.int32))


def test_materialize_rounded_to_the_files_dtype_saves_the_rounded_weights_as_a_generation_first(tmp_path, cli):
    # The explicit, lossy alternative: the files keep their bf16 header; the rounded weights are generation 2,
    # which the files hold, and generation 1 keeps the trained float32 values.
    import subprocess

    model, files, trained = trained_qwen35_like(tmp_path)
    with CheckpointStore(model) as store:
        assert store.materialize(1, round_to_file_dtype=True) == [A_LOG]
        assert (store.head, store.materialized) == (2, 2) and store.verify() == []
        assert store.list()[-1]["weight_version"] == store.list()[1]["weight_version"]
    after = read_model(model)
    assert after[A_LOG].dtype == torch.bfloat16 and torch.equal(after[A_LOG], trained[A_LOG].bfloat16())
    assert all(torch.equal(after[n].view(torch.uint8), trained[n].view(torch.uint8)) for n in files if n != A_LOG)
    live = {n: t.float() if n == A_LOG else t.clone() for n, t in after.items()}
    assert not restore_latest(live, model)["restored"]  # the files hold the head (the rounded weights)
    with CheckpointStore(model) as store:
        assert store.compare(1, live)["elements"] > 0  # generation 1 still has the float32 values
        store.restore(1, live)
        assert torch.equal(live[A_LOG], trained[A_LOG])
    # The CLI says it rounded, and which generation holds the rounded weights.
    (tmp_path / "cli").mkdir()
    model, _, _ = trained_qwen35_like(tmp_path / "cli")
    p = subprocess.run(
        [cli, "checkpoint", "materialize", str(model), "1", "--round-to-file-dtype", "--json", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["materialized"] == 2 and out["rounded_to_file_dtype"] == [A_LOG] and out["written_as_served"] == []
    with CheckpointStore(model, held=[]) as store:
        with pytest.raises(livetrain.InvalidArgumentError, match="head copy of every tensor"):
            store.materialize(1, round_to_file_dtype=True)


def test_every_served_dtype_a_store_takes_is_checked_with_the_same_words(tmp_path):
    # The engine's set_served, its served= (and serve_as) and a rank's part at commit: one check of the
    # name and of the conversion, saying who serves the tensor (the part's message was its own before).
    model, files = tp_model(tmp_path)
    with CheckpointStore.create(model, held=[]) as store:
        with pytest.raises(livetrain.InvalidArgumentError, match=r'tensor "nope", served by the engine, is not in'):
            store.set_served({"nope": torch.float32})
        with pytest.raises(livetrain.InvalidArgumentError, match=r'tensor "nope", served by the engine, is not in'):
            store.serve_as({"nope": torch.float32})
    with pytest.raises(livetrain.InvalidArgumentError, match=r'tensor "nope", served by the engine, is not in'):
        CheckpointStore(model, held=[], served={"nope": torch.float32})
    ranks = [rank_shards(served(files), r, 2) for r in range(2)]
    stores = [CheckpointStore(model, rank=r, ranks=2, held=ranks[r]) for r in range(2)]
    try:
        parts = [stores[r].save_part(ranks[r]) for r in range(2)]
        refused = {
            "nope": (
                livetrain.InvalidArgumentError,
                r'tensor "nope", served by rank 1\'s part, is not in the checkpoint',
            ),
            A_LOG: (
                livetrain.UnsupportedError,
                f'tensor "{A_LOG}" is BF16 in the model files and served as F16 by rank 1\'s part; the checkpoint store',
            ),
        }
        for name, (error, message) in refused.items():
            with pytest.raises(error, match=message):
                stores[0].commit(1, [parts[0], {**parts[1], "served": [(name, "F16")]}])
        assert stores[0].head == 0
    finally:
        for s in stores:
            s.close()
