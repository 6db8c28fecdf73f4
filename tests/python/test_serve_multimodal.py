"""`livetrain serve` on a published-style Qwen3.5 multimodal checkpoint (issue #15), on CPU: a tiny random
``Qwen3_5ForConditionalGeneration`` with a vision tower and an MTP head is served as its text model; a /train
job and a /checkpoint save the text model's change; /train/status names the tensors that are never trained;
a restart serves the checkpoint; the materialized files (the trained float32 A_log written as float32) serve
again and load in transformers' published class with the vision tower and MTP head bit for bit as they were. A checkpoint livetrain cannot map is refused at start,
naming its architecture."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("fastapi", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")
pytest.importorskip("uvicorn", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")

import livetrain  # noqa: E402
from livetrain import checkpoint, sharing  # noqa: E402
from livetrain.checkpoint import CheckpointStore  # noqa: E402

import servers  # noqa: E402
from qwen35_model import MTP, make_qwen35_dir  # noqa: E402

ENV = {**servers.ENV, "OMP_NUM_THREADS": "1"}
CORPUS = ["the capital of zorbia is quuxville", "one two three four five six", "hello how are you today"]


def serve(model, base, name):
    args = ["--model", str(model), "--state-dir", str(base / "state"), "--run-dir", str(base / "run")]
    return servers.ServeProcess(args + ["--max-seq-len", "32", "--batch-size", "2"], base / f"{name}-{{port}}.log", ENV)


def served_weights(base, model) -> dict:
    """The engine's weights (read through its manifest, no lease) under the model files' names."""
    a = sharing.attach(base / "run" / "engine.manifest.json", take_lease=False)
    return {k: v.clone() for k, v in checkpoint.by_file_names(a.tensors, model).items()}


def test_a_qwen35_multimodal_checkpoint_is_served_trained_and_restored_as_its_text_model(tmp_path):
    model = tmp_path / "model"
    make_qwen35_dir(model, corpus=CORPUS)
    files = load_file(str(model / "model.safetensors"))
    unserved = sorted(n for n in files if not n.startswith("model.language_model.") and n != "lm_head.weight")
    assert any(n.startswith("model.visual.") for n in unserved) and set(MTP) <= set(unserved)

    s = serve(model, tmp_path, "first")
    try:
        status = s.status()
        assert status["not_trained"]["tensors"] == unserved
        # vLLM's (and the reference engine's) float32 A_log over the bf16 files: said so, not a mismatch.
        other = status["checkpoint"]["served_in_other_dtype"]
        assert other and all(n.endswith(".linear_attn.A_log") for n in other)
        assert all(v == {"files": "BF16", "served": "F32"} for v in other.values())
        code, job = s.http(
            "/train", {"examples": [{"prompt": "one two", "completion": "three"}], "steps": 2, "lr": 1e-3}
        )
        assert code == 202, job
        assert s.wait_job(job["job_id"])["state"] == "done"
        code, saved = s.http("/checkpoint", {})
        assert code == 200 and saved["generation"] == 1 and saved["changed"] > 0, saved
        trained = served_weights(tmp_path, model)
        assert not all(torch.equal(trained[n], files[n]) for n in trained)
    finally:
        assert s.stop() == 0

    # Gated DeltaNet's A_log is served in float32 as vLLM serves it (the files hold bf16), and trained so.
    a_log = sorted(n for n in trained if n.endswith(".linear_attn.A_log"))
    assert a_log and all(trained[n].dtype == torch.float32 and files[n].dtype == torch.bfloat16 for n in a_log)
    assert any(not torch.equal(trained[n], files[n].float()) for n in a_log)

    # A restart serves generation 1 (the text model, A_log's float32 bits included), the store says nothing
    # else changed.
    s = serve(model, tmp_path, "again")
    try:
        again = served_weights(tmp_path, model)
        assert all(t.dtype == trained[n].dtype and torch.equal(t, trained[n]) for n, t in again.items())
        assert s.status()["checkpoint"]["generation"] == 1
    finally:
        assert s.stop() == 0
    with CheckpointStore(model) as store:
        assert store.file_dtypes() == {n: "BF16" for n in a_log}
        # A new directory holds the trained float32 A_log in float32, everything else in the files' dtype ...
        as_served = store.restore(1, out_dir=tmp_path / "export")
        # ... and so do the model files once materialized: bf16 cannot hold it, so its file is rewritten with it
        # in float32, and materialize names it.
        assert store.materialize(1) == as_served
        assert store.verify() == []
    assert as_served == [n for n in a_log if not torch.equal(trained[n], trained[n].bfloat16().float())]
    assert as_served
    after = load_file(str(model / "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in exported.items())
    for n in unserved:
        assert torch.equal(after[n].view(torch.int16), files[n].view(torch.int16)), n
    for n, t in trained.items():
        assert torch.equal(after[n].to(t.dtype), t) and (after[n].dtype == torch.float32) == (n in as_served), n
    # Served again from the materialized files (A_log as they now hold it): the head, nothing to restore.
    s = serve(model, tmp_path, "materialized")
    try:
        again = served_weights(tmp_path, model)
        assert all(torch.equal(t, trained[n]) for n, t in again.items())
        ck = s.status()["checkpoint"]
        assert ck["generation"] == 1
        # The files hold the rewritten A_log in float32 now; any other A_log is still bf16 on disk.
        assert set(ck["served_in_other_dtype"]) == set(a_log) - set(as_served)
    finally:
        assert s.stop() == 0
    import transformers

    loaded = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16)
    loaded = loaded.state_dict()
    for n, t in trained.items():
        assert torch.equal(loaded[n], t.to(torch.bfloat16)), n
    assert torch.equal(loaded["model.visual.patch_embed.proj.weight"], files["model.visual.patch_embed.proj.weight"])


def test_a_checkpoint_livetrain_cannot_map_is_refused_at_start_naming_its_architecture(tmp_path):
    from livetrain.engines.reference import Engine

    model = tmp_path / "model"
    make_qwen35_dir(model, corpus=CORPUS, mtp=False)
    config = json.loads((model / "config.json").read_text())
    for arch, extra, named in (
        ("Qwen3_5SomethingNewForConditionalGeneration", {}, "Qwen3_5ForConditionalGeneration"),
        ("Qwen3_5ForConditionalGeneration", {"quantization_config": {"quant_method": "fp8"}}, "quant_method"),
    ):
        (model / "config.json").write_text(json.dumps({**config, "architectures": [arch], **extra}))
        # The engine refuses before it shares anything (no manifest, no store).
        with pytest.raises(livetrain.UnsupportedError, match=f"{arch}.*{named}|{named}.*{arch}"):
            Engine(str(model), str(tmp_path / "engine.json"))
        assert not (tmp_path / "engine.json").exists() and not (model / ".livetrain-store").exists()
