"""The delta checkpoint store for torch tensors: a thin wrapper over ``livetrain._core.CheckpointStore``.

The store itself (format, diff, crash safety, the protocol of a generation written by several
tensor-parallel ranks) is C++ (docs/checkpoint.md). This module only turns torch tensors into (name,
dtype, shape, address, device, region start) tuples. CPU tensors are diffed on the CPU; CUDA tensors in
place on their GPU, against the store's page-locked host copy of the head.

A process may pass any subset of the model's tensors (those its engine serves): the others keep the model
files' bytes. Under tensor parallelism each rank passes :class:`Shard` regions of the Hugging Face
tensors (``shards`` derives them from a rank's layout views), saves them with ``save_part``, and rank 0
commits every rank's descriptor with ``commit``; a store written at one TP size restores at any other.
``restore_latest`` is what an engine calls at start-up so that it serves the last checkpointed weights
(docs/serve.md, "Restart").
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch

from livetrain import _core
from livetrain.safetensors import dtype_name

__all__ = [
    "CheckpointStore",
    "Shard",
    "by_file_names",
    "open_store",
    "restore_head",
    "restore_latest",
    "save_distributed",
    "shards",
    "store_exists",
    "store_path",
]

# The store's default place inside the model directory and its commit file (include/livetrain/checkpoint/format.hpp:
# kDefaultStoreDirName, kCommitFileName).
DEFAULT_STORE_DIR = ".livetrain-store"
COMMIT_FILE = "COMMIT"


class Shard(NamedTuple):
    """A region of a Hugging Face tensor held in ``tensor``: it starts at ``start`` (one index per dim of
    the full tensor) and has ``tensor``'s shape. ``saved``: this rank saves it (a replicated tensor is
    saved by rank 0 only; every rank restores it)."""

    name: str
    start: tuple[int, ...]
    tensor: torch.Tensor
    saved: bool = True


def shards(layout: dict, views: Mapping[str, torch.Tensor], rank: int) -> list[Shard]:
    """The regions of the Hugging Face tensors that one rank's layout views hold (``livetrain.layout.build``
    and ``views`` of that rank): a column-parallel view is a block of rows, a row-parallel one a block of
    columns, a view split into several segments (conv1d's q, k, v parts) one region per segment, a
    replicated view the whole tensor. Only the lowest rank holding an element saves it (the layout's
    ``primary``): rank 0 for replicated tensors, the first of the ranks sharing a KV head when the TP size
    exceeds the KV heads. Tied views are skipped (the tensor they are tied to is the same memory); empty
    regions (vocabulary padding beyond the real rows) too."""
    out: list[Shard] = []
    for v in layout["views"]:
        if v["tied_to"] is not None:
            continue
        t = views[v["hf_name"]]
        ndim = len(v["hf_shape"])
        saved = bool(v.get("primary", rank == 0 if v["shard"] is None else True))
        if v["shard"] is None:
            out.append(Shard(v["hf_name"], (0,) * ndim, t, saved))
            continue
        dim, segments = v["shard"]
        offset = 0
        for start, length in segments:
            part = t.narrow(dim, offset, length)
            offset += length
            if length == 0:
                continue
            where = [0] * ndim
            where[dim] = start
            out.append(Shard(v["hf_name"], tuple(where), part, saved))
    return out


def by_file_names(tensors: Mapping[str, torch.Tensor], model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An engine's tensors (named as the transformers class it serves names its parameters) under the names of
    the model files, which the checkpoint store uses. They differ for a multimodal checkpoint served as its
    text model (``model.language_model.*`` in the files of a ``Qwen3_5ForConditionalGeneration``,
    ``model.*`` in its text-only class): the layout of the files' config.json maps them (docs/layouts.md), and
    refuses, naming the architecture, a wrapper or a quantized checkpoint it cannot map. Other models'
    names are the files' already. A tied parameter is left out (the files store it once)."""
    from livetrain import layout

    with open(os.path.join(os.fspath(model_dir), "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if "text_config" not in config and "quantization_config" not in config:
        return dict(tensors)
    lay = layout.build(config, tensors, engine="hf")
    views = layout.views(lay, tensors)
    return {v["hf_name"]: views[v["hf_name"]] for v in lay["views"] if v["tied_to"] is None}


def _live(tensors: Mapping[str, torch.Tensor] | Iterable[Shard], *, only_saved: bool = False) -> list[tuple]:
    """The core's (name, dtype, shape, address, device, start) tuples from whole tensors by name, or from
    Shards; CUDA tensors are passed in place (the core diffs them on their GPU), after the device has
    finished pending writes."""
    items = (
        [(n, t, []) for n, t in tensors.items()]
        if isinstance(tensors, Mapping)
        else [(s.name, s.tensor, list(s.start)) for s in tensors if s.saved or not only_saved]
    )
    args, devices = [], set()
    for name, t, start in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous: the store reads its bytes in place")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"tensor {name!r} is on {t.device}; the store takes CPU or CUDA tensors")
        if start and len(start) != t.dim():
            raise ValueError(f"tensor {name!r}: region start {start} has {len(start)} dims, the tensor {t.dim()}")
        device = t.device.index if t.device.type == "cuda" else -1
        if device is None:
            device = torch.cuda.current_device()
        devices.add(device)
        args.append((name, dtype_name(t.dtype), list(t.shape), t.data_ptr(), device, start))
    if len(devices) > 1:
        raise ValueError(f"tensors are on several devices ({sorted(devices)}); pass the weights of one device")
    for d in devices - {-1}:
        torch.cuda.synchronize(d)
    return args


def _served_arg(served, held) -> list[tuple[str, str]]:
    """(name, dtype name) of the tensors this process serves, for the core: ``served`` as given, else the
    dtypes of the held Shards (the live memory they view is what is served)."""
    if served is None:
        served = {h.name: h.tensor.dtype for h in held or () if isinstance(h, Shard)}
    return [(n, d if isinstance(d, str) else dtype_name(d)) for n, d in served.items()]


def _held(held) -> list[tuple] | None:
    """(name, start, shape) regions for the core; None: every tensor whole."""
    if held is None:
        return None
    out = []
    for h in held:
        if isinstance(h, Shard):
            if h.saved:
                out.append((h.name, list(h.start), list(h.tensor.shape)))
        else:
            name, start, shape = h
            out.append((name, list(start), list(shape)))
    return out


class CheckpointStore:
    """Generations of a model's weights as XOR deltas against the model directory's safetensors files.

    ``CheckpointStore.create(model_dir)`` makes generation 0 from the files as they are;
    ``CheckpointStore(model_dir)`` opens an existing store (exclusive: one process at a time).
    Use as a context manager, or call ``close()``, to release the lock and the host copy of the head.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        store_dir: str | os.PathLike | None = None,
        *,
        rank: int = 0,
        ranks: int = 1,
        held: Iterable[Shard] | Iterable[tuple[str, Sequence[int], Sequence[int]]] | None = None,
        group: str = "",
        served: Mapping[str, torch.dtype | str] | None = None,
        _create: bool = False,
    ):
        """Opens the store of ``model_dir``. One process per tensor-parallel rank: ``rank`` of ``ranks``
        (rank 0 first; it holds the store's lock, recovers, and commits), ``held`` the regions it keeps a
        head copy of and saves (Shards, of which those with ``saved``, or (name, start, shape); default:
        every tensor whole; ``[]``: none, for a process that only restores), ``group`` the engine the ranks
        serve (parts of another group are refused at commit), ``served`` the dtypes this process's engine
        serves tensors in ({files' name: dtype}; default: the dtypes of the held Shards, else what the store
        records), so that every rank uses its own without waiting for another to record them (saves record
        them)."""
        held = list(held) if held is not None else None
        make = _core.CheckpointStore.create if _create else _core.CheckpointStore.open
        self._s = make(str(model_dir), str(store_dir or ""), rank, ranks, _held(held), group, _served_arg(served, held))
        self.created = False  # set by open_store when it made the store
        # open_store made the store and nothing was saved in it yet: whether it made the directory too.
        self._first_save_of_new: bool | None = None

    @classmethod
    def create(
        cls, model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None, **options
    ) -> "CheckpointStore":
        """Creates the store (generation 0 = the model files as they are; fails if one exists), then opens it
        with ``options`` as ``CheckpointStore()`` takes them (rank, ranks, held, group): e.g. ``held=[]``
        keeps no head copy."""
        return cls(model_dir, store_dir, **options, _create=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._s.close()

    def prepare_gpu(self, device: torch.device | int | str) -> None:
        """Starts what the first save of CUDA weights would otherwise do first, on a thread of its own:
        page-locking the head copy (``cudaHostRegister``: most of the 15.7 s first save of the 27B model's
        50 GiB on the H200), in registrations of whole tensors of ``checkpoint.pin_chunk_mib`` (256 MiB) or
        more with a pause after each: a registration holds up every CUDA call of the process while it runs.
        Returns at once; a save (and :meth:`close`) waits for whatever is still running. Call it after
        opening, when the weights are on ``device``, so that the user's first checkpoint does not pay for it.
        A failure there is left to the first save, which page-locks as before and reports it. Once per open;
        nothing when there is no head copy (``held=[]``)."""
        if not isinstance(device, int):
            d = torch.device(device)
            if d.type != "cuda":
                raise ValueError(f"prepare_gpu: {d} is not a CUDA device")
            device = d.index if d.index is not None else torch.cuda.current_device()
        self._s.prepare_gpu(device)

    @property
    def gpu_prepared(self) -> bool:
        """Whether nothing of :meth:`prepare_gpu`'s is left running (it finished, failed, or never started)."""
        return self._s.gpu_prepared

    @property
    def dir(self) -> str:
        return self._s.dir

    @property
    def head(self) -> int:
        return self._s.head

    @property
    def rank(self) -> int:
        return self._s.rank

    @property
    def ranks(self) -> int:
        return self._s.ranks

    @property
    def oldest(self) -> int:
        return self._s.oldest

    @property
    def materialized(self) -> int:
        return self._s.materialized

    def tensors(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype name, shape) of every tensor of the model, in the store's order; the dtype is the one
        this process serves it in (deltas, restore and compare use it): ``served=`` at open, :meth:`serve_as`,
        or the dtypes of the held Shards, else the one COMMIT records (the files', unless :meth:`set_served`
        or a save recorded another); :meth:`file_dtypes` gives the files'."""
        return [(n, served, list(shape)) for n, _, shape, served, _ in self._s.tensors()]

    def file_dtypes(self) -> dict[str, str]:
        """{name: dtype in the model files} of the tensors served in another dtype (see :meth:`set_served`)."""
        return {n: d for n, d, _, served, _ in self._s.tensors() if served != d}

    def recorded_dtypes(self) -> dict[str, str]:
        """{name: dtype} of every tensor as COMMIT records it: the files' dtype, or the served one once
        :meth:`set_served` or a save recorded it (this process may serve it otherwise: ``served=``)."""
        return {n: recorded for n, _, _, _, recorded in self._s.tensors()}

    def set_served(self, served: Mapping[str, torch.dtype | str]) -> None:
        """Records that the engine serves these tensors (files' names) in other dtypes than the model files
        (vLLM keeps Qwen3.5's ``A_log`` in float32 while the files hold bfloat16): their base becomes the
        files' values converted to that dtype (exact from bf16/fp16 to fp32; torch's round-to-nearest-even
        from fp32 to bf16/fp16) and their deltas are in it. Any other conversion, or a tensor that saved
        generations hold in another dtype, is refused naming the tensor and both dtypes. Rank 0, in a store
        opened with ``held=[]``; a no-op when nothing changes."""
        self._s.set_served(_served_arg(served, None))

    def serve_as(self, served: Mapping[str, torch.dtype | str]) -> None:
        """Declares, after opening, the dtypes this process serves tensors in (as ``served=`` does; nothing is
        written); refused for a tensor this process keeps a head copy of in another dtype."""
        self._s.serve_as(_served_arg(served, None))

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
        written when nothing changed (unless ``save_if_unchanged``). When the first save of a store that
        :func:`open_store` has just created fails, the store is removed (and closed), as ``livetrain
        checkpoint save`` does: it would tie the model files to a store nobody saved in.
        """
        new_dir, self._first_save_of_new = self._first_save_of_new, None
        try:
            return self._s.save(
                _live(tensors),
                weight_version=weight_version,
                optimizer_state=str(optimizer_state or ""),
                save_if_unchanged=save_if_unchanged,
            )
        except Exception:
            if new_dir is not None:
                try:
                    self._s.discard_new(new_dir)
                except _core.Error:  # the save's error is the one to report
                    pass
            raise

    def save_part(
        self, tensors: Iterable[Shard] | Mapping[str, torch.Tensor], *, optimizer_state: str | os.PathLike | None = None
    ) -> dict:
        """This rank's part of the next generation (its ``saved`` Shards, each a held region; written and
        durable on return, even when nothing changed). Returns the descriptor (a dict: ``generation``,
        ``rank``, ``ranks``, ``group``, ``file``, ``bytes``, ``hash``, ``changed``, ``optimizer_state``, ...)
        to gather on rank 0 for :meth:`commit`. Every rank calls :meth:`refresh` after rank 0 committed."""
        return self._s.save_part(_live(tensors, only_saved=True), optimizer_state=str(optimizer_state or ""))

    def commit(
        self, generation: int, parts: Sequence[dict], *, weight_version: int = 0, save_if_unchanged: bool = False
    ) -> dict:
        """Rank 0: checks every rank's part of ``generation`` (one per rank, same TP size and group; each file
        read back against its hash) and commits them. Returns what ``save`` returns; nothing is committed
        when no part changed anything (unless ``save_if_unchanged``)."""
        if generation != self.head + 1:
            raise _core.InvalidArgumentError(
                f"generation {generation} cannot be committed: the next generation is {self.head + 1}"
            )
        return self._s.commit_parts(list(parts), weight_version=weight_version, save_if_unchanged=save_if_unchanged)

    def refresh(self) -> int:
        """Rereads the commit: confirms this rank's last part (or puts its head copy back when rank 0 did
        not commit it) and catches up with generations committed since. Returns the head."""
        return self._s.refresh()

    def restore(
        self,
        generation: int,
        tensors: Mapping[str, torch.Tensor] | Iterable[Shard] | None = None,
        *,
        out_dir: str | os.PathLike | None = None,
    ) -> list[str] | None:
        """Sets ``tensors`` (whole tensors by name, or Shards of any rank at any TP size; in place) to
        ``generation``, or writes it as a new model directory ``out_dir`` (which must not exist or be empty:
        it is filled under a temporary name and renamed into place; the model directory's other top-level files,
        config.json and the tokenizer's among them, are copied as they are, except hidden files and other
        weight formats: docs/checkpoint.md). Tensors not given are untouched.
        With ``out_dir``, returns the tensors written in their served dtype: a tensor served in another dtype
        than the files' is written in the files' dtype when all its values convert back exactly, else in the
        served dtype (nothing is rounded)."""
        if (tensors is None) == (out_dir is None):
            raise ValueError("restore needs exactly one of tensors= or out_dir=")
        if out_dir is not None:
            return self._s.restore_to_dir(generation, str(out_dir))
        self._s.restore_live(generation, _live(tensors))

    def check_restore(self, generation: int, tensors: Mapping[str, torch.Tensor] | Iterable[Shard]) -> None:
        """Checks, writing nothing, what ``restore(generation, tensors)`` reads (the tensors against the store,
        every delta file on the way: size, checksums, header) and the optimizer-state files of ``generation``
        this rank would load (size and hash against the commit: its own part's at the store's TP size, else
        every part's); raises what restore would. A rollback under tensor parallelism has every rank check
        before any rank writes."""
        self._s.check_restore(generation, _live(tensors))

    def compare(self, generation: int, tensors: Mapping[str, torch.Tensor] | Iterable[Shard]) -> dict:
        """How ``tensors`` differ from ``generation``: ``{"tensors", "elements", "first"}``."""
        return self._s.compare_live(generation, _live(tensors))

    def verify(self) -> list[str]:
        """Checks every file each generation names (deltas and parts against their hashes and record
        checksums, optimizer states against their sizes and hashes) and the model files' hashes; the
        problems found (empty: none)."""
        return self._s.verify()

    def materialize(
        self, generation: int, *, copy_symlinks: bool = False, round_to_file_dtype: bool = False
    ) -> list[str]:
        """Writes ``generation`` into the model directory's own files, crash-safe. Returns the tensors written
        in their served dtype: a tensor served in another dtype whose values the files' dtype cannot hold
        (a trained float32 ``A_log`` over bfloat16 files) is written as served, its file rewritten whole
        (transformers and vLLM load it, casting to the model's dtype where they keep another). With
        ``round_to_file_dtype`` such values are rounded to the files' dtype instead (round to nearest even:
        lossy): the rounded weights are saved as a new generation (``head`` + 1) that the files then hold, and
        the rounded tensors are returned (needs the default open: a head copy of every tensor)."""
        return self._s.materialize(generation, copy_symlinks, round_to_file_dtype)

    def gc(self, keep_from: int, *, copy_symlinks: bool = False) -> None:
        """Forgets generations before ``keep_from``, materializing it first when the files are older
        (``copy_symlinks`` as for ``materialize``)."""
        self._s.gc(keep_from, copy_symlinks)


def save_distributed(
    store: CheckpointStore,
    tensors: Iterable[Shard],
    *,
    weight_version: int = 0,
    optimizer_state: str | os.PathLike | None = None,
    save_if_unchanged: bool = False,
    process_group=None,
) -> dict:
    """One generation written by every rank of ``process_group`` (torch.distributed; the store's rank must
    be the rank in that group): each rank saves its part, the descriptors are gathered, rank 0 commits them
    (docs/checkpoint.md, "Generations written by several processes"), and every rank refreshes. Call it on
    every rank at the same point. Returns rank 0's result on every rank; raises on every rank if the
    commit failed (nothing is committed then)."""
    import torch.distributed as dist

    if dist.get_rank(process_group) != store.rank or dist.get_world_size(process_group) != store.ranks:
        raise _core.InvalidArgumentError(
            f"the store is open as rank {store.rank} of {store.ranks}, but this process is rank "
            f"{dist.get_rank(process_group)} of {dist.get_world_size(process_group)} of its process group"
        )
    error, part = None, None
    try:
        part = store.save_part(tensors, optimizer_state=optimizer_state)
    except Exception as e:  # every rank must reach the collectives below, or the others wait forever
        error = f"rank {store.rank}: {type(e).__name__}: {e}"
    parts: list = [None] * store.ranks
    dist.all_gather_object(parts, (part, error), group=process_group)
    result: dict = {}
    if store.rank == 0:
        errors = [err for _, err in parts if err]
        if errors:
            result = {"error": "; ".join(errors)}
        else:
            try:
                result = store.commit(
                    parts[0][0]["generation"],
                    [p for p, _ in parts],
                    weight_version=weight_version,
                    save_if_unchanged=save_if_unchanged,
                )
            except Exception as e:
                result = {"error": f"rank 0: {type(e).__name__}: {e}"}
    box = [result]
    dist.broadcast_object_list(
        box, src=dist.get_global_rank(process_group, 0) if process_group is not None else 0, group=process_group
    )
    store.refresh()
    if "error" in box[0]:
        raise _core.Error(f"checkpoint not committed: {box[0]['error']}")
    return box[0]


def store_path(model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None) -> str:
    """Where the store of ``model_dir`` is: ``store_dir``, or ``MODEL/.livetrain-store``."""
    return str(store_dir) if store_dir else os.path.join(str(model_dir), DEFAULT_STORE_DIR)


def store_exists(model_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None) -> bool:
    """Whether the store of ``model_dir`` has been created (its commit record exists)."""
    return os.path.exists(os.path.join(store_path(model_dir, store_dir), COMMIT_FILE))


def open_store(
    model_dir: str | os.PathLike,
    store_dir: str | os.PathLike | None = None,
    *,
    create: bool = False,
    rank: int = 0,
    ranks: int = 1,
    held: Iterable[Shard] | Iterable[tuple[str, Sequence[int], Sequence[int]]] | None = None,
    group: str = "",
    served: Mapping[str, torch.dtype | str] | None = None,
) -> CheckpointStore:
    """Opens the store of ``model_dir`` (``rank``, ``ranks``, ``held``, ``group`` and ``served`` as
    CheckpointStore takes them); with ``create``, makes it first when it does not exist yet (generation 0 = the model files as
    they are; rank 0 only, the other ranks open after it). The one place that creates stores for
    livetrain's processes: ``store.created`` says whether this call did; if so and its first ``save`` fails,
    the store is removed again."""
    path = store_path(model_dir, store_dir)
    held = list(held) if held is not None else None
    options = dict(rank=rank, ranks=ranks, held=held, group=group, served=served)
    if create and rank == 0 and not store_exists(model_dir, path):
        new_dir = not os.path.exists(path)
        try:
            store = CheckpointStore.create(model_dir, path, **options)
            store.created, store._first_save_of_new = True, new_dir
            return store
        except _core.Error:
            if not store_exists(model_dir, path):
                raise
            # another process created it first: open that one
    return CheckpointStore(model_dir, path, **options)


def _served(store: CheckpointStore, tensors: Mapping[str, torch.Tensor] | Iterable[Shard]) -> list[str]:
    """Checks that every tensor given is one of the store's with its dtype (and shape, for whole tensors);
    returns the store's tensors not given (not served)."""
    given = (
        {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}
        if isinstance(tensors, Mapping)
        else {s.name: (s.tensor.dtype, None) for s in tensors}
    )
    known = {name: (dtype, shape) for name, dtype, shape in store.tensors()}
    files = store.file_dtypes()
    for name, (dtype, shape) in given.items():
        if name not in known:
            raise _core.InvalidArgumentError(
                f"the live weights have a tensor {name!r} that the checkpoint store {store.dir} does not have (the "
                "store was made from other files, or the engine names its tensors differently from the model files)"
            )
        want_dtype, want_shape = known[name]
        if dtype_name(dtype) != want_dtype or (shape is not None and shape != want_shape):
            raise _core.InvalidArgumentError(
                f"tensor {name!r} is {dtype_name(dtype)} {shape if shape is not None else ''} in the live weights but "
                f"{want_dtype} {want_shape} in the checkpoint store {store.dir}"
                + (f" (served as {want_dtype}, {files[name]} in the model files)" if name in files else "")
                + ": the store keeps the dtype the engine served it in when the store was started"
            )
    return sorted(set(known) - set(given))


def _given_dtypes(tensors: Mapping[str, torch.Tensor] | list[Shard]) -> dict[str, torch.dtype]:
    """{name: dtype} of the tensors an engine serves (``{name: tensor}`` or one rank's Shards)."""
    if isinstance(tensors, Mapping):
        return {n: t.dtype for n, t in tensors.items()}
    return {s.name: s.tensor.dtype for s in tensors}


def _adopt_served_dtypes(store: CheckpointStore, given: Mapping[str, torch.dtype]) -> None:
    """Start-up, rank 0: records the dtypes the engine serves tensors in (``given``, see _given_dtypes) where
    they differ from the store's (CheckpointStore.set_served decides what it accepts and says why not)."""
    known = store.recorded_dtypes()
    changed = {n: d for n, d in given.items() if n in known and dtype_name(d) != known[n]}
    if changed:
        store.set_served(changed)


def restore_head(store: CheckpointStore, tensors: Mapping[str, torch.Tensor] | Iterable[Shard]) -> bool:
    """Writes the store's head generation into ``tensors`` (in place: ``{Hugging Face name: tensor}`` or one
    rank's Shards; the tensors the engine serves, any subset of the model files') unless the model files
    already hold it; whether it did. The tensors are checked against the store first, so that a mismatch is
    an error naming the tensor before any write; tensors of the files not given keep the files' bytes."""
    tensors = tensors if isinstance(tensors, Mapping) else list(tensors)
    _served(store, tensors)
    if store.head == store.materialized:
        return False
    store.restore(store.head, tensors)
    return True


def restore_latest(
    tensors: Mapping[str, torch.Tensor] | Iterable[Shard],
    model_dir: str | os.PathLike,
    store_dir: str | os.PathLike | None = None,
    *,
    create: bool = True,
    rank: int = 0,
    ranks: int = 1,
) -> dict:
    """The start-up step of an engine (or of one rank's worker): ``restore_head`` from the store of
    ``model_dir``, creating the store when it is missing (``create``, rank 0). Call it after loading the
    weights from ``model_dir`` and before serving them. ``tensors`` are what the engine serves; tensors of
    the files it does not serve (a vision tower, an MTP head) stay as the files hold them.

    The store is opened without a head copy and closed (its lock released) on return, so that the trainer
    can open it. Returns ``{"store", "generation", "weight_version", "restored", "created", "not_served"}``:
    the head generation, the weight version recorded with it, whether ``tensors`` were changed, whether the
    store was created, and the store's tensors that ``tensors`` leave out.
    """
    tensors = tensors if isinstance(tensors, Mapping) else list(tensors)
    given = _given_dtypes(tensors)
    with open_store(model_dir, store_dir, create=create, rank=rank, ranks=ranks, held=[]) as store:
        # Every rank restores in the dtypes its engine serves (the store converts the files' values), whatever
        # rank 0 has recorded yet; rank 0 records them (a later save by the trainer would too). Tensors the
        # store lacks are refused by _served, naming them.
        known = store.recorded_dtypes()
        store.serve_as({n: d for n, d in given.items() if n in known})
        if rank == 0:
            _adopt_served_dtypes(store, given)
        not_served = _served(store, tensors)
        restored = restore_head(store, tensors)
        return {
            "store": store.dir,
            "generation": store.head,
            "weight_version": store.list()[-1]["weight_version"],
            "restored": restored,
            "created": store.created,
            "not_served": not_served,
        }
