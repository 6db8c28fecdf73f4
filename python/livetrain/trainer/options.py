"""The trainer's command-line options, defined once for every launcher: ``python -m livetrain.trainer``,
``livetrain serve`` (which passes them on to the trainer it starts, and the store options to its engine)
and the vLLM plugin (``$LIVETRAIN_TRAINER_ARGS``). ``add_options`` puts them on a parser; ``argv`` turns
the parsed values back into the words that start a trainer with them.
"""

from __future__ import annotations

import argparse

DEFAULT_STATE_DIR = "livetrain-state"
# Tokens one training step may compute (rows × the longest row). Not yet measured per token: chosen from
# the review of issue #13, where a step of 8 × 1,050 tokens (8,400) on the default model grew the CPU
# trainer past 5.6 GiB, so about half that stays well inside a few GiB; the idle trainer of the default
# model is ~0.4 GiB resident and one step of ~150 tokens raised its peak to ~0.85 GiB (first step,
# optimizer state included; measured on the shared CPU machine, 2026-11-30).
DEFAULT_MAX_BATCH_TOKENS = 4096
# How embeddings and lm_head are trained: optim.param_groups' choices (named here, where torch is not imported).
EMBEDDINGS = ("apollo", "adamw", "frozen")


def add_store_options(parser) -> None:
    """``--store DIR`` / ``--no-store``: which checkpoint store the engine and the trainer use."""
    parser.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="the model's checkpoint store (default MODEL/.livetrain-store; the engine creates it "
        "when missing and serves its newest generation; POST /checkpoint and "
        "--checkpoint-every add generations)",
    )
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="no checkpoint store: serve the model files as they are; /checkpoint, /checkpoints "
        "and /rollback answer 409",
    )


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every option of the trainer process except where it attaches (manifest, model, socket)."""
    parser = parser.add_argument_group("training options")
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="optimizer state and weight version, saved after every job and restored at start "
        f"(default ./{DEFAULT_STATE_DIR})",
    )
    add_store_options(parser)
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="save a generation every SECONDS when the weights changed since the last one "
        "(default 0: only on POST /checkpoint)",
    )
    parser.add_argument("--lr", type=float, default=1e-5, help="default learning rate of a job (APOLLO-Mini)")
    parser.add_argument("--batch-size", type=int, default=8, help="default examples per step")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        metavar="N",
        help="tokens one step may compute (examples × the longest, padding included): a job whose batches "
        "would exceed it runs in smaller batches, or is refused with a 400 naming the limit when it set "
        f"batch_size itself or one example is longer (default {DEFAULT_MAX_BATCH_TOKENS}: about half the step "
        "that made the default model's CPU trainer grow past 5.6 GiB)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=0, help="longest training example in tokens (default: the model's context)"
    )
    parser.add_argument("--queue-size", type=int, default=8, help="queued jobs before /train answers 429")
    parser.add_argument(
        "--embeddings", default="apollo", choices=EMBEDDINGS, help="how embeddings and lm_head are trained"
    )
    parser.add_argument(
        "--no-grad-checkpointing",
        action="store_true",
        help="keep every layer's activations instead of recomputing them in backward",
    )


def check(ns: argparse.Namespace) -> str | None:
    """What is wrong with a combination of the options (None: nothing)."""
    if ns.checkpoint_every < 0:
        return "--checkpoint-every must be >= 0"
    if ns.max_batch_tokens < 1:
        return "--max-batch-tokens must be >= 1"
    if ns.no_store and (ns.store or ns.checkpoint_every):
        return "--no-store cannot be combined with --store or --checkpoint-every"
    return None


def store_argv(ns: argparse.Namespace) -> list[str]:
    """The store options as command-line words."""
    return ["--no-store"] if ns.no_store else ["--store", ns.store] if ns.store else []


def argv(ns: argparse.Namespace) -> list[str]:
    """Every option of ``add_options`` as command-line words, for the trainer process."""
    return [
        "--state-dir",
        ns.state_dir,
        *store_argv(ns),
        "--checkpoint-every",
        str(ns.checkpoint_every),
        "--lr",
        str(ns.lr),
        "--batch-size",
        str(ns.batch_size),
        "--max-batch-tokens",
        str(ns.max_batch_tokens),
        "--max-seq-len",
        str(ns.max_seq_len),
        "--queue-size",
        str(ns.queue_size),
        "--embeddings",
        ns.embeddings,
        *(["--no-grad-checkpointing"] if ns.no_grad_checkpointing else []),
    ]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser``'s arguments with the training options added and checked (``parser.error`` when a
    combination is wrong): what every launcher with a command line of its own calls."""
    add_options(parser)
    ns = parser.parse_args(argv)
    problem = check(ns)
    if problem:
        parser.error(problem)
    return ns


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


def parse(words: list[str]) -> argparse.Namespace:
    """The training options alone from words (``$LIVETRAIN_TRAINER_ARGS``); ValueError with argparse's
    message."""
    return parse_args(_Parser(prog="trainer options", add_help=False), words)
