"""``python -m livetrain.trainer``: the trainer process. Attaches to an engine's weights through its
manifest, answers the training routes' requests on a Unix socket, and trains until SIGTERM/SIGINT, after
which it finishes the current step, answers what is pending, saves its state and exits.

usage: python -m livetrain.trainer --manifest FILE --model DIR --socket PATH [--state-dir DIR] [...]
(normally started by ``livetrain serve`` or the vLLM plugin; docs/serve.md)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from livetrain.trainer import options, protocol, security


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

    from livetrain import Error
    from livetrain.trainer.service import Trainer

    try:
        trainer = Trainer(a.manifest, a.model, a)
    except Error as e:  # a stale manifest, a busy lease or store, a bad state file: the message names it
        sys.exit(f"livetrain trainer: {e}")
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
