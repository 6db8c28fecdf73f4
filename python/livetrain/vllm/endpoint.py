"""livetrain's vLLM endpoint plugin (``vllm.endpoint_plugins``, vLLM >= 0.26): mounts the training routes
of livetrain.trainer.routes on vLLM's API server, has every worker export its weights (``collective_rpc``), starts
the trainer on them (or leaves that to the user), and after every training step drops vLLM's prefix cache
and sets vLLM's weight version, so that no request is answered from KV computed with older weights.

docs/vllm.md describes the setup, the environment variables and what is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import fcntl
import json
import logging
import os
import shlex
import shutil
import tempfile
from typing import Awaitable, Callable

from livetrain.trainer import options, process, protocol, routes
from livetrain.vllm import api, worker

logger = logging.getLogger("vllm.livetrain")

EXTENSION = "livetrain.vllm.WorkerExtension"
TRAINER_MODES = ("plugin", "external")
# How long one look at the trainer waits for a new weight version (its ``version`` op answers as soon as a
# step ends), so that the prefix cache is reset within milliseconds of a step rather than a poll later.
VERSION_WAIT_S = 2.0


def trainer_options(env=os.environ) -> argparse.Namespace:
    """The trainer's options (livetrain.trainer.options) from the environment: ``$LIVETRAIN_STATE_DIR``,
    the store the workers restore from (``$LIVETRAIN_STORE_DIR``), then ``$LIVETRAIN_TRAINER_ARGS`` (shell
    words, parsed here so that a mistake stops vLLM at start-up). ValueError saying what is wrong."""
    words = ["--state-dir", env.get("LIVETRAIN_STATE_DIR", options.DEFAULT_STATE_DIR)]
    if env.get(worker.STORE_ENV):
        words += ["--store", env[worker.STORE_ENV]]
    try:
        return options.parse(words + shlex.split(env.get("LIVETRAIN_TRAINER_ARGS", "")))
    except ValueError as e:
        raise ValueError(f"LIVETRAIN_TRAINER_ARGS: {e}") from None


# The chat-template options are vLLM's: the trainer gets vLLM's values, never its own (trainer_chat_problem).
CHAT_OPTIONS = ("--chat-template", "--default-chat-template-kwargs", "--chat-template-content-format")


def trainer_chat_problem(ns: argparse.Namespace, args) -> str | None:
    """Why the chat options cannot be passed on (None: they can): one set in ``$LIVETRAIN_TRAINER_ARGS`` (vLLM
    would not render with it), or vLLM's ``--default-chat-template-kwargs`` naming one of
    ``apply_chat_template``'s own parameters (options.chat_template_kwargs)."""
    if options.chat_argv(ns):
        return (
            f"LIVETRAIN_TRAINER_ARGS has {options.chat_argv(ns)[0]}: give it to vLLM (vllm serve "
            f"{' / '.join(CHAT_OPTIONS)}); the plugin passes vLLM's to the trainer"
        )
    try:
        options.chat_template_kwargs(api.default_chat_template_kwargs(args))
    except argparse.ArgumentTypeError as e:
        return f"--default-chat-template-kwargs: {e}"
    return None


def tokenizer_template(model_dir: str) -> str | None:
    """The chat template of the model directory's tokenizer (its default one when it has several), which
    vLLM renders with when it has no --chat-template."""
    import transformers

    template = transformers.AutoTokenizer.from_pretrained(model_dir).chat_template
    return template.get("default") if isinstance(template, dict) else template


def pass_chat(args, ns: argparse.Namespace, run_dir: str, model_dir: str) -> str | None:
    """Gives the trainer (options ``ns``) how vLLM's chat route renders, so that chat examples, the guard's
    prompts and rewording are rendered as vLLM renders a chat request without options of its own: vLLM's
    ``--chat-template`` (api.chat_template; written to ``run_dir/chat-template.jinja``, the trainer's
    ``--chat-template``: a base model's chat examples are trainable then), ``--default-chat-template-kwargs``,
    and the content format vLLM uses (``--chat-template-content-format``, or under ``auto`` what vLLM detects
    in the template it renders with). The template file's path, or None (the tokenizer's, on both sides)."""
    template, path = api.chat_template(args), None
    ns.chat_template = None
    if template is not None:
        path = os.path.join(run_dir, "chat-template.jinja")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(template)
        ns.chat_template = options.chat_template(path)
    ns.default_chat_template_kwargs = api.default_chat_template_kwargs(args)
    if getattr(args, "chat_template_content_format", None) in (None, "auto") and template is None:
        template = tokenizer_template(model_dir)
    ns.chat_template_content_format = api.content_format(args, template)
    return path


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
        return (
            f"--worker-extension-cls {qualname} is not {EXTENSION} (nor a subclass of it); "
            "the workers would not have livetrain's methods"
        )
    return None


class VersionWatcher:
    """Follows the trainer's weight version and, on each change, runs ``on_change`` (drop the prefix
    cache, set vLLM's weight version, tell the trainer). ``read(known)`` is the trainer's light ``version``
    op, which may wait until the version is no longer ``known`` (None while it cannot say;
    TrainerUnavailable while it is not there). Asking keeps the trainer unaware of vLLM; after a change the
    watcher asks again at once, otherwise after ``interval``."""

    def __init__(
        self,
        read: Callable[[int | None], int | None],
        on_change: Callable[[int], Awaitable[None]],
        interval: float = 0.2,
    ):
        self.read, self.on_change, self.interval = read, on_change, interval
        self.version: int | None = None
        self.task: asyncio.Task | None = None

    async def poll(self) -> bool:
        """One look at the trainer; True when the version changed (and ``on_change`` ran)."""
        try:
            version = await asyncio.to_thread(self.read, self.version)
        except protocol.TrainerUnavailable:
            return False
        if not isinstance(version, int) or version == self.version:
            return False
        self.version = version
        await self.on_change(version)
        return True

    async def run(self) -> None:
        while True:
            try:
                if await self.poll():
                    continue
            except Exception:  # a failed reset must not stop the watching
                logger.exception("livetrain: reacting to a new weight version failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="livetrain-version-watcher")


def weight_version_action(
    engine_client, prefix_caching: bool, set_version: bool, served: Callable[[int], None] | None = None
):
    """What to do when the weights change: drop the prefix cache (when vLLM has one), tell vLLM the
    version (vLLM >= 0.27), then tell the trainer that vLLM serves it (``served``, in /train/status)."""

    async def on_change(version: int) -> None:
        if prefix_caching and not await api.reset_prefix_cache(engine_client):
            logger.warning("livetrain: vLLM did not reset its prefix cache after weight version %d", version)
        if set_version:
            await api.set_weight_version(engine_client, str(version))
        if served is not None:
            await asyncio.to_thread(served, version)

    return on_change


def report_served(socket: str, version: int) -> None:
    """Tells the trainer that vLLM serves ``version`` (nothing lost if it is gone: it is only a report)."""
    try:
        protocol.call(socket, "served", json.dumps({"weight_version": version}).encode(), timeout=10)
    except protocol.TrainerUnavailable:
        pass


def ensure_store(facts: api.Facts, env=os.environ) -> None:
    """Creates the model's checkpoint store when it is missing (generation 0 = the model files), before the
    workers of a tensor-parallel vLLM restore from it: each opens it as its rank, and only rank 0 could create
    it while the others already look for it."""
    from livetrain import checkpoint

    model_dir = worker.resolve_model_dir(facts.model, facts.revision)
    sdir = worker.store_dir(model_dir, env)
    if not checkpoint.store_exists(model_dir, sdir):
        checkpoint.open_store(model_dir, sdir, create=True, held=[]).close()
        logger.info("livetrain: created the checkpoint store %s (generation 0: the model files)", sdir)


class EndpointPlugin:
    """The ``vllm.endpoint_plugins`` entry point (vLLM instantiates it with no arguments)."""

    name = "livetrain"
    required_tasks = ("generate",)

    def __init__(self):
        self.run_dir: str | None = None
        self.keys: list[str] = []
        self.trainer: process.Process | None = None
        self.watcher: VersionWatcher | None = None
        self.exports: list[dict] = []
        self._lock_fd: int | None = None
        self._reported_exit = False

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "trainer.sock") if self.run_dir else ""

    def attach_router(self, app) -> None:
        app.include_router(
            routes.training_router(
                lambda: self.socket, api_key=lambda: self.keys, metrics_path=routes.VLLM_METRICS_PATH
            )
        )

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
        try:
            trainer_ns = trainer_options(env)
            chat_problem = trainer_chat_problem(trainer_ns, args)  # one rendering for serving and training: vLLM's
            if chat_problem:
                problems.append(chat_problem)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            msg = "livetrain cannot train this vLLM in place: " + "; ".join(problems)
            logger.error(msg)
            raise worker.Refused(msg)
        self.keys = api.api_keys(args)

        if facts.tensor_parallel > 1 and not trainer_ns.no_store:
            # The workers open the store at once and only rank 0 may create it: it is made here, first.
            ensure_store(facts, env)
        own_dir = not env.get("LIVETRAIN_RUN_DIR")
        run_dir = env.get("LIVETRAIN_RUN_DIR") or tempfile.mkdtemp(prefix="livetrain-vllm-")
        self.exports = sorted(
            await api.collective_rpc(engine_client, worker.EXPORT_METHOD, run_dir), key=lambda e: e["tp_rank"]
        )
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
        pass_chat(args, trainer_ns, self.run_dir, first["model_dir"])
        logger.info(
            "livetrain: the trainer renders chat examples as vLLM does: %s",
            shlex.join(options.chat_argv(trainer_ns)) or "the tokenizer's template",
        )
        restore = first["restore"]
        if restore["restored"]:
            logger.info("livetrain: serving checkpoint generation %d from %s", restore["generation"], restore["store"])
        manifests = [e["manifest"] for e in self.exports]
        if mode == "plugin" and len(manifests) > 1:
            # One trainer rank per worker, one process group (trainer.ranks); tied as at TP 1.
            self.trainer = process.start_trainer_group(
                manifests, first["model_dir"], self.socket, trainer_ns, tied=True
            )
            logger.info("livetrain: trainer ranks, pids %s, on %s", self.trainer.pids, ", ".join(manifests))
        elif mode == "plugin":
            # Tied: stopped when the API server exits, by the kernel if it dies.
            self.trainer = process.start_trainer(
                first["manifest"], first["model_dir"], self.socket, trainer_ns, tied=True
            )
            logger.info("livetrain: trainer pid %d on %s", self.trainer.pid, first["manifest"])
        else:
            for r, manifest in enumerate(manifests):
                cmd = process.trainer_command(manifest, first["model_dir"], self.socket, trainer_ns)
                ranks = f"RANK={r} WORLD_SIZE={len(manifests)} MASTER_ADDR=127.0.0.1 MASTER_PORT=<a free port> "
                logger.info(
                    "livetrain: LIVETRAIN_TRAINER=external; start the trainer%s with: %s%s",
                    f" rank {r}" if len(manifests) > 1 else "",
                    ranks if len(manifests) > 1 else "",
                    shlex.join(cmd),
                )

        if facts.prefix_caching:
            logger.info(
                "livetrain: vLLM's prefix cache is reset after every training step (running requests "
                "are preempted and recomputed); --no-enable-prefix-caching avoids that cost"
            )
        else:
            logger.info("livetrain: prefix caching is off; nothing to reset after training steps")
        installed = api.installed_vllm_version()
        set_version = installed is not None and api.version_at_least(installed, api.WEIGHT_VERSION_SINCE)

        def read_version(known: int | None) -> int | None:
            if self.trainer is not None and self.trainer.poll() is not None and not self._reported_exit:
                self._reported_exit = True
                logger.error(
                    "livetrain: the trainer exited with status %s; /train answers 503 until vLLM restarts",
                    self.trainer.poll(),
                )
            return protocol.weight_version(self.socket, after=known, wait_s=VERSION_WAIT_S if known is not None else 0)

        self.watcher = VersionWatcher(
            read_version,
            weight_version_action(
                engine_client, facts.prefix_caching, set_version, lambda v: report_served(self.socket, v)
            ),
        )
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
