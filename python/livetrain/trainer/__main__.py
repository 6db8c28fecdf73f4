"""``python -m livetrain.trainer``: the trainer process. Attaches to an engine's weights through its
manifest, answers the training routes' requests on a Unix socket, and trains until SIGTERM/SIGINT, after
which it finishes the current step, answers what is pending, saves its state and exits.

usage: python -m livetrain.trainer --manifest FILE --model DIR --socket PATH [--state-dir DIR] [...]
(normally started by ``livetrain serve`` or the vLLM plugin; docs/serve.md)

Tensor parallelism: with WORLD_SIZE > 1 in its environment (and RANK, MASTER_ADDR, MASTER_PORT, as
``trainer.process.start_trainer_group`` sets them) the process is one rank of the trainer, ``--manifest``
its engine rank's; rank 0 answers on the socket, the others follow it (docs/tensor-parallel.md).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from livetrain.trainer import options, process, protocol, security


def sacrifice_first() -> None:
    """Makes this process the one the kernel's out-of-memory killer picks first (``oom_score_adj`` 1000):
    when training and serving together run out of memory, the trainer dies and its launcher restarts it,
    while the engine keeps serving. The engine leaves its own score alone."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:  # not Linux, or a sandbox that forbids it: nothing else to do
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m livetrain.trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="the engine's sharing manifest")
    p.add_argument("--model", required=True, help="model directory (for the tokenizer and chat template)")
    p.add_argument("--socket", required=True, help="Unix socket to answer the training routes on")
    a = options.parse_args(p, argv)
    sacrifice_first()
    security.private_files()

    from livetrain import Error, _core
    from livetrain.trainer.ranks import Ranks
    from livetrain.trainer.service import Trainer

    # What this core can do on a GPU, first in the log: an engine sharing CUDA memory needs CUDA support.
    print(f"livetrain trainer: {_core.cuda_support()}", file=sys.stderr, flush=True)

    ranks = None
    try:
        ranks = Ranks.from_env(timeout=a.tp_timeout, state_dir=a.state_dir)
        trainer = Trainer(a.manifest, a.model, a, ranks=ranks)
    except (Error, ValueError) as e:  # a stale manifest, a busy lease or store, a bad state file, ranks that do
        who = f" rank {ranks.rank}" if ranks is not None else ""  # not fit together: the message names it
        sys.exit(f"livetrain trainer{who}: {e}")
    process.freeze_startup_heap()  # the start's objects out of the collector's way for the process's life
    if ranks is not None and ranks.rank > 0:  # a follower: rank 0 answers the socket and leads
        try:
            ranks.follow(trainer)
        finally:
            trainer.close()
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: trainer.stopping.set())
    server = protocol.Server(a.socket, trainer.handle)
    server.start()
    print(
        json.dumps(
            {
                "trainer": "ready",
                "restored": trainer.restored_from,
                "weight_version": trainer.weight_version,
                "kernels": trainer.kernels,
                "fused_ops": trainer.fused_ops,
                "checkpoint": trainer.status()["checkpoint"],
            }
        ),
        flush=True,
    )
    try:
        trainer.run()
    finally:
        server.close()
        trainer.close()


if __name__ == "__main__":
    main()
