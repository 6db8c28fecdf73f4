"""The delta checkpoint store for torch tensors: a thin wrapper over ``livetrain._core.CheckpointStore``.

The store itself (format, diff, crash safety) is C++ (docs/checkpoint.md). This module only turns a
``{name: tensor}`` dict into (name, dtype, shape, address, device) tuples. CPU tensors are diffed on the
CPU; CUDA tensors in place on their GPU, against the store's page-locked host copy of the head.
``restore_latest`` is what an engine calls at start-up so that it serves the last checkpointed weights
(docs/serve.md, "Restart").
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from livetrain import _core
from livetrain.safetensors import dtype_name

__all__ = ["CheckpointStore", "open_store", "restore_head", "restore_latest", "store_exists", "store_path"]

# The store's default place inside the model directory and its commit file (include/livetrain/checkpoint/format.hpp:
# kDefaultStoreDirName, kCommitFileName).
DEFAULT_STORE_DIR = ".livetrain-store"
COMMIT_FILE = "COMMIT"


def _live(tensors: Mapping[str, torch.Tensor]) -> list[tuple]:
    """The core's (name, dtype, shape, address, device) tuples; CUDA tensors are passed in place (the core
    diffs them on their GPU), after the device has finished pending writes."""
    args, devices = [], set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous: the store reads its bytes in place")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"tensor {name!r} is on {t.device}; the store takes CPU or CUDA tensors")
        device = t.device.index if t.device.type == "cuda" else -1
        if device is None:
            device = torch.cuda.current_device()
        devices.add(device)
        args.append((name, dtype_name(t.dtype), list(t.shape), t.data_ptr(), device))
    if len(devices) > 1:
        raise ValueError(f"tensors are on several devices ({sorted(devices)}); pass the weights of one device")
    for d in devices - {-1}:
        torch.cuda.synchronize(d)
    return args


class CheckpointStore:
    """Generations of a model's weights as XOR deltas against the model directory's safetensors files.

    ``CheckpointStore.create(model_dir)`` makes generation 0 from the files as they are;
    ``CheckpointStore(model_dir)`` opens an existing store (exclusive: one process at a time).
    Use as a context manager, or call ``close()``, to release the lock and the host copy of the head.
    """

    def __init__(self, model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None, *, _core_store=None):
        self._s = _core_store or _core.CheckpointStore.open(str(model_dir), str(store_dir or ""))
        self.created = False  # set by open_store when it made the store

    @classmethod
    def create(cls, model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None) -> "CheckpointStore":
        return cls(model_dir, store_dir, _core_store=_core.CheckpointStore.create(str(model_dir), str(store_dir or "")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._s.close()

    @property
    def dir(self) -> str:
        return self._s.dir

    @property
    def head(self) -> int:
        return self._s.head

    @property
    def oldest(self) -> int:
        return self._s.oldest

    @property
    def materialized(self) -> int:
        return self._s.materialized

    def tensors(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype name, shape) of every tensor of the model, in the store's order."""
        return [(n, d, list(shape)) for n, d, shape in self._s.tensors()]

    def list(self) -> list[dict]:
        """The committed generations, oldest first."""
        return self._s.generations()

    def save(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        weight_version: int = 0,
        optimizer_state: str | os.PathLike | None = None,
        save_if_unchanged: bool = False,
    ) -> dict:
        """Commits the elements of ``tensors`` that differ from the head as a new generation.

        Returns ``{"written", "generation", "bytes", "changed", "elements", "model_bytes"}``; nothing is
        written when nothing changed (unless ``save_if_unchanged``).
        """
        return self._s.save(
            _live(tensors),
            weight_version=weight_version,
            optimizer_state=str(optimizer_state or ""),
            save_if_unchanged=save_if_unchanged,
        )

    def restore(
        self,
        generation: int,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        """Sets ``tensors`` (in place) to ``generation``, or writes it as a new model directory ``out_dir``."""
        if (tensors is None) == (out_dir is None):
            raise ValueError("restore needs exactly one of tensors= or out_dir=")
        if out_dir is not None:
            self._s.restore_to_dir(generation, str(out_dir))
            return
        self._s.restore_live(generation, _live(tensors))

    def compare(self, generation: int, tensors: Mapping[str, torch.Tensor]) -> dict:
        """How ``tensors`` differ from ``generation``: ``{"tensors", "elements", "first"}``."""
        return self._s.compare_live(generation, _live(tensors))

    def verify(self) -> list[str]:
        """Checks every delta's checksums and the model files' hashes; the problems found (empty: none)."""
        return self._s.verify()

    def materialize(self, generation: int, *, copy_symlinks: bool = False) -> None:
        """Writes ``generation`` into the model directory's own files, crash-safe."""
        self._s.materialize(generation, copy_symlinks)

    def gc(self, keep_from: int) -> None:
        """Forgets generations before ``keep_from``."""
        self._s.gc(keep_from)


def store_path(model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None) -> str:
    """Where the store of ``model_dir`` is: ``store_dir``, or ``MODEL/.livetrain-store``."""
    return str(store_dir) if store_dir else os.path.join(str(model_dir), DEFAULT_STORE_DIR)


def store_exists(model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None) -> bool:
    """Whether the store of ``model_dir`` has been created (its commit record exists)."""
    return os.path.exists(os.path.join(store_path(model_dir, store_dir), COMMIT_FILE))


def open_store(
    model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None, *, create: bool = False
) -> CheckpointStore:
    """Opens the store of ``model_dir``; with ``create``, makes it first when it does not exist yet
    (generation 0 = the model files as they are). The one place that creates stores for livetrain's
    processes: ``store.created`` says whether this call did."""
    path = store_path(model_dir, store_dir)
    if create and not store_exists(model_dir, path):
        try:
            store = CheckpointStore.create(model_dir, path)
            store.created = True
            return store
        except _core.Error:
            if not store_exists(model_dir, path):
                raise
            # another process created it first: open that one
    return CheckpointStore(model_dir, path)


def restore_head(store: CheckpointStore, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Writes the store's head generation into ``tensors`` (``{Hugging Face name: tensor}``, every tensor of
    the model files, in place) unless the model files already hold it; whether it did. The tensors are
    checked against the store first, so that a mismatch is an error naming the tensor before any write."""
    for name, dtype, shape in store.tensors():
        t = tensors.get(name)
        if t is None:
            raise _core.InvalidArgumentError(
                f"the live weights have no tensor {name!r} (the checkpoint store {store.dir} has it)"
            )
        if dtype_name(t.dtype) != dtype or list(t.shape) != shape:
            raise _core.InvalidArgumentError(
                f"tensor {name!r} is {dtype_name(t.dtype)} {list(t.shape)} in the live weights but {dtype} {shape} "
                f"in the checkpoint store {store.dir}: the store keeps the model files' dtype, so serve the model "
                "in that dtype or without a store"
            )
    if store.head == store.materialized:
        return False
    store.restore(store.head, tensors)
    return True


def restore_latest(
    tensors: Mapping[str, torch.Tensor],
    model_dir: str | os.PathLike,
    store_dir: str | os.PathLike | None = None,
    *,
    create: bool = True,
) -> dict:
    """The start-up step of an engine: ``restore_head`` from the store of ``model_dir``, creating the store
    when it is missing (``create``). Call it after loading the weights from ``model_dir`` and before
    serving them.

    The store is closed (its lock released) on return, so that the trainer can open it. Returns
    ``{"store", "generation", "weight_version", "restored", "created"}``: the head generation, the weight
    version recorded with it, whether ``tensors`` were changed, and whether the store was created.
    """
    with open_store(model_dir, store_dir, create=create) as store:
        restored = restore_head(store, tensors)
        return {
            "store": store.dir,
            "generation": store.head,
            "weight_version": store.list()[-1]["weight_version"],
            "restored": restored,
            "created": store.created,
        }
