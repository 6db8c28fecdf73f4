"""livetrain's vLLM worker extension: vLLM mixes ``WorkerExtension`` into its worker class
(``--worker-extension-cls livetrain.vllm.WorkerExtension``), and the endpoint plugin calls
``livetrain_export`` on every worker through ``collective_rpc``: the worker refuses configurations it
cannot share safely, restores checkpoint generations newer than the model files into its weights (in
place), and shares its weights in place as a livetrain manifest, one per tensor-parallel rank.

Everything here takes the worker as a plain object (``worker.vllm_config``, ``worker.model_runner.get_model()``,
see livetrain.vllm.api), so it runs the same on a vLLM worker and in tests without vLLM.
"""

from __future__ import annotations

import json
import logging
import os

from livetrain.vllm import api

logger = logging.getLogger("vllm.livetrain")  # a child of vLLM's logger: printed the way vLLM prints

EXPORT_METHOD = "livetrain_export"
STORE_ENV = "LIVETRAIN_STORE_DIR"


class Refused(RuntimeError):
    """vLLM runs in a way livetrain cannot train safely; the message says why and what to change."""


def manifest_path(run_dir: str, tp_rank: int) -> str:
    return os.path.join(run_dir, f"tp{tp_rank}.manifest.json")


def _alloc_conf(env) -> str:
    # PYTORCH_ALLOC_CONF is the name since torch 2.9; PYTORCH_CUDA_ALLOC_CONF still works.
    return ",".join(env.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))


def refusals(facts: api.Facts, env=os.environ) -> list[str]:
    """Why livetrain cannot train this vLLM configuration in place (empty: it can)."""
    out = []
    if facts.quantization:
        out.append(
            f"the weights are quantized ({facts.quantization}): the served tensors are packed integers or "
            "scaled low-precision values, not the model's parameters, so they cannot be trained in place; "
            "serve an unquantized (bf16/fp16/fp32) checkpoint without --quantization"
        )
    if facts.sleep_mode:
        out.append(
            "sleep mode (--enable-sleep-mode) allocates the weights with CUDA virtual memory, which CUDA IPC "
            "cannot share, and sleep level 2 discards them; start vLLM without --enable-sleep-mode"
        )
    if "expandable_segments:True" in _alloc_conf(env):
        out.append(
            "PYTORCH_CUDA_ALLOC_CONF/PYTORCH_ALLOC_CONF has expandable_segments:True: PyTorch then allocates "
            "with CUDA virtual memory (cuMemCreate), which CUDA IPC cannot share; unset it"
        )
    if facts.pipeline_parallel > 1:
        out.append(
            f"pipeline parallelism ({facts.pipeline_parallel} stages): each stage holds only some layers, "
            "and the trainer needs every layer; use tensor parallelism only"
        )
    if facts.data_parallel > 1:
        out.append(
            f"data parallelism ({facts.data_parallel} replicas): each replica has its own copy of the "
            "weights and one trainer would update only one of them; run one vLLM per replica"
        )
    if facts.lora:
        out.append(
            "LoRA (--enable-lora) wraps the layers, which changes the weights' names and layout; "
            "start vLLM without --enable-lora"
        )
    if facts.kv_transfer:
        out.append(
            "a KV-transfer connector (--kv-transfer-config) shares KV computed by another vLLM, whose "
            "weights livetrain does not train, and the prefix cache cannot be reset while transfers are "
            "in flight; start vLLM without --kv-transfer-config"
        )
    return out


def model_refusal(config: dict, tp_size: int) -> str | None:
    """Why the layouts cannot map this checkpoint onto vLLM's tensors (mixture-of-experts, quantized, a
    model family or multimodal wrapper without a layout, a TP size its heads do not divide), naming its
    architecture and what is supported; None when they can."""
    from livetrain import Error, layout

    try:
        layout.plan(config, engine="vllm", tp_size=tp_size)
    except Error as e:
        return str(e)
    return None


def raise_refusals(facts: api.Facts, env=os.environ, config: dict | None = None) -> None:
    """Refused: what ``refusals`` finds, and with the model's ``config``, what ``model_refusal`` finds."""
    problems = refusals(facts, env)
    problem = model_refusal(config, facts.tensor_parallel) if config is not None else None
    if problem:
        problems.append(problem)
    if problems:
        raise Refused("livetrain cannot train this vLLM in place: " + "; ".join(problems))


def resolve_model_dir(model: str, revision: str | None = None) -> str:
    """The local directory of vLLM's ``--model``: the path itself, or the Hugging Face cache snapshot of a
    repo id (vLLM downloaded it before loading)."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception as e:
        raise Refused(
            f"livetrain needs the model's files on disk; {model!r} is neither a directory nor in the "
            f"Hugging Face cache ({type(e).__name__}: {e})"
        ) from e


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise Refused(f"{path}: cannot read the model's config ({e})") from e


def store_dir(model_dir: str, env=os.environ) -> str:
    """``$LIVETRAIN_STORE_DIR``, else the checkpoint store's default (docs/checkpoint.md)."""
    from livetrain import checkpoint

    return checkpoint.store_path(model_dir, env.get(STORE_ENV))


def restore_newer(model_dir: str, params, config: dict, tp_rank: int, tp_size: int, env=os.environ) -> dict:
    """If the checkpoint store holds a generation newer than the model files, write it into ``params``
    (vLLM's own tensors of this rank, through layout views: in place, no reallocation); at tensor
    parallelism every rank restores its own shards, whatever TP size wrote the generation. Returns what was
    done: ``{"store", "generation", "restored"}`` (``generation`` None without a store)."""
    from livetrain import checkpoint, layout

    sdir = store_dir(model_dir, env)
    if tp_size != 1 and not checkpoint.store_exists(model_dir, sdir):
        # Ranks open the store concurrently and only rank 0 could create it: the endpoint creates it before
        # the export (endpoint.ensure_store); missing here, it is a store-less run (--no-store).
        return {"store": sdir, "generation": None, "restored": False}
    lay = layout.build(config, params, engine="vllm", tp_rank=tp_rank, tp_size=tp_size)
    # This rank's regions of the Hugging Face tensors (a tied lm_head is the embedding itself, left out).
    shards = checkpoint.shards(lay, layout.views(lay, params), tp_rank)
    # Created when missing (generation 0 = the model files), so that the trainer's /checkpoint has a store;
    # the core writes the tensors' memory itself: no torch operation, nothing for autograd to see.
    r = checkpoint.restore_latest(shards, model_dir, sdir, create=tp_size == 1, rank=tp_rank, ranks=tp_size)
    if r["created"]:
        logger.info("livetrain: created the checkpoint store %s (generation 0: the model files)", sdir)
    if r["restored"]:
        logger.info(
            "livetrain: TP rank %d/%d restored checkpoint generation %d from %s",
            tp_rank,
            tp_size,
            r["generation"],
            sdir,
        )
    return {"store": sdir, "generation": r["generation"], "restored": r["restored"]}


def export(worker, run_dir: str, env=os.environ) -> dict:
    """What ``livetrain_export`` does; idempotent (several API servers may ask): a worker exports once
    and answers later calls with the same result, whatever ``run_dir`` they pass."""
    done = getattr(worker, "_livetrain_export", None)
    if done is not None:
        return done["info"]
    try:
        return _export(worker, run_dir, env)
    except Refused as e:  # in the worker's own log too: vLLM may report a worker's error in fewer words
        logger.error("%s", e)
        raise


def _export(worker, run_dir: str, env) -> dict:
    from livetrain import _core, sharing

    facts = api.config_facts(api.worker_config(worker))
    raise_refusals(facts, env)
    model_dir = resolve_model_dir(facts.model, facts.revision)
    config = read_config(model_dir)
    raise_refusals(facts, env, config)  # the checkpoint itself, before its store is created or anything shared
    tp_rank, tp_size = api.tp_rank_size(worker)
    params = dict(api.worker_model(worker).named_parameters())
    elsewhere = next(((n, t.device) for n, t in params.items() if t.device.type != "cuda"), None)
    if elsewhere:
        raise Refused(
            f"vLLM's parameter {elsewhere[0]!r} is on {elsewhere[1]}: livetrain shares vLLM's weights "
            "through CUDA IPC, so vLLM's CPU and other non-CUDA backends are not supported"
        )
    # A core built without CUDA support, or with no code for this GPU, is refused here, before anything else.
    problem = _core.cuda_device_problem(next(iter(params.values())).device.index or 0) if params else ""
    if problem:
        raise Refused(f"livetrain's core cannot run on vLLM's GPU: {problem}")
    restored = restore_newer(model_dir, params, config, tp_rank, tp_size, env)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    path = manifest_path(run_dir, tp_rank)
    exported = sharing.export_cuda(
        params,
        path,
        model_path=model_dir,
        config=config,
        engine="vllm",
        tp_rank=tp_rank,
        tp_size=tp_size,
        # The ranks of one vLLM share the run directory (the endpoint passes the same one to every worker):
        # how the trainer's ranks know their manifests are one engine's.
        group=os.path.abspath(run_dir) if tp_size > 1 else "",
    )
    info = {
        "run_dir": run_dir,
        "manifest": path,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "pid": os.getpid(),
        "model_dir": model_dir,
        "tensors": len(params),
        "restore": restored,
    }
    worker._livetrain_export = {"exported": exported, "info": info}  # keeps the export alive with the worker
    logger.info("livetrain: TP rank %d/%d shares %d tensors in place: %s", tp_rank, tp_size, len(params), path)
    return info


class WorkerExtension:
    """Mixed into vLLM's worker class; its methods run on each worker (``self`` is the worker)."""

    def init_worker_extension(self) -> None:
        """vLLM >= 0.33 calls this after device initialisation and before the model loads: a configuration
        or a checkpoint (when its files are on disk already) livetrain refuses fails here, before minutes of
        loading."""
        facts = api.config_facts(api.worker_config(self))
        try:
            config = read_config(resolve_model_dir(facts.model, facts.revision))
        except Refused:  # not downloaded yet: livetrain_export checks it after vLLM has loaded it
            config = None
        try:
            raise_refusals(facts, config=config)
        except Refused as e:
            logger.error("%s", e)
            raise

    def livetrain_export(self, run_dir: str) -> dict:
        """collective_rpc target: refuse, restore, share (``export``)."""
        return export(self, run_dir)
