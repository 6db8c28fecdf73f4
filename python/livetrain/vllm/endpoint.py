"""livetrain's vLLM endpoint plugin (``vllm.endpoint_plugins``, vLLM >= 0.26): mounts the training routes
of livetrain.routes on vLLM's API server, has every worker export its weights (``collective_rpc``), starts
the trainer on them (or leaves that to the user), and after every training step drops vLLM's prefix cache
and sets vLLM's weight version, so that no request is answered from KV computed with older weights.

docs/vllm.md describes the setup, the environment variables and what is refused.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Awaitable, Callable

from livetrain.vllm import api, worker

logger = logging.getLogger("vllm.livetrain")

EXTENSION = "livetrain.vllm.WorkerExtension"
TRAINER_MODES = ("plugin", "external")


def trainer_command(manifest: str, model_dir: str, socket: str, state_dir: str, extra: str = "") -> list[str]:
    """``python -m livetrain.trainer ...`` for a manifest (extra: ``$LIVETRAIN_TRAINER_ARGS``, shell words);
    the store is the one the workers restore from (``$LIVETRAIN_STORE_DIR`` when set)."""
    store = os.environ.get(worker.STORE_ENV)
    return [sys.executable, "-m", "livetrain.trainer", "--manifest", manifest, "--model", model_dir,
            "--socket", socket, "--state-dir", state_dir, *(["--store", store] if store else []), *shlex.split(extra)]


def _extension_problem(qualname: str) -> str | None:
    """Why ``--worker-extension-cls`` does not give the workers livetrain's methods (None: it does)."""
    if not qualname:
        return f"vLLM was started without --worker-extension-cls {EXTENSION}"
    module, _, name = qualname.rpartition(".")
    try:
        import importlib

        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        return f"--worker-extension-cls {qualname} cannot be imported ({e})"
    if not (isinstance(cls, type) and issubclass(cls, worker.WorkerExtension)):
        return (f"--worker-extension-cls {qualname} is not {EXTENSION} (nor a subclass of it); "
                "the workers would not have livetrain's methods")
    return None


class TrainerProcess:
    """The trainer as a child of the API server: in its own session (a terminal's Ctrl-C reaches vLLM,
    which stops it in order), sent SIGTERM when the API server exits, and by the kernel if it dies.
    The kernel's signal follows the thread that started the child: vLLM runs ``init_state`` on its main
    thread's event loop, which lives as long as the server."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.cmd = cmd
        wrapped = [sys.executable, "-m", "livetrain.vllm.endpoint", "--exec-tied-to", str(os.getpid()), "--", *cmd]
        from livetrain.serve import process_env

        self.proc = subprocess.Popen(wrapped, env=process_env(os.environ if env is None else env), start_new_session=True)
        atexit.register(self.stop)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the trainer finishes its step and saves its state), SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _exec_tied_to(parent: int, cmd: list[str]) -> None:
    """Become ``cmd`` with SIGTERM on the death of ``parent`` (Linux ``PR_SET_PDEATHSIG``, kept across
    exec): set here, in the child, because ``preexec_fn`` is unsafe in a threaded server."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the prctl
        sys.exit(1)
    os.execv(cmd[0], cmd)


class VersionWatcher:
    """Follows the trainer's weight version (its /train/status) and, on each change, runs ``on_change``
    (drop the prefix cache, set vLLM's weight version). Polling keeps the trainer unaware of vLLM."""

    def __init__(self, status: Callable[[], dict], on_change: Callable[[int], Awaitable[None]],
                 interval: float = 0.2):
        self.status, self.on_change, self.interval = status, on_change, interval
        self.version: int | None = None
        self.task: asyncio.Task | None = None

    async def poll(self) -> bool:
        """One look at the trainer; True when the version changed (and ``on_change`` ran)."""
        from livetrain import jobsock

        try:
            reply = await asyncio.to_thread(self.status)
        except jobsock.TrainerUnavailable:
            return False
        version = reply.get("body", {}).get("weight_version") if reply.get("code") == 200 else None
        if not isinstance(version, int) or version == self.version:
            return False
        self.version = version
        await self.on_change(version)
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a failed reset must not stop the watching
                logger.exception("livetrain: reacting to a new weight version failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="livetrain-version-watcher")


def weight_version_action(engine_client, prefix_caching: bool, set_version: bool):
    """What to do when the weights change: drop the prefix cache (when vLLM has one) and tell vLLM the
    version (vLLM >= 0.27)."""

    async def on_change(version: int) -> None:
        if prefix_caching and not await api.reset_prefix_cache(engine_client):
            logger.warning("livetrain: vLLM did not reset its prefix cache after weight version %d", version)
        if set_version:
            await api.set_weight_version(engine_client, str(version))

    return on_change


class EndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry point (vLLM instantiates it with no arguments)."""

    name = "livetrain"
    required_tasks = ("generate",)

    def __init__(self):
        self.run_dir: str | None = None
        self.keys: list[str] = []
        self.trainer: TrainerProcess | None = None
        self.watcher: VersionWatcher | None = None
        self.exports: list[dict] = []
        self._lock_fd: int | None = None
        self._reported_exit = False

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "trainer.sock") if self.run_dir else ""

    def attach_router(self, app) -> None:
        from livetrain import routes

        app.include_router(routes.training_router(lambda: self.socket, api_key=lambda: self.keys))

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # vLLM's render-only server has no engine (required_tasks keeps us off it)
            logger.warning("livetrain: no engine in this server; the training routes answer 503")
            return
        env = os.environ
        facts = api.config_facts(api.engine_config(engine_client))
        problems = worker.refusals(facts, env)
        ext = _extension_problem(facts.worker_extension)
        if ext:
            problems.insert(0, ext)
        mode = env.get("LIVETRAIN_TRAINER", "plugin")
        if mode not in TRAINER_MODES:
            problems.append(f"LIVETRAIN_TRAINER is {mode!r}; it must be one of {', '.join(TRAINER_MODES)}")
        if problems:
            msg = "livetrain cannot train this vLLM in place: " + "; ".join(problems)
            logger.error(msg)
            raise worker.Refused(msg)
        self.keys = api.api_keys(args)

        own_dir = not env.get("LIVETRAIN_RUN_DIR")
        run_dir = env.get("LIVETRAIN_RUN_DIR") or tempfile.mkdtemp(prefix="livetrain-vllm-")
        self.exports = sorted(await api.collective_rpc(engine_client, worker.EXPORT_METHOD, run_dir),
                              key=lambda e: e["tp_rank"])
        # The first API server to ask decided the directory; every later one gets the workers' answer.
        self.run_dir = self.exports[0]["run_dir"]
        if own_dir and self.run_dir != run_dir:
            os.rmdir(run_dir)
        if not self._supervise(self.run_dir):
            logger.info("livetrain: another API server process supervises the trainer of %s", self.run_dir)
            return
        if own_dir:
            atexit.register(shutil.rmtree, self.run_dir, True)  # registered first: runs after the trainer stops

        first = self.exports[0]
        restore = first["restore"]
        if restore["restored"]:
            logger.info("livetrain: serving checkpoint generation %d from %s", restore["generation"], restore["store"])
        cmd = trainer_command(first["manifest"], first["model_dir"], self.socket,
                              env.get("LIVETRAIN_STATE_DIR", "livetrain-state"), env.get("LIVETRAIN_TRAINER_ARGS", ""))
        if facts.tensor_parallel > 1:
            logger.warning("livetrain: vLLM runs with tensor parallelism %d; manifests %s are exported, but the "
                           "trainer builds a model from one whole rank only, so no trainer is started and /train "
                           "answers 503", facts.tensor_parallel, ", ".join(e["manifest"] for e in self.exports))
        elif mode == "plugin":
            self.trainer = TrainerProcess(cmd)
            logger.info("livetrain: trainer pid %d on %s", self.trainer.proc.pid, first["manifest"])
        else:
            logger.info("livetrain: LIVETRAIN_TRAINER=external; start the trainer with: %s", shlex.join(cmd))

        if facts.prefix_caching:
            logger.info("livetrain: vLLM's prefix cache is reset after every training step (running requests "
                        "are preempted and recomputed); --no-enable-prefix-caching avoids that cost")
        else:
            logger.info("livetrain: prefix caching is off; nothing to reset after training steps")
        installed = api.installed_vllm_version()
        set_version = installed is not None and api.version_at_least(installed, api.WEIGHT_VERSION_SINCE)
        from livetrain import jobsock

        def status() -> dict:
            if self.trainer is not None and self.trainer.proc.poll() is not None and not self._reported_exit:
                self._reported_exit = True
                logger.error("livetrain: the trainer exited with status %s; /train answers 503 until vLLM restarts",
                             self.trainer.proc.returncode)
            return jobsock.call(self.socket, {"op": "status"}, timeout=10)

        self.watcher = VersionWatcher(status, weight_version_action(engine_client, facts.prefix_caching, set_version))
        self.watcher.start()

    def _supervise(self, run_dir: str) -> bool:
        """Whether this API server process is the one that starts the trainer and watches it (vLLM may run
        several, ``--api-server-count``): the holder of ``run_dir/supervisor.lock`` for its lifetime."""
        fd = os.open(os.path.join(run_dir, "supervisor.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True


if __name__ == "__main__":  # python -m livetrain.vllm.endpoint --exec-tied-to PID -- CMD...
    if len(sys.argv) < 5 or sys.argv[1] != "--exec-tied-to" or sys.argv[3] != "--":
        sys.exit("usage: python -m livetrain.vllm.endpoint --exec-tied-to PID -- CMD...")
    _exec_tied_to(int(sys.argv[2]), sys.argv[4:])
