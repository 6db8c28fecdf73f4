"""What the GPU runs do that a CPU can check: bench/gdn.py's comparison on a tiny stack, bench/serve.py's
Qwen3.5 path (several token counts in one trainer, the checkpoint saves after opening the store and after
one step), scripts/vllm_gpu_run.py's multimodal Qwen3.5 checkpoint and its vision/MTP comparison,
bench/vllm_transfer.py's Ray stand-in and table, and scripts/gpu.sh's steps."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from servers import ENV

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT, **kw)


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="flash-linear-attention is installed")
def test_gdn_bench_runs_the_torch_path_and_says_the_kernels_are_missing(tmp_path):
    r = run(
        [
            sys.executable,
            "bench/gdn.py",
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--layers",
            "2",
            "--tokens",
            "64,128",
            "--reps",
            "1",
            "--json",
            str(tmp_path / "gdn.json"),
        ]
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "gdn.json").read_text())
    assert [(row["tokens"], row["unit"]) for row in doc["rows"]] == [
        (64, "mixer"),
        (64, "layer"),
        (128, "mixer"),
        (128, "layer"),
    ]
    assert all(row["torch"]["tokens_per_s"] > 0 and "fused" not in row for row in doc["rows"])
    assert doc["kernels"]["chunk_gated_delta_rule"] == "torch (install flash-linear-attention)"
    assert "| 128 | layer | fused: not used, torch (install flash-linear-attention) | - |" in r.stdout


def test_serve_bench_takes_shape_and_its_earlier_name_size():
    for flag in ("--shape", "--size"):
        r = run([sys.executable, "bench/serve.py", flag, "qwen3.5-2b"])
        assert r.returncode == 2 and "argument --shape/--size: invalid choice: 'qwen3.5-2b'" in r.stderr, r.stderr
        assert "qwen3.5-27b" in r.stderr and "qwen3.5-tiny" in r.stderr


def test_serve_bench_qwen35_runs_without_model_files(tmp_path):
    """Without --checkpoint no files are written: the engine's exact float32 load of A_log has nothing to read
    (the H200 run of --shape qwen3.5-27b without --checkpoint stopped there)."""
    args = ["--shape", "qwen3.5-tiny", "--device", "cpu", "--tokens", "32", "--steps", "1", "--gen-seconds", "0"]
    r = run([sys.executable, "bench/serve.py", *args, "--no-adamw", "--dir", str(tmp_path)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 32 |" in r.stdout


def test_serve_bench_qwen35_steps_each_length_and_times_the_checkpoint_saves(tmp_path):
    r = run(
        [
            sys.executable,
            "bench/serve.py",
            "--shape",
            "qwen3.5-tiny",
            "--device",
            "cpu",
            "--tokens",
            "32,48",
            "--steps",
            "1",
            "--gen-seconds",
            "0",
            "--no-adamw",
            "--checkpoint",
            "--dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "serve.json"),
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "serve.json").read_text())
    s = doc["sets"][0]
    assert doc["token_list"] == [32, 48] and doc["adamw_skipped"] is None
    lt = s["livetrain"]
    assert [run["tokens"] for run in lt["runs"]] == [32, 48] and all(run["tokens_per_s"] > 0 for run in lt["runs"])
    assert set(lt["kernels"]) == {
        "chunk_gated_delta_rule",
        "fused_recurrent_gated_delta_rule",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    }
    first, one = lt["checkpoint"]
    assert first["scenario"].startswith("first save after open") and not first["written"]
    assert one["scenario"] == "after one step" and one["written"] and one["changed"] > 0
    assert s["files"]["seconds"] > 0
    assert "| 4 | " in r.stdout and "| 48 |" in r.stdout


def test_vllm_run_qwen35_checkpoint_and_the_vision_mtp_comparison(tmp_path):
    vr = load(ROOT / "scripts" / "vllm_gpu_run.py", "vllm_gpu_run")
    model = tmp_path / "model"
    vr.make_model(model, "qwen3_5")
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["text_config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [11, 11, 10]
    original = vr.model_tensors(model)
    outside = sorted(n for n in original if vr.outside_text_model(n))
    assert any(n.startswith("model.visual.") for n in outside) and any(n.startswith("mtp.") for n in outside)
    assert "lm_head.weight" not in outside and not any(n.startswith("model.language_model.") for n in outside)

    trained = {n: t.clone() for n, t in original.items()}
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"
    trained[name].view(torch.int16)[0, 0] ^= 1
    got = vr.compare_outside(original, trained, "trained")
    assert got["outside_identical"] == len(outside) and got["text_changed"] == 1
    with pytest.raises(vr.Failed, match="no text model tensor differs"):
        vr.compare_outside(original, original, "untrained")
    trained[outside[0]].view(torch.int16).view(-1)[0] ^= 1
    with pytest.raises(vr.Failed, match=f"tensor {outside[0]} differs from the original files"):
        vr.compare_outside(original, trained, "changed vision")
    del trained[outside[0]]
    with pytest.raises(vr.Failed, match=f"tensor {outside[0]} is missing"):
        vr.compare_outside(original, trained, "lost vision")


def test_vllm_transfer_ray_stand_in_and_table(tmp_path):
    vt = load(ROOT / "bench" / "vllm_transfer.py", "vllm_transfer")
    d = vt.stand_in_ray(tmp_path)
    if d is None:
        pytest.skip("Ray is installed: no stand-in is written")
    code = (
        "import ray\n"
        "try:\n    from ray.util import placement_group_table\nexcept ImportError as e:\n    print('import', type(e).__name__)\n"
        "try:\n    ray.init()\nexcept AttributeError as e:\n    print('attr', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "PYTHONPATH": d})
    assert r.stdout.splitlines() == [
        "import ModuleNotFoundError",
        "attr ray is not installed: ray.init is not available (stand-in module)",
    ]
    result = {
        "device": "GPU",
        "vllm": "0.26.0",
        "torch": "2.11",
        "size": "8b",
        "weights_bytes": 2**34,
        "params": 8e9,
        "max_model_len": 4096,
        "rounds": 2,
        "startup": {"files_s": 10.0, "health_s": 60.0, "trainer_s": 80.0},
        "methods": [
            {
                "name": "livetrain in place",
                "seconds": vt.stats([0.01, 0.02]),
                "extra_bytes": 3 * 2**30,
                "includes": "reset",
            },
            {
                "name": "vLLM IPC unpacked",
                "seconds": vt.stats([1.0, 1.2]),
                "extra_bytes": 17 * 2**30,
                "includes": "all",
                "phases": {"send": 0.8},
            },
            {"name": "vLLM IPC packed", "error": "RuntimeError: boom"},
        ],
        "compare": {"tensors": 3, "identical": 3, "differ": [], "missing": []},
        "ray_stand_in": True,
        "errors": [],
        "seconds": 100.0,
    }
    table = vt.render(result)
    assert "| livetrain in place | 3.00 | 0.015 | 0.010–0.020 | reset |" in table
    assert "| vLLM IPC packed | - | - | - | FAILED: RuntimeError: boom |" in table
    assert "3 of 3 tensors identical" in table and "stand-in" in table


def test_gpu_sh_lists_its_steps_and_refuses_unknown_ones():
    r = run(["bash", "scripts/gpu.sh"])
    assert r.returncode == 2
    for step in (
        "build",
        "wheel",
        "checks",
        "tests",
        "bench-core",
        "bench-gdn",
        "bench-serve8b",
        "bench-serve27b",
        "bench-gen27b",
        "vllm-llama",
        "vllm-qwen35",
        "vllm-transfer",
        "sweep",
    ):
        assert f"\n{step} " in r.stdout, step
    r = run(["bash", "scripts/gpu.sh", "build", "bench-nothing"])
    assert r.returncode == 2 and "unknown step bench-nothing" in r.stderr


def test_vllm_run_qwen35_steps_without_vllm(tmp_path):
    """scripts/vllm_gpu_run.py --arch qwen3_5 with a CPU engine in vLLM's layout in place of vLLM: the worker's
    start-up restore, the plugin's trainer (the text model built on the views), steps, POST /checkpoint's
    save, the store's head written out, a restart's restore: the vision and MTP tensors stay bit-identical to
    the original files, the text model's are the trained ones everywhere. A_log is float32 as vLLM serves it,
    trained so: the export writes it in float32, and so does materialize (rewriting the bf16 file), naming it;
    the materialized files then serve the trained weights with nothing to restore."""
    from livetrain import checkpoint, layout, sharing
    from livetrain.trainer import options
    from livetrain.trainer.examples import parse_job
    from livetrain.trainer.service import Trainer
    from livetrain.vllm import worker

    import tiny_model

    vr = load(ROOT / "scripts" / "vllm_gpu_run.py", "vllm_gpu_run")
    model, store = tmp_path / "model", tmp_path / "model" / ".livetrain-store"
    vr.make_model(model, "qwen3_5")
    original = vr.model_tensors(model)
    config = json.loads((model / "config.json").read_text())
    checkpoint.CheckpointStore.create(model, store).close()
    env = {worker.STORE_ENV: str(store)}

    def engine():  # what vLLM loads from the files: the text model, in its layout, A_log widened to float32
        text = {n: t for n, t in original.items() if not vr.outside_text_model(n)}
        merged = layout.merge(config, text, engine="vllm")
        return {n: t.float() if layout.served_in_fp32(n) else t for n, t in merged.items()}

    served = engine()
    assert not worker.restore_newer(str(model), served, config, 0, 1, env=env)["restored"]
    exported = sharing.export_cpu(served, tmp_path / "tp0.json", model_path=model, config=config, engine="vllm")
    settings = options.parse(["--state-dir", str(tmp_path / "state"), "--store", str(store), "--lr", "1e-2"])
    trainer = Trainer(str(tmp_path / "tp0.json"), str(model), settings)
    try:
        job = parse_job(trainer.tokenizer, {"examples": tiny_model.FACT_EXAMPLES}, 64, 10)
        trainer.step(job["examples"])
        saved = trainer.checkpoint().body
        assert saved["written"] and saved["generation"] == 1
    finally:
        trainer.close()
    trained = {n: t.clone() for n, t in exported.tensors.items()}
    exported.close()
    with checkpoint.CheckpointStore(model, store) as s:
        a_log = sorted(s.file_dtypes())
        assert a_log and all(n.endswith(".linear_attn.A_log") for n in a_log)
        assert s.restore(s.head, out_dir=tmp_path / "head") == a_log  # trained in float32: written so
    head = vr.model_tensors(tmp_path / "head")
    assert vr.compare_outside(original, head, "head")["outside_identical"] == sum(map(vr.outside_text_model, original))
    restarted = engine()
    assert worker.restore_newer(str(model), restarted, config, 0, 1, env=env)["restored"]
    assert all(torch.equal(restarted[n], trained[n]) for n in trained)
    with checkpoint.CheckpointStore(model, store) as s:  # the bf16 files cannot hold the float32 A_log: as float32
        assert s.materialize(s.head) == a_log
    files = vr.model_tensors(model)
    assert vr.compare_outside(original, files, "files")["outside_identical"] == sum(
        map(vr.outside_text_model, original)
    )
    assert all(vr.torch_equal_bytes(files[n], t) for n, t in head.items())
    # Served again from the materialized files (vLLM copies the float32 A_log in as it is): nothing to restore.
    again = {
        n: t.float() if layout.served_in_fp32(n) else t
        for n, t in layout.merge(
            config, {n: t for n, t in files.items() if not vr.outside_text_model(n)}, engine="vllm"
        ).items()
    }
    assert not worker.restore_newer(str(model), again, config, 0, 1, env=env)["restored"]
    assert all(torch.equal(again[n], trained[n]) for n in trained)


def test_serve_bench_completion_windows_run_until_both_requests_and_seconds():
    """bench/serve.py's completion window runs until at least --gen-requests requests AND --gen-seconds (the H200
    27B run measured 2 requests per window, ~7-14 s each: noise), and reports each request's rate beside the
    window's, and its decode time per token after its first text (over the tokens after those it came with) apart
    from the time to that text."""
    serve_bench = load(ROOT / "bench" / "serve.py", "serve_bench_windows")
    calls = []

    def one(i: int):
        calls.append(i)
        time.sleep(0.01)  # the "prefill": before the first token
        first = time.monotonic()
        n = [8, 2, 8, 8, 8, 8, 8][len(calls) - 1]
        time.sleep(0.002 * (n - 1))  # then 2 ms per token
        # request 3: no first-text time (not streamed); request 4's first text came with 3 tokens
        return n, (None if i == 2 else first), 3 if i == 3 else 1

    r = serve_bench.completion_loop(one, 0.0, 5)
    assert calls == [0, 1, 2, 3, 4]  # the requests bind: 0 s
    assert r["requests"] == 5 and r["tokens"] == 8 + 2 + 8 + 8 + 8
    q = r["request_tokens_per_s"]
    assert q["min"] <= q["median"] <= q["max"] and len(r["per_request"]) == 5
    assert r["per_request"][2]["first_token_seconds"] is None
    # decode over requests 1, 2, 4, 5 (3 has no first text): 7 + 1 + 5 + 7 tokens after those of the first text
    assert r["decode"]["tokens"] == 20 and r["per_request"][3]["first_tokens"] == 3
    d = r["decode_seconds_per_token"]
    assert 0.0019 < d["min"] <= d["median"] <= d["max"] < 0.05, d
    assert 0.0099 < r["first_token_seconds"]["min"] < 0.1
    calls.clear()
    r = serve_bench.completion_loop(lambda i: (calls.append(i) or time.sleep(0.02) or 3, None, 0), 0.1, 1)
    assert calls[0] == 0 and r["requests"] >= 5 and r["seconds"] >= 0.1  # the seconds bind: more than 1 request
    assert r["decode_seconds_per_token"] is None and r["decode"]["tokens"] == 0


def test_serve_bench_measures_completions_alone_once_the_trainer_is_idle(tmp_path):
    """Completions alone are measured once the trainer has nothing left to make between jobs (the H200 27B run's
    window alone overlapped the guard's 52 s of retention answers), then during a job, then after the trainer
    stopped; the table says so and shows each window's per-request spread. Over HTTP, as on the GPU machine:
    each request streamed, timed at its first token."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    args = ["--shape", "tiny", "--device", "cpu", "--layers", "2", "--tokens", "32", "--steps", "1", "--no-adamw"]
    args += ["--gen-seconds", "0.5", "--gen-requests", "3", "--gen-tokens", "4", "--client", "http"]
    # No --dir: the trainer socket's path under pytest's tmp_path is too long for AF_UNIX.
    r = run([sys.executable, "bench/serve.py", *args, "--json", str(tmp_path / "s.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads((tmp_path / "s.json").read_text())["sets"][0]["completions"]
    # The guard is on by default: its measures of the live weights were made before the first window alone.
    assert c["waited"]["made"] == ["kept", "answers", "reference", "anchor"], c["waited"]
    assert c["waited"]["why"] == "the guard's measures of the live weights are made"
    assert c["warmup_seconds"] > 0  # the engine's warm-up request, taken while the guard made its measures
    assert "anchor made in" in r.stderr.split("trainer idle after")[0]  # logged before the window starts
    # Nothing of the guard's ran during the job's window (the job runs on the training thread: no idle moment).
    during = r.stderr.split("completions while the /train job runs")[1].split("with training")[0]
    assert "guard: making" not in during, during
    for key in ("alone", "training", "alone_after"):
        assert c[key]["requests"] >= 3 and c[key]["seconds"] >= 0.5, (key, c[key])
        assert all(0 < r["first_token_seconds"] < r["seconds"] for r in c[key]["per_request"]), c[key]
    assert c["alone"]["end"] < c["training"]["start"] < c["training"]["end"] < c["alone_after"]["start"]
    assert c["concurrent_training"]["steps"] >= 1
    assert "| 2 | alone (trainer idle: waited " in r.stdout and "| 2 | alone again (trainer stopped) |" in r.stdout
    assert "per request tokens/s median (min–max)" in r.stdout and "the two windows alone: " in r.stdout
    assert "| first text chunk ms median |" in r.stdout  # over HTTP: the first chunk with text, not a token
    assert "; the decode alone " in r.stdout


def test_serve_bench_times_the_optimizer_over_parameters_of_two_dtypes():
    """bench/serve.py's APOLLO-Mini timing gives each parameter a gradient of its own dtype: Qwen3.5's A_log is
    served in fp32 beside bf16 weights, and PyTorch refuses a bf16 gradient on an fp32 parameter (the H200 run
    of --shape qwen3.5-27b failed there)."""
    from types import SimpleNamespace

    from livetrain.optim import ApolloMini

    serve_bench = load(ROOT / "bench" / "serve.py", "serve_bench_dtypes")
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(16, 24, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.randn(4, dtype=torch.float32)),
        torch.nn.Parameter(torch.randn(8, 16, dtype=torch.bfloat16)),
    ]
    before = [p.detach().clone() for p in params]
    trainer = SimpleNamespace(opt=ApolloMini(params, lr=1e-2), device=torch.device("cpu"))
    out = serve_bench.optim_step_times(trainer, 1)
    assert out["tensors"] == 3 and out["params"] == 16 * 24 + 4 + 8 * 16
    assert out["batched_seconds"] > 0 and out["per_parameter_seconds"] > 0 and out["hooks_seconds"] > 0
    assert all(p.grad is None for p in params)
    assert not torch.equal(params[0], before[0])  # the steps ran
    # The trainer's hooks path batched (its --step-batch-mib): every gradient freed, nothing left waiting.
    trainer.opt.attach_hooks(params=[], batch_bytes=1 << 20)
    out = serve_bench.optim_step_times(trainer, 1)
    assert out["hooks_seconds"] > 0 and not trainer.opt._ready and trainer.opt._batches
    assert all(p.grad is None for p in params)


def test_vllm_run_fails_at_once_where_vllm_left_out_livetrains_routes(tmp_path):
    """scripts/vllm_gpu_run.py's wait for the trainer: /train/status 404 and vLLM's log saying it skipped the
    livetrain endpoint plugin (a model served without the generate task) is a failure naming that line, not a
    600-second wait (the H200 run of bench/vllm_transfer.py waited out its time so)."""
    import http.server
    import threading

    vr = load(ROOT / "scripts" / "vllm_gpu_run.py", "vllm_gpu_run_skip")

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *_):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = object.__new__(vr.Server)
        server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        server.log_path = tmp_path / "vllm-1.log"
        server.log_path.write_text("INFO starting\n")
        assert server.trainer_ready() is False  # not up yet: keep waiting
        line = "Skipping endpoint plugin livetrain: requires one of tasks ('generate',), server supports ('embed',)"
        server.log_path.write_text(f"INFO starting\n(APIServer pid=1) INFO 12-01 [__init__.py:146] {line}\n")
        with pytest.raises(vr.Failed, match="left out livetrain's routes: .*Skipping endpoint plugin livetrain"):
            server.trainer_ready()
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("shape, arch", [("tiny", "Qwen3ForCausalLM"), ("qwen3.5-tiny", "Qwen3_5ForCausalLM")])
def test_bench_model_dirs_name_their_architecture(tmp_path, shape, arch):
    """The benches' model directories name the causal-LM class as published checkpoints do: vLLM serves a
    config without `architectures` as an embedding model (no /train: the H200 run of bench/vllm_transfer.py)."""
    serve_bench = load(ROOT / "bench" / "serve.py", "serve_bench_arch")
    vocab = serve_bench.SHAPES[shape]["vocab_size"]
    serve_bench.write_model_dir(str(tmp_path), shape, 1, serve_bench.build_tokenizer(vocab))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]


def test_optim_bench_full_set_is_every_trained_parameter_of_the_serve_shape():
    """bench/optim.py --full times the step over what bench/serve.py's trainer steps (issue #15's measure): for
    qwen3.5-27b, 851 tensors and 26.90B parameters, as the trainer groups them, A_log in fp32 as served."""
    optim_bench = load(ROOT / "bench" / "optim.py", "optim_bench_full_set")
    groups = optim_bench.full_set("qwen3.5-27b")
    parts = {part: params for part, _, params in groups}
    assert sorted(parts) == ["adamw", "embeddings", "matrices"]
    assert (len(parts["matrices"]), len(parts["embeddings"]), len(parts["adamw"])) == (496, 2, 353)
    count = sum(math.prod(shape) for _, _, params in groups for _, shape, _ in params)
    assert abs(count - 26.896e9) < 1e6
    assert {name.rsplit(".", 1)[0] for name, _, _ in parts["embeddings"]} == {"model.embed_tokens", "lm_head"}
    fp32 = {name for _, _, params in groups for name, _, dt in params if dt == torch.float32}
    assert len(fp32) == 48 and all(name.endswith(".linear_attn.A_log") for name in fp32)


def test_optim_bench_full_runs_every_row_on_the_cpu():
    """bench/optim.py --full --device cpu: every row of the table steps (their code paths before the one GPU run)."""
    r = run([sys.executable, "bench/optim.py", "--full", "--device", "cpu", "--shapes", "qwen3.5-tiny", "--steps", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    optim_bench = load(ROOT / "bench" / "optim.py", "optim_bench_full_rows")
    for _, label, _, _, _ in optim_bench.FULL_GRID:
        line = next((x for x in r.stdout.splitlines() if x.startswith(f"| {label} |")), None)
        assert line is not None, (label, r.stdout[-3000:])
        float(line.strip("|").split("|")[5])  # its step ms: the row stepped
    assert "qwen3.5-tiny: shipped step" in r.stdout
    bad = run([sys.executable, "bench/optim.py", "--full", "--device", "cpu", "--shapes", "70b"])
    assert bad.returncode == 2 and "unknown ['70b']" in bad.stderr


def test_tp_bench_rank_shape_run_and_its_gap_accounting(tmp_path):
    """bench/tp.py on CPU: TP 1 and TP 1 on a TP-2 rank's shapes (heads, KV heads, intermediate size and
    vocabulary halved) in one table, what each trainer's fused operations were; and the GPU-side accounting
    on made-up intervals: the union of kernels, and each gap named by the innermost host operation covering
    half of it or more."""
    tp = load(ROOT / "bench" / "tp.py", "tp_bench")
    assert tp.covered([(0, 100), (50, 150), (400, 500), (500, 600)]) == 350
    host = [
        {"ts": 100, "dur": 300, "name": "aten::item"},
        {"ts": 0, "dur": 2000, "name": "outer"},
        {"ts": 600, "dur": 50, "name": "short"},
    ]
    text = tp.gap_table([(0, 100), (50, 150), (400, 500), (1000, 1100)], host)
    assert "0.8 ms in all" in text  # gaps 150-400 and 500-1000; 0.25 + 0.5
    assert "0.25 ms      1 gaps  aten::item" in text and "0.50 ms      1 gaps  outer" in text
    name = tp.rank_shape("8b", 2)
    assert {k: tp.SHAPES[name][k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")} == {
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "intermediate_size": 6144,
    }
    assert tp.SHAPES[name]["vocab_size"] == 75968 and tp.SHAPES[name]["hidden_size"] == 4096
    with pytest.raises(SystemExit, match="linear-attention"):
        tp.rank_shape("qwen3.5-27b", 2)  # its Gated DeltaNet heads are not divided: refused, not mis-shaped

    args = ["bench/tp.py", "--size", "tiny", "--device", "cpu", "--tokens", "32", "--steps", "1", "--tp", "1"]
    r = run([sys.executable, *args, "--rank-shape", "2", "--json", str(tmp_path / "tp.json")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 1 on a TP-2 rank's shapes | - | 32 |" in r.stdout
    assert "rms_norm: torch (on cpu)" in r.stdout  # the title: what the trainers ran
    runs = json.loads((tmp_path / "tp.json").read_text())["tables"][0]["runs"]
    assert [run.get("rank_of") for run in runs] == [None, 2]
    assert runs[1]["ranks"][0]["fused_ops"]["silu_mul"] == "torch (on cpu)"
    assert runs[1]["ranks"][0]["weights_bytes"] < runs[0]["ranks"][0]["weights_bytes"]
