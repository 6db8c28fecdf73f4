"""livetrain in place against vLLM's own weight transfer (issue #15 item 5), on one vLLM server and model in one
run: the time from "optimizer step done" to "served weights updated", and the extra GPU memory each way needs.

One `vllm serve` of a Qwen3-8B-shaped model (random bf16 weights written once as safetensors, the writing
timed) with the livetrain plugin and vLLM's CUDA-IPC weight transfer (``--weight-transfer-config
'{"backend": "ipc"}'``, its RLHF routes with ``VLLM_SERVER_DEV_MODE=1``), ``--enforce-eager`` and a short
``--max-model-len`` so that it starts fast (start-up timed apart):

  livetrain   the plugin's trainer trains vLLM's weights in place: a one-step POST /train job per round. The
              step ends with the last in-place update; the plugin, waiting on the trainer's version op,
              resets vLLM's prefix cache and reports the version served (/train/status ``served``:
              ``seconds_after_step``). Extra memory: the trainer process's GPU memory.
  vLLM IPC    a trainer process holding its own full copy of the model (transformers, on the GPU) changes
              it in place (the "optimizer step"), then does what vLLM's RLHF examples do: POST
              /start_weight_update; IPCWeightTransferEngine.trainer_send_weights over HTTP (CUDA IPC handles
              of every tensor to /update_weights; the worker opens them and runs the model's load_weights
              through vLLM's layerwise reload); POST /finish_weight_update; POST /reset_prefix_cache. Timed
              from the step's end to the last reply; unpacked (all tensors in one request, the default) and
              packed (bounded chunks: vLLM's default 1 GiB, or the largest tensor where that is larger). Extra
              memory: that process's GPU memory (its copy and context) plus what vLLM's engine process grows by
              during the updates. After the first round the served
              weights are compared with the copy through livetrain's manifest (layout views of vLLM's own
              tensors): every tensor must be identical.

Before each round one completion request fills the prefix cache, so that every reset has blocks to drop.
GPU memory per process: nvidia-smi's per-process used memory, sampled every 0.2 s, highest per phase.

vLLM 0.26's ipc_engine.py imports Ray at module level for its "ray" send mode; where Ray is not installed
(the GPU machine), the vLLM server and the copy process get a stand-in module named ray whose every
attribute raises (this run sends over HTTP and never touches Ray). Said in the output when used.

usage: bash scripts/vllm_gpu_run.sh bench/vllm_transfer.py [--size 8b|tiny] [--tokens 2048] [--rounds 5]
                                                           [--work DIR] [--json F]
(vllm_gpu_run.sh makes livetrain's vLLM plugin visible to vLLM; scripts/gpu.sh vllm-transfer runs this.)
Prints a markdown table; with $OUT set also writes $OUT/transfer.{md,json} and the vLLM log (vllm-1.log).
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))  # bench/serve.py, when this file is loaded as a module

import serve as serve_bench  # noqa: E402  (bench/serve.py: shapes, tokenizer, random model, child processes)

from livetrain.trainer.client import http, wait_job  # noqa: E402

GiB = 2**30
RAY_STAND_IN = '''"""A stand-in for Ray, written by livetrain's bench/vllm_transfer.py where Ray is not installed: vLLM 0.26's
weight_transfer/ipc_engine.py imports ray at module level for its "ray" send mode, which the benchmark does
not use (it sends over HTTP). Every attribute raises."""


def __getattr__(name):
    raise AttributeError(f"ray is not installed: ray.{name} is not available (stand-in module)")
'''


def log(msg: str) -> None:
    print(f"[transfer bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the copy process: a trainer with its own full copy, sending it with vLLM's IPC weight transfer ----
def role_copy(a) -> None:
    import requests
    import torch

    from livetrain import safetensors as lst

    t = time.perf_counter()
    model = serve_bench.random_model(a.model, "cuda")
    params = dict(model.named_parameters())
    serve_bench.reply(
        {
            "seconds": time.perf_counter() - t,
            "params": sum(p.numel() for p in params.values()),
            "weights_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "pid": os.getpid(),
        }
    )

    def write_files() -> dict:
        t = time.perf_counter()
        lst.save_model(a.model, params)
        return {"seconds": time.perf_counter() - t}

    def post(url: str) -> None:
        requests.post(url, timeout=600).raise_for_status()

    def packed_buffer_bytes() -> int:
        from vllm.distributed.weight_transfer import ipc_engine

        largest = max(p.numel() * p.element_size() for p in params.values())
        return max(ipc_engine.DEFAULT_PACKED_BUFFER_SIZE_BYTES, largest)

    @torch.no_grad()
    def round_(url: str, packed: bool, seed: int) -> dict:
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

        g = torch.Generator(device="cuda").manual_seed(seed)
        for p in params.values():  # the "optimizer step": every element changes, in place
            p.add_(torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype) * 1e-3)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        post(url + "/start_weight_update")
        t1 = time.perf_counter()
        args = {"send_mode": "http", "url": url, "packed": packed}
        if packed:  # vLLM's chunk (1 GiB by default) must hold the largest tensor: the 8B embedding is 1.24 GB
            args["packed_buffer_size_bytes"] = packed_buffer_bytes()
        IPCWeightTransferEngine.trainer_send_weights(iter(params.items()), args)
        t2 = time.perf_counter()
        post(url + "/finish_weight_update")
        t3 = time.perf_counter()
        post(url + "/reset_prefix_cache?reset_running_requests=true")
        t4 = time.perf_counter()
        return {"seconds": t4 - t0, "start": t1 - t0, "send": t2 - t1, "finish": t3 - t2, "reset": t4 - t3}

    def compare(manifest: str) -> dict:
        """vLLM's served tensors (livetrain's layout views, attached read-only) against this copy."""
        from livetrain import layout, sharing

        att = sharing.attach(manifest, take_lease=False)
        lay = layout.build(att.config, att.tensors, engine="vllm")
        views = layout.views(lay, att.tensors)
        torch.cuda.synchronize()
        differ = [n for n, p in params.items() if n in views and not torch.equal(views[n], p)]
        missing = [n for n in params if n not in views]
        return {
            "tensors": len(params),
            "identical": len(params) - len(differ) - len(missing),
            "differ": differ[:5],
            "missing": missing[:5],
        }

    serve_bench.command_loop({"write_files": write_files, "round": round_, "compare": compare})


# ---- GPU memory per process, sampled ----
class Sampler:
    """nvidia-smi's used memory per process, sampled in a thread; the highest per (phase, pid)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.phase, self.peaks = interval, "start", {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def read() -> dict[int, int]:
        try:
            r = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return {int(p): int(m) * 2**20 for p, m in (line.split(",") for line in r.stdout.splitlines() if line)}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return {}

    def run(self) -> None:
        while not self.stop.is_set():
            phase = self.phase
            for pid, used in self.read().items():
                key = (phase, pid)
                self.peaks[key] = max(self.peaks.get(key, 0), used)
            self.stop.wait(self.interval)

    def peak(self, phase: str, pid: int) -> int | None:
        return self.peaks.get((phase, pid))


def device_name() -> str:
    """The first GPU's name from nvidia-smi (the orchestrator makes no CUDA context of its own)."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return r.stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "cuda"


def descendants(pid: int) -> set[int]:
    """pid's child processes, recursively (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stand_in_ray(work: Path) -> str | None:
    """A directory holding the Ray stand-in when Ray is not importable here, else None."""
    if importlib.util.find_spec("ray") is not None:
        return None
    d = work / "ray-stand-in"
    d.mkdir(exist_ok=True)
    (d / "ray.py").write_text(RAY_STAND_IN)
    return str(d)


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def render(r: dict) -> str:
    gb = lambda x: "-" if x is None else f"{x / GiB:.2f}"  # noqa: E731
    lines = [
        f"{r['device']}; vLLM {r['vllm']}, torch {r['torch']}; {r['size']}-shaped Qwen3, random bf16 weights "
        f"({r['weights_bytes'] / GiB:.2f} GiB, {r['params'] / 1e9:.2f}B parameters); one vLLM server "
        f"(--enforce-eager, --max-model-len {r['max_model_len']}, prefix caching on); "
        f"{r['rounds']} rounds each",
        "",
        "| method | extra GPU memory GiB | step done → served, median s | min–max s | what the time includes |",
        "|---|---:|---:|---|---|",
    ]
    for m in r["methods"]:
        if "error" in m:
            lines.append(f"| {m['name']} | - | - | - | FAILED: {m['error']} |")
            continue
        s = m["seconds"]
        lines.append(
            f"| {m['name']} | {gb(m['extra_bytes'])} | {s['median']:.3f} | {s['min']:.3f}–{s['max']:.3f} | "
            f"{m['includes']} |"
        )
    lines.append("")
    for m in r["methods"]:
        if m.get("memory_note"):
            lines.append(f"{m['name']}: {m['memory_note']}.")
        if m.get("phases"):
            lines.append(f"{m['name']}: median " + ", ".join(f"{k} {v:.3f} s" for k, v in m["phases"].items()) + ".")
    if r.get("compare"):
        c = r["compare"]
        lines.append(
            f"After the first IPC round, vLLM serves the copy's weights: {c['identical']} of {c['tensors']} tensors "
            f"identical (through livetrain's layout views of vLLM's tensors)"
            + (f"; differ: {c['differ']}, missing: {c['missing']}" if c["identical"] != c["tensors"] else "")
            + "."
        )
    st = r.get("startup", {})
    lines.append(
        f"Start-up (not in the table): model files written in {st.get('files_s', 0):.1f} s "
        f"({r['weights_bytes'] / 1e9:.1f} GB); vLLM /health after {st.get('health_s', '-')} s, the plugin's trainer "
        f"ready after {st.get('trainer_s', '-')} s."
    )
    if r.get("ray_stand_in"):
        lines.append("Ray is not installed here: vLLM's ipc_engine module imported the stand-in (never used).")
    for e in r.get("errors", []):
        lines.append(f"FAILED: {e}")
    lines.append(f"\nTotal run time {r['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="8b", choices=["8b", "tiny"], help="model shape (bench/serve.py's)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of livetrain's training step")
    ap.add_argument("--rounds", type=int, default=5, help="updates measured per method")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    ap.add_argument("--work", default=None, help="model, store and run directories (default: a temp dir, removed)")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "copy":
        role_copy(a)
        return 0

    from livetrain.vllm import api

    vllm_gpu_run = importlib.import_module("vllm_gpu_run")  # scripts/vllm_gpu_run.py: the vLLM server it starts
    t_start = time.monotonic()
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="livetrain-transfer-out-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="livetrain-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    r: dict = {"size": a.size, "rounds": a.rounds, "max_model_len": a.max_model_len, "methods": [], "errors": []}
    r["vllm"] = api.installed_vllm_version()
    if r["vllm"] is None:
        sys.exit("bench/vllm_transfer.py: vLLM is not installed (importable) here")
    sampler = Sampler()
    copy = server = None
    try:
        r["torch"] = importlib.metadata.version("torch")
        r["device"] = device_name()
        layers = serve_bench.SHAPES[a.size]["num_hidden_layers"]
        tokenizer = serve_bench.build_tokenizer(serve_bench.SHAPES[a.size]["vocab_size"])
        serve_bench.write_model_dir(str(model), a.size, layers, tokenizer)
        ray_dir = stand_in_ray(work)
        r["ray_stand_in"] = ray_dir is not None
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if ray_dir:
            env["PYTHONPATH"] = ray_dir + os.pathsep + env.get("PYTHONPATH", "")
        log("the copy process: the model on the GPU, random weights")
        copy = serve_bench.Child("copy", ["--model", str(model)], env, script=__file__)
        c = copy.expect(600)
        r.update(params=c["params"], weights_bytes=c["weights_bytes"])
        log(f"writing the model files ({c['weights_bytes'] / 1e9:.1f} GB)")
        r["startup"] = {"files_s": copy.ask(600, "write_files")["seconds"]}

        env.update(
            VLLM_PLUGINS="livetrain",
            VLLM_SERVER_DEV_MODE="1",
            VLLM_ALLOW_INSECURE_SERIALIZATION="1",
            LIVETRAIN_RUN_DIR=str(work / "run"),
            LIVETRAIN_STATE_DIR=str(work / "state"),
            LIVETRAIN_TRAINER_ARGS=f"--max-seq-len {a.tokens + 16} --batch-size 1",
        )
        extra = [
            "--enforce-eager",
            "--max-model-len",
            str(a.max_model_len),
            "--gpu-memory-utilization",
            str(a.gpu_memory_utilization),
            "--weight-transfer-config",
            json.dumps({"backend": "ipc"}),
        ]
        log("starting vLLM with the plugin and the IPC weight transfer")
        server = vllm_gpu_run.Server(1, model, env, out, extra)
        r["startup"].update(server.ready())
        key, url = vllm_gpu_run.KEY, server.url
        procs = descendants(server.proc.pid)
        trainer_pid = next((p for p in procs if "livetrain.trainer" in cmdline(p)), None)
        engine_pids = procs - {trainer_pid}

        def fill_prefix_cache(i: int) -> None:
            body = {"model": "tiny", "prompt": serve_bench.prompt(i), "max_tokens": 4, "temperature": 0}
            code, reply_body = http(url + "/v1/completions", body, key=key, timeout=300)
            if code != 200:
                raise RuntimeError(f"/v1/completions answered {code}: {reply_body}")

        def engine_peak(phase: str) -> int:
            return sum(sampler.peak(phase, p) or 0 for p in engine_pids)

        # ---- livetrain in place ----
        sampler.phase = "livetrain"
        times = []
        try:
            for i in range(a.rounds):
                fill_prefix_cache(i)
                # One plain step: the forgetting guard's measures (retention answers, replayed rows, the KL
                # anchor) are not part of the transfer being compared, and would only lengthen each round.
                job = {
                    "examples": [serve_bench.train_example(a.tokens)],
                    "steps": 1,
                    "lr": 1e-5,
                    "batch_size": 1,
                    **{"guard": False, "replay": 0, "anchor": 0},
                }
                code, body = http(url + "/train", job, key=key)
                if code != 202:
                    raise RuntimeError(f"/train answered {code}: {body}")
                done = wait_job(url, body["job_id"], key=key, timeout=600, interval=0.1)
                if done["state"] != "done":
                    raise RuntimeError(f"the training job failed: {done}")
                deadline = time.monotonic() + 60
                while True:
                    st = http(url + "/train/status", key=key)[1]
                    if st["served"] and st["served"]["weight_version"] == st["weight_version"]:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"vLLM did not report serving version {st['weight_version']}: {st['served']}"
                        )
                    time.sleep(0.05)
                times.append(st["served"]["seconds_after_step"])
                log(f"livetrain round {i + 1}: served {times[-1]:.3f} s after the step")
            r["methods"].append(
                {
                    "name": "livetrain in place (trainer on vLLM's memory)",
                    "seconds": stats(times),
                    "extra_bytes": sampler.peak("livetrain", trainer_pid) if trainer_pid else None,
                    "includes": "the plugin learning of the new version, vLLM's prefix-cache reset",
                    "memory_note": f"the trainer process at {a.tokens:,} tokens per step (APOLLO-Mini, gradient "
                    "checkpointing); vLLM's weights are the served ones, not copied",
                }
            )
        except Exception as e:
            r["methods"].append({"name": "livetrain in place", "error": f"{type(e).__name__}: {e}"})

        # ---- vLLM's IPC weight transfer from a trainer holding its own copy ----
        code, body = http(url + "/init_weight_transfer_engine", {"init_info": {}})  # a no-op for IPC, as vLLM's flow
        if code != 200:
            raise RuntimeError(f"/init_weight_transfer_engine answered {code}: {body}")
        for packed in (False, True):
            name = f"vLLM IPC weight transfer, {'packed' if packed else 'unpacked'} (trainer holds a full copy)"
            phase = "packed" if packed else "unpacked"
            before = engine_peak("livetrain")
            sampler.phase = phase
            rounds = []
            try:
                for i in range(a.rounds):
                    fill_prefix_cache(100 + i)
                    rounds.append(copy.ask(600, "round", url=url, packed=packed, seed=1000 * packed + i))
                    log(f"{phase} round {i + 1}: {rounds[-1]['seconds']:.3f} s")
                    if not packed and i == 0:
                        r["compare"] = copy.ask(600, "compare", manifest=str(work / "run" / "tp0.manifest.json"))
                time.sleep(3 * sampler.interval)
                grew = max(0, engine_peak(phase) - before)
                r["methods"].append(
                    {
                        "name": name,
                        "seconds": stats([x["seconds"] for x in rounds]),
                        "phases": {
                            k: statistics.median(x[k] for x in rounds) for k in ("start", "send", "finish", "reset")
                        },
                        "extra_bytes": (sampler.peak(phase, c["pid"]) or 0) + grew,
                        "includes": "start, IPC handles of every tensor, load_weights (layerwise reload), finish, "
                        "prefix-cache reset",
                        "memory_note": f"the copy process {(sampler.peak(phase, c['pid']) or 0) / GiB:.2f} GiB (weights "
                        f"and context) + vLLM's engine process grew {grew / GiB:.2f} GiB during the updates",
                    }
                )
            except Exception as e:
                r["methods"].append({"name": name, "error": f"{type(e).__name__}: {e}"})
    except Exception as e:
        r["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        sampler.stop.set()
        if server is not None:
            server.stop()
        if copy is not None:
            copy.close()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    r["seconds"] = time.monotonic() - t_start
    r.setdefault("device", "cuda")
    r.setdefault("weights_bytes", 0)
    r.setdefault("params", 0)
    r.setdefault("torch", "-")
    table = render(r)
    print(table)
    for path, text in (
        (a.json, json.dumps(r, indent=2)),
        (out / "transfer.json", json.dumps(r, indent=2)),
        (out / "transfer.md", table),
    ):
        if path:
            Path(path).write_text(text + "\n")
    return 1 if r["errors"] or any("error" in m for m in r["methods"]) else 0


if __name__ == "__main__":
    sys.exit(main())
