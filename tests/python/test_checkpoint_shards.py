"""The checkpoint store under tensor parallelism and with served subsets, on CPU, with a tiny Qwen3.5 multimodal
checkpoint (vision tower and MTP head that no engine serves): two rank processes (torch.distributed, gloo)
save parts of generations and a rollback; the store then restores at TP 1 and at TP 2 bit for bit, a TP 1
store restores at TP 2, materialize writes the same bytes as the same generations saved at TP 1, the files
load in transformers, and the unserved tensors never change. Mismatched parts are refused with the ranks named.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import livetrain
from livetrain import checkpoint, layout
from livetrain.checkpoint import CheckpointStore

from qwen35_model import MTP, make_qwen35_dir, step

HERE = Path(__file__).resolve().parent
STEPS = 3


def run_ranks(mode: str, model: Path, ranks: int, tmp_path: Path, **kw) -> list[dict]:
    """Runs checkpoint_ranks.py once per rank; their JSON results by rank."""
    init = tmp_path / f"rendezvous-{uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1] / "python"), LIVETRAIN_NUM_THREADS="1")
    args = [f"--{k}={x}" for k, v in kw.items() for x in (v if isinstance(v, list) else [v])]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "checkpoint_ranks.py"),
                mode,
                "--model",
                str(model),
                "--rank",
                str(r),
                "--ranks",
                str(ranks),
                "--init",
                str(init),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(ranks)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def text_names(config: dict) -> set[str]:
    return {t["name"] for t in layout.plan(config, engine="vllm")["hf_tensors"]}


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("qwen35") / "model"
    return d, make_qwen35_dir(d)


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".livetrain-store"))
    return dst


def test_tp2_parts_restore_at_tp1_and_tp2_and_materialize_like_tp1(qwen35, tmp_path):
    src, config = qwen35
    tp2, tp1 = fresh_copy(src, tmp_path / "tp2"), fresh_copy(src, tmp_path / "tp1")
    files = load_file(str(src / "model.safetensors"))
    text = text_names(config)
    unserved = sorted(set(files) - text)
    assert any(n.startswith("model.visual.") for n in unserved) and set(MTP) <= set(unserved)
    CheckpointStore.create(tp2).close()

    # Two rank processes: generations 1..3, then generation 4 = a rollback to 1.
    outs = run_ranks("save", tp2, 2, tmp_path, steps=STEPS)
    assert [o["generations"] for o in outs] == [[1, 2, 3, 4]] * 2

    # The same generations saved by one process at TP 1, from the text tensors whole (the served subset).
    expected = {0: {n: files[n].clone() for n in text}}
    live = {n: files[n].clone() for n in text}
    with CheckpointStore.create(tp1) as store:
        for g in range(1, STEPS + 1):
            step(live, g, 0.05 if g % 2 else 0.5)
            expected[g] = {n: t.clone() for n, t in live.items()}
            assert store.save(live, weight_version=g)["generation"] == g
        store.restore(1, live)
        assert store.save(live, weight_version=99)["generation"] == 4
        expected[4] = expected[1]

    with CheckpointStore(tp2) as store:
        gens = store.list()
        assert [g["ranks"] for g in gens] == [1, 2, 2, 2, 2]
        assert all(len(g["parts"]) == 2 and g["parts"][1]["file"].endswith(".rank-1-of-2.delta") for g in gens[1:])
        assert gens[4]["weight_version"] == 99
        assert store.verify() == []
        # At TP 1, whole tensors, every generation, bit for bit; the unserved tensors are the files'.
        for g in range(5):
            got = {n: torch.zeros_like(t) for n, t in files.items()}
            store.restore(g, got)
            for n in text:
                assert torch.equal(got[n].view(torch.int16), expected[g][n].view(torch.int16)), (g, n)
            for n in unserved:
                assert torch.equal(got[n].view(torch.int16), files[n].view(torch.int16)), (g, n)
        store.materialize(3)
    with CheckpointStore(tp1) as store:
        store.materialize(3)
    # Materialized at TP 2 or TP 1: the same bytes.
    assert (tp2 / "model.safetensors").read_bytes() == (tp1 / "model.safetensors").read_bytes()
    after = load_file(str(tp2 / "model.safetensors"))
    for n in unserved:
        assert torch.equal(after[n].view(torch.int16), files[n].view(torch.int16)), n

    # A TP 1 store restored by two ranks, and the TP 2 store too (generation 2 after the files moved to 3).
    checks = [f"{tp1}:3:3", f"{tp2}:2:2", f"{tp2}:4:1"]
    outs = run_ranks("restore", src, 2, tmp_path, check=checks)
    assert all(o["equal"] == [True] * 3 for o in outs), outs

    # transformers loads the materialized checkpoint with its published class.
    import transformers

    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(tp2, dtype=torch.bfloat16)
    state = model.state_dict()
    for n in (
        "model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
        "model.language_model.embed_tokens.weight",
        "model.visual.blocks.0.attn.qkv.weight",
    ):
        want = expected[3][n] if n in text else files[n]
        assert torch.equal(state[n].view(torch.int16), want.view(torch.int16)), n


def test_served_text_model_of_a_multimodal_checkpoint(qwen35, tmp_path):
    """Issue #15: an engine serving the text model of a ConditionalGeneration checkpoint (tensors named as the
    text-only class names them) restores, saves and rolls back through the layout's names; the vision tower
    and MTP head are carried unchanged."""
    src, config = qwen35
    d = fresh_copy(src, tmp_path / "model")
    files = load_file(str(d / "model.safetensors"))
    # The text-only class's names: model.* and lm_head.weight.
    engine = {
        n.replace("model.language_model.", "model.", 1): t.clone() for n, t in files.items() if n in text_names(config)
    }
    untouched = {n: t.clone() for n, t in engine.items()}
    lay = layout.build(config, engine, engine="hf")
    views = layout.views(lay, engine)
    assert "model.language_model.embed_tokens.weight" in views
    r = checkpoint.restore_latest(views, d)
    assert r["created"] and not r["restored"]
    assert r["not_served"] == sorted(set(files) - set(views))
    with CheckpointStore(d) as store:
        step(views, 7, 0.2)
        assert store.save(views)["written"]
        trained = {n: t.clone() for n, t in views.items()}
    # A restarted engine gets the trained text model; unserved tensors only ever come from the files.
    engine2 = {n: t.clone() for n, t in untouched.items()}
    views2 = layout.views(layout.build(config, engine2, engine="hf"), engine2)
    assert checkpoint.restore_latest(views2, d)["restored"]
    assert all(torch.equal(views2[n], trained[n]) for n in views2)
    # Engine names that do not map to the files are refused, naming the tensor.
    with pytest.raises(livetrain.Error, match="model.embed_tokens.weight' that the checkpoint store"):
        checkpoint.restore_latest(engine2, d)
    with CheckpointStore(d) as store:
        store.materialize(1)
    after = load_file(str(d / "model.safetensors"))
    for n, t in files.items():
        want = trained.get(n, t)
        assert torch.equal(after[n].view(torch.int16), want.view(torch.int16)), n


def test_mismatched_parts_are_refused_with_the_ranks_named(qwen35, tmp_path):
    src, config = qwen35
    d = fresh_copy(src, tmp_path / "model")
    CheckpointStore.create(d).close()
    full = {n: t for n, t in load_file(str(d / "model.safetensors")).items() if n in text_names(config)}
    ranks = []
    for r in range(2):
        engine = layout.merge(config, full, engine="vllm", tp_rank=r, tp_size=2)
        lay = layout.build(config, engine, engine="vllm", tp_rank=r, tp_size=2)
        ranks.append((engine, checkpoint.shards(lay, layout.views(lay, engine), r)))
    # Two ranks in one process (rank 0 first); each holds only its own lock.
    s0 = CheckpointStore(d, rank=0, ranks=2, held=ranks[0][1], group="a")
    s1 = CheckpointStore(d, rank=1, ranks=2, held=ranks[1][1], group="a")
    with pytest.raises(livetrain.Error, match="in use by another process as rank 1"):
        CheckpointStore(d, rank=1, ranks=2, held=[])
    for engine, _ in ranks:
        for t in engine.values():
            step({"t": t}, 3, 0.1)
    p0, p1 = s0.save_part(ranks[0][1]), s1.save_part(ranks[1][1])
    assert p0["generation"] == p1["generation"] == 1 and p1["file"] == "gen-00000000000000000001.rank-1-of-2.delta"
    with pytest.raises(livetrain.Error, match=r"rank\(s\) 1 are missing"):
        s0.commit(1, [p0])
    with pytest.raises(livetrain.Error, match="rank 1's part was written at tensor-parallel size 4"):
        s0.commit(1, [p0, {**p1, "ranks": 4}])
    with pytest.raises(livetrain.Error, match='rank 1\'s part comes from "b"'):
        s0.commit(1, [p0, {**p1, "group": "b"}])
    with pytest.raises(livetrain.Error, match=r"parts\[1\]: missing \"hash\""):
        s0.commit(1, [p0, {k: v for k, v in p1.items() if k != "hash"}])
    with pytest.raises(livetrain.Error, match="next generation is 1"):
        s0.commit(2, [p0, p1])
    with pytest.raises(livetrain.Error, match=r"parts\[1\]\.usage\.encode: expected a dict"):
        s0.commit(1, [p0, {**p1, "usage": {**p1["usage"], "encode": 3}}])
    done = s0.commit(1, [p0, p1])
    assert done["written"]
    # The parts' timings and usage reach the generation's answer, summed (they crossed as dicts, as between ranks).
    assert done["encode_seconds"] >= max(p0["encode_seconds"], p1["encode_seconds"]) > 0
    assert done["usage"]["process"]["wall_seconds"] >= p1["usage"]["process"]["wall_seconds"] > 0
    assert s1.refresh() == 1
    # Shards of another TP size than the held ones cannot be saved by this rank; any shard can be restored.
    engine1 = layout.merge(config, full, engine="vllm")
    lay1 = layout.build(config, engine1, engine="vllm")
    whole = checkpoint.shards(lay1, layout.views(lay1, engine1), 0)
    with pytest.raises(livetrain.Error, match="not a region this process keeps a head copy of"):
        s0.save_part(whole)
    s0.restore(1, whole)
    assert s0.compare(1, whole)["tensors"] == 0
    s1.close()
    s0.close()


def diagnose(cli, manifest) -> tuple[dict, str]:
    """`livetrain diagnose` of a manifest: its --json document and its text, both of a run that agreed."""
    runs = [
        subprocess.run(
            [cli, "diagnose", "--manifest", str(manifest), *extra], capture_output=True, text=True, timeout=60
        )
        for extra in (["--json"], [])
    ]
    for r in runs:
        assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(runs[0].stdout), runs[1].stdout


def test_diagnose_lists_the_vision_tower_and_mtp_head_as_not_served(cli, qwen35, tmp_path):
    from livetrain import sharing

    src, config = qwen35
    files = load_file(str(src / "model.safetensors"))
    engine = layout.merge(config, {n: t for n, t in files.items() if n in text_names(config)}, engine="vllm")
    exported = sharing.export_cpu(engine, tmp_path / "engine.json", config=config, engine="vllm", model_path=src)
    doc, text = diagnose(cli, tmp_path / "engine.json")
    assert doc["ok"] and doc["only_on_disk"] == [] and doc["mismatched"] == []
    assert doc["not_served"] == sorted(set(files) - text_names(config))
    assert f"{len(doc['not_served'])} not served: the engine and the files agree" in text
    del exported


def test_diagnose_lists_a_float32_A_log_over_bf16_files_as_served_in_another_dtype_at_tp2(cli, qwen35, tmp_path):
    # vLLM's TP rank 1 serves its shards of A_log in float32 (the files hold bf16): not a mismatch.
    from livetrain import sharing

    src, config = qwen35
    files = load_file(str(src / "model.safetensors"))
    text = {
        n: t.float() if n.endswith(".linear_attn.A_log") else t for n, t in files.items() if n in text_names(config)
    }
    a_log = sorted(n for n in text if n.endswith(".linear_attn.A_log"))
    assert a_log
    engine = layout.merge(config, text, engine="vllm", tp_rank=1, tp_size=2)
    exported = sharing.export_cpu(
        engine, tmp_path / "engine.json", config=config, engine="vllm", model_path=src, tp_rank=1, tp_size=2
    )
    doc, text = diagnose(cli, tmp_path / "engine.json")
    assert doc["ok"] and doc["mismatched"] == []
    assert sorted(doc["served_in_other_dtype"]) == [f"{n}: BF16 on disk, served as F32" for n in a_log]
    assert f"{len(a_log)} served in another dtype" in text, text
    del exported


def test_kv_heads_shared_by_ranks_are_saved_once(tmp_path):
    """At TP 4 with 2 KV heads, ranks 0-1 and 2-3 share one each: only the first of each pair saves it, so
    the parts are disjoint and the TP 1 state is exact (four ranks' stores in one process)."""
    import transformers

    from livetrain import safetensors as lst

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=100,
        attention_bias=True,
    )
    config = cfg.to_dict()
    torch.manual_seed(0)
    full = {
        n: t.detach().to(torch.bfloat16).clone() for n, t in transformers.LlamaForCausalLM(cfg).state_dict().items()
    }
    d = tmp_path / "model"
    d.mkdir()
    lst.save_model(d, full)
    (d / "config.json").write_text(json.dumps(config))
    CheckpointStore.create(d).close()
    ranks = []
    for r in range(4):
        engine = layout.merge(config, full, engine="vllm", tp_rank=r, tp_size=4)
        lay = layout.build(config, engine, engine="vllm", tp_rank=r, tp_size=4)
        ranks.append(checkpoint.shards(lay, layout.views(lay, engine), r))
    k = "model.layers.0.self_attn.k_proj.weight"
    assert [[s.saved for s in sh if s.name == k] for sh in ranks] == [[True], [False], [True], [False]]
    stores = [CheckpointStore(d, rank=r, ranks=4, held=ranks[r]) for r in range(4)]
    step(full, 5, 0.3)
    for r in range(4):  # every rank's memory follows the same step (shared KV heads alike)
        for s in ranks[r]:
            region = full[s.name]
            for dim, start in enumerate(s.start):
                region = region.narrow(dim, start, s.tensor.shape[dim])
            s.tensor.copy_(region)
    parts = [stores[r].save_part(ranks[r]) for r in range(4)]
    assert stores[0].commit(1, parts)["written"]
    for s in stores:
        s.refresh()
        s.close()
    with CheckpointStore(d) as store:
        got = {n: torch.zeros_like(t) for n, t in full.items()}
        store.restore(1, got)
        assert all(torch.equal(got[n], full[n]) for n in full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
@pytest.mark.parametrize(
    "knobs",
    [{}, {"checkpoint.pipeline": 1, "checkpoint.diff": 1, "checkpoint.digests": 1, "checkpoint.group_mib": 1}],
    ids=["defaults", "pipeline-onepass-digests"],
)
def test_cuda_parts_equal_cpu_parts(qwen35, tmp_path, knobs):
    """Parts saved from CUDA shards (diffed on the GPU against each rank's page-locked head copy of its
    regions) are byte-identical to parts saved from the same weights on the CPU; both restore bit-exact. Under
    the default tuning and with every GPU-save knob on (docs/tuning.md: the encoder pipelined with the diff,
    the one-pass staged diff in 1 MiB groups, chunk digests): save_part takes save's path."""
    for name, value in knobs.items():
        livetrain._core.tuning_set(name, value)
    try:
        _cuda_parts_equal_cpu_parts(qwen35, tmp_path)
    finally:
        livetrain._core.tuning_reset()


def _cuda_parts_equal_cpu_parts(qwen35, tmp_path):
    src, config = qwen35
    full = {n: t for n, t in load_file(str(src / "model.safetensors")).items() if n in text_names(config)}
    dirs = {dev: fresh_copy(src, tmp_path / dev) for dev in ("cpu", "cuda")}
    ranks = {}
    for dev, d in dirs.items():
        CheckpointStore.create(d).close()
        ranks[dev] = []
        for r in range(2):
            engine = {n: t.to(dev) for n, t in layout.merge(config, full, engine="vllm", tp_rank=r, tp_size=2).items()}
            lay = layout.build(config, engine, engine="vllm", tp_rank=r, tp_size=2)
            ranks[dev].append((engine, checkpoint.shards(lay, layout.views(lay, engine), r)))
    stores = {
        dev: [CheckpointStore(d, rank=r, ranks=2, held=ranks[dev][r][1]) for r in range(2)] for dev, d in dirs.items()
    }
    for g, fraction in enumerate([0.2, 0.001, 1.0], start=1):
        step(full, g, fraction)
        for dev in dirs:
            for r in range(2):
                for n, t in layout.merge(config, full, engine="vllm", tp_rank=r, tp_size=2).items():
                    ranks[dev][r][0][n].copy_(t)
            parts = [stores[dev][r].save_part(ranks[dev][r][1]) for r in range(2)]
            assert stores[dev][0].commit(g, parts)["written"]
            stores[dev][1].refresh()
        for r in range(2):
            name = f"gen-{g:020d}.rank-{r}-of-2.delta"
            assert (dirs["cpu"] / ".livetrain-store" / name).read_bytes() == (
                dirs["cuda"] / ".livetrain-store" / name
            ).read_bytes(), (g, r)
    for r in range(2):
        engine, shards_ = ranks["cuda"][r]
        want = {n: t.clone() for n, t in engine.items()}
        for t in engine.values():
            t.zero_()
        stores["cuda"][r].restore(3, shards_)
        assert all(torch.equal(engine[n].cpu(), want[n].cpu()) for n in engine)
        assert stores["cuda"][r].compare(3, shards_)["elements"] == 0
    for ss in stores.values():
        for s in ss:
            s.close()
