"""The reference engine's serving options, defined once for the engine and for ``livetrain serve``, which
passes them on (``argv``): how many requests run in one batch, how many may wait, how large a request
body may be. Light: no torch here, so the supervisor starts fast.
"""

from __future__ import annotations

import argparse

from livetrain.trainer import protocol, security

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 64
# How a batched decode step computes attention (engines.batching.ATTENTION: defined here, where no torch is).
BATCH_ATTENTION = ("auto", "rows", "masked", "static")
DEFAULT_BATCH_ATTENTION = "auto"
DEFAULT_STATIC_CACHE_LEN = 2048


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serving options")
    g.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"completions decoded together in one forward pass (continuous batching; default "
        f"{DEFAULT_MAX_BATCH}; 1: one request at a time)",
    )
    g.add_argument(
        "--batch-attention",
        default=DEFAULT_BATCH_ATTENTION,
        choices=BATCH_ATTENTION,
        help="attention of a batched decode step: 'auto' ('static' on a GPU, where replayed CUDA graphs remove "
        "the launch overhead that bounds a decode step, when the model's cache is plain attention and the static "
        "cache takes at most a quarter of the GPU's free memory, else 'rows'; 'rows' at --tensor-parallel > 1), "
        "'rows' (each request on its own keys: greedy answers equal "
        "one-at-a-time decoding bit for bit), 'masked' (one call per layer over the padded batch: fewer "
        "kernel launches; answers may differ in the last bits) or 'static' (a preallocated KV cache, see "
        "--static-cache-len, and on a GPU decode steps replayed from CUDA graphs; answers as 'masked') "
        f"(default {DEFAULT_BATCH_ATTENTION})",
    )
    g.add_argument(
        "--static-cache-len",
        type=int,
        default=DEFAULT_STATIC_CACHE_LEN,
        metavar="N",
        help="with --batch-attention static: positions per request in the static KV cache (--max-batch x N "
        "positions per layer, allocated at start; at most the model's context). A request whose prompt "
        f"plus max_tokens exceeds it is refused (400) (default {DEFAULT_STATIC_CACHE_LEN})",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help=f"completions that may wait for a place in the batch; beyond them the engine answers 503 with "
        f"Retry-After (default {DEFAULT_MAX_QUEUE})",
    )
    g.add_argument(
        "--max-body-mib",
        type=int,
        default=security.DEFAULT_MAX_BODY_MIB,
        metavar="MIB",
        help=f"largest request body in MiB; larger ones get 413 before they are read (default "
        f"{security.DEFAULT_MAX_BODY_MIB}, at most {protocol.MAX_BODY >> 20}: the trainer socket's limit)",
    )

    g.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="engine ranks, each holding 1/N of every weight (vLLM's shards): N processes over gloo on CPU, "
        "one GPU each with --device cuda (rank r on cuda:r); N trainer ranks train them in place "
        "(docs/tensor-parallel.md; default 1)",
    )


def check(ns: argparse.Namespace) -> str | None:
    """What is wrong with the serving options (None: nothing)."""
    if ns.tensor_parallel < 1:
        return "--tensor-parallel must be >= 1"
    if ns.tensor_parallel > 1 and getattr(ns, "device", "cpu") not in ("cpu", "cuda"):
        return (
            f"--device {ns.device}: at --tensor-parallel {ns.tensor_parallel} give cpu or cuda (rank r runs on cuda:r)"
        )
    if ns.max_batch < 1:
        return "--max-batch must be >= 1"
    if ns.static_cache_len < 1:
        return "--static-cache-len must be >= 1"
    if ns.batch_attention == "static" and ns.tensor_parallel > 1:
        return "--batch-attention static is not supported with --tensor-parallel > 1"
    if ns.max_queue < 0:
        return "--max-queue must be >= 0"
    if not 1 <= ns.max_body_mib <= protocol.MAX_BODY >> 20:
        return f"--max-body-mib must be between 1 and {protocol.MAX_BODY >> 20}"
    return None


def argv(ns: argparse.Namespace) -> list[str]:
    """The serving options as command-line words, for the engine process."""
    return [
        "--max-batch",
        str(ns.max_batch),
        "--batch-attention",
        ns.batch_attention,
        "--static-cache-len",
        str(ns.static_cache_len),
        "--max-queue",
        str(ns.max_queue),
        "--max-body-mib",
        str(ns.max_body_mib),
        "--tensor-parallel",
        str(ns.tensor_parallel),
    ]
