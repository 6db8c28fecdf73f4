"""The trainer: attaches to an engine's weights through its manifest, builds the Hugging Face model on
them, and runs training jobs from a queue with APOLLO-Mini steps applied from backward hooks as gradients
are made (in batches of --step-batch-mib of gradients), so the served weights change in place. Requests arrive through ``handle`` (the socket protocol,
trainer.protocol); checkpoint and rollback requests run on the training thread between two steps, writing
to the model's checkpoint store (livetrain.checkpoint). ``python -m livetrain.trainer`` runs it as a process.
Under tensor parallelism one Trainer runs per engine rank (trainer.ranks): rank 0 as described, the others
following its commands; each step, checkpoint and rollback then runs on every rank at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import queue
import sys
import threading
import time
import uuid

import torch

from livetrain import _core
from livetrain.loss import OutputGradient, causal_lm_loss, output_projection
from livetrain.trainer import admission, augment, guard, options, schedule
from livetrain.trainer.examples import job_id, own_rendering, parse_job, prompt_ids, use_chat
from livetrain.trainer.protocol import Invalid, Reply, error, parse_body
from livetrain.trainer.ranks import RankFailure, RanksFailed

ROLLBACK_FIELDS = {"generation"}
RETENTION_FIELDS = {"prompts", "builtin"}
# The longest a ``version`` request may wait for a new version (the plugin's watcher asks again after it).
MAX_VERSION_WAIT_S = 30.0
# The jobs /train/status and GET /train/{job_id} list: the oldest finished ones are forgotten past this.
KEPT_JOBS = 100


def parse_job_id(args: dict) -> str:
    """The ``{"job_id": ...}`` the job routes send (the id from the URL)."""
    jid = args.get("job_id")
    if not isinstance(jid, str) or not jid:
        raise Invalid("job_id", "job_id must be a job id string (POST /train answers it)")
    return jid


class JobQueue(queue.Queue):
    """The training queue of (job id, job) items, from which a cancel takes a queued job out at once: its slot
    is free for the next submission and it is not counted among the jobs queued (it stayed until the
    training thread reached it: eight cancelled jobs behind a long one filled the queue)."""

    def remove(self, jid: str) -> bool:
        """Takes job ``jid`` out of the queue; False when it is not there (the training thread took it)."""
        with self.mutex:  # queue.Queue's own lock, over its deque ``queue``
            for item in self.queue:
                if item[0] == jid:
                    self.queue.remove(item)
                    self.not_full.notify()
                    return True
        return False


class RollbackRefused(RuntimeError):
    """A rollback that a rank's check refused (``Trainer.rollback_rank``): nothing was written on any rank."""


class RollbackIncomplete(RuntimeError):
    """A rollback that failed while writing, after every rank's check had passed: the message says which
    ranks hold the generation's weights and which hold a mix (docs/serve.md, "Checkpoints")."""


class NonFinite(Exception):
    """A step met a non-finite loss or gradient. ``applied``: whether some parameters had been stepped
    (a finite loss whose backward overflowed in some parameters only)."""

    def __init__(self, message: str, applied: bool, parameters: list[str]):
        super().__init__(message)
        self.applied, self.parameters = applied, parameters


def parse_checkpoint_args(args: dict) -> None:
    """POST /checkpoint takes an empty body or ``{}``."""
    if args:
        raise Invalid(sorted(args)[0], f"unknown field {sorted(args)[0]!r} (POST /checkpoint takes no fields)")


def _integer(args: dict, field: str, what: str) -> int:
    v = args[field]
    if isinstance(v, bool) or not isinstance(v, int):
        raise Invalid(field, f"{field} must be an integer ({what}), got {json.dumps(v)[:40]}")
    return v


def parse_version_args(args: dict) -> tuple[int | None, float]:
    """The ``version`` op's optional ``{"after": N, "wait_s": S}``: answer once the weight version is not N,
    or after S seconds (at most MAX_VERSION_WAIT_S), so that a watcher learns of a step as it ends instead
    of at its next poll. Empty: answer at once."""
    unknown = set(args) - {"after", "wait_s"}
    if unknown:
        raise Invalid(sorted(unknown)[0], f"unknown field {sorted(unknown)[0]!r} (allowed: after, wait_s)")
    after = _integer(args, "after", "the weight version the caller has") if "after" in args else None
    wait = args.get("wait_s", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_VERSION_WAIT_S:
        raise Invalid("wait_s", f"wait_s must be a number of seconds in [0, {MAX_VERSION_WAIT_S:g}]")
    return after, float(wait)


def parse_served_args(args: dict) -> int:
    """The ``served`` op's ``{"weight_version": N}``: the engine serves version N (its caches reset)."""
    unknown = set(args) - {"weight_version"}
    if unknown:
        raise Invalid(sorted(unknown)[0], f"unknown field {sorted(unknown)[0]!r} (allowed: weight_version)")
    if "weight_version" not in args:
        raise Invalid("weight_version", "weight_version is required")
    return _integer(args, "weight_version", "the version the engine now serves")


def parse_rollback_args(args: dict, generations: list[int]) -> int:
    """The generation of ``{"generation": N}``; ``generations`` are those the store holds."""
    unknown = set(args) - ROLLBACK_FIELDS
    if unknown:
        raise Invalid(sorted(unknown)[0], f"unknown field {sorted(unknown)[0]!r} (allowed: generation)")
    if "generation" not in args:
        raise Invalid("generation", "generation is required: the generation to roll back to (GET /checkpoints)")
    g = args["generation"]
    if isinstance(g, bool) or not isinstance(g, int):
        raise Invalid("generation", f"generation must be an integer, got {json.dumps(g)[:40]}")
    if g not in generations:
        raise Invalid(
            "generation",
            f"generation {g} is not in the checkpoint store (it holds {generations[0]}..{generations[-1]})",
        )
    return g


def padding_waste(examples: list, anchor_rows: list) -> float:
    """How many more tokens one forward over ``examples`` and ``anchor_rows`` (each padded to the longest of
    both) computes than two forwards, each padded to its own longest, as a fraction of the two's."""
    wx, wa = max(len(t) for t, _, _ in examples), max(len(t) for t, _, _ in anchor_rows)
    apart = len(examples) * wx + len(anchor_rows) * wa
    return (len(examples) + len(anchor_rows)) * max(wx, wa) / apart - 1


def _join(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


class Trainer:
    """The model on the engine's memory, the optimizer, the job queue, the checkpoint store and what
    /train/status reports.

    ``settings``: the trainer's options as livetrain.trainer.options parses them (``options.parse([...])``;
    default: every option's default). The checkpoint store (``--store``, default ``MODEL/.livetrain-store``)
    is the one the engine created and restored from before exporting its weights; with ``--no-store``
    there is none.

    ``release_cached`` (CUDA): once per step, just before the first vocabulary-sized gradient is made
    (the input embeddings' at the end of backward, else the output projection's after it), give the
    allocator's free pages back to the device (``torch.cuda.empty_cache``). By then the freed
    activations are broken up by the few tensors still alive, no free range is large enough, and the
    allocator would map new memory for the gradient while keeping the old: 0.5 GiB more at the peak for
    an 8B model (bench/RESULTS.md). The second such gradient reuses the first one's memory.
    """

    def __init__(
        self,
        manifest: str,
        model_dir: str,
        settings: argparse.Namespace | None = None,
        *,
        max_examples: int = 10_000,
        wait_s: float = 60.0,
        release_cached: bool = True,
        ranks=None,
    ):
        import transformers

        from livetrain import checkpoint, kernels, optim, safetensors, sharing

        t_start = time.monotonic()

        def progress(what: str) -> None:  # the start's phases in the log: /train answers 503 until the end
            print(f"livetrain trainer: {what} ({time.monotonic() - t_start:.1f} s)", file=sys.stderr, flush=True)

        deadline = time.monotonic() + wait_s
        while True:  # the engine writes the manifest once its weights are shared
            try:
                self.attached = sharing.attach(manifest)
                break
            except _core.BusyError:  # another trainer holds the lease: waiting would not help
                raise
            except (FileNotFoundError, _core.Error):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        progress(f"attached to {manifest}; building the model on the shared weights")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        # Tensor parallelism (trainer.ranks): this rank's model on its engine rank's shards; None at TP 1.
        self.ranks, self.rank_model, self.vocab = ranks, None, None
        if ranks is None:
            self.model = sharing.build_hf_model(self.attached)
        else:
            os.makedirs(ranks.state_dir, exist_ok=True)  # where a failing rank leaves its message
            ranks.start(next(iter(self.attached.tensors.values())).device)
            self.rank_model = ranks.build_model(self.attached)
            self.model, self.vocab = self.rank_model.model, self.rank_model.vocab
        self.model.train()
        self.device = next(self.model.parameters()).device
        # What the Gated DeltaNet layers (Qwen3-Next, Qwen3.5) run: fused kernels or the slow torch path.
        progress("model built; checking the model's kernels (the first run of fused kernels compiles them)")
        s = settings or options.parse([])
        found = kernels.prepare(self.model, self.device, backward=True)
        # The norms, rotary embedding and MLP activation as fused kernels (kernels.fuse: checked first).
        found += kernels.fuse(self.model, self.device) if s.fused_ops == "auto" else kernels.fuse_off(self.model)
        for warning in found:
            print(f"livetrain trainer: warning: {warning}", file=sys.stderr, flush=True)
        self.kernels = kernels.report(self.model)
        self.fused_ops = kernels.fused_report(self.model)
        use_chat(self.tokenizer, options.chat(s))  # read and checked when the options were parsed
        self.grad_checkpointing = bool(
            not s.no_grad_checkpointing and getattr(self.model, "supports_gradient_checkpointing", False)
        )
        if self.grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.opt = optim.ApolloMini(optim.param_groups(self.model, embeddings=s.embeddings), lr=s.lr)
        if ranks is not None:
            self.opt.tensor_parallel(ranks.group, self.rank_model.shards)
        self.names = {p: n for n, p in self.model.named_parameters()}
        # The model files' names -> the engine's memory, as the checkpoint store takes them (tied weights once;
        # a multimodal checkpoint's text model under its names in the files); under tensor parallelism, this
        # rank's regions of them (trainer.ranks).
        if ranks is None:
            self.weights = checkpoint.by_file_names({n: p.data for n, p in self.model.named_parameters()}, model_dir)
            held = set(self.weights)
        else:
            self.weights = ranks.regions(self.rank_model)
            held = {region.name for region in self.weights}
        # Tensors of the model files that this model does not hold (a vision tower, an MTP head): never
        # trained; the checkpoint store carries them unchanged.
        try:
            self.not_trained = sorted(set(safetensors.Model(model_dir).names()) - held)
        except _core.NotFoundError:  # no model files (an engine with random weights, --no-store): none to list
            self.not_trained = []
        self.opt.param_names = self.names
        # The hooks' steps wait in batches of this many gradient bytes (--step-batch-mib): the batched launches of
        # step(), with those gradients' memory counted in a step's (admission.step_memory). Under tensor
        # parallelism every step waits for its sums over ranks, alone.
        trained = sum(p.numel() * p.element_size() for p in self.names if p.requires_grad)
        self.step_batch_bytes = (
            0 if ranks is not None else admission.step_batch_bytes(s.step_batch_mib, trained, self.device.type)
        )
        self.hooks = self.opt.attach_hooks(batch_bytes=self.step_batch_bytes)
        progress(
            f"optimizer ready over {len(self.names)} parameters; the backward hooks step them in batches of "
            f"{self.step_batch_bytes / 2**20:.0f} MiB of gradients"
            if self.step_batch_bytes
            else f"optimizer ready over {len(self.names)} parameters; the backward hooks step each alone"
        )
        self.release_cached = release_cached
        self._released = False  # in this step's backward (see step)
        embeddings_module = self.model.get_input_embeddings()
        if release_cached and embeddings_module is not None and embeddings_module.weight.requires_grad:
            embeddings_module.register_forward_hook(self._embeddings_forward)
        if ranks is not None and not s.no_guard:
            # The guard's retention answers are generated on rank 0 alone (see submit): off by default here.
            s = argparse.Namespace(**{**vars(s), "no_guard": True, "replay": 0, "anchor": 0.0, "reword": False})
            print("livetrain trainer: the forgetting guard is off under tensor parallelism", file=sys.stderr)
        self.settings = s  # the defaults of a job's plan (trainer.schedule.plan)
        self.lr, self.batch_size = s.lr, s.batch_size
        self.max_batch_tokens, self.max_batch_tokens_from = s.max_batch_tokens, "--max-batch-tokens"
        cfg, esize = self.model.config.get_text_config(), next(self.model.parameters()).element_size()
        if s.max_batch_tokens == "auto":  # after the optimizer's state exists: what is free now is what a step has
            self.max_batch_tokens, self.max_batch_tokens_from = admission.auto_max_batch_tokens(
                cfg.hidden_size, cfg.num_hidden_layers, esize, self.device, self.step_batch_bytes
            )
        progress(f"{self.max_batch_tokens} tokens per step at most ({self.max_batch_tokens_from})")
        # The guard's and rewording's greedy answers run outside the steps, in the memory a step may take: half
        # of it for their batches' caches, the rest for the prompts' forward (a layer's activations at a time).
        self.greedy = {
            "batch": guard.GREEDY_ROWS["cuda" if self.device.type == "cuda" else "cpu"],
            "memory": admission.step_memory(
                self.max_batch_tokens, cfg.hidden_size, cfg.num_hidden_layers, esize, self.device.type
            )
            / 2,  # outside the steps: no gradients wait then
        }
        progress(
            f"greedy answers (the guard's, rewording's) in batches of at most {self.greedy['batch']} rows and "
            f"{self.greedy['memory'] / 2**30:.2f} GiB of cache (half of a step's memory)"
        )
        self.retries = admission.Retries()
        self.max_len = s.max_seq_len or int(self.attached.config.get("max_position_embeddings") or 4096)
        self.max_examples = max_examples
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        try:
            user = guard.read_prompts(s.retention, self.tokenizer, self.max_len) if s.retention else None
        except (OSError, ValueError) as e:
            raise _core.InvalidArgumentError(f"--retention: {e}") from None
        every = {"all": True, "core": False}.get(s.builtin_retention, self.device.type != "cpu")
        self.retention = guard.Retention(self.tokenizer, user, with_replay_only=every)

        self.state_dir = s.state_dir
        os.makedirs(s.state_dir, exist_ok=True)
        self.opt_path = os.path.join(
            s.state_dir, self._state_files(ranks.size if ranks else 1)[ranks.rank if ranks else 0]
        )
        self.meta_path = os.path.join(s.state_dir, "trainer.json")
        # trainer.json: the weight version the saved optimizer state belongs to, the highest version a
        # step may have used (written before the step: versions never repeat, whatever crashes when), and
        # the engine the weights were trained on.
        saved_version, reserved, engine, saved_files = None, 0, None, None
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                meta = json.load(f)
            saved_version = int(meta.get("weight_version", 0))
            reserved, engine = int(meta.get("reserved", 0)), meta.get("engine")
            saved_files = meta.get("files")
        # The state dir's optimizer state: the files its last save wrote (trainer.json names them), at
        # whatever tensor-parallel size that was (resharded on load). A file of this size left by an older
        # run at it is not that state: a TP-1 save after a TP-2 one leaves the TP-2 rank files behind.
        if saved_files is None:  # saved before trainer.json named them: this size's file, if any
            saved_files = [os.path.basename(self.opt_path)] if os.path.exists(self.opt_path) else []
        dir_state = [os.path.join(s.state_dir, f) for f in saved_files]
        if not dir_state or not all(os.path.exists(f) for f in dir_state):
            dir_state = None
        # What trainer.json names until this run saves (``_name_state``): the files that go with state_version,
        # whatever this run's size (a trainer.json written before then, by ``reserve``, must not name files
        # this run has not written yet).
        self.state_files = saved_files if dir_state else []
        self.engine = dict(self.attached.manifest["owner"])
        # The same engine still runs: only the trainer restarted (it died, and its launcher started it
        # again). The engine serves the weights as the last trainer left them, not the store's head, and
        # the state dir's optimizer state is the newest one of them.
        same_engine = engine == self.engine
        if ranks is not None:
            # trainer.json names rank 0's engine: every rank takes rank 0's answer, and so the same state.
            same_engine = ranks.agree(same_engine)
        # The engine serves the store's head generation (it restored it before exporting), so the optimizer
        # state recorded with that generation belongs to these weights; the state dir's is newer (training
        # after the checkpoint, lost) or older, unless it was saved at the same weight version.
        self.store, head = None, None
        if not s.no_store:
            self.store = (
                checkpoint.open_store(model_dir, s.store, served={n: t.dtype for n, t in self.weights.items()})
                if ranks is None
                else ranks.open_store(model_dir, s.store, self.weights)
            )
            head = self.store.list()[-1]
            if self.device.type == "cuda":
                # Page-lock the head copy now, on a thread of the store's, rather than in the first
                # checkpoint (13.4 s for the 27B model's 50 GiB on the H200): the first save waits only for
                # what is left of it.
                self.store.prepare_gpu(self.device)
        # Tensors served (and so saved) in another dtype than the model files hold: vLLM's float32 A_log over
        # Qwen3.5's bf16 files. Not a mismatch: /train/status says so.
        served = {n: d for n, d, _ in self.store.tensors()} if self.store is not None else {}
        files = self.store.file_dtypes() if self.store is not None else {}
        self.served_dtypes = {n: {"files": d, "served": served[n]} for n, d in sorted(files.items())}
        self.restored_from = None
        head_state = self._generation_state(head) if head is not None else None
        if same_engine and dir_state:
            self._load_state(dir_state)
            self.restored_from = "state-dir"
        elif not same_engine and head_state and (saved_version != head["weight_version"] or not dir_state):
            self._load_state(head_state)
            self.restored_from = f"generation {head['generation']}"
        elif dir_state:
            self._load_state(dir_state)
            self.restored_from = "state-dir"
        self.restored = self.restored_from is not None
        # Versions never go back: training after the head generation was lost, so the weights (the head's)
        # get a new version rather than a number that named other weights; after a trainer-only restart,
        # the steps the last trainer may have taken since its save make the weights new too.
        top = max(saved_version or 0, reserved)
        self.weight_version = top
        if same_engine:
            self.weight_version = top + 1 if reserved > (saved_version or 0) else top
        elif head is not None:
            hv = head["weight_version"]
            self.weight_version = top + 1 if top > hv else hv
        self.reserved = self.weight_version
        self.state_version = saved_version or 0  # the version of the optimizer state in --state-dir
        self.saved_version = self.weight_version  # the version the store's head holds (see checkpoint_due)
        # The generation the live weights and optimizer state are, bit for bit, since a rollback to it with
        # no new version since (None: not known): a rollback to it again changes nothing (``rollback``).
        self.live_generation: int | None = None
        self.checkpoint_every = s.checkpoint_every
        self.last_checkpoint = time.monotonic()
        self.generations = self.store.list() if self.store else []
        # Generations saved in the middle of a job (a periodic or requested checkpoint between its steps), by
        # number: {job, step, guarded, verdict} (``_mark_mid_job``), kept in STATE_DIR/generations.json by
        # rank 0 so that /checkpoints still tells them apart after a restart.
        self.mid_job_path = os.path.join(s.state_dir, "generations.json")
        self.mid_job = self._read_mid_job()
        self.checkpoint_error: str | None = None
        self.save_error: str | None = None  # of the last save() (optimizer state, weight version), else None

        # Read by status() from the socket threads: kept here, never computed from self.opt.state, which
        # the training thread mutates.
        self.opt_steps = self._optimizer_steps()
        self.opt_bytes = self.opt.state_bytes()["total"]

        self.queue = JobQueue(maxsize=s.queue_size)
        self.lock = threading.Lock()  # guards what status() reads
        # Notified on every new weight version: what a waiting ``version`` request (the plugin) waits on.
        self.version_changed = threading.Condition(self.lock)
        # When each recent version was made (monotonic, the end of its step), and the last version an
        # engine reported serving (``served``) with the seconds from the one to the other.
        self.made_at: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.served: dict | None = None
        self.jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.started = time.time()  # when this trainer process started: the jobs it lists are its own (unknown_job)
        self.current: str | None = None
        self.losses: collections.deque = collections.deque(maxlen=200)
        self.tokens_per_s = 0.0
        # What /metrics counts since this process started (trainer.metrics).
        self.counts = {"steps": 0, "tokens": 0, "guard_rollbacks": 0, "nonfinite_stops": 0}
        self.stopping = threading.Event()
        # Requests that must run between two steps (checkpoint, rollback): [function, done, reply].
        self.pending: collections.deque = collections.deque()
        self.closed = False  # set when the training thread takes no more of them
        # The guard's measures of the weights a job starts from, made once per weight version (``_prepare``):
        # between jobs (--guard-prepare idle) or at a guarded job's start.
        self.prepared: dict | None = None
        self.making: dict | None = None  # the guard's measure being made now (_prepare), for /train/status
        # The last guarded job whose answers kept are measured after its verdict, off its path: at the next
        # idle moment or the next guarded job's start, whichever comes first (``_kept_measured``).
        self.kept_pending: dict | None = None
        self.prepare_failed: int | None = None  # the weight version whose measures between jobs failed
        # (weight version, retention prompts' version) at which a call between jobs found nothing left to make
        self.prepared_all: tuple | None = None

    # ---- requests (trainer.protocol); an Invalid raised here is answered 400 naming its field ----
    def handle(self, op: str, body: bytes, idempotency_key: str | None = None) -> Reply:
        """One request: ``op`` and its body as the HTTP route received it (and its Idempotency-Key)."""
        if op == "version":  # what watchers poll: no copy of the job list
            after, wait_s = parse_version_args(parse_body(body, empty_ok=True))
            with self.version_changed:
                if after is not None:
                    self.version_changed.wait_for(lambda: self.weight_version != after, wait_s)
                return Reply(200, {"weight_version": self.weight_version})
        if op == "served":
            version = parse_served_args(parse_body(body, empty_ok=False))
            now = time.monotonic()
            with self.lock:
                made = self.made_at.get(version)
                self.served = {
                    "weight_version": version,
                    "seconds_after_step": None if made is None else round(now - made, 4),
                }
            return Reply(200, {})
        if op == "status":
            return Reply(200, self.status())
        if op in ("submit", "checkpoint", "rollback") and self.ranks is not None and self.ranks.failure:
            return error(503, self.ranks.failure)
        if op == "submit":
            job = parse_body(body, empty_ok=False)
            key = admission.job_key(idempotency_key, job_id(job))
            return self.retries.run(key, body, lambda: self.submit(job))
        if op == "job":
            return self.job(parse_job_id(parse_body(body, empty_ok=False)))
        if op == "cancel":
            return self.cancel(parse_job_id(parse_body(body, empty_ok=False)))
        if op == "metrics":
            return Reply(200, self.metrics())
        if op == "retention":
            return self.between_steps(lambda: Reply(200, self.retention.describe()))
        if op == "set_retention":
            prompts, builtin = self.parse_retention(parse_body(body, empty_ok=False))
            return self.between_steps(lambda: self.set_retention(prompts, builtin))
        if op in ("checkpoint", "checkpoints", "rollback"):
            if self.store is None:
                return error(409, "this server has no checkpoint store (it was started with --no-store)")
            if op == "checkpoints":
                return Reply(200, self.checkpoints())
            args = parse_body(body, empty_ok=True)
            if op == "checkpoint":
                parse_checkpoint_args(args)
                return self.between_steps(self.checkpoint)
            with self.lock:
                known = [g["generation"] for g in self.generations]
            g = parse_rollback_args(args, known)
            return self.between_steps(lambda: self.rollback(g))
        return error(400, f"unknown op {op!r}", "op")

    def between_steps(self, fn) -> Reply:
        """Runs ``fn`` on the training thread between two steps (or while it is idle); returns its reply.
        Serving goes on meanwhile: only training waits."""
        item = [fn, threading.Event(), None]
        with self.lock:
            if self.closed:
                return error(503, "the trainer is shutting down")
            self.pending.append(item)
        item[1].wait()
        return item[2]

    def run_pending(self, timer: bool = True) -> None:
        """On the training thread, between steps: the waiting checkpoint/rollback requests, then the
        periodic checkpoint when it is due."""
        while True:
            with self.lock:
                if not self.pending:
                    break
                item = self.pending.popleft()
            try:
                item[2] = item[0]()
            except Exception as e:
                message = self._failed(e)
                # A broken group answers 503 from now on (handle): this request the same, not a 500.
                item[2] = error(503 if self.ranks is not None and self.ranks.failure else 500, message)
            item[1].set()
        if timer and self.checkpoint_due():
            try:
                r = self.checkpoint().body
                print(json.dumps({"checkpoint": r}), flush=True)
            except Exception as e:  # reported in /train/status; tried again after another period
                self.last_checkpoint = time.monotonic()
                with self.lock:
                    self.checkpoint_error = self._failed(e)
                print(f"livetrain trainer: periodic checkpoint failed: {self.checkpoint_error}", flush=True)

    def _failed(self, e: Exception) -> str:
        """What to report of an error; under tensor parallelism, one of the transport (a rank died or timed
        out, RankFailure) breaks the group (trainer.ranks)."""
        if self.ranks is not None and self.ranks.broken(e):
            return str(self.ranks.fail(e))
        return f"{type(e).__name__}: {e}"

    def checkpoint_due(self) -> bool:
        return (
            self.store is not None
            and self.checkpoint_every > 0
            and self.weight_version != self.saved_version
            and time.monotonic() - self.last_checkpoint >= self.checkpoint_every
        )

    def submit(self, job: dict) -> Reply:
        """Checks and tokenizes a /train body (``Invalid`` naming the field), fits its batches to the
        per-step token budget (trainer.admission), then queues it."""
        parsed = parse_job(self.tokenizer, job, self.max_len, self.max_examples)
        # A chat example whose template does not render it incrementally trains as one sequence per assistant
        # turn (examples.encode_example): each a row of the job, as the restated answers below.
        sequences = len(parsed["examples"])
        # Each chat example's answer as plain text too (trainer.augment.restated): made here, no model run,
        # so they are the job's examples from the start (admission, epochs, until_loss count them).
        restated = []
        if parsed.get("restate", self.settings.restate):
            restated = augment.restated(self.tokenizer, job["examples"], self.max_len)
            parsed["examples"] = parsed["examples"] + restated
        n = len(parsed["examples"])
        # The per-step token budget (trainer.admission): a batch size the client did not choose shrinks
        # to fit, one it chose is refused; steps of epochs count the batches of the fitted size.
        asked = parsed.get("batch_size", self.settings.batch_size)
        first = schedule.plan(parsed, self.settings, n)  # replayed rows join every step: they count
        # So do the rewordings that will join the job (made when it runs): a row reserved for each.
        later = len(augment.rewordable(job["examples"])) if first.reword else 0
        bs = admission.fit_batch(
            parsed["examples"], asked, "batch_size" in parsed, self.max_batch_tokens, first.replay, later
        )
        plan = schedule.plan({**parsed, "batch_size": bs}, self.settings, n)
        if self.ranks is not None and (plan.guard or plan.replay):
            # The retention answers and losses are generated on rank 0 alone, while a tensor-parallel
            # forward needs every rank: not built yet (issue #16).
            raise Invalid(
                "guard",
                "the forgetting guard and retention replay do not run under tensor parallelism yet; send "
                '"guard": false and "replay": 0 (the defaults under tensor parallelism)',
            )
        if self.ranks is not None and plan.train != "all":
            raise Invalid("train", 'under tensor parallelism a job trains every parameter: send "train": "all"')
        if self.ranks is not None and plan.reword:
            raise Invalid("reword", "rewording runs the model on rank 0 alone: not under tensor parallelism yet")
        if self.stopping.is_set():
            return error(503, "the trainer is shutting down")
        jid = job_id(job) or f"job-{uuid.uuid4().hex[:12]}"
        info = {
            "id": jid,
            "state": "queued",
            "examples": n,
            "sequences": sequences,
            "steps": plan.budget,  # the most it takes: exactly this many when fixed
            "step": 0,
            "batch_size": plan.batch_size,
            "lr": plan.lr,
            "until_loss": plan.until_loss,
            "plan": plan.describe(),
            "loss": None,
            "loss_before": None,
            "loss_after": None,
            "losses": None,
            "stop_reason": None,
            "reworded": None,
            "restated": len(restated) if plan.restate else None,
            "trains": None,
            "guard": None,
            "error": None,
            "submitted": time.time(),
            "started": None,
            "finished": None,
            "seconds": None,
        }
        with self.lock:
            if jid in self.jobs:
                return error(409, f"job id {jid!r} is taken by another job", "id")
            try:
                queued = {
                    "examples": parsed["examples"],
                    "plan": plan,
                    "examples_own": n - len(restated),
                    "restated": len(restated),
                }
                if plan.reword:
                    queued["raw"] = job["examples"]  # the chat text the model rewords (trainer.augment)
                self.queue.put_nowait((jid, queued))
            except queue.Full:
                return error(429, f"the training queue is full ({self.queue.maxsize} jobs); retry later")
            self.jobs[jid] = info
            while len(self.jobs) > KEPT_JOBS:  # forget the oldest finished jobs
                old = next((k for k, v in self.jobs.items() if v["state"] in schedule.FINAL), None)
                if old is None:
                    break
                del self.jobs[old]
        reply = {"job_id": jid, "steps": plan.budget, "until_loss": plan.until_loss, "examples": n}
        reply["queued"] = self.queue.qsize()
        if plan.batch_size != asked:
            reply["batch_size"] = plan.batch_size
            reply["split"] = (
                f"batches of {plan.batch_size} examples rather than {asked}, to stay within --max-batch-tokens "
                f"{self.max_batch_tokens} tokens per step"
            )
        return Reply(202, reply)

    def unknown_job(self, jid: str) -> Reply:
        """404 for a job id this trainer process does not list: never submitted, among the oldest finished ones
        past ``KEPT_JOBS``, or a job of an earlier trainer process (a restart keeps the weights, not the list)."""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return error(
            404,
            f"no job {jid!r}: this trainer lists the last {KEPT_JOBS} jobs submitted to it since it started "
            f"({since}); jobs of an earlier trainer process are not kept",
            "job_id",
        )

    def job(self, jid: str) -> Reply:
        """GET /train/{job_id}: the job's entry, as /train/status lists it."""
        with self.lock:
            info = self.jobs.get(jid)
            if info is None:
                return self.unknown_job(jid)
            return Reply(200, dict(info))

    def cancel(self, jid: str) -> Reply:
        """Cancels a queued job at once, a running one after its current step (202); 409 once it ended."""
        with self.lock:
            info = self.jobs.get(jid)
            if info is None:
                return self.unknown_job(jid)
            if info["state"] in schedule.FINAL:
                return error(409, f"job {jid} has already ended ({info['state']})", "job_id")
            info["cancel"] = True
            if info["state"] == "queued":  # out of the queue, or skipped by the training thread that just took it
                self.queue.remove(jid)
                info.update(state="cancelled", stop_reason="cancelled", finished=time.time())
                return Reply(200, dict(info))
            return Reply(202, dict(info))

    def parse_retention(self, args: dict) -> tuple[list, bool]:
        """PUT /train/retention: ``{"prompts": [...], "builtin": true}``."""
        unknown = set(args) - RETENTION_FIELDS
        if unknown:
            name = sorted(unknown)[0]
            raise Invalid(name, f"unknown field {name!r} (allowed: prompts, builtin)")
        if "prompts" not in args:
            raise Invalid("prompts", "prompts is required: a list of strings or {messages} objects")
        builtin = args.get("builtin", True)
        if not isinstance(builtin, bool):
            raise Invalid("builtin", "builtin must be true or false")
        prompts = guard.check_prompts(args["prompts"], tokenizer=self.tokenizer, max_len=self.max_len)
        if not builtin and len(prompts) < 2:
            raise Invalid("prompts", "without the built-in prompts, give at least two (one replayed, one held out)")
        return prompts, builtin

    def set_retention(self, prompts: list, builtin: bool) -> Reply:
        self.retention.set_user(prompts, builtin)
        self.prepared = None  # measured on other prompts (this runs on the training thread)
        self._kept_not_measured("the retention prompts changed before they were measured")
        return Reply(200, self.retention.describe())

    def metrics(self) -> dict:
        """What /metrics exports (trainer.metrics turns it into Prometheus metrics)."""
        with self.lock:
            states = collections.Counter(v["state"] for v in self.jobs.values())
            last = self.losses[-1]["loss"] if self.losses else None
            return {
                "weight_version": self.weight_version,
                "counts": dict(self.counts),
                "loss": last,
                "tokens_per_s": self.tokens_per_s,
                "jobs": {state: states.get(state, 0) for state in schedule.STATES},
                "checkpoint_time": self.generations[-1]["time_ms"] / 1000 if self.store is not None else None,
                "checkpoint_weight_version": self.generations[-1]["weight_version"] if self.store is not None else None,
                "running": self.current,
            }

    def status(self) -> dict:
        with self.lock:
            return {
                "queue": [k for k, v in self.jobs.items() if v["state"] == "queued"],
                "queue_max": self.queue.maxsize,
                "current": dict(self.jobs[self.current]) if self.current else None,
                "jobs": [dict(v) for v in self.jobs.values()],
                "weight_version": self.weight_version,
                "served": dict(self.served) if self.served else None,
                "loss_history": list(self.losses),
                "tokens_per_s": round(self.tokens_per_s, 1),
                "optimizer": {
                    "name": "apollo-mini",
                    "state_bytes": self.opt_bytes,
                    "restored": self.restored,
                    "restored_from": self.restored_from,
                    "steps": self.opt_steps,
                    "save_error": self.save_error,
                },
                "gradient_checkpointing": self.grad_checkpointing,
                "train": self.settings.train,
                "kernels": self.kernels,
                "fused_ops": self.fused_ops,
                "device": str(self.device),
                "max_batch_tokens": {"tokens": self.max_batch_tokens, "chosen": self.max_batch_tokens_from},
                "not_trained": {
                    "tensors": self.not_trained,
                    "why": "in the model files but outside the text model this engine serves (e.g. a vision tower "
                    "or an MTP head): never trained, kept unchanged by the checkpoint store",
                },
                "checkpoint": self._checkpoint_status(),
                "tensor_parallel": self.ranks.status() if self.ranks is not None else None,
                "guard": {
                    "default": not self.settings.no_guard,
                    "threshold": self.settings.guard_threshold,
                    "min_kept": self.settings.guard_min_kept,
                    "replay": self.settings.replay,
                    "anchor": self.settings.anchor,
                    "replay_select": self.settings.replay_select,
                    "rollbacks": self.counts["guard_rollbacks"],
                    "can_roll_back": self.store is not None,
                    "retention_prompts": len(self.retention.prompts),
                    # How the retention answers' prompts render (and rewording's): thinking off where the template has it.
                    "rendering": own_rendering(self.tokenizer),
                    "builtin_retention": "all" if self.retention.with_replay_only else "core",
                    "prepare": self.settings.guard_prepare,
                    "prepared": self._prepared_status(),
                    "between_jobs": self.between_jobs(),
                },
            }

    def _prepared_status(self) -> dict | None:
        """Which of the guard's measures of the starting weights are made (``_prepare``), and at what weight
        version: those of the live version are what the next guarded job starts from without making them."""
        p = self.prepared
        if p is None:
            return None
        m = self.making
        made = [k for k in ("kept", "reference") if p[k] is not None] + ["anchor"] * bool(p["anchors"])
        if self.retention.version == p["version"]:
            made.insert(1, "answers")
        return {
            "weight_version": p["version"],
            "current": p["version"] == self.weight_version,
            "made": made,
            "seconds_idle": round(p["idle_s"], 3),
            "seconds_at_job_start": round(p["job_s"], 3),
            # The measure being made now (None: none): what a job waiting at step 0 is waiting for.
            "making": None if m is None else {**m, "seconds": round(time.time() - m["since"], 1)},
        }

    def _checkpoint_status(self) -> dict | None:
        if self.store is None:
            return None
        head = self.generations[-1]
        return {
            "store": self.store.dir,
            "generation": head["generation"],
            "weight_version": head["weight_version"],
            "time": head["time_ms"] / 1000,
            "every_s": self.checkpoint_every,
            "error": self.checkpoint_error,
            "served_in_other_dtype": self.served_dtypes,
        }

    # ---- the checkpoint store (on the training thread, between steps) ----
    def checkpoints(self) -> dict:
        with self.lock:
            gens = [{**g, "mid_job": self.mid_job.get(g["generation"])} for g in self.generations]
        return {
            "store": self.store.dir,
            "head": gens[-1]["generation"],
            "oldest": gens[0]["generation"],
            "generations": gens,
        }

    def _commit(self) -> dict:
        """Saves the live weights as a generation with the optimizer state beside them (under tensor
        parallelism every rank saves its part, rank 0 commits them: commit_rank)."""
        if self.ranks is not None:
            self.ranks.lead("commit", self.weight_version)
        r = self.commit_rank(self.weight_version)
        gens = self.store.list()
        with self.lock:
            self.generations = gens
            self.checkpoint_error = None
        self.saved_version, self.last_checkpoint = self.weight_version, time.monotonic()
        return r

    def commit_rank(self, weight_version: int) -> dict:
        """This rank's part of ``_commit`` (every rank, at once, under tensor parallelism)."""
        self.save_rank(weight_version)  # the optimizer-state file that the generation records
        if self.ranks is None:
            return self.store.save(self.weights, weight_version=weight_version, optimizer_state=self.opt_path)
        return self.ranks.commit(self.store, self.weights, weight_version, self.opt_path)

    def checkpoint(self) -> Reply:
        """/checkpoint, and the periodic one (``run_pending``): between two steps, possibly of a job (then
        marked as taken in its middle: ``_mark_mid_job``)."""
        t0 = time.perf_counter()
        r = self._commit()
        with self.lock:
            info = self.jobs.get(self.current) if self.current is not None else None
        if r["written"] and info is not None and info["step"] > 0:
            self._mark_mid_job(r["generation"], info)
        head = self.generations[-1]
        return Reply(
            200,
            {
                "generation": r["generation"],
                "written": r["written"],
                "bytes": r["bytes"],
                "changed": r["changed"],
                "seconds": round(time.perf_counter() - t0, 3),
                "weight_version": head["weight_version"],
                # Where the save's time went (docs/checkpoint.md, "What a save reports"): its phases, and what the
                # encoder's threads and the process used.
                **{k: r.get(k) for k in ("diff_seconds", "encode_seconds", "write_seconds", "usage")},
            },
        )

    def rollback(self, generation: int) -> Reply:
        """Generation ``generation`` into the live weights, its optimizer state (or a fresh one when it has
        none) into the optimizer, a new weight version, and all of it committed as a new generation so
        that a restart serves the rolled-back weights too."""
        t0 = time.perf_counter()
        gen = next(g for g in self.generations if g["generation"] == generation)

        def reply(head: int, written: bool) -> Reply:
            return Reply(
                200,
                {
                    "rolled_back_to": generation,
                    "restored_weight_version": gen["weight_version"],
                    "optimizer": "restored" if self._generation_state(gen) else "reset",
                    "generation": head,
                    "written": written,
                    "weight_version": self.weight_version,
                    "seconds": round(time.perf_counter() - t0, 3),
                },
            )

        if generation == self.live_generation:
            # The live weights and optimizer state are the generation's already (rolled back to it, no step
            # since): nothing to write, and no new version, which would name the same weights twice (/metrics
            # counted it not yet durable).
            return reply(self.generations[-1]["generation"], False)
        files = self._generation_state(gen)
        if files:  # checked before anything changes: a state that cannot load fails the rollback with nothing
            # changed, not even a version reserved (rank 0's part; each rank checks its own in rollback_rank)
            self.opt.check_state(self._rank_state(files), names=self.names)
        if self.ranks is not None:
            self.ranks.lead("rollback", generation)
        try:
            # The version the rolled-back weights get is reserved once every rank's check passed, before any
            # write (rank 0 keeps the versions): a refused rollback reserves none.
            self.rollback_rank(generation, reserve=lambda: self.reserve(self.weight_version + 1))
        except RollbackRefused:
            raise  # a rank's check failed: nothing was written anywhere, the weights keep their version
        except Exception:
            # Some weights may be generation's now (a write that failed after every check passed: a read
            # error in the middle, a rank lost): a new version, so that no number names two states of the
            # weights (the vLLM plugin resets its prefix cache on a new one).
            with self.lock:
                self._new_version()
            raise
        steps = self._optimizer_steps()
        with self.lock:
            self._new_version()
            self.opt_steps = steps
            self.live_generation = generation
        r = self._commit()
        return reply(r["generation"], r["written"])

    def rollback_rank(self, generation: int, reserve=None) -> None:
        """This rank's part of ``rollback``: its weights (or regions) and optimizer state of ``generation``.
        Every rank first checks all it will read (``CheckpointStore.check_restore``: the deltas on the way, the
        optimizer-state files it loads, by size and hash; ``check_state``: that state against this rank's
        optimizer as it is configured, each parameter's algorithm, rank and part), and no rank writes before
        every rank's check passed (``RollbackRefused``: nothing changed anywhere). Then ``reserve`` (rank 0's:
        the new weight version recorded) runs, every rank waiting for it; its failure refuses the rollback too. A failure while writing after that is
        ``RollbackIncomplete``, naming the ranks whose writes failed (they hold a mix of the generation's
        weights and their previous ones) and those that completed (they hold the generation's)."""

        def state_files() -> list[str] | None:
            # Inside the collectives: a rank whose store lists no such generation fails them on every rank.
            return self._generation_state(next(g for g in self.store.list() if g["generation"] == generation))

        def check():
            self.store.check_restore(generation, self.weights)
            files = state_files()
            if files:
                self.opt.check_state(self._rank_state(files), names=self.names)

        def restore():
            files = state_files()
            self.store.restore(generation, self.weights)
            self.opt.reset_state()
            if files:
                self._load_state(files)

        lost = (RankFailure, torch.distributed.DistError)  # the group broke: trainer.ranks reports it
        try:
            self._together("rollback check", check)
        except lost:
            raise
        except Exception as e:
            raise RollbackRefused(f"rollback to generation {generation} refused, nothing written: {e}") from e
        try:
            self._together("rollback's version", reserve or (lambda: None))
        except lost:
            raise
        except Exception as e:
            raise RollbackRefused(f"rollback to generation {generation} refused, nothing written: {e}") from e
        try:
            self._together("rollback", restore)
        except lost:
            raise
        except Exception as e:
            size = 1 if self.ranks is None else self.ranks.size
            failed = e.ranks if isinstance(e, RanksFailed) else [0]  # under TP together raises RanksFailed
            done = [r for r in range(size) if r not in failed]
            where = "" if self.ranks is None else f" on rank{'s' if len(failed) > 1 else ''} {_join(failed)}"
            held = (
                f"; rank{'s' if len(done) > 1 else ''} {_join(done)} hold{'' if len(done) > 1 else 's'} "
                f"generation {generation}'s weights and optimizer state"
                if done
                else ""
            )
            raise RollbackIncomplete(
                f"rollback to generation {generation} failed while writing{where}, after every check had passed: "
                f"{e}. The weights{' there' if where else ''} are partly generation {generation}'s and partly as "
                f"before (optimizer state reset or partly loaded){held}; they are served as a new weight version: "
                "roll back again"
            ) from e

    def _together(self, what: str, fn, *args):
        """``fn`` on this rank; under tensor parallelism, an error on any rank is raised on every rank."""
        return fn(*args) if self.ranks is None else self.ranks.together(what, fn, *args)

    # ---- generations saved in the middle of a job ----
    VERDICT_PENDING = "pending"  # a guarded job's generation before the guard's verdict

    def _read_mid_job(self) -> dict[int, dict]:
        """generations.json (rank 0), the generations the store still holds; a verdict still pending was
        never given: the trainer stopped (or died) before it."""
        if (self.ranks is not None and self.ranks.rank != 0) or not os.path.exists(self.mid_job_path):
            return {}
        try:  # informational: a file that cannot be read (edited by hand, say) loses its marks, never the start
            with open(self.mid_job_path) as f:
                marks = {int(g): m for g, m in json.load(f).items()}
            if not all(isinstance(m, dict) and "verdict" in m for m in marks.values()):
                raise ValueError("a mark without a verdict")
        except (OSError, ValueError, AttributeError) as e:
            print(f"livetrain trainer: {self.mid_job_path} not read ({type(e).__name__}: {e}): no marks", flush=True)
            return {}
        held = {g["generation"] for g in self.generations}
        for m in marks.values():
            if m["verdict"] == self.VERDICT_PENDING:
                m["verdict"] = "none: the trainer stopped before the job's verdict"
        return {g: m for g, m in marks.items() if g in held}

    def _write_mid_job(self) -> None:
        """generations.json (rank 0). It only informs (/checkpoints keeps the marks in memory): a write that
        fails (a full disk) is logged, never raised, which would end the training thread in a job's end
        (run_job's finally: no log line, no save) or make a committed checkpoint a 500."""
        if self.ranks is not None and self.ranks.rank != 0:
            return
        held = {g["generation"] for g in self.generations}
        with self.lock:  # the marks of generations the store no longer holds go (in memory too: bounded)
            self.mid_job = {g: m for g, m in self.mid_job.items() if g in held}
            marks = {str(g): m for g, m in self.mid_job.items()}
        try:
            _core.write_file_atomic(self.mid_job_path, json.dumps(marks).encode())
        except (OSError, _core.Error) as e:
            print(f"livetrain trainer: writing {self.mid_job_path} failed: {type(e).__name__}: {e}", flush=True)

    def _mark_mid_job(self, generation: int, info: dict) -> None:
        """Generation ``generation`` holds the weights of a job in the middle of it (``info``'s steps so far):
        /checkpoints says so, and for a guarded job that the guard has not judged them (``verdict``: pending,
        then the job's verdict: ``_judge_mid_job``)."""
        guarded = bool(info["plan"].get("guard"))
        with self.lock:
            self.mid_job[generation] = {
                "job": info["id"],
                "step": info["step"],
                "guarded": guarded,
                "verdict": self.VERDICT_PENDING if guarded else None,
            }
        self._write_mid_job()

    def _judge_mid_job(self, jid: str, verdict: str) -> None:
        """The verdict of guarded job ``jid`` on the generations saved in its middle: "kept" (the guard passed
        it), "rolled back" (the weights went back to the job's start), or "none: ..." (it was never judged)."""
        with self.lock:
            marks = [m for m in self.mid_job.values() if m["job"] == jid and m["verdict"] == self.VERDICT_PENDING]
            for m in marks:
                m["verdict"] = verdict
        if marks:
            self._write_mid_job()

    def _generation_state(self, gen: dict) -> list[str] | None:
        """The optimizer-state files a generation records, one per rank that wrote it (None: it has none)."""
        parts = gen.get("parts")
        files = [p.get("optimizer_state") for p in parts] if parts else [gen.get("optimizer_state")]
        if not files or not all(files):
            return None
        return [os.path.join(self.store.dir, f) for f in files]

    def _state_files(self, size: int) -> list[str]:
        """The optimizer-state files a save at tensor-parallel size ``size`` writes in the state dir."""
        if size == 1:
            return ["optimizer.safetensors"]
        return [f"optimizer.rank-{r}-of-{size}.safetensors" for r in range(size)]

    def _rank_state(self, files: list[str]) -> str | list[str]:
        """What of an optimizer state's files this rank loads: its own (or the one file of a TP-1 save), or
        (saved at another tensor-parallel size) all of them, each parameter's state assembled from every
        rank's file and cut to this rank's part."""
        if len(files) == 1:
            return files[0]
        return files[self.ranks.rank] if self.ranks is not None and len(files) == self.ranks.size else files

    def _load_state(self, files: list[str]) -> None:
        """The optimizer state from its files (``_rank_state``)."""
        self.opt.load_state(self._rank_state(files), names=self.names)

    def _new_version(self) -> None:
        """The weights changed (the caller holds ``lock``): a new version, its time, and the waiting
        ``version`` requests woken."""
        self.weight_version += 1
        self.live_generation = None
        self.made_at[self.weight_version] = time.monotonic()
        while len(self.made_at) > 64:
            self.made_at.popitem(last=False)
        self.version_changed.notify_all()

    def _optimizer_steps(self) -> int:
        """Steps of the most-stepped parameter (synchronizes with the device)."""
        return max((int(st["step"].item()) for st in self.opt.state.values() if "step" in st), default=0)

    # ---- training ----
    def _batch(self, examples):
        width = max(len(ids) for ids, _, _ in examples)
        ids = torch.full((len(examples), width), self.pad, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        attn = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (t, m, _) in enumerate(examples):
            ids[i, : len(t)] = torch.tensor(t)
            attn[i, : len(t)] = 1
            labels[i, : len(t)] = torch.where(torch.tensor(m), torch.tensor(t), -100)
        weights = torch.tensor([w for _, _, w in examples], dtype=torch.float32)
        return ids.to(self.device), attn.to(self.device), labels.to(self.device), weights.to(self.device)

    def step(self, examples, anchor=None, separate_anchor: bool | None = None) -> tuple[float, int, list[float]]:
        """One forward/backward over a batch (and the anchor's rows: ``loss``); the optimizer steps each
        parameter from its hook during backward (batched: see __init__'s attach_hooks). Returns the loss (without the anchor's term), the batch's
        tokens and each example's loss (unweighted).

        ``NonFinite`` when the loss is not finite (nothing was stepped: backward does not run), or when
        some parameter's gradient or update was (the others were stepped: ``applied``)."""
        # The output projection's vocabulary-sized gradient is made after backward, once the layers'
        # activations are gone, and stepped at once (OutputGradient): it never coexists with them.
        later = OutputGradient(vocab=self.vocab)
        loss, value, ntok, per_example = self.loss(examples, anchor, later, separate_anchor)
        if not math.isfinite(value):
            # Before backward: the hooks step parameters one by one as gradients appear, so a step that
            # starts cannot be taken back. A non-finite loss never starts one.
            raise NonFinite(f"the loss is {value}", applied=False, parameters=[])
        statuses = [st["status"] for st in self.opt.state.values() if "status" in st]
        if statuses:
            torch._foreach_zero_(statuses)  # each parameter's step writes its outcome there (optim.Status)
        self._released = False
        try:
            loss.backward()
        except BaseException:
            # Gradients that waited for a batched step, or that a failing hook left, from a pass that did not end:
            # the next pass would add its own to them.
            self.opt.drop_ready()
            self.opt.zero_grad(set_to_none=True)
            raise
        # Once the embeddings' gradient has been made and freed, the projection's (the same size) takes
        # its place: release only when that did not happen (embeddings tied or frozen).
        if later.active and self.release_cached and not self._released:
            self._release()
        later.apply(self.opt.step_now)  # a batch of one with --step-batch-mib (APOLLO-Mini's batched kernels)
        if self.ranks is not None:
            self.ranks.end_step()
        self._check_step()
        return value, ntok, per_example.tolist()

    def loss(self, examples, anchor=None, later=None, separate_anchor: bool | None = None):
        """A step's loss before backward: per example, the mean cross-entropy over its trained tokens, times
        its weight, averaged; plus, with ``anchor`` = (guard.Reference, indices, beta), beta × the mean KL
        divergence from the reference's distributions on those of its examples. Returns (the loss tensor,
        its value without the anchor's term, the batch's tokens, each example's loss, unweighted).

        The anchor's rows join the batch's forward (one forward over both, padded to the longer, and so one
        backward), when the model has a plain linear output layer; else they have a forward of their own in
        the same backward. ``separate_anchor``: None chooses (on CPU, two forwards when one would compute more
        than 10% more tokens in padding: ``padding_waste``), True / False force two / one (what
        bench/learning_step.py compares).
        ``later``: see ``step``; when it defers the output projection's gradient (``later.active``), that
        gradient comes from the examples' loss alone (its deferred step runs once, after backward)."""
        n = len(examples)
        head = output_projection(self.model) if anchor is not None and separate_anchor is not True else None
        anchor_rows = anchor[0].rows(anchor[1]) if head is not None else []
        if (
            separate_anchor is None
            and anchor_rows
            and self.device.type == "cpu"
            and padding_waste(examples, anchor_rows) > 0.1
        ):
            # A CPU step costs about its tokens, padding included: one forward padded to the longer rows cost
            # 1.50x a step without the anchor where two forwards cost 1.24x (bench/learning_step.py, 33% more
            # tokens). A GPU step at these sizes costs its kernel launches: one forward there.
            head, anchor_rows = None, []
        rows = examples + anchor_rows
        ids, attn, labels, weights = self._batch(rows)
        width = max(len(t) for t, _, _ in examples)  # the examples' own width: the same loss as without the anchor
        hidden = None
        if head is not None:
            hidden = self.model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        # Chunked over the vocabulary when the output layer allows: no full logits (livetrain/loss.py).
        per_example = torch.empty(n, dtype=torch.float32, device=self.device)
        loss = causal_lm_loss(
            self.model,
            ids[:n, :width],
            attn[:n, :width],
            labels[:n, :width],
            weights[:n],
            later=later,
            vocab=self.vocab,
            per_example=per_example,
            hidden=None if hidden is None else hidden[:n, :width],
        )
        value = float(loss.detach())  # the same on every rank: the vocabulary-parallel loss is gathered
        if anchor is not None:
            reference, indices, beta = anchor
            detach = later is not None and later.active
            if hidden is not None:
                term = reference.anchor_hidden(hidden[n:], indices, head, detach_head=detach)
            else:
                term = reference.anchor(self.model, indices, detach_head=detach)
            kl = float(term.detach())
            if not math.isfinite(kl):
                raise NonFinite(f"the retention anchor's KL divergence is {kl}", applied=False, parameters=[])
            loss = loss + beta * term
        return loss, value, int(attn[:n].sum()), per_example

    def _check_step(self) -> None:
        """``NonFinite`` when a parameter's step of this batch met a non-finite gradient or update (one read
        of every status: one synchronization)."""
        entries = [(p, st) for p, st in self.opt.state.items() if "status" in st]
        codes = torch.cat([st["status"] for _, st in entries]).tolist() if entries else []
        bad = [self.names.get(p, "?") for (p, _), c in zip(entries, codes) if c != 0]
        if bad:
            applied = len(bad) < len(entries) or any(c == 2 for c in codes)  # 2: optim.STATUS_NONFINITE_UPDATE
            raise NonFinite(
                f"non-finite gradient or update in {len(bad)} of {len(entries)} parameters ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''})",
                applied=applied,
                parameters=bad,
            )

    def train_step(self, examples, lr: float, anchor=None) -> tuple[float, int, list[float]]:
        """A training step at ``lr`` (every rank, at once, under tensor parallelism); ``anchor``: see step."""
        self.live_generation = None  # a step that fails may have changed weights (half applied) with no new version
        for group in self.opt.param_groups:
            group["lr"] = lr
        return self.step(examples, anchor) if anchor is not None else self.step(examples)

    def _embeddings_forward(self, _module, _inputs, out) -> None:
        # A hook on the gradient of the embeddings' output runs just before their own gradient is made.
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._before_embeddings_gradient)

    def _before_embeddings_gradient(self, _grad) -> None:
        self._released = True
        self._release()

    def _release(self) -> None:
        """Give the allocator's free pages back before a vocabulary-sized gradient (see release_cached)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_job(self, jid: str, job: dict) -> None:
        """Runs a job (trainer.schedule): its steps until it has learned its examples, its budget, or a
        cancel; the guard around it (trainer.guard); what /train/status reports of it."""
        plan: schedule.Plan = job["plan"]
        examples = job["examples"]
        with self.lock:
            info = self.jobs[jid]
            if info["state"] != "queued":  # cancelled while it waited
                return
            info["state"], info["started"], self.current = "running", time.time(), jid
        t_job = time.perf_counter()
        reason, state, undo, restored = None, "done", None, False
        frozen: list = []

        def given_up() -> bool:
            """A cancel or a shutdown: what ends the guard's measures and the rewording before the first step
            (each waits for one forward or one new token at most, as between jobs)."""
            return self.stopping.is_set() or bool(info.get("cancel"))

        try:
            undo = self._undo_point() if plan.guard else None
            # What the job trains (plan.train): the rest is frozen for the job's steps alone (no gradient, no
            # update, the optimizer's state of it untouched).
            trained = self.trained_parameters(plan.train)
            keep = {id(p) for p in trained}
            frozen = [p for p in self.names if p.requires_grad and id(p) not in keep]
            for p in frozen:
                p.requires_grad_(False)
            with self.lock:
                info["trains"] = {
                    "train": plan.train,
                    "tensors": len(trained),
                    "parameters": sum(p.numel() for p in trained),
                }
            # First the rewordings (they join the job's rows), then the replayed rows cut to their share of
            # the step budget with every row known (trainer.admission), before the anchor's reference
            # distributions are taken on them.
            if plan.reword:
                examples = examples + self._reword(info, job["raw"], examples, given_up)
            width = (
                admission.replay_width(self.max_batch_tokens, min(plan.batch_size, len(examples)), plan.replay)
                if plan.replay
                else None
            )
            watch = self._guard_start(plan, width, given_up) if plan.guard or plan.replay else None
            if watch is not None:
                with self.lock:
                    info["guard"] = watch["report"]
            # The restated answers (trainer.augment.restated, after the job's own examples) are trained but not
            # waited for: their first tokens have no context to be predicted from.
            aside = range(job["examples_own"], job["examples_own"] + job["restated"])
            losses = schedule.Losses(len(examples), aside)
            # Which replayed rows join each step: in the batch (one-hot), or as the anchor's rows (the same
            # rows: indices into its reference).
            replayed, anchor = None, None
            if watch and plan.replay and watch["replay"]:
                replayed = schedule.Replayed([_prompt(r) for r in watch["replay"]], plan.replay_select)
                anchor = watch["anchor"]
            order = schedule.batches(len(examples), plan.batch_size)
            for s in range(plan.budget):
                self.run_pending()
                if self.stopping.is_set():
                    reason = "shutdown"
                    break
                if info.get("cancel"):
                    reason = "cancelled"
                    break
                idx = next(order)
                picked = replayed.pick(plan.replay, [_prompt(examples[i]) for i in idx]) if replayed else []
                batch = [examples[i] for i in idx]
                if anchor is None:
                    batch += [watch["replay"][j] for j in picked]
                lr = plan.lr_at(s)
                self.reserve(self.weight_version + 1)  # before the step writes the weights
                t0 = time.perf_counter()
                try:
                    if self.ranks is not None:
                        self.ranks.lead("step", batch, lr)
                    step_anchor = (anchor, picked, plan.anchor) if anchor is not None and picked else None
                    loss, ntok, per_example = self.train_step(batch, lr, step_anchor)
                except NonFinite as e:
                    reason, state = "nonfinite", "failed"
                    restored = self._nonfinite_stop(info, e, undo, watch)
                    break
                dt = time.perf_counter() - t0
                losses.record(idx, per_example[: len(idx)])
                summary = losses.summary(plan.until_loss)
                with self.lock:
                    self._new_version()
                    self.opt_steps += 1
                    self.counts["steps"] += 1
                    self.counts["tokens"] += ntok
                    info["step"], info["loss"] = s + 1, loss
                    info["loss_before"], info["loss_after"], info["losses"] = (
                        summary["before"],
                        summary["after"],
                        summary,
                    )
                    self.losses.append({"version": self.weight_version, "job": jid, "loss": loss})
                    self.tokens_per_s = ntok / dt if dt > 0 else 0.0
                print(
                    f"livetrain trainer: {jid} step {s + 1}/{plan.budget} loss {loss:.4f} (examples: mean "
                    f"{summary['after']:.4f}, max {summary['max_after']:.4f}"
                    + (
                        f", {summary['below']}/{summary['counted']} below {plan.until_loss:g}"
                        if plan.until_loss
                        else ""
                    )
                    + f") lr {lr:.2e} {ntok / dt if dt > 0 else 0:.0f} tok/s {dt:.2f} s "
                    f"weight version {self.weight_version}",
                    flush=True,
                )
                if losses.learned(plan.until_loss):
                    reason = "until_loss"
                    break
            else:
                reason = "steps" if plan.steps is not None else "max_steps"
            if reason == "cancelled":
                state = "cancelled"
            # After a non-finite stop too: the steps before it may have done the damage (a huge lr).
            if watch is not None and plan.guard and info["step"] > 0 and reason != "shutdown" and not restored:
                state = self._guard_end(jid, info, watch, undo, state)
        except guard.Interrupted:  # before the first step: nothing trained
            reason = "shutdown" if self.stopping.is_set() else "cancelled"
            state = "cancelled" if reason == "cancelled" else state
        except Exception as e:
            reason, state = "error", "failed"
            message = f"{type(e).__name__}: {e}"
            if self.ranks is not None:
                message = str(self.ranks.fail(e))  # a step failed on a rank: the group cannot go on (trainer.ranks)
            with self.lock:
                info["error"] = message
        finally:
            for p in frozen:
                p.requires_grad_(True)
            report = info.get("guard") if plan.guard else None
            with self.lock:
                if reason == "shutdown":
                    state, info["error"] = "failed", "stopped by shutdown"
                    if report is not None and info["step"] > 0 and report["passed"] is None:
                        # The guard's measures need the model, which the shutdown stops: no verdict, the
                        # weights keep the job's steps unjudged (a restart serves them once checkpointed).
                        undone = f"generation {undo['generation']}" if undo else None
                        report["rollback"] = "not judged: stopped by shutdown before the guard's verdict"
                        info["error"] = (
                            f"stopped by shutdown after {info['step']} steps, before the guard's verdict: the "
                            "weights keep the job's steps, not judged"
                            + (
                                f" ({undone} holds them as before the job: /rollback to it undoes the job)"
                                if undone
                                else ""
                            )
                        )
                info["state"], info["stop_reason"] = state, reason or "error"
                info["finished"], info["seconds"] = time.time(), round(time.perf_counter() - t_job, 3)
                info["skipped_nonfinite"] = info.get("skipped_nonfinite", [])
                self.current = None
            if plan.guard:
                passed = report.get("passed") if report else None
                rolled = bool(report and report.get("rolled_back"))
                self._judge_mid_job(
                    jid,
                    "rolled back"
                    if rolled
                    else "kept"
                    if passed
                    else f"none: {info.get('error') or schedule.STOP_REASONS.get(reason, 'no verdict')}",
                )
            why = (
                info["error"]
                if reason in ("error", "shutdown") and info.get("error")
                else schedule.STOP_REASONS.get(reason, "")
            )
            print(
                f"livetrain trainer: {jid} {state} after {info['step']} steps ({reason}: "
                f"{why}); examples' loss {info['loss_before']} -> "
                f"{info['loss_after']}; {info['seconds']} s",
                flush=True,
            )
            self.save()

    def trained_parameters(self, train: str) -> list:
        """The parameters a job of ``train`` (options.TRAIN) trains, of those the trainer trains at all
        (``--embeddings frozen`` leaves out the embeddings and output projection): "all"; "layers", all but
        the input embeddings and the output projection; "mlp", the parameters of the layers' MLPs alone (the
        ``mlp`` modules of the transformers model: their gate, up and down projections, or their experts)."""
        live = [p for p in self.names if p.requires_grad]
        if train == "all":
            return live
        if train not in options.TRAIN:
            raise ValueError(f"train must be one of {', '.join(options.TRAIN)}, not {train!r}")
        tables = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        out = self.model.get_output_embeddings()
        if out is not None:
            tables.add(id(out.weight))
        if train == "layers":
            return [p for p in live if id(p) not in tables]
        return [p for p in live if id(p) not in tables and ".mlp." in f".{self.names[p]}"]

    def _reword(self, info: dict, raw: list, examples: list, interrupt=None) -> list:
        """The job's examples with their questions reworded by the model (trainer.augment), at most as long
        as its longest example (its batches were fitted to the token budget at submit)."""
        t0 = time.perf_counter()
        longest = max(len(ids) for ids, _, _ in examples)
        extra, texts = augment.reworded(
            self.model, self.tokenizer, raw, self.pad, min(self.max_len, longest), interrupt=interrupt, **self.greedy
        )
        with self.lock:
            info["examples"] = len(examples) + len(extra)
            info["reworded"] = {
                "examples": len(extra),
                "questions": texts,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        return extra

    def _undo_point(self) -> dict | None:
        """The store's generation that holds the weights as they are before a guarded job (saved now when
        the weights changed since the head; the store writes only what changed): what a guard rollback or
        a half-applied step goes back to. None without a store."""
        if self.store is None:
            return None
        if self.weight_version != self.saved_version:
            self._commit()
        return self.generations[-1]

    def _guard_start(self, plan: schedule.Plan, replay_width: int | None = None, interrupt=None) -> dict:
        """Before a guarded job (or one that replays): the retention answers on the live weights, the replay
        and held-out examples, the starting model's next-token distributions on the held-out answers (the
        guard's KL) and, with an anchor, on the replayed ones (guard.Reference), and the held-out answers'
        first tokens (``_prepare``: made once per weight version, most often between jobs already).
        ``interrupt``: asked as ``_prepare`` asks it at a job's start."""
        t0 = time.perf_counter()
        anchored = plan.anchor > 0 and plan.replay
        p, made = self._prepare(
            idle=False,
            guarded=plan.guard,
            anchor=(replay_width, plan.replay) if anchored else None,
            interrupt=interrupt,
        )
        key = self._anchor_key(replay_width, plan.replay) if anchored else None  # the retention answers are fresh now
        replay = p["anchors"][key][0] if key is not None else self._fit(self.retention.replay(), replay_width)
        held_out = p["held_out"] if plan.guard else self._fit(self.retention.held_out())
        reference = p["reference"] if plan.guard else None
        # The held-out answers' first tokens were made exactly as they are made again after the job (the
        # same prompts in the same batches): batched greedy decoding is not bit-stable across batch shapes,
        # and a near-tie that flips for that reason alone is not forgetting.
        kept_before = p["kept"] if reference is not None else None
        anchor = p["anchors"][key][1] if key is not None and replay else None
        report = {
            "kl": None,
            "threshold": self.settings.guard_threshold,
            "answers_kept": None,
            "answers_compared": None,
            "answers_kept_when": None,
            "min_kept": self.settings.guard_min_kept,
            "passed": None,
            "rolled_back": False,
            "rollback": None,
            "replayed_prompts": len(replay) if plan.replay else 0,
            "anchor": plan.anchor if anchor is not None else 0.0,
            "replay_select": plan.replay_select,
            "held_out_prompts": len(held_out),
            "answers_made": "answers" in made,
            # Where the measures of the starting weights were made: between jobs (off the job's path) or at
            # its start (on it), and their seconds in each place.
            "prepared": {
                "weight_version": p["version"],
                "at_job_start": made,
                "seconds_idle": round(p["idle_s"], 3),
                "seconds_at_job_start": round(time.perf_counter() - t0, 3),
            },
            "seconds": round(time.perf_counter() - t0, 3),  # the guard's time on the job's path
        }
        return {
            "replay": replay,
            "anchor": anchor,
            "reference": reference,
            "kept_before": kept_before,
            "prepared": p,
            "report": report,
        }

    def _prepare(
        self, idle: bool, guarded: bool = True, anchor: tuple | None = None, interrupt=None
    ) -> tuple[dict, list[str]]:
        """The guard's measures of the live weights, each made once per weight version and kept until the
        weights (or the retention prompts) change: the held-out answers' first guard.KEPT_TOKENS tokens
        (``kept``), the retention answers (``Retention.refresh``), the held-out examples' reference
        distributions (``reference``), and the replayed ones' for an anchor of ``anchor`` = (replay width,
        rows per step) (``anchors``). ``guarded``: the first and the third too. ``idle``: between jobs,
        one missing measure per call (the training thread looks at its queue and requests between them).
        Returns the entry and the names of the measures made by this call."""
        p = self._entry()
        todo = []
        if guarded and p["kept"] is None:
            todo.append("kept")  # first: it is also the answers kept after the previous job (kept_pending)
        if self.retention.version != self.weight_version or len(self.retention.answers) != len(self.retention.prompts):
            todo.append("answers")
        if guarded and p["held_out"] is None:
            todo.append("reference")
        if anchor is not None and ("answers" in todo or self._anchor_key(*anchor) not in p["anchors"]):
            todo.append("anchor")
        made = []
        # Between jobs, each measure is given up (guard.Interrupted) as soon as a job or a request arrives:
        # they wait for one new token or one forward at most, not for a whole measure.
        # At a job's start, ``interrupt`` (the job's cancel or a shutdown) gives them up the same way.
        interrupt = self._arrived if idle else interrupt
        for what in todo[:1] if idle else todo:
            t0 = time.perf_counter()
            where = "between jobs" if idle else "at the job's start"
            self.making = {"what": what, "where": where, "since": time.time()}
            print(f"livetrain trainer: guard: making {self._measure_text(what)} {where}", file=sys.stderr, flush=True)
            try:
                if what == "kept":
                    p["kept"] = self._kept_answers(interrupt)
                    self._kept_measured(p["kept"])
                elif what == "answers":
                    self.retention.refresh(
                        self.model, self.weight_version, self.pad, interrupt=interrupt, **self.greedy
                    )
                elif what == "reference":
                    held_out = self._fit(self.retention.held_out())
                    # Its forwards within the step budget.
                    ref = (
                        guard.Reference(
                            self.model, held_out, self.pad, max_tokens=self.max_batch_tokens, interrupt=interrupt
                        )
                        if held_out
                        else None
                    )
                    p["held_out"], p["reference"] = held_out, ref
                else:  # measured in the steps' own shape: ``rows`` rows per forward
                    width, rows = key = self._anchor_key(*anchor)
                    replay = self._fit(self.retention.replay(), width)
                    p["anchors"][key] = (
                        replay,
                        guard.Reference(self.model, replay, self.pad, batch=rows, interrupt=interrupt)
                        if replay
                        else None,
                    )
            finally:
                self.making = None
            p["idle_s" if idle else "job_s"] += time.perf_counter() - t0
            print(
                f"livetrain trainer: guard: {what} made in {time.perf_counter() - t0:.1f} s {where}",
                file=sys.stderr,
                flush=True,
            )
            made.append(what)
        return p, made

    def _measure_text(self, what: str) -> str:
        """One of ``_prepare``'s measures in words, for the log."""
        return {
            "kept": f"the held-out answers' first tokens ({len(self.retention.held_out_prompts())} prompts)",
            "answers": f"the model's answers to the retention prompts ({len(self.retention.prompts)})",
            "reference": "the held-out answers' reference distributions",
            "anchor": "the replayed answers' reference distributions (the anchor)",
        }[what]

    def _arrived(self) -> bool:
        """A job queued, a request waiting for the training thread, or a shutdown: what ends a measure made
        between jobs."""
        return not self.queue.empty() or bool(self.pending) or self.stopping.is_set()

    def _entry(self) -> dict:
        """``prepared`` for the live weights: a fresh entry when they changed since it was made."""
        p = self.prepared
        if p is None or p["version"] != self.weight_version:
            if self.kept_pending is not None and self.kept_pending["version"] != self.weight_version:
                self._kept_not_measured("the weights changed before they were measured")
            p = self.prepared = {
                "version": self.weight_version,
                "kept": None,
                "held_out": None,
                "reference": None,
                "anchors": {},
                "idle_s": 0.0,
                "job_s": 0.0,
            }
        return p

    def _anchor_key(self, width: int | None, rows: int) -> tuple[int, int]:
        """Where ``prepared["anchors"]`` keeps the anchor's measure of the replayed rows cut to ``width``
        tokens, ``rows`` per forward: under the width that binds (``_fit`` gives the same rows for every width
        at least as long as the longest replayed row), so that the measure made between jobs for the default
        plan serves a job of fewer examples, whose replay rows get a wider share of the step budget."""
        longest = max((len(ids) for ids, _, _ in self.retention.replay()), default=0)
        return min(width or self.max_len, self.max_len, longest), rows

    def prepares_idle(self) -> bool:
        """Whether the training thread makes the guard's measures between jobs (``_idle``): the guard on with
        --guard-prepare idle, not under tensor parallelism (where the guard is off), and those measures not
        failed at this weight version (bench/serve.py waits on it for a trainer with nothing left to make)."""
        s = self.settings
        return not (
            s.no_guard
            or s.guard_prepare != "idle"
            or self.ranks is not None
            or self.prepare_failed == self.weight_version
        )

    def between_jobs(self) -> str:
        """What the training thread has left to make between jobs (/train/status guard.between_jobs): "off"
        (it makes nothing then: prepares_idle), "failed" (its measures failed at the live weights; a guarded
        job's start makes them again), "done" (every measure a default job needs is made for the live weights
        and retention prompts: until a job or a new retention set, the trainer leaves the GPU to the engine),
        or "making" (some are still to make, or being made)."""
        if not self.prepares_idle():
            return "failed" if self.prepare_failed == self.weight_version else "off"
        done = self.prepared_all == (self.weight_version, self.retention.version) and self.making is None
        return "done" if done else "making"

    def _idle(self) -> None:
        """The training thread with nothing queued: the next missing measure of ``_prepare`` for a job with
        the default plan (see prepares_idle)."""
        if not self.prepares_idle():
            return
        s = self.settings
        anchor = None
        if s.anchor > 0 and s.replay:
            anchor = (admission.replay_width(self.max_batch_tokens, s.batch_size, s.replay), s.replay)
        try:
            at = (self.weight_version, self.retention.version)
            _, made = self._prepare(idle=True, anchor=anchor)
            self.prepared_all = None if made else at
        except guard.Interrupted:
            pass  # made again at the next idle moment, or by the job's start
        except Exception as e:  # a job's start makes it again, and fails there with the reason
            self.prepare_failed = self.weight_version
            print(f"livetrain trainer: the guard's measures between jobs failed: {self._failed(e)}", flush=True)

    def _kept_report(self, report: dict, before: list, after: list, when: str) -> None:
        """The answers kept (``after`` against ``before``) into a guard ``report``, and when they were measured."""
        same = guard.kept(before, after)
        report["answers_kept"], report["answers_compared"] = sum(same), len(same)
        # The same count over shorter beginnings: how much of the change is in the wording further on.
        report["answers_kept_at"] = {str(k): sum(guard.kept(before, after, k)) for k in (4, 8, guard.KEPT_TOKENS)}
        report["answers_kept_when"] = when

    def _kept_measured(self, after: list) -> None:
        """The held-out answers' first tokens made at the current weight version: the answers kept of the
        last guarded job, when it ended at this version and its report waits for them."""
        pending = self.kept_pending
        if pending is None or pending["version"] != self.weight_version:
            return
        self.kept_pending = None
        report = dict(pending["info"]["guard"])
        self._kept_report(report, pending["before"], after, "after the verdict (the next idle moment or job start)")
        with self.lock:
            pending["info"]["guard"] = report

    def _kept_not_measured(self, why: str) -> None:
        if self.kept_pending is not None:
            info, self.kept_pending = self.kept_pending["info"], None
            with self.lock:
                info["guard"] = {**info["guard"], "answers_kept_when": f"not measured: {why}"}

    def _kept_answers(self, interrupt=None) -> list[list[int]]:
        """The first guard.KEPT_TOKENS tokens of the greedy answer to each held-out retention prompt."""
        prompts = [prompt_ids(self.tokenizer, p) for p in self.retention.held_out_prompts()]
        stop = guard.stop_ids(self.tokenizer, self.model)
        return guard.greedy(self.model, prompts, guard.KEPT_TOKENS, stop, self.pad, interrupt=interrupt, **self.greedy)

    def _fit(self, examples: list, limit: int | None = None) -> list:
        """Retention examples cut to the trainer's longest example, or to ``limit`` tokens (answers
        shortened; prompts that do not fit leave the set)."""
        out = []
        limit = min(self.max_len, limit or self.max_len)
        for ids, mask, w in examples:
            if len(ids) > limit:
                ids, mask = ids[:limit], mask[:limit]
            if any(mask[1:]):
                out.append((ids, mask, w))
        return out

    def _guard_end(self, jid: str, info: dict, watch: dict, undo: dict | None, state: str) -> str:
        """After a guarded job: the KL divergence on the held-out answers and the answers kept; either past
        its threshold rolls the weights back to ``undo`` (bit for bit, through the store). The answers kept
        decide nothing while --guard-min-kept is 0: for a job within the KL threshold they are then
        measured after the verdict, off the job's path (``kept_pending``). Returns the job's final state."""
        t0 = time.perf_counter()
        report = dict(watch["report"])
        if watch["reference"] is None:
            report["passed"] = True
        else:
            kl, kl_se = watch["reference"].kl_spread(self.model)
            report["kl"], report["kl_se"] = _round(kl), _round(kl_se)
            kl_ok = math.isfinite(kl) and kl <= self.settings.guard_threshold
            if not kl_ok or self.settings.guard_min_kept > 0 or self.settings.guard_prepare == "job":
                after = self._kept_answers()
                self._kept_report(report, watch["kept_before"], after, "before the verdict")
                report["passed"] = kl_ok and report["answers_kept"] >= self.settings.guard_min_kept * len(after)
                if report["passed"]:  # the next job starts from these weights: its answers are made
                    self._entry()["kept"] = after
            else:
                report["passed"] = True
                report["answers_kept_when"] = "pending: measured after the verdict, off the job's path"
                self.kept_pending = {"version": self.weight_version, "info": info, "before": watch["kept_before"]}
        if not report["passed"]:
            if undo is None:
                report["rollback"] = "not possible: the trainer has no checkpoint store (--no-store)"
            else:
                self._roll_back(undo, watch, report)
                state = "rolled_back"
        report["seconds"] = round(report["seconds"] + time.perf_counter() - t0, 3)
        with self.lock:
            info["guard"] = report
        print(
            f"livetrain trainer: {jid} guard: KL {report['kl']} nats/token (threshold {report['threshold']}), "
            f"answers kept {report['answers_kept']}/{report['answers_compared']} (at least "
            f"{report['min_kept']:.0%}): "
            + (
                "kept" if report["passed"] else "rolled back" if report["rolled_back"] else "NOT rolled back (no store)"
            ),
            flush=True,
        )
        return state

    def _roll_back(self, undo: dict, watch: dict | None, report: dict) -> int:
        """Puts the weights back to a guarded job's undo point (bit for bit, through the store) and says so
        where a user or a monitor looks, whatever the cause (the guard's verdict, a half-applied non-finite
        step): the job's guard report ``report`` (``rolled_back``, ``rollback``), /train/status
        ``guard.rollbacks`` and ``livetrain_guard_rollbacks_total``. The generation rolled back to."""
        r = self.rollback(undo["generation"]).body
        p = watch["prepared"] if watch is not None else None
        if p is not None and self.prepared is p and p["version"] == self.retention.version:
            # The weights are those the job started from, bit for bit: so are its measures of them.
            p["version"] = self.retention.version = self.weight_version
        with self.lock:
            report["rolled_back"] = True
            report["rollback"] = {k: r[k] for k in ("rolled_back_to", "generation", "weight_version", "seconds")}
            self.counts["guard_rollbacks"] += 1
        return r["rolled_back_to"]

    def _nonfinite_stop(self, info: dict, e: NonFinite, undo: dict | None, watch: dict | None) -> bool:
        """A job stopped by a non-finite loss or gradient: the weights as they were before that step. When
        the step was half applied (some parameters stepped), that means the job's undo point (its guard
        report then says ``rolled_back`` as after the guard's verdict; ``passed`` stays null: the guard did
        not judge). True when the weights were rolled back to it."""
        restored = None
        if e.applied and undo is not None:
            # A guarded job's undo point: its guard report exists (info["guard"] is watch["report"]).
            restored = self._roll_back(undo, watch, info["guard"])
        with self.lock:
            self.counts["nonfinite_stops"] += 1
            info["skipped_nonfinite"] = e.parameters
            if not e.applied:
                info["error"] = f"stopped at step {info['step'] + 1}: {e}; nothing of that step was applied"
            elif restored is not None:
                info["error"] = (
                    f"stopped at step {info['step'] + 1}: {e}; the other parameters had been stepped, so the "
                    f"weights were rolled back to generation {restored}, as they were before the job"
                )
            else:
                info["error"] = (
                    f"stopped at step {info['step'] + 1}: {e}; the other parameters of that step were applied "
                    "(the job kept no undo point: it was not guarded, or the trainer has no checkpoint store)"
                )
        return restored is not None

    def save(self) -> None:
        """Optimizer state (every rank's, under tensor parallelism) and weight version, each replaced
        crash-safely by the core (temp file, fsync, rename, fsync of the directory). After every job and at
        shutdown: a failure (a full disk, a rank that died in the middle) is logged and reported in
        /train/status (``optimizer.save_error``), never raised out of the training thread, which would end
        the trainer with the job it just finished. Once the tensor-parallel group is broken nothing is saved:
        rank 0's state alone is no state a restart could take, and beside the other ranks' older files it
        would be a mix of two saves. trainer.json stays as it is: it names the last save that every rank
        completed (consistent), or none when the group broke inside a save (``save_rank`` emptied it first)."""
        try:
            if self.ranks is not None and not self.ranks.failure:
                try:
                    self.ranks.lead("save", self.weight_version)
                    self.save_rank(self.weight_version)
                    return self._saved(None)
                except Exception as e:
                    if not self.ranks.broken(e):
                        raise
                    self.ranks.fail(e)
            if self.ranks is not None:
                raise RankFailure(
                    f"{self.ranks.failure}; no optimizer state saved (trainer.json names the last save every rank "
                    "completed, if any)"
                )
            self._save_files(self.weight_version)
            self._saved(None)
        except Exception as e:
            self._saved(f"{type(e).__name__}: {e}")
            print(f"livetrain trainer: saving the optimizer state failed: {self.save_error}", flush=True)

    def _saved(self, err: str | None) -> None:
        with self.lock:
            self.save_error = err

    def save_rank(self, weight_version: int) -> None:
        """This rank's part of ``save`` (every rank at once under tensor parallelism). trainer.json names
        the files of one save only: under tensor parallelism none while the ranks replace theirs (a save
        that fails on a rank, or a rank lost in the middle, leaves it so), every rank's once all are written.
        Rank 0 writes trainer.json inside the collective too: a failure there (a full disk) is raised on
        every rank, which then go on in step (raised on rank 0 alone, it left the others in the collectives
        that follow, and the next command hung for --tp-timeout, then broke the group)."""
        if self.ranks is None:
            self._save_files(weight_version)
            return
        self.ranks.together("save (trainer.json)", self._name_state, self.state_version, [])
        self.ranks.together("save", lambda: self.opt.save_state(self.opt_path, names=self.names))
        self.ranks.together("save (trainer.json)", self._name_state, weight_version, self._state_files(self.ranks.size))

    def _save_files(self, weight_version: int) -> None:
        self.opt.save_state(self.opt_path, names=self.names)
        self._name_state(weight_version, self._state_files(1))

    def _name_state(self, weight_version: int, files: list[str]) -> None:
        """trainer.json: the state dir's optimizer state is ``files``, saved at ``weight_version`` (unchanged:
        not rewritten; a write that fails is made again by the next save: ``_write_meta``)."""
        if (weight_version, files) != (self.state_version, self.state_files):
            self._write_meta(state_version=weight_version, state_files=files)

    def reserve(self, version: int) -> None:
        """Records durably that weight version ``version`` may be in use, before anything uses it: a trainer
        killed at any instant restarts above every version it handed out (issue #13: after a SIGKILL
        mid-job the version went from 10 back to 8). A write that fails is made again by the next
        reservation (``_write_meta``)."""
        if version > self.reserved:
            self._write_meta(reserved=version)

    def _write_meta(self, **fields) -> None:
        """trainer.json (rank 0 writes it; the other ranks keep the fields alone) with ``fields`` (of
        ``state_version``, ``state_files``, ``reserved``) set to their new values. A write that fails leaves
        them as they were: not counted as written, so that the next save or reservation writes them again."""
        before = {name: getattr(self, name) for name in fields}
        for name, value in fields.items():
            setattr(self, name, value)
        if self.ranks is not None and self.ranks.rank != 0:  # rank 0 keeps the weight version
            return
        meta = {
            "weight_version": self.state_version,
            "reserved": self.reserved,
            "engine": self.engine,
            "files": self.state_files,
        }
        try:
            _core.write_file_atomic(self.meta_path, json.dumps(meta).encode())
        except BaseException:
            for name, value in before.items():
                setattr(self, name, value)
            raise

    def run(self) -> None:
        """The training thread (rank 0): jobs from the queue and the requests between them, until stopped."""
        while not self.stopping.is_set():
            self.run_pending()
            try:
                jid, job = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self.ranks is not None:
                    self.ranks.heartbeat()
                else:
                    self._idle()
                continue
            self.run_job(jid, job)
        with self.lock:
            self.closed = True
        self.run_pending(timer=False)  # requests that arrived before the shutdown are still answered
        self.save()
        if self.ranks is not None and not self.ranks.failure:
            try:
                self.ranks.lead("stop")
            except RankFailure:  # a rank died since: nothing is left to stop (the failure is recorded)
                pass

    def close(self) -> None:
        """Releases the checkpoint store (its lock and host copy)."""
        if self.store is not None:
            self.store.close()


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 5)


def _prompt(example) -> list[int]:
    """An (ids, mask, weight) example's prompt: its tokens that carry no loss."""
    ids, mask, _ = example
    return [t for t, m in zip(ids, mask) if not m]
