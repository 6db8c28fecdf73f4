"""The trainer under tensor parallelism: one trainer process per engine rank, the N of them one
``torch.distributed`` process group (NCCL on CUDA, gloo on CPU), started and stopped as one unit
(trainer/process.py: ``start_trainer_group``).

Rank 0 is the trainer service as at TP 1: it owns the socket, the job queue and the status. Before each
thing that touches the weights or the optimizer (a training step, a checkpoint, a rollback, saving the
optimizer state, stopping) it sends the command to the other ranks (``Ranks.lead``), which run it with it
(``Ranks.follow``): every rank steps in lockstep and runs the same collectives in the same order. Commands
travel over a gloo group of their own (objects, small), the model's collectives over the model's group.

Faults. A rank that dies or fails makes the others' next collective fail (gloo: its sockets close) or time
out (``--tp-timeout``); the job fails on every rank and rank 0 reports which rank, and how, in
/train/status, while the engine keeps serving. A parameter's update is written by a rank only after every
rank has passed that parameter's sums (livetrain.optim), and a step ends with a barrier, so a fault never
leaves a parameter updated on some ranks and not on others; the parameters of the failed step that every
rank had already updated stay updated (docs/tensor-parallel.md, "Faults"). The group is then broken: rank
0 answers /train and /checkpoint with 503 until the trainer is restarted; the other ranks exit.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time

from livetrain import _core

# Seconds a rank waits in one collective before it declares the others gone (and between two commands
# while idle: rank 0 sends a heartbeat every quarter of it).
DEFAULT_TIMEOUT = 1800.0


class RankFailure(RuntimeError):
    """The tensor-parallel group can no longer train: a rank died or failed (the message says which)."""


class RanksFailed(RuntimeError):
    """Work the ranks did together (``Ranks.together``) failed on ``ranks`` (the others completed it); the
    message names each failed rank and its error."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")


class Ranks:
    """This process's place among the trainer's tensor-parallel ranks: ``rank`` of ``size``, the model's
    process group (``group``) and the commands' (``control``). Created from the environment the launcher
    sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; ``from_env``)."""

    def __init__(
        self, rank: int, size: int, *, timeout: float = DEFAULT_TIMEOUT, state_dir: str = ".", role: str = "trainer"
    ):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.role = role  # "trainer", or "engine" for the reference engine's ranks (livetrain.engines.ranks)
        self.state_dir = state_dir
        self.group = self.control = None  # start()
        self.failure: str | None = None  # why the group can no longer train (rank 0 reports it)
        self.engine_group = ""  # the manifests' model.group (check_manifests)
        self.pids: list[int] = [0] * size
        # The residual stream split by tokens too (livetrain.tensor_parallel): 1/N of the layers' checkpoints
        # and norms per rank. Off only to compare against it (bench/tp.py).
        self.sequence_parallel = True
        self._last_sent = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, *, timeout: float = DEFAULT_TIMEOUT, state_dir: str = ".", env=os.environ):
        """The ranks of a trainer started by ``start_trainer_group`` (None at TP 1: WORLD_SIZE unset or 1)."""
        size = int(env.get("WORLD_SIZE", "1") or 1)
        if size == 1:
            return None
        rank = int(env.get("RANK", "-1"))
        if not 0 <= rank < size:
            raise ValueError(f"RANK={env.get('RANK')!r} is not a rank of WORLD_SIZE={size}")
        return cls(rank, size, timeout=timeout, state_dir=state_dir)

    def start(self, device) -> None:
        """Joins the process group (every rank at once; MASTER_ADDR and MASTER_PORT from the environment)
        for weights on ``device``: NCCL for CUDA, with a gloo group beside it for the commands; gloo on CPU."""
        import torch
        import torch.distributed as dist

        delta = datetime.timedelta(seconds=self.timeout)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.size, timeout=delta)
        self.group = dist.group.WORLD
        self.control = dist.new_group(backend="gloo", timeout=delta) if cuda else self.group
        dist.all_gather_object(self.pids, os.getpid(), group=self.control)
        if self.rank == 0:
            self.clear_failures()
        dist.barrier(group=self.control)  # no rank records a failure before rank 0 has cleared the old ones

    # ---- start-up: the manifests of one engine, one per rank ----
    def check_manifests(self, attached) -> None:
        """Refuses, on every rank with the same message, a group whose manifests are not the N ranks of one
        engine: another TP size, a rank given twice or missing, trainer rank r on another engine rank,
        ranks of different engines (model.group), models or layouts."""
        import torch.distributed as dist

        m = attached.manifest["model"]
        mine = {
            "manifest": attached.path,
            "tp_rank": m["tp_rank"],
            "tp_size": m["tp_size"],
            "engine": m["engine"],
            "group": m.get("group", ""),
            "path": m["path"],
            "config": json.dumps(m["config"], sort_keys=True),
        }
        every: list = [None] * self.size
        dist.all_gather_object(every, mine, group=self.control)
        problem = manifest_mismatch(every)
        if problem:
            raise _core.InvalidArgumentError(f"the trainer's {self.size} ranks cannot train together: {problem}")
        self.engine_group = every[0]["group"]

    def build_model(self, attached):
        """This rank's model on its engine rank's shards (livetrain.tensor_parallel), once the manifests
        are known to be one engine's N ranks."""
        from livetrain import tensor_parallel

        self.check_manifests(attached)
        return tensor_parallel.build_model(attached, self.group, sequence_parallel=self.sequence_parallel)

    # ---- the checkpoint store: each rank saves its regions, rank 0 commits (docs/checkpoint.md) ----
    def regions(self, rank_model):
        """The regions of the Hugging Face tensors this rank holds, as the checkpoint store saves and
        restores them (``checkpoint.shards``: replicated tensors and shared KV heads saved by their first
        holder only)."""
        from livetrain import checkpoint

        return checkpoint.shards(rank_model.layout, rank_model.views, self.rank)

    def open_store(self, model_dir: str, store_dir: str | None, regions):
        """The model's store, opened as this rank: rank 0 first (it recovers), then the others. The engine
        created it at start (``checkpoint.restore_latest``)."""
        import torch.distributed as dist

        from livetrain import checkpoint

        def open_it():
            return checkpoint.open_store(
                model_dir, store_dir, rank=self.rank, ranks=self.size, held=regions, group=self.engine_group
            )

        store = open_it() if self.rank == 0 else None
        dist.barrier(group=self.control)
        return store if self.rank == 0 else open_it()

    def commit(self, store, regions, weight_version: int, optimizer_state: str) -> dict:
        """One generation from every rank's part (each rank calls it at once): rank 0's result everywhere."""
        from livetrain import checkpoint

        return checkpoint.save_distributed(
            store, regions, weight_version=weight_version, optimizer_state=optimizer_state, process_group=self.control
        )

    def together(self, what: str, fn, *args):
        """Runs ``fn`` on this rank (every rank at once); if it failed on any rank, raises the same error on
        every rank (``RanksFailed``, the ranks named), so that they all go on in step."""
        import torch.distributed as dist

        result, err = None, None
        try:
            result = fn(*args)
        except dist.DistError:
            raise
        except Exception as e:
            err = f"rank {self.rank}: {type(e).__name__}: {e}"
        every: list = [None] * self.size
        try:
            dist.all_gather_object(every, err, group=self.control)
        except Exception as e:  # a rank died or timed out in the middle: the group is broken, not the work
            if self.rank == 0:
                raise self.fail(e) from e
            raise RankFailure(f"{what}: lost a rank: {type(e).__name__}: {e}") from e
        errors = [e for e in every if e]
        if errors:
            raise RanksFailed(f"{what} failed: " + "; ".join(errors), [r for r, e in enumerate(every) if e])
        return result

    def agree(self, value):
        """Rank 0's ``value`` on every rank (every rank calls it at once): a decision they must share."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # ---- commands, rank 0 -> the others ----
    def lead(self, op: str, *args) -> None:
        """Rank 0: the others run ``op`` with it (they are waiting in ``follow``). Raises RankFailure once
        the group is broken."""
        import torch.distributed as dist

        if self.failure:
            raise RankFailure(self.failure)
        with self._lock:
            try:
                dist.broadcast_object_list([(op, args)], src=0, group=self.control)
            except Exception as e:
                raise self.fail(e) from e
            self._last_sent = time.monotonic()

    def heartbeat(self) -> None:
        """Rank 0, idle: a no-op command once a quarter of the timeout has passed since the last one, so
        that the waiting ranks never time out while nothing happens (and a dead one is noticed)."""
        if self.failure is None and time.monotonic() - self._last_sent > self.timeout / 4:
            try:
                self.lead("noop")
            except RankFailure:
                pass  # recorded in self.failure

    def follow(self, trainer) -> None:
        """Ranks > 0: runs rank 0's commands until it says stop. A failure here is written where rank 0
        reads it (``failure_path``) and ends this process."""
        ops = {
            "step": trainer.train_step,
            "commit": trainer.commit_rank,
            "rollback": trainer.rollback_rank,
            "save": trainer.save_rank,
        }
        self.run_commands(ops, fatal={"step"})

    def run_commands(self, ops: dict, fatal) -> None:
        """Ranks > 0: runs rank 0's commands (``ops``: name -> function of the command's arguments; "noop"
        and "stop" are known) until it says stop. A command in ``fatal`` that fails (or any failure of
        torch.distributed) is written where rank 0 reads it (``failure_path``) and ends this process: rank 0
        is then inside that command's collectives without this rank. Others are logged and the loop goes on."""
        import torch.distributed as dist

        ops = {"noop": lambda: None, **ops}
        while True:
            box = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=self.control)
            except Exception as e:  # rank 0 is gone
                self._record(f"lost rank 0: {type(e).__name__}: {e}")
                raise SystemExit(1) from None
            op, args = box[0]
            if op == "stop":
                return
            try:
                ops[op](*args)
            except Exception as e:
                # A step that failed on this rank leaves the others inside its collectives: the group is done.
                # Checkpoint, rollback and save fail on every rank alike (``together``) and the group goes on.
                if op in fatal or isinstance(e, (dist.DistError, RankFailure)):
                    self._record(f"{op}: {type(e).__name__}: {e}")
                    raise SystemExit(1) from None
                print(
                    f"livetrain {self.role} rank {self.rank}: {op}: {type(e).__name__}: {e}",
                    file=sys.stderr,
                    flush=True,
                )

    def end_step(self) -> None:
        """Every rank, after its step's last write: once this returns, every rank's part of the step is in
        the engine's memory."""
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()
        dist.barrier(group=self.control)

    # ---- faults ----
    def failure_path(self, rank: int) -> str:
        return os.path.join(self.state_dir, f"rank-{rank}.failure")

    def _record(self, message: str) -> None:
        try:
            _core.write_file_atomic(self.failure_path(self.rank), message.encode())
        except Exception:
            pass
        print(f"livetrain {self.role} rank {self.rank}: {message}", file=sys.stderr, flush=True)

    def fail(self, error: BaseException) -> RankFailure:
        """Rank 0, after a collective or a step failed: which rank died or failed and how (its pid, or the
        message it left), recorded as the group's failure; the group is torn down so that no rank waits on
        it. Returns the RankFailure to raise."""
        if self.failure is None:
            time.sleep(0.5)  # a rank that failed writes its message before it exits
            found = []
            for r in range(1, self.size):
                try:
                    with open(self.failure_path(r)) as f:
                        found.append(f"rank {r} (pid {self.pids[r]}) failed: {f.read().strip()}")
                        continue
                except OSError:
                    pass
                if not _alive(self.pids[r]):
                    found.append(f"rank {r} (pid {self.pids[r]}) died")
            if not found:
                found.append(f"rank 0: {type(error).__name__}: {error}")
            restart = "restart it to train again" if self.role == "trainer" else "restart the server"
            self.failure = "; ".join(found) + f"; the tensor-parallel {self.role} stopped ({restart})"
            self.abort()
        return RankFailure(self.failure)

    def broken(self, error: BaseException) -> bool:
        """Whether ``error`` (raised on rank 0 while the ranks worked together) means the group can no longer
        work: a timeout or a transport error of torch.distributed (gloo reports a peer's closed sockets as a
        plain RuntimeError, so a rank that is gone or left a failure message counts too)."""
        import torch.distributed as dist

        if self.failure or isinstance(error, (dist.DistError, RankFailure)):
            return True

        def gone() -> bool:
            return any(not _alive(p) or os.path.exists(self.failure_path(r)) for r, p in enumerate(self.pids) if r)

        if gone():
            return True
        if isinstance(error, RuntimeError):  # a killed rank's sockets close before its process turns zombie:
            time.sleep(0.5)  # gloo's error can come first; give the process a moment to be seen gone
            return gone()
        return False

    def abort(self) -> None:
        """Tear the process groups down: ranks waiting in a collective with this one get an error."""
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:
            pass

    def status(self) -> dict:
        alive = [_alive(p) for p in self.pids]
        # A rank gone while the group was idle: its failure is known at the next command; say it now.
        gone = "; ".join(
            f"rank {r} (pid {p}) is not running" for r, (p, a) in enumerate(zip(self.pids, alive)) if not a
        )
        return {
            "size": self.size,
            "pids": list(self.pids),
            "alive": alive,
            "state": "failed" if self.failure or gone else "ok",
            "error": self.failure or gone or None,
        }

    def clear_failures(self) -> None:
        """At start-up: messages from an earlier run's ranks are not this run's."""
        for r in range(self.size):
            try:
                os.unlink(self.failure_path(r))
            except FileNotFoundError:
                pass


def manifest_mismatch(every: list[dict]) -> str | None:
    """What is wrong with the ranks' manifests, rank by rank (None: they are the N ranks of one engine)."""
    size = len(every)
    problems = []
    sizes = {m["tp_size"] for m in every}
    if sizes != {size}:
        named = ", ".join(f"rank {r}: {m['manifest']} is of TP size {m['tp_size']}" for r, m in enumerate(every))
        problems.append(f"the group has {size} ranks but the manifests are not all of TP size {size} ({named})")
    for r, m in enumerate(every):
        if m["tp_rank"] != r:
            problems.append(f"trainer rank {r} was given {m['manifest']}, the engine's rank {m['tp_rank']}")
    held = {m["tp_rank"] for m in every}
    missing = sorted(set(range(size)) - held)
    if missing:
        problems.append(f"no trainer rank has the engine's rank(s) {', '.join(map(str, missing))}")
    for field, what in (("group", "engine"), ("engine", "engine kind"), ("path", "model path"), ("config", "config")):
        if len({m[field] for m in every}) > 1:
            by = (
                ", ".join(f"rank {r}: {m[field][:60]!r}" for r, m in enumerate(every))
                if field != "config"
                else (
                    "ranks "
                    + ", ".join(str(r) for r, m in enumerate(every) if m[field] != every[0][field])
                    + " differ from rank 0's"
                )
            )
            problems.append(f"the manifests name different {what}s ({by})")
    if not problems and not every[0]["group"]:
        problems.append(
            f"{every[0]['manifest']} has no model.group: an engine at tensor-parallel size > 1 names the group "
            "of its ranks in every rank's manifest, so that ranks of different engines are told apart"
        )
    return "; ".join(problems) or None
