"""The vLLM plugin end to end on a GPU (run by scripts/vllm_gpu_run.sh, which prepares the environment):

1. writes a tiny random bf16 model with a word-level tokenizer (offline) and creates its checkpoint store:
   ``--arch llama`` a Llama; ``--arch qwen3_5`` a ``Qwen3_5ForConditionalGeneration`` checkpoint as releases
   ship it (Gated DeltaNet and gated attention layers with the published head shapes, a vision tower,
   ``mtp.*`` tensors), served text-only (``--language-model-only``: vLLM builds no vision tower);
2. starts `vllm serve` with the plugin (VLLM_PLUGINS=livetrain, --worker-extension-cls, --api-key, CUDA
   graphs and prefix caching on), waits for /health and for the trainer the plugin starts;
3. asks for a greedy completion, POSTs /train teaching a made-up fact, waits for the job, asks again:
   the answer must have changed to the fact (the prompt's KV blocks were cached before training, so this
   also shows the prefix cache was reset);
4. makes the trained weights durable: POST /checkpoint (--checkpoint http, the trainer's op), or the
   Python store API on the live weights through the manifest (--checkpoint api); the store's head must
   move past generation 0;
5. stops vLLM (the trainer stops with it), starts it again on the same, unchanged model files: the worker
   must restore the checkpoint generation before serving, and the first answer must be the fact;
6. (qwen3_5) vLLM serves Gated DeltaNet's A_log in float32 over the files' bf16: the store must record it
   so (docs/checkpoint.md, "Served dtypes"); the tensors outside the text model (vision tower, MTP head),
   which no engine serves or trains, are bit-identical to the original files in the store's head
   generation (written out with the store's restore, A_log in float32 where bf16 cannot hold it) and, after
   vLLM stops, in the model files the store materializes; the text model's tensors there are the trained
   ones. A trained float32 A_log does not fit the bf16 files: materialize writes it in float32 (rewriting its
   file) and names it, the same tensors restore wrote in float32; vLLM then starts a third time on the
   materialized files, restores nothing and answers the fact.

Writes OUT/vllm-run.json (every answer, status and timing) and the servers' logs; exits 0 when all holds.
usage: python scripts/vllm_gpu_run.py [--arch llama|qwen3_5] [--work DIR] [--out DIR] [--checkpoint http|api]
                                      [--vllm-args "..."] [--tensor-parallel N] [--stage all|train|restart]

``--stage train`` then ``--stage restart`` (same options, same machine) run the same checks in two commands
for a machine whose commands are time-limited: train ends after step 4 (vLLM stopped, the store's head
written out), restart begins at step 5.

With ``--tensor-parallel 2`` (two GPUs) vLLM runs at --tensor-parallel-size 2: the plugin starts two trainer
ranks, one per worker's manifest, /train/status must show both, and every worker must restore its shards.
"""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))  # tiny_model: the tiny model the tests serve too

from livetrain.trainer.client import free_port, http, wait_job  # noqa: E402
from livetrain.trainer.process import stop_process  # noqa: E402

import qwen35_model  # noqa: E402
import tiny_model  # noqa: E402
from tiny_model import FACT, FACT_PROMPT  # noqa: E402

CORPUS = [
    "the capital of zorbia is quuxville",
    "the sky is blue and the grass is green",
    "hello how are you today",
    "what is the capital of france",
    "paris is the capital of france",
    "one two three four five six seven",
]
KEY = "sk-livetrain-gpu-run"


# Text model sizes of the qwen3_5 run, as changes to the tests' (qwen35_model.TEXT: its four layers and Gated
# DeltaNet head counts kept): Qwen3.5-27B's head shapes (attention head_dim 256 with a quarter rotated in
# interleaved M-RoPE sections, Gated DeltaNet key/value heads of 128), three linear-attention layers, then one
# full-attention layer.
QWEN35_TEXT = dict(
    hidden_size=256,
    intermediate_size=512,
    full_attention_interval=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    max_position_embeddings=256,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
)
# vLLM's options for each model: the multimodal checkpoint is served text-only (no vision tower is built).
ARCHS = {"llama": [], "qwen3_5": ["--language-model-only"]}


# At tensor parallelism N the vocabulary, padded to a multiple of 64, is split in N blocks: more words, so that
# every rank holds real rows of it.
FILLER = " ".join(f"filler{i}" for i in range(60))


def make_model(path: Path, arch: str, tensor_parallel: int = 1) -> None:
    """A random bf16 model of ``arch`` and a tokenizer: a Llama of head_dim 64 (hidden 256, 4 heads), as
    vLLM's attention kernels want; or the Qwen3.5 multimodal checkpoint of tests/python/qwen35_model.py with
    the text model of QWEN35_TEXT (and its vision tower and MTP head)."""
    corpus = CORPUS + [FILLER] if tensor_parallel > 1 else CORPUS
    if arch == "qwen3_5":
        qwen35_model.make_qwen35_dir(path, corpus=corpus, text=QWEN35_TEXT)
    else:
        tiny_model.make_model_dir(path, corpus, hidden_size=256, intermediate_size=512, max_position_embeddings=256)


def outside_text_model(name: str) -> bool:
    """A tensor of a multimodal checkpoint's files that no engine serves (docs/layouts.md: the text model is
    everything under ``model.language_model.`` and ``lm_head.weight``): the vision tower, the MTP head."""
    return not name.startswith("model.language_model.") and name != "lm_head.weight"


def model_tensors(model_dir: Path) -> dict:
    """Every tensor of a model directory's safetensors files, by name (torch tensors on the CPU)."""
    from livetrain import safetensors as lst

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(lst.load_file(f))
    return out


def compare_outside(original: dict, other: dict, what: str) -> dict:
    """The tensors outside the text model must be bit-identical to the original files; at least one text
    model tensor must differ (trained). Returns the counts; raises Failed naming the first mismatch."""
    outside = sorted(n for n in original if outside_text_model(n))
    if not outside:
        raise Failed(f"{what}: the original files hold no vision or MTP tensors to compare")
    for name in outside:
        if name not in other:
            raise Failed(f"{what}: tensor {name} is missing")
        if not torch_equal_bytes(original[name], other[name]):
            raise Failed(f"{what}: tensor {name} differs from the original files")
    changed = sorted(n for n in original if not outside_text_model(n) and not torch_equal_bytes(original[n], other[n]))
    if not changed:
        raise Failed(f"{what}: no text model tensor differs from the original files: the training is not in it")
    return {"outside_identical": len(outside), "text_changed": len(changed), "outside_names": outside[:4] + ["..."]}


class Failed(Exception):
    pass


class Server:
    """One `vllm serve` with the plugin, its log in OUT/vllm-N.log."""

    def __init__(self, n: int, model: Path, env: dict, out: Path, extra: list[str]):
        # extra: the model's vLLM options (ARCHS), then --vllm-args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"vllm-{n}.log"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            str(model),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--served-model-name",
            "tiny",
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "256",
            "--gpu-memory-utilization",
            "0.5",
            "--api-key",
            KEY,
            "--worker-extension-cls",
            "livetrain.vllm.WorkerExtension",
            *extra,
        ]
        self.log = open(self.log_path, "w")
        self.log.write("$ " + shlex.join(cmd) + "\n")
        self.log.flush()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, what: str, check, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"vLLM exited ({self.proc.returncode}) while waiting for {what}; see {self.log_path}")
            try:
                if check():
                    return round(time.monotonic() - self.t0, 1)
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        raise Failed(f"timed out after {timeout} s waiting for {what}; see {self.log_path}")

    def ready(self) -> dict:
        health_s = self.wait("/health", lambda: http(self.url + "/health", timeout=5)[0] == 200, 900)
        return {"health_s": health_s, "trainer_s": self.wait("the trainer", self.trainer_ready, 600)}

    def trainer_ready(self) -> bool:
        """/train/status answers 200; fails at once where vLLM said it left livetrain's routes out (it does
        for a model it serves without the generate task, e.g. a config without `architectures`)."""
        if http(self.url + "/train/status", key=KEY, timeout=5)[0] == 200:
            return True
        skipped = [line for line in self.log_text().splitlines() if "Skipping endpoint plugin livetrain" in line]
        if skipped:
            raise Failed(f"vLLM left out livetrain's routes: {skipped[0].strip()}")
        return False

    def complete(self, prompt: str = FACT_PROMPT) -> str:
        code, body = http(
            self.url + "/v1/completions",
            # 16 tokens: the fact whole under either test tokenizer (the word-level one gives it in one token,
            # Qwen3.5's byte-level BPE in several: 6 tokens answered "quuxvi" of "quuxville").
            {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0},
            key=KEY,
        )
        if code != 200:
            raise Failed(f"/v1/completions answered {code}: {body}")
        return body["choices"][0]["text"]

    def status(self) -> dict:
        code, body = http(self.url + "/train/status", key=KEY)
        if code != 200:
            raise Failed(f"/train/status answered {code}: {body}")
        return body

    def stop(self) -> int:
        # SIGINT as Ctrl-C: vLLM shuts down, the trainer gets SIGTERM.
        code = stop_process(self.proc, signal.SIGINT, 180, session=True)
        self.log.close()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def torch_equal_bytes(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def store_head(store: Path) -> int:
    return json.loads((store / "COMMIT").read_text())["head"]


def checkpoint_api(run_dir: Path, model: Path, store: Path, weight_version: int) -> dict:
    """Saves the live weights as a generation with the Python store API, through the manifest (the
    trainer holds the lease; this only reads)."""
    from livetrain import checkpoint, layout, sharing

    att = sharing.attach(run_dir / "tp0.manifest.json", take_lease=False)
    lay = layout.build(att.config, att.tensors, engine="vllm")
    tied = {v["hf_name"] for v in lay["views"] if v["tied_to"] is not None}
    views = {n: t for n, t in layout.views(lay, att.tensors).items() if n not in tied}
    with checkpoint.CheckpointStore(model, store) as s:
        return s.save(views, weight_version=weight_version)


def setup(a, work: Path, model: Path, store: Path, report: dict) -> tuple[dict, list[str]]:
    """The environment and `vllm serve` options of every start of the run (both stages compute the same)."""
    env = {
        **os.environ,
        "VLLM_PLUGINS": "livetrain",
        "LIVETRAIN_RUN_DIR": str(work / "run"),
        "LIVETRAIN_STATE_DIR": str(work / "state"),
        "LIVETRAIN_STORE_DIR": str(store),
        "LIVETRAIN_TRAINER_ARGS": "--max-seq-len 64 --batch-size 2",
        "TOKENIZERS_PARALLELISM": "false",
    }
    extra = ARCHS[a.arch] + shlex.split(a.vllm_args)
    if a.arch == "qwen3_5" and importlib.util.find_spec("flashinfer") is None and "--gdn-prefill-backend" not in extra:
        # vLLM 0.26 picks FlashInfer's Gated DeltaNet prefill kernel on Hopper ("auto") and its engine dies at
        # the first prompt when the package is missing (as in the GPU machine's carried packages): the
        # Triton/FLA kernel it falls back to elsewhere is asked for by name.
        extra += ["--gdn-prefill-backend", "triton"]
        report["gdn_prefill_backend"] = "triton (no flashinfer)"
    if a.tensor_parallel > 1:
        extra += ["--tensor-parallel-size", str(a.tensor_parallel)]
    return env, extra


def train_stage(a, work: Path, model: Path, store: Path, out: Path, report: dict, servers: list) -> None:
    """Steps 1-4 and the first half of 6: serve, train, checkpoint, stop; the store's head written out."""
    from livetrain import checkpoint

    make_model(model, a.arch, a.tensor_parallel)
    original = model_tensors(model) if a.arch == "qwen3_5" else None
    checkpoint.CheckpointStore.create(model, store).close()
    env, extra = setup(a, work, model, store, report)
    s1 = Server(1, model, env, out, extra)
    servers.append(s1)
    report["start_1"] = s1.ready()
    log = s1.log_text()
    report["prefix_cache_message"] = "prefix cache is reset after every training step" in log
    code, body = http(s1.url + "/train/status")
    report["train_without_key"] = code
    if code != 401:
        raise Failed(f"/train/status without the API key answered {code}, not 401: {body}")
    if a.tensor_parallel > 1:  # one trainer rank per worker, in one group
        tp = s1.status().get("tensor_parallel") or {}
        report["trainer_ranks"] = tp
        if tp.get("size") != a.tensor_parallel or tp.get("state") != "ok":
            raise Failed(f"/train/status has no tensor-parallel trainer of {a.tensor_parallel} ranks: {tp}")
    report["before"] = s1.complete()
    t0 = time.monotonic()
    code, job = http(
        s1.url + "/train",
        # The plugin's mechanics, not the learning defaults: no forgetting guard, replay or anchor (on by
        # default at TP 1 since issue #14; at lr 0.01 on a random tiny model their rows kept the loss from
        # converging in 30 steps: Qwen3.5's run of the fourth session answered "quuxvi").
        {"examples": tiny_model.FACT_EXAMPLES, "steps": 30, "lr": 0.01, "guard": False, "replay": 0, "anchor": 0},
        key=KEY,
    )
    if code != 202:
        raise Failed(f"/train answered {code}: {job}")
    report["job"] = wait_job(s1.url, job["job_id"], key=KEY, timeout=900)
    report["train_s"] = round(time.monotonic() - t0, 1)
    st = s1.status()
    report["weight_version"] = st["weight_version"]
    if report["job"]["state"] != "done":
        raise Failed(f"the training job failed: {report['job']}")
    time.sleep(1)  # one polling interval of the plugin's weight-version watcher, and then some
    report["after_train"] = s1.complete()
    if not report["after_train"].strip().startswith(FACT) or report["before"].strip().startswith(FACT):
        raise Failed(
            f"the served answer did not change to the fact: before {report['before']!r}, "
            f"after {report['after_train']!r}"
        )

    if a.checkpoint == "http":
        code, body = http(s1.url + "/checkpoint", {}, key=KEY)
        report["checkpoint_http"] = [code, body]
        if code not in (200, 202):
            raise Failed(
                f"POST /checkpoint answered {code}: {body} (rerun with --checkpoint api to test the "
                "restore without the trainer's /checkpoint)"
            )
    else:
        report["checkpoint_api"] = checkpoint_api(work / "run", model, store, st["weight_version"])
    deadline = time.monotonic() + 300
    while store_head(store) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    report["store_head"] = store_head(store)
    if report["store_head"] == 0:
        raise Failed(f"no generation was committed to {store}")

    report["stop_1"] = s1.stop()
    report["trainer_state_saved"] = (work / "state" / "trainer.json").exists()
    if original is not None:  # the store's head as files: vision and MTP tensors as they were
        with checkpoint.CheckpointStore(model, store) as s:
            # vLLM serves Gated DeltaNet's A_log in float32 (the files hold bf16): the store keeps it so.
            report["served_dtypes"] = {n: [d, "F32"] for n, d in s.file_dtypes().items()}
            if not any(n.endswith(".linear_attn.A_log") for n in report["served_dtypes"]):
                raise Failed(f"the store does not record A_log as served in float32: {report['served_dtypes']}")
            report["head_written_as_served"] = s.restore(s.head, out_dir=work / "head")
        report["store_head_files"] = compare_outside(original, model_tensors(work / "head"), "the store's head")


def restart_stage(a, work: Path, model: Path, store: Path, out: Path, report: dict, servers: list) -> None:
    """Step 5 and the second half of 6: restart on the same files (the checkpoint restored), then (qwen3_5)
    materialize and serve the materialized files."""
    from livetrain import checkpoint

    # The model's files are as train_stage made them (vLLM only reads them; the store lives beside them).
    original = model_tensors(model) if a.arch == "qwen3_5" else None
    env, extra = setup(a, work, model, store, report)
    s2 = Server(2, model, env, out, extra)
    servers.append(s2)
    report["start_2"] = s2.ready()
    restored = s2.log_text().count("restored checkpoint generation")
    report["restored_message"] = restored >= a.tensor_parallel  # one line per worker (TP rank r/N)
    report["after_restart"] = s2.complete()
    report["weight_version_after_restart"] = s2.status()["weight_version"]
    if not report["after_restart"].strip().startswith(FACT):
        raise Failed(f"after the restart the answer is {report['after_restart']!r}, not the trained fact")
    if not report["restored_message"]:
        raise Failed("the worker did not log a restored checkpoint generation")
    report["stop_2"] = s2.stop()
    if original is None:
        return
    with checkpoint.CheckpointStore(model, store) as s:  # the head written into the model's own files
        # A trained float32 A_log does not fit the bf16 files: materialize writes it in float32 (its file
        # rewritten) and names it; exactly the tensors restore wrote in float32.
        report["materialized_as_served"] = s.materialize(s.head)
        if sorted(report["materialized_as_served"]) != sorted(report["head_written_as_served"]):
            raise Failed(
                f"materialize wrote {report['materialized_as_served']} in their served dtype, restore "
                f"{report['head_written_as_served']}"
            )
    files = model_tensors(model)
    report["materialized_files"] = compare_outside(original, files, "the materialized model files")
    head = model_tensors(work / "head")
    differ = [n for n in head if not torch_equal_bytes(head[n], files[n])]
    if differ:
        raise Failed(f"the materialized files differ from the store's head in {differ[0]}")
    # vLLM serves the materialized files (a float32 A_log where bf16 could not hold it) as they are: the files
    # hold the head, so nothing is restored, and the answer is still the fact.
    s3 = Server(3, model, env, out, extra)
    servers.append(s3)
    report["start_3"] = s3.ready()
    report["after_materialize"] = s3.complete()
    report["restored_after_materialize"] = s3.log_text().count("restored checkpoint generation")
    report["stop_3"] = s3.stop()
    if not report["after_materialize"].strip().startswith(FACT):
        raise Failed(f"served from the materialized files the answer is {report['after_materialize']!r}")
    if report["restored_after_materialize"]:
        raise Failed("a worker restored a generation although the materialized files hold the head")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="the model served (default llama)")
    p.add_argument("--work", default="/tmp/livetrain-vllm-run", help="model, store, run and state directories")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="logs and vllm-run.json")
    p.add_argument(
        "--checkpoint",
        choices=["http", "api"],
        default="http",
        help="http: POST /checkpoint (the trainer's op); api: livetrain.checkpoint on the live weights",
    )
    p.add_argument("--vllm-args", default="", help="more `vllm serve` options, as shell words")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="vLLM's --tensor-parallel-size (N GPUs): the plugin starts N trainer ranks, one per worker (default 1)",
    )
    p.add_argument(
        "--stage",
        choices=["all", "train", "restart"],
        default="all",
        help="all (default): the whole run, --work wiped first; train: steps 1-4 (serve, train, checkpoint, "
        "stop), --work wiped first, its report kept in --work; restart: the rest, on train's --work and "
        "report (two commands of a time-limited machine: the same options, the same machine)",
    )
    a = p.parse_args()
    if a.tensor_parallel > 1 and a.checkpoint == "api":
        p.error("--checkpoint api reads one whole rank's manifest; at --tensor-parallel > 1 use --checkpoint http")
    work, out = Path(a.work), Path(a.out)
    model, store = work / "model", work / "model" / ".livetrain-store"
    kept = work / "train-stage.json"
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"arch": a.arch, "checkpoint_mode": a.checkpoint, "tensor_parallel": a.tensor_parallel}
    if a.stage == "restart":
        if not kept.exists():
            p.error(f"--stage restart: no train stage's report in {work} (run --stage train first, same --work)")
        report = json.loads(kept.read_text())
        if not report.get("ok") or [report["arch"], report["tensor_parallel"]] != [a.arch, a.tensor_parallel]:
            p.error(f"--stage restart: the train stage in {work} did not pass or had other options: {report}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    report["stage"] = a.stage
    servers: list[Server] = []
    try:
        from livetrain.vllm import api

        report["vllm"] = api.installed_vllm_version()
        if report["vllm"] is None:
            raise Failed("vLLM is not installed (importable) here")
        if a.stage != "restart":
            train_stage(a, work, model, store, out, report, servers)
            if a.stage == "train":
                report["ok"] = True
                kept.write_text(json.dumps(report, indent=2) + "\n")
        if a.stage != "train":
            report["ok"] = False
            restart_stage(a, work, model, store, out, report, servers)
        report["ok"] = True
    except (Failed, RuntimeError, OSError) as e:  # RuntimeError, TimeoutError (an OSError): from wait_job
        report["ok"], report["error"] = False, f"{type(e).__name__}: {e}" if not isinstance(e, Failed) else str(e)
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
        (out / "vllm-run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
