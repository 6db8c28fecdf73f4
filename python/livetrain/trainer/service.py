"""The trainer: attaches to an engine's weights through its manifest, builds the Hugging Face model on
them, and runs training jobs from a queue with APOLLO-Mini steps applied per parameter from backward hooks,
so the served weights change in place. Requests arrive through ``handle`` (the socket protocol,
trainer.protocol); checkpoint and rollback requests run on the training thread between two steps, writing
to the model's checkpoint store (livetrain.checkpoint). ``python -m livetrain.trainer`` runs it as a process.
"""

from __future__ import annotations

import argparse
import collections
import itertools
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
from livetrain.loss import OutputGradient, causal_lm_loss
from livetrain.trainer import admission, options
from livetrain.trainer.examples import job_id, parse_job
from livetrain.trainer.protocol import Invalid, Reply, error, parse_body

ROLLBACK_FIELDS = {"generation"}
# The longest a ``version`` request may wait for a new version (the plugin's watcher asks again after it).
MAX_VERSION_WAIT_S = 30.0


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
    ):
        import transformers

        from livetrain import checkpoint, kernels, optim, safetensors, sharing

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
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = sharing.build_hf_model(self.attached)
        self.model.train()
        self.device = next(self.model.parameters()).device
        # What the Gated DeltaNet layers (Qwen3-Next, Qwen3.5) run: fused kernels or the slow torch path.
        for warning in kernels.prepare(self.model, self.device, backward=True):
            print(f"livetrain trainer: warning: {warning}", file=sys.stderr, flush=True)
        self.kernels = kernels.report(self.model)
        s = settings or options.parse([])
        self.grad_checkpointing = bool(
            not s.no_grad_checkpointing and getattr(self.model, "supports_gradient_checkpointing", False)
        )
        if self.grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.opt = optim.ApolloMini(optim.param_groups(self.model, embeddings=s.embeddings), lr=s.lr)
        self.names = {p: n for n, p in self.model.named_parameters()}
        # The model files' names -> the engine's memory, as the checkpoint store takes them (tied weights once;
        # a multimodal checkpoint's text model under its names in the files).
        self.weights = checkpoint.by_file_names({n: p.data for n, p in self.model.named_parameters()}, model_dir)
        # Tensors of the model files that this model does not hold (a vision tower, an MTP head): never
        # trained; the checkpoint store carries them unchanged.
        self.not_trained = sorted(set(safetensors.Model(model_dir).names()) - set(self.weights))
        self.opt.param_names = self.names
        self.opt.attach_hooks()
        self.release_cached = release_cached
        self._released = False  # in this step's backward (see step)
        embeddings_module = self.model.get_input_embeddings()
        if release_cached and embeddings_module is not None and embeddings_module.weight.requires_grad:
            embeddings_module.register_forward_hook(self._embeddings_forward)
        self.lr, self.batch_size = s.lr, s.batch_size
        self.max_batch_tokens = s.max_batch_tokens
        self.retries = admission.Retries()
        self.max_len = s.max_seq_len or int(self.attached.config.get("max_position_embeddings") or 4096)
        self.max_examples = max_examples
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        self.state_dir = s.state_dir
        os.makedirs(s.state_dir, exist_ok=True)
        self.opt_path = os.path.join(s.state_dir, "optimizer.safetensors")
        self.meta_path = os.path.join(s.state_dir, "trainer.json")
        # trainer.json: the weight version the saved optimizer state belongs to, the highest version a
        # step may have used (written before the step: versions never repeat, whatever crashes when), and
        # the engine the weights were trained on.
        saved_version, reserved, engine = None, 0, None
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                meta = json.load(f)
            saved_version = int(meta.get("weight_version", 0))
            reserved, engine = int(meta.get("reserved", 0)), meta.get("engine")
        self.engine = dict(self.attached.manifest["owner"])
        # The same engine still runs: only the trainer restarted (it died, and its launcher started it
        # again). The engine serves the weights as the last trainer left them, not the store's head, and
        # the state dir's optimizer state is the newest one of them.
        same_engine = engine == self.engine
        # The engine serves the store's head generation (it restored it before exporting), so the optimizer
        # state recorded with that generation belongs to these weights; the state dir's is newer (training
        # after the checkpoint, lost) or older, unless it was saved at the same weight version.
        self.store, head = None, None
        if not s.no_store:
            self.store = checkpoint.open_store(model_dir, s.store)
            head = self.store.list()[-1]
        self.restored_from = None
        if same_engine and os.path.exists(self.opt_path):
            self.opt.load_state(self.opt_path, names=self.names)
            self.restored_from = "state-dir"
        elif not same_engine and head is not None and head["optimizer_state"] and saved_version != head["weight_version"]:
            self.opt.load_state(os.path.join(self.store.dir, head["optimizer_state"]), names=self.names)
            self.restored_from = f"generation {head['generation']}"
        elif os.path.exists(self.opt_path):
            self.opt.load_state(self.opt_path, names=self.names)
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
        self.checkpoint_every = s.checkpoint_every
        self.last_checkpoint = time.monotonic()
        self.generations = self.store.list() if self.store else []
        self.checkpoint_error: str | None = None

        # Read by status() from the socket threads: kept here, never computed from self.opt.state, which
        # the training thread mutates.
        self.opt_steps = self._optimizer_steps()
        self.opt_bytes = self.opt.state_bytes()["total"]

        self.queue: queue.Queue = queue.Queue(maxsize=s.queue_size)
        self.lock = threading.Lock()  # guards what status() reads
        # Notified on every new weight version: what a waiting ``version`` request (the plugin) waits on.
        self.version_changed = threading.Condition(self.lock)
        # When each recent version was made (monotonic, the end of its step), and the last version an
        # engine reported serving (``served``) with the seconds from the one to the other.
        self.made_at: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.served: dict | None = None
        self.jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.current: str | None = None
        self.losses: collections.deque = collections.deque(maxlen=200)
        self.tokens_per_s = 0.0
        self.stopping = threading.Event()
        # Requests that must run between two steps (checkpoint, rollback): [function, done, reply].
        self.pending: collections.deque = collections.deque()
        self.closed = False  # set when the training thread takes no more of them

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
        if op == "submit":
            job = parse_body(body, empty_ok=False)
            key = admission.job_key(idempotency_key, job_id(job))
            return self.retries.run(key, body, lambda: self.submit(job))
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
                item[2] = error(500, f"{type(e).__name__}: {e}")
            item[1].set()
        if timer and self.checkpoint_due():
            try:
                r = self.checkpoint().body
                print(json.dumps({"checkpoint": r}), flush=True)
            except Exception as e:  # reported in /train/status; tried again after another period
                self.last_checkpoint = time.monotonic()
                with self.lock:
                    self.checkpoint_error = f"{type(e).__name__}: {e}"
                print(f"livetrain trainer: periodic checkpoint failed: {self.checkpoint_error}", flush=True)

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
        if self.stopping.is_set():
            return error(503, "the trainer is shutting down")
        n = len(parsed["examples"])
        asked = parsed.get("batch_size", self.batch_size)
        bs = admission.fit_batch(parsed["examples"], asked, "batch_size" in parsed, self.max_batch_tokens)
        steps = parsed.get("steps") or parsed.get("epochs", 1) * math.ceil(n / bs)
        jid = job_id(job) or f"job-{uuid.uuid4().hex[:12]}"
        info = {
            "id": jid,
            "state": "queued",
            "examples": n,
            "steps": steps,
            "step": 0,
            "batch_size": bs,
            "lr": parsed.get("lr", self.lr),
            "loss": None,
            "error": None,
            "submitted": time.time(),
        }
        with self.lock:
            if jid in self.jobs:
                return error(409, f"job id {jid!r} is taken by another job", "id")
            try:
                self.queue.put_nowait((jid, parsed))
            except queue.Full:
                return error(429, f"the training queue is full ({self.queue.maxsize} jobs); retry later")
            self.jobs[jid] = info
            while len(self.jobs) > 100:  # forget the oldest finished jobs
                old = next((k for k, v in self.jobs.items() if v["state"] in ("done", "failed")), None)
                if old is None:
                    break
                del self.jobs[old]
        reply = {"job_id": jid, "steps": steps, "examples": n, "queued": self.queue.qsize()}
        if bs != asked:
            reply["batch_size"] = bs
            reply["split"] = (
                f"batches of {bs} examples rather than {asked}, to stay within --max-batch-tokens "
                f"{self.max_batch_tokens} tokens per step"
            )
        return Reply(202, reply)

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
                },
                "gradient_checkpointing": self.grad_checkpointing,
                "kernels": self.kernels,
                "device": str(self.device),
                "not_trained": {
                    "tensors": self.not_trained,
                    "why": "in the model files but outside the text model this engine serves (e.g. a vision tower "
                    "or an MTP head): never trained, kept unchanged by the checkpoint store",
                },
                "checkpoint": self._checkpoint_status(),
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
        }

    # ---- the checkpoint store (on the training thread, between steps) ----
    def checkpoints(self) -> dict:
        with self.lock:
            gens = [dict(g) for g in self.generations]
        return {
            "store": self.store.dir,
            "head": gens[-1]["generation"],
            "oldest": gens[0]["generation"],
            "generations": gens,
        }

    def _commit(self) -> dict:
        """Saves the live weights as a generation with the optimizer state beside them."""
        self.save()  # the optimizer-state file that the generation records
        r = self.store.save(self.weights, weight_version=self.weight_version, optimizer_state=self.opt_path)
        gens = self.store.list()
        with self.lock:
            self.generations = gens
            self.checkpoint_error = None
        self.saved_version, self.last_checkpoint = self.weight_version, time.monotonic()
        return r

    def checkpoint(self) -> Reply:
        t0 = time.perf_counter()
        r = self._commit()
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
            },
        )

    def rollback(self, generation: int) -> Reply:
        """Generation ``generation`` into the live weights, its optimizer state (or a fresh one when it has
        none) into the optimizer, a new weight version, and all of it committed as a new generation so
        that a restart serves the rolled-back weights too."""
        t0 = time.perf_counter()
        gen = next(g for g in self.generations if g["generation"] == generation)
        self.reserve(self.weight_version + 1)  # before the weights change
        self.store.restore(generation, self.weights)
        self.opt.reset_state()
        if gen["optimizer_state"]:
            self.opt.load_state(os.path.join(self.store.dir, gen["optimizer_state"]), names=self.names)
        steps = self._optimizer_steps()
        self.reserve(self.weight_version + 1)
        with self.lock:
            self._new_version()
            self.opt_steps = steps
        r = self._commit()
        return Reply(
            200,
            {
                "rolled_back_to": generation,
                "restored_weight_version": gen["weight_version"],
                "optimizer": "restored" if gen["optimizer_state"] else "reset",
                "generation": r["generation"],
                "written": r["written"],
                "weight_version": self.weight_version,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )

    def _new_version(self) -> None:
        """The weights changed (the caller holds ``lock``): a new version, its time, and the waiting
        ``version`` requests woken."""
        self.weight_version += 1
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

    def step(self, examples) -> tuple[float, int]:
        """One forward/backward over a batch; the optimizer steps each parameter from its hook during
        backward. Loss: per example, the mean over its trained tokens, times its weight; averaged."""
        ids, attn, labels, weights = self._batch(examples)
        # Chunked over the vocabulary when the output layer allows: no full logits (livetrain/loss.py).
        # The output projection's vocabulary-sized gradient is made after backward, once the layers'
        # activations are gone, and stepped at once (OutputGradient): it never coexists with them.
        later = OutputGradient()
        loss = causal_lm_loss(self.model, ids, attn, labels, weights, later=later)
        self._released = False
        loss.backward()
        # Once the embeddings' gradient has been made and freed, the projection's (the same size) takes
        # its place: release only when that did not happen (embeddings tied or frozen).
        if later.active and self.release_cached and not self._released:
            self._release()
        later.apply(self.opt.step_param)
        return float(loss.detach()), int(attn.sum())

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
        with self.lock:
            info = self.jobs[jid]
            info["state"], self.current = "running", jid
        for group in self.opt.param_groups:
            group["lr"] = info["lr"]
        order = list(range(len(job["examples"])))
        cycle = itertools.cycle(order)
        try:
            for s in range(info["steps"]):
                self.run_pending()
                if self.stopping.is_set():
                    raise RuntimeError("stopped by shutdown")
                batch = [job["examples"][next(cycle)] for _ in range(min(info["batch_size"], len(order)))]
                self.reserve(self.weight_version + 1)  # before the step writes the weights
                t0 = time.perf_counter()
                loss, ntok = self.step(batch)
                dt = time.perf_counter() - t0
                with self.lock:
                    self._new_version()
                    self.opt_steps += 1
                    info["step"], info["loss"] = s + 1, loss
                    self.losses.append({"version": self.weight_version, "job": jid, "loss": loss})
                    self.tokens_per_s = ntok / dt if dt > 0 else 0.0
            report = self.opt.report()
            with self.lock:
                info["state"] = "done"
                info["skipped_nonfinite"] = report["skipped_nonfinite_grad"] + report["nonfinite_update"]
        except Exception as e:
            with self.lock:
                info["state"], info["error"] = "failed", f"{type(e).__name__}: {e}"
        finally:
            with self.lock:
                self.current = None
            self.save()

    def save(self) -> None:
        """Optimizer state and weight version, each replaced crash-safely by the core (temp file, fsync,
        rename, fsync of the directory)."""
        self.opt.save_state(self.opt_path, names=self.names)
        self.state_version = self.weight_version
        self._write_meta()

    def reserve(self, version: int) -> None:
        """Records durably that weight version ``version`` may be in use, before anything uses it: a trainer
        killed at any instant restarts above every version it handed out (issue #13: after a SIGKILL
        mid-job the version went from 10 back to 8)."""
        if version > self.reserved:
            self.reserved = version
            self._write_meta()

    def _write_meta(self) -> None:
        meta = {"weight_version": self.state_version, "reserved": self.reserved, "engine": self.engine}
        _core.write_file_atomic(self.meta_path, json.dumps(meta).encode())

    def run(self) -> None:
        while not self.stopping.is_set():
            self.run_pending()
            try:
                jid, job = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self.run_job(jid, job)
        with self.lock:
            self.closed = True
        self.run_pending(timer=False)  # requests that arrived before the shutdown are still answered
        self.save()

    def close(self) -> None:
        """Releases the checkpoint store (its lock and host copy)."""
        if self.store is not None:
            self.store.close()
