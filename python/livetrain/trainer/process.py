"""Starting, watching and stopping livetrain's processes: the trainer (with the environment it needs) and,
for ``livetrain serve``, the reference engine. Each child runs in its own session, so a terminal's Ctrl-C
reaches only the launcher, which stops the children in order: SIGTERM (the trainer finishes its step and
saves its state), SIGKILL after a timeout. A tensor-parallel engine's trainer is one process per rank,
started and stopped as one unit (``start_trainer_group``).

``python -m livetrain.trainer.process --exec-tied-to PID -- CMD...`` becomes CMD with SIGTERM on the
death of PID (Linux ``PR_SET_PDEATHSIG``): how a launcher that may die without cleaning up (vLLM's API
server) ties its trainer to itself.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shlex
import signal
import subprocess
import sys

from livetrain.trainer import options


def freeze_startup_heap() -> None:
    """Called by the trainer and the reference engine once started: the Python objects made so far (torch,
    transformers, the model's modules, the tokenizer: ~370,000 objects) live as long as the process, so they
    are moved out of the collector's generations (``gc.freeze``) and the oldest generation's collections,
    which otherwise walk all of them now and then in the middle of a step, skip them. Measured on 2 CPU
    cores over 40 steps of a 24-layer model (bench/RESULTS.md, third session of 2026-12-02): that
    collection took 295 ms, 13 ms frozen. vLLM's engine core does the same after its start."""
    import gc

    gc.collect()
    gc.freeze()


def environment(env) -> dict:
    """The environment to start a trainer process with: PyTorch's expandable segments for its own
    allocations (activations and one gradient at a time come and go in many sizes; measured on the H100,
    see bench/RESULTS.md) unless PYTORCH_CUDA_ALLOC_CONF is set. The engine must not use them (CUDA IPC
    cannot export such memory); the trainer only imports the engine's memory, which is unaffected."""
    env = dict(env)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def trainer_command(manifest: str, model_dir: str, socket: str, ns: argparse.Namespace) -> list[str]:
    """``python -m livetrain.trainer`` on an engine's manifest with the options ``ns`` (trainer.options)."""
    return [
        sys.executable,
        "-m",
        "livetrain.trainer",
        "--manifest",
        manifest,
        "--model",
        model_dir,
        "--socket",
        socket,
        *options.argv(ns),
    ]


def stop_process(
    proc: subprocess.Popen, sig: int | None = signal.SIGTERM, timeout: float = 60.0, *, session: bool = False
) -> int:
    """Sends ``sig`` to ``proc`` while it runs (None: nothing, it is stopping already), waits ``timeout``
    seconds for it to exit, then SIGKILL: to its whole session when ``session`` (a child started in a
    session of its own, whose children must not outlive it), else to it alone. Its exit status."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if session:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    return proc.wait()


class Process:
    """A child in its own session. ``tied``: its life is bound to this process's: ``stop`` runs when this
    process exits normally (atexit), and if it dies, the kernel sends the child SIGTERM. The kernel's
    signal follows the thread that started the child, so start it from a thread that lives as long as
    this process (vLLM's event-loop thread, a main thread)."""

    def __init__(self, cmd: list[str], env: dict | None = None, *, tied: bool = False, **popen):
        self.cmd = cmd
        if tied:
            cmd = [sys.executable, "-m", "livetrain.trainer.process", "--exec-tied-to", str(os.getpid()), "--", *cmd]
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
        if tied:
            atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit status once the child has exited, else None."""
        return self.proc.poll()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status."""
        return stop_process(self.proc, signal.SIGTERM, timeout)

    def __str__(self) -> str:
        return shlex.join(self.cmd)


def start_trainer(
    manifest: str, model_dir: str, socket: str, ns: argparse.Namespace, env=None, *, tied: bool = False
) -> Process:
    """The trainer process on an engine's manifest, in ``environment(env)`` (default: this process's)."""
    return Process(
        trainer_command(manifest, model_dir, socket, ns), environment(os.environ if env is None else env), tied=tied
    )


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TrainerGroup:
    """The trainer of a tensor-parallel engine: one process per engine rank (rank r on ``manifests[r]``),
    one ``torch.distributed`` group among them (trainer.ranks), started and stopped as one unit. Rank 0
    answers the socket. ``poll`` is the first rank's exit status to be known (a rank that exits ends the
    group's training; rank 0 stays up to report it); ``stop`` stops rank 0 first (it saves, then tells the
    others to stop), then the others."""

    def __init__(self, procs: list[Process]):
        self.procs = procs

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def poll(self) -> int | None:
        """rank 0's exit status once it has exited, else None (the other ranks' exits are rank 0's to
        report: it keeps answering /train/status)."""
        for p in self.procs[1:]:
            p.poll()  # reap: a dead rank must not linger as a zombie that looks alive
        return self.procs[0].poll()

    def exited(self) -> dict[int, int]:
        """rank -> exit status of every rank that has exited."""
        return {r: p.poll() for r, p in enumerate(self.procs) if p.poll() is not None}

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to rank 0, which saves and stops the others; then SIGTERM/SIGKILL to any rank left."""
        code = self.procs[0].stop(timeout)
        for p in self.procs[1:]:
            try:
                p.proc.wait(timeout if code == 0 else 1.0)
            except subprocess.TimeoutExpired:
                pass
            p.stop(10.0)
        return code

    def __str__(self) -> str:
        return "; ".join(f"rank {r}: {p}" for r, p in enumerate(self.procs))


def start_trainer_group(
    manifests: list[str],
    model_dir: str,
    socket: str,
    ns: argparse.Namespace,
    env=None,
    *,
    tied: bool = False,
    master_addr: str = "127.0.0.1",
) -> TrainerGroup:
    """The trainer of an engine at tensor-parallel size ``len(manifests)``: rank r on ``manifests[r]``, in
    ``environment(env)`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (a free port) set, every rank
    with the same options (the same --state-dir: rank files are named by rank); rank 0 on ``socket``."""
    base = environment(os.environ if env is None else env)
    base.update(WORLD_SIZE=str(len(manifests)), MASTER_ADDR=master_addr, MASTER_PORT=str(free_port(master_addr)))
    procs = []
    for rank, manifest in enumerate(manifests):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(Process(trainer_command(manifest, model_dir, socket, ns), rank_env, tied=tied))
    group = TrainerGroup(procs)
    if tied:
        # atexit runs last-registered first: the group's ordered stop (rank 0 saves and stops the others)
        # before each rank's own SIGTERM, which would otherwise reach the last rank first.
        atexit.register(group.stop)
    return group


def _exec_tied_to(parent: int, cmd: list[str]) -> None:
    """Become ``cmd`` with SIGTERM on the death of ``parent`` (``PR_SET_PDEATHSIG``, kept across exec):
    set here, in the child, because ``preexec_fn`` is unsafe in a threaded server."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the prctl
        sys.exit(1)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "--exec-tied-to" or sys.argv[3] != "--":
        sys.exit("usage: python -m livetrain.trainer.process --exec-tied-to PID -- CMD...")
    _exec_tied_to(int(sys.argv[2]), sys.argv[4:])
