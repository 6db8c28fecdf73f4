"""APOLLO, APOLLO-Mini and AdamW as a torch.optim.Optimizer whose steps run in the livetrain core.

Each parameter is stepped on its own (``step_param``), so the optimizer can run from backward hooks and
free every gradient as soon as it is used (``attach_hooks``): gradient memory is then about one
parameter, not the whole model. bf16 weights are updated in place with stochastic rounding.

Which algorithm a parameter gets is its group's ``algo``: ``"apollo"`` (matrices), ``"adamw"``, or
``"auto"`` (the default: matrices whose smaller side is at least ``rank`` get APOLLO, everything else —
norms, biases — AdamW). ``param_groups(model)`` builds the usual split, with embeddings and lm_head on
APOLLO unless asked otherwise. docs/optim.md has the math and the defaults.

Under tensor parallelism (``tensor_parallel``), each rank steps its part of every sharded parameter: the
core's step in phases (``_core.apollo_phase``), with the few floats that need the whole tensor (the
projection of a gradient sharded along its projected dimension, the norms) summed over the ranks by
``torch.distributed`` in between, so that the ranks together make the TP-1 step.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, NamedTuple

import torch

from livetrain import _core
from livetrain import safetensors as lst

_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}
STATUS_OK, STATUS_NONFINITE_GRAD, STATUS_NONFINITE_UPDATE = 0, 1, 2


class _Load(NamedTuple):
    """One parameter's state as ``Apollo.load_state`` takes it (``Apollo._plan_load``): from file ``first`` its
    step (and prev_norm), and its moments too unless ``parts`` (the files' parts of them: file, shape, dim,
    segments) make them: the full tensor's, of shape ``whole``, cut along ``cut_dim`` (-1: not cut) to the
    optimizer's part."""

    p: torch.Tensor
    group: dict
    key: str
    seed: int
    first: int
    parts: tuple = ()
    whole: tuple = ()
    cut_dim: int = -1


class ParamShard(NamedTuple):
    """A tensor-parallel rank's part of a parameter: ``full_shape`` is the whole tensor's; along ``dim``
    (-1: the rank holds all of it) the rank holds the runs ``segments`` ((start, length) of the full
    tensor's indices, concatenated in the local tensor's order). ``primary``: this rank's values count in
    sums over ranks (of ranks holding the same block, one). ``summed``: a tensor every rank holds whole
    whose gradient was summed over the ranks before the step (livetrain.tensor_parallel's hooks): the same
    gradient on every rank, after a collective every rank passed, so its step needs no collective of its own."""

    full_shape: tuple[int, ...]
    dim: int = -1
    segments: tuple[tuple[int, int], ...] = ()
    primary: bool = True
    summed: bool = False

    def core(self):
        """The core's form (dim, full size along dim, segments, primary); None for a whole tensor."""
        if self.dim < 0:
            return None
        return (self.dim, self.full_shape[self.dim], [tuple(x) for x in self.segments], self.primary)


def _rounding(name: str):
    try:
        return getattr(_core.Rounding, name)
    except AttributeError:
        raise ValueError(f"rounding must be 'stochastic' or 'nearest', not {name!r}") from None


def _scaling(name: str):
    try:
        return getattr(_core.Scaling, name)
    except AttributeError:
        raise ValueError(f"scaling must be 'channel' or 'tensor', not {name!r}") from None


class Apollo(torch.optim.Optimizer):
    """APOLLO (rank r, channel scaling) with AdamW for the parameters APOLLO does not take.

    Defaults follow the official implementation: betas (0.9, 0.999), eps 1e-6, update_proj_gap 200,
    scale 1, channel scaling, the norm-growth limiter on. ``max_grad_norm`` clips each parameter's
    gradient norm before its step (0: off). ``seed`` makes projections and rounding reproducible.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 256,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        scaling: str = "channel",
        limiter: bool = True,
        max_grad_norm: float = 0.0,
        rounding: str = "stochastic",
        adamw_eps: float = 1e-8,
        algo: str = "auto",
        seed: int = 0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if rank < 1 or update_proj_gap < 1 or scale <= 0:
            raise ValueError("rank and update_proj_gap must be >= 1 and scale > 0")
        _scaling(scaling), _rounding(rounding)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            scaling=scaling,
            limiter=limiter,
            max_grad_norm=max_grad_norm,
            rounding=rounding,
            adamw_eps=adamw_eps,
            algo=algo,
        )
        self._param_index: dict = {}
        super().__init__(params, defaults)
        self._groups_by_id = {id(p): g for g in self.param_groups for p in g["params"]}
        self._calls: dict[int, tuple] = {}  # per parameter: the step's fixed arguments (see _call)
        self._batch_workspaces: dict = {}  # per device: the workspace of batched steps (see step)
        self._adamw_workspaces: dict = {}  # per device: the workspace of batched AdamW steps (see step)
        self._batches: dict = {}  # per (kind, device, parameters): the core's batch of their steps (_step_batch)
        self._routes: dict = {}  # per set of parameters with gradients: how step() steps them (_route)
        self._hook_batch_bytes = 0  # attach_hooks(batch_bytes=...)
        self._ready: dict = {}  # per device: parameters whose gradients wait for a batched step, per kind (step_ready)
        self._seed = seed
        self._workspaces: dict[torch.device, torch.Tensor] = {}
        self._shards: dict[int, ParamShard] = {}  # tensor parallelism: id(param) -> its shard (tensor_parallel)
        self._tp_group = None
        self._sumsq: dict[torch.device, torch.Tensor] = {}  # AdamW under TP: ‖G‖² summed over ranks (_gate)
        index = 0
        for group in self.param_groups:
            if group["algo"] not in ("auto", "apollo", "adamw"):
                raise ValueError(f"algo must be 'auto', 'apollo' or 'adamw', not {group['algo']!r}")
            for p in group["params"]:
                index += 1
                self._param_index[p] = index

    # ---- tensor parallelism ----
    def tensor_parallel(self, group, shards: Mapping[torch.Tensor, ParamShard]) -> None:
        """Step as one rank of the ``torch.distributed`` process ``group``: ``shards`` says which part of the
        full tensor each parameter is (parameters not in it are whole on every rank, with the same
        gradient everywhere). Every rank must step the same parameters in the same order (backward hooks
        do). Call before the first step."""
        if self.state:
            raise RuntimeError("tensor_parallel must be set before the first step")
        for p, sh in shards.items():
            if tuple(p.shape) != self._local_shape(sh, p) or (sh.dim >= 0 and p.numel() == 0):
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not the part {sh} describes")
            self._shards[id(p)] = sh
        self._tp_group = group
        self._calls.clear()
        self._routes.clear()

    @staticmethod
    def _local_shape(sh: ParamShard, p: torch.Tensor) -> tuple[int, ...]:
        if sh.dim < 0:
            return tuple(sh.full_shape)
        shape = list(sh.full_shape)
        shape[sh.dim] = sum(length for _, length in sh.segments)
        return tuple(shape)

    def _shard(self, p: torch.Tensor) -> ParamShard:
        return self._shards.get(id(p)) or ParamShard(tuple(p.shape))

    def _channels(self, p: torch.Tensor) -> int:
        """APOLLO's channels this rank holds: rows when the full matrix is tall, else columns."""
        full = self._shard(p).full_shape
        return p.shape[0] if full[0] >= full[1] else p.shape[1]

    # ---- which algorithm, and its state ----
    def algorithm(self, p: torch.Tensor, group: dict | None = None) -> str:
        """The algorithm of ``p``, decided by the full tensor's shape (a rank's part may be smaller)."""
        group = group or self._group_of(p)
        algo = group["algo"]
        full = self._shard(p).full_shape
        if algo == "auto":
            algo = "apollo" if len(full) == 2 and min(full) >= group["rank"] else "adamw"
        if algo == "apollo" and (len(full) != 2 or min(full) < group["rank"]):
            raise ValueError(
                f"APOLLO needs a matrix whose smaller side is >= rank {group['rank']}; got shape {tuple(full)}"
            )
        return algo

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_groups_by_id"):
            for p in self.param_groups[-1]["params"]:
                self._groups_by_id[id(p)] = self.param_groups[-1]

    def _moments(self, p: torch.Tensor, group: dict) -> tuple[str, int]:
        """``p``'s algorithm and how many values each of its moments (m, v) holds: APOLLO's one per channel and
        rank, AdamW's one per element."""
        algo = self.algorithm(p, group)
        return algo, self._channels(p) * group["rank"] if algo == "apollo" else p.numel()

    def _state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            algo, k = self._moments(p, group)
            dev = p.device
            state["m"] = torch.zeros(k, dtype=torch.float32, device=dev)
            state["v"] = torch.zeros(k, dtype=torch.float32, device=dev)
            state["step"] = torch.zeros(1, dtype=torch.int64, device=dev)
            state["status"] = torch.zeros(1, dtype=torch.int32, device=dev)
            if algo == "apollo":
                state["prev_norm"] = torch.full((1,), -1.0, dtype=torch.float32, device=dev)
            state["algo"] = algo
            state["seed"] = (self._seed * 1_000_003 + self._param_index.get(p, 0)) & 0xFFFFFFFFFFFFFFFF
        return state

    def _workspace(self, device: torch.device, nbytes: int) -> torch.Tensor:
        ws = self._workspaces.get(device)
        if ws is None or ws.numel() < nbytes:
            # Zero-filled once: the steps keep their counters at zero between uses.
            ws = torch.zeros(max(nbytes, 4096), dtype=torch.uint8, device=device)
            self._workspaces[device] = ws
        return ws

    # ---- stepping ----
    def _call(self, p: torch.Tensor, group: dict, state: dict) -> tuple:
        """The step's fixed arguments, built once per parameter (addresses of its state, sizes, dtypes,
        a hyperparameter object whose lr and weight decay are refreshed on every step)."""
        call = self._calls.get(id(p))
        if call is not None:
            return call
        if p.dtype not in _DTYPES:
            raise TypeError(f"livetrain optimizers update bf16 or fp32 parameters, not {p.dtype}")
        cuda = p.device.type == "cuda"
        shard = self._shards.get(id(p))
        if state["algo"] == "apollo":
            if p.stride(1) != 1:
                raise ValueError(f"APOLLO needs rows of the weight contiguous; got strides {p.stride()}")
            rows, cols = p.shape
            h = _core.ApolloHyper()
            (h.beta1, h.beta2), h.eps = group["betas"], group["eps"]
            h.rank, h.update_proj_gap = group["rank"], group["update_proj_gap"]
            h.scale, h.scaling, h.limiter = group["scale"], _scaling(group["scaling"]), group["limiter"]
            h.max_grad_norm, h.rounding = group["max_grad_norm"], _rounding(group["rounding"])
            if shard is not None and shard.dim >= 0:
                # A part of a tensor: stepped in phases, with the layout's regions summed over ranks between them.
                nbytes, *regions = _core.apollo_phase_layout(rows, cols, group["rank"], shard.core())
                ws = self._workspace(p.device, nbytes)
                algo = ("apollo-shard", shard.core(), regions)
            else:
                nbytes = _core.apollo_workspace_bytes(rows, cols, group["rank"])
                ws = self._workspace(p.device, nbytes) if cuda else None
                summed = shard is not None and shard.summed
                algo = "apollo" if self._tp_group is None or summed else ("apollo-whole",)
            call = (
                algo,
                h,
                (rows, cols, p.stride(0)),
                (
                    state["m"].data_ptr(),
                    state["v"].data_ptr(),
                    state["prev_norm"].data_ptr(),
                    state["status"].data_ptr(),
                    state["step"].data_ptr(),
                ),
                ws,
                cuda,
            )
        else:
            if not p.is_contiguous():
                raise ValueError(f"AdamW needs a contiguous parameter; got shape {tuple(p.shape)} strides {p.stride()}")
            h = _core.AdamWHyper()
            (h.beta1, h.beta2), h.eps = group["betas"], group["adamw_eps"]
            h.max_grad_norm, h.rounding = group["max_grad_norm"], _rounding(group["rounding"])
            ws = self._workspace(p.device, _core.adamw_workspace_bytes(p.numel())) if cuda else None
            algo = "adamw"
            if shard is not None and shard.dim >= 0:
                # A part of a tensor: ‖G‖² summed over ranks first; rounding keyed by the full tensor's indices.
                algo = ("adamw-shard", shard.core(), math.prod(p.shape[shard.dim + 1 :]), shard.primary)
            elif self._tp_group is not None and not (shard is not None and shard.summed):
                algo = ("adamw-whole", None, 1, True)
            call = (
                algo,
                h,
                (p.numel(),),
                (state["m"].data_ptr(), state["v"].data_ptr(), state["status"].data_ptr(), state["step"].data_ptr()),
                ws,
                cuda,
            )
        self._calls[id(p)] = call
        return call

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, grad: torch.Tensor | None = None, stream: int | None = None) -> None:
        """One step of one parameter with ``grad`` (default ``p.grad``), queued on ``stream`` (default: the
        current stream of the parameter's device)."""
        grad = p.grad if grad is None else grad
        if grad is None:
            return
        group = self._groups_by_id.get(id(p)) or self._group_of(p)
        state = self.state[p] if p in self.state else self._state(p, group)
        algo, h, sizes, ptrs, ws, cuda = self._call(p, group, state)
        if grad.dtype not in _DTYPES or grad.device != p.device:
            raise TypeError(f"gradient must be bf16 or fp32 on {p.device}; got {grad.dtype} on {grad.device}")
        if not grad.is_contiguous():
            grad = grad.contiguous()
        h.lr, h.weight_decay = group["lr"], group["weight_decay"]
        if cuda:
            # The workspace may have grown since this call was built: always pass the current one.
            ws = self._workspaces[p.device]
            if stream is None:
                stream = torch.cuda.current_stream(p.device).cuda_stream
            if torch.cuda.current_device() != p.device.index:
                torch.cuda.set_device(p.device)
        wdt, gdt = _DTYPES[p.dtype], _DTYPES[grad.dtype]
        if isinstance(algo, tuple):
            self._step_shard(p, grad, algo, h, sizes, ptrs, state["seed"], wdt, gdt, cuda, stream or 0)
        elif algo == "apollo":
            rows, cols, ld = sizes
            _core.apollo_step(
                p.data_ptr(),
                wdt,
                ld,
                grad.data_ptr(),
                gdt,
                rows,
                cols,
                *ptrs[:4],
                ptrs[4],
                state["seed"],
                ws.data_ptr() if cuda else 0,
                h,
                cuda,
                stream or 0,
            )
        else:
            m, v, status, step = ptrs
            _core.adamw_step(
                p.data_ptr(),
                wdt,
                grad.data_ptr(),
                gdt,
                sizes[0],
                m,
                v,
                status,
                step,
                state["seed"],
                ws.data_ptr() if cuda else 0,
                h,
                cuda,
                stream or 0,
            )

    def _all_reduce(self, t: torch.Tensor, max: bool = False) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if max else dist.ReduceOp.SUM, group=self._tp_group)

    def _gate(self, device) -> torch.Tensor:
        """A float on ``device`` for a parameter's sum over ranks (AdamW's ‖G‖², or a plain gate)."""
        t = self._sumsq.get(device)
        if t is None:
            t = self._sumsq[device] = torch.zeros(1, dtype=torch.float32, device=device)
        return t

    def _step_shard(self, p, grad, algo, h, sizes, ptrs, seed, wdt, gdt, cuda, stream) -> None:
        """One rank's step of a parameter under tensor parallelism (see tensor_parallel): the core's phases on
        its part of the tensor, with what needs the whole tensor summed over the ranks in between; a tensor
        every rank holds whole is stepped by each after a sum of ‖G‖² (its maximum over ranks: the same
        gradient everywhere, the same decision everywhere). Either way every rank passes a collective before
        it writes, so a rank that fails or dies before it stops every rank there: no rank writes its part
        of this parameter alone."""
        # The workspace may have grown since this call was built: always pass the current one.
        ws = self._workspaces.get(p.device)
        if algo[0] == "apollo-whole":
            gate = self._gate(p.device)
            self._all_reduce(gate)
            rows, cols, ld = sizes
            _core.apollo_step(
                p.data_ptr(), wdt, ld, grad.data_ptr(), gdt, rows, cols, *ptrs[:4], ptrs[4], seed,
                ws.data_ptr() if cuda else 0, h, cuda, stream,
            )  # fmt: skip
            return
        if algo[0] == "apollo-shard":
            _, shard, (first, nfirst, second, nsecond) = algo
            rows, cols, ld = sizes
            m, v, prev, status, step = ptrs
            args = (p.data_ptr(), wdt, ld, grad.data_ptr(), gdt, rows, cols, m, v, prev, status, step, seed)
            floats = ws.view(torch.float32)  # workspaces are whole multiples of 256 bytes
            for phase, (offset, count) in (
                (_core.ApolloPhase.project, (first, nfirst)),
                (_core.ApolloPhase.moments, (second, nsecond)),
                (_core.ApolloPhase.update, (0, 0)),
            ):
                _core.apollo_phase(phase, *args, ws.data_ptr(), h, shard, cuda, stream)
                if count:
                    self._all_reduce(floats[offset : offset + count])
            return
        _, shard, inner, primary = algo
        total = self._gate(p.device)
        if primary:
            _core.adamw_sumsq(
                grad.data_ptr(), gdt, grad.numel(), total.data_ptr(), ws.data_ptr() if cuda else 0, cuda, stream
            )
        else:  # another rank holding the same block contributes
            total.zero_()
        if shard is None:
            self._all_reduce(total, max=True)
        else:
            self._all_reduce(total)
        m, v, status, step = ptrs
        _core.adamw_step(
            p.data_ptr(), wdt, grad.data_ptr(), gdt, sizes[0], m, v, status, step, seed,
            ws.data_ptr() if cuda else 0, h, cuda, stream, shard, inner, total.data_ptr(),
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter that has a gradient. The rank-1 APOLLO steps (APOLLO-Mini) of each device are
        launched together (on CUDA the core batches up to 64 matrices per launch), and so are the AdamW steps
        (norms, biases: on CUDA two launches per 64 tensors instead of two per tensor); same bits as one by one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        # Which parameters step alone and which in which batch: decided once per set of parameters with gradients.
        key = tuple(map(id, params))
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._route(params)
        alone, apollo, adamw = route
        for p in alone:
            self.step_param(p)
        # The matrices first: while the GPU works through them, the host prepares the AdamW batch, which the GPU
        # would otherwise wait for. Separate tensors: the order changes no bit.
        for device, entries in apollo.items():
            self._step_batch("apollo", device, entries)
        for device, entries in adamw.items():
            self._step_batch("adamw", device, entries)
        return loss

    def _route(self, params: list) -> tuple[list, dict, dict]:
        """(parameters that step alone, per device the APOLLO batch's entries, per device the AdamW batch's)."""
        alone, batches = [], {"apollo": {}, "adamw": {}}
        for p in params:
            entry, kind = self._batch_entry(p)
            if kind is None:
                alone.append(p)
            else:
                batches[kind].setdefault(p.device, []).append(entry)
        return alone, batches["apollo"], batches["adamw"]

    def _batch_entry(self, p: torch.Tensor) -> tuple[tuple, str | None]:
        """((p, group, state), the batch ``p`` steps in): "apollo" (rank-1 APOLLO), "adamw", or None (it steps
        alone: APOLLO at rank > 1, and every step under tensor parallelism, which waits for its sums over ranks)."""
        group = self._groups_by_id.get(id(p)) or self._group_of(p)
        state = self.state[p] if p in self.state else self._state(p, group)
        if self._tp_group is not None or p.dtype not in _DTYPES:
            return (p, group, state), None
        if state["algo"] == "apollo":
            return (p, group, state), "apollo" if group["rank"] == 1 else None
        return (p, group, state), "adamw"

    def _step_batch(self, kind: str, device: torch.device, entries: list) -> None:
        """One batched step of ``entries`` (the "apollo" or "adamw" kind) on ``device``'s current stream. Its
        arguments (addresses of weights and state, sizes, hyperparameters) are converted once per set of
        parameters (_core.ApolloBatch, _core.AdamWBatch); per step only the gradients' addresses and the groups'
        learning rates and weight decays go to the core, in one call. On the CPU the core steps them one by one."""
        # The Python here is a few list passes over the parameters (about 1 us a tensor on the developer machine).
        params = [p for p, _, _ in entries]
        key = (kind, device, tuple(map(id, params)))
        weights = list(map(torch.Tensor.data_ptr, params))  # a parameter given other memory (p.data = ...) rebuilds
        cached = self._batches.get(key)
        if cached is None or cached[2] != weights:
            cached = self._batches[key] = (*self._make_batch(kind, entries), weights)
        batch, nbytes, _ = cached
        grads = [p.grad for p in params]
        if not all(map(torch.Tensor.is_contiguous, grads)):
            grads = [g.contiguous() for g in grads]  # each lives until its step is queued
        lr = [group["lr"] for group in self.param_groups]
        wd = [group["weight_decay"] for group in self.param_groups]
        cuda = device.type == "cuda"
        ws, stream = 0, 0
        if cuda:
            # Each kind its own workspace: the slices of one lie elsewhere in the other and would leave floats
            # where these steps keep counters. Zero-filled once: the steps keep their counters at zero between uses.
            workspaces = self._batch_workspaces if kind == "apollo" else self._adamw_workspaces
            buf = workspaces.get(device)
            if buf is None or buf.numel() < nbytes:
                buf = workspaces[device] = torch.zeros(max(nbytes, 256), dtype=torch.uint8, device=device)
            ws, nbytes = buf.data_ptr(), buf.numel()
            if torch.cuda.current_device() != device.index:
                torch.cuda.set_device(device)
            stream = torch.cuda.current_stream(device).cuda_stream
        batch.run(list(map(torch.Tensor.data_ptr, grads)), lr, wd, ws, nbytes, cuda, stream)

    def _make_batch(self, kind: str, entries: list) -> tuple:
        """(the core's batch of ``entries``, its workspace bytes on CUDA)."""
        position = {id(group): i for i, group in enumerate(self.param_groups)}
        items, groups = [], []
        for p, group, state in entries:
            call = self._call(p, group, state)
            h, sizes, ptrs = call[1], call[2], call[3]
            groups.append(position[id(group)])
            dt = _DTYPES[p.dtype]  # a parameter's gradient has its dtype (torch checks every assignment)
            if kind == "apollo":
                (rows, cols, ld), (m, v, prev, status, step) = sizes, ptrs
                items.append((p.data_ptr(), dt, ld, dt, rows, cols, m, v, prev, status, step, state["seed"], h))
            else:
                (numel,), (m, v, status, step) = sizes, ptrs
                items.append((p.data_ptr(), dt, dt, numel, m, v, status, step, state["seed"], h))
        if kind == "apollo":
            nbytes = _core.apollo_many_workspace_bytes([(it[4], it[5], 1) for it in items])
            return _core.ApolloBatch(items, groups), nbytes
        return _core.AdamWBatch(items, groups), _core.adamw_many_workspace_bytes([it[3] for it in items])

    def attach_hooks(self, params: Iterable[torch.Tensor] | None = None, batch_bytes: int = 0) -> list:
        """Step each parameter as soon as its gradient is accumulated, then free the gradient. Call
        ``backward()`` as usual and do not call ``step()``; returns the hook handles.

        ``batch_bytes`` > 0 batches the steps as ``step()`` does (the rank-1 APOLLO steps of APOLLO-Mini, and
        the AdamW steps): parameters whose gradients are ready wait, and step together once the waiting
        gradients hold ``batch_bytes`` (the matrices, and the AdamW tensors too once theirs hold half of it);
        the rest step when the backward pass ends. Their gradients live until then: up to ``batch_bytes`` (plus
        the last gradient) more memory at the peak. The result is the same bits as stepping one at a time.
        Under tensor parallelism every parameter steps at once, alone."""
        if batch_bytes < 0:
            raise ValueError(f"batch_bytes must be >= 0, got {batch_bytes}")
        self._hook_batch_bytes = int(batch_bytes)
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if params is not None and not any(p is q for q in params):
                    continue
                handles.append(p.register_post_accumulate_grad_hook(self.step_ready))
        return handles

    @torch.no_grad()
    def step_ready(self, p: torch.Tensor) -> None:
        """What the hooks do with a parameter whose gradient is ready: step it and free the gradient, or
        (attach_hooks' ``batch_bytes``) queue it for a batched step. Inside a backward pass the queue is
        stepped when the pass ends; outside one, call ``flush_ready()``."""
        if p.grad is None:
            return
        limit = self._hook_batch_bytes
        if limit > 0:
            entry, kind = self._batch_entry(p)
            if kind is not None:
                ready = self._ready.get(p.device)
                if ready is None:
                    ready = self._ready[p.device] = {"apollo": [], "adamw": [], "apollo_bytes": 0, "adamw_bytes": 0}
                ready[kind].append(entry)
                ready[kind + "_bytes"] += p.grad.nbytes
                try:  # once per queued parameter: a pass that fails before its end leaves no stale flag
                    torch.autograd.Variable._execution_engine.queue_callback(self.flush_ready)
                except RuntimeError:  # not inside a backward pass: the caller flushes
                    pass
                if ready["apollo_bytes"] + ready["adamw_bytes"] >= limit:
                    self._flush_kind(p.device, "apollo")
                    # The AdamW tensors (norms, biases: a few KiB each) wait for the end of the pass, in one batch,
                    # unless their gradients are large (embeddings on AdamW).
                    if ready["adamw_bytes"] >= limit // 2:
                        self._flush_kind(p.device, "adamw")
                return
        self.step_param(p)
        p.grad = None

    @torch.no_grad()
    def step_now(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Step ``p`` with ``grad`` at once, as the hooks would (with attach_hooks' ``batch_bytes``, a batch of one:
        on CUDA APOLLO-Mini's batched kernels, faster than step_param's single launch; same bits; else step_param).
        What the trainer does with the output projection's gradient, which it makes after backward."""
        if self._hook_batch_bytes > 0:
            entry, kind = self._batch_entry(p)
            if kind is not None:
                p.grad = grad
                self._step_batch(kind, p.device, [entry])
                p.grad = None
                return
        self.step_param(p, grad)

    @torch.no_grad()
    def flush_ready(self) -> None:
        """Steps every parameter that step_ready queued, and frees their gradients."""
        for device in list(self._ready):
            self._flush_device(device)

    def drop_ready(self) -> None:
        """Forgets the steps that wait (step_ready) and frees their gradients, unstepped: after a backward pass
        that failed, whose end never came. Else the next pass would add its gradients to theirs and step them
        twice."""
        for ready in self._ready.values():
            for p, _, _ in ready["apollo"] + ready["adamw"]:
                p.grad = None
        self._ready.clear()

    def _flush_device(self, device: torch.device) -> None:
        self._flush_kind(device, "apollo")
        self._flush_kind(device, "adamw")
        self._ready.pop(device, None)

    def _flush_kind(self, device: torch.device, kind: str) -> None:
        ready = self._ready.get(device)
        if ready is None or not ready[kind]:
            return
        entries, ready[kind], ready[kind + "_bytes"] = ready[kind], [], 0
        self._step_batch(kind, device, entries)
        for p, _, _ in entries:
            p.grad = None

    # ---- reporting and state ----
    def report(self) -> dict:
        """Steps taken and outcome of each parameter's last step (synchronizes with the device)."""
        out = {"ok": 0, "skipped_nonfinite_grad": [], "nonfinite_update": [], "steps": {}}
        names = getattr(self, "param_names", {})
        for p, state in self.state.items():
            if "status" not in state:
                continue
            status = int(state["status"].item())
            name = names.get(p, f"param{self._param_index.get(p, 0)}")
            out["steps"][name] = int(state["step"].item())
            if status == STATUS_OK:
                out["ok"] += 1
            elif status == STATUS_NONFINITE_GRAD:
                out["skipped_nonfinite_grad"].append(name)
            else:
                out["nonfinite_update"].append(name)
        return out

    def state_bytes(self) -> dict:
        """Optimizer-state bytes per group and in total, beside what AdamW would keep (8 bytes/param)."""
        groups, total, adamw = [], 0, 0
        for i, group in enumerate(self.param_groups):
            b = 0
            for p in group["params"]:
                algo, k = self._moments(p, group)
                b += 8 * k + 16 + (4 if algo == "apollo" else 0)
                adamw += 8 * p.numel()
            groups.append({"group": i, "algo": group["algo"], "bytes": b})
            total += b
        return {"groups": groups, "total": total, "adamw_equivalent": adamw}

    def save_state(self, path: str | os.PathLike, names: dict | None = None) -> None:
        """Write the optimizer state as a safetensors file: per parameter m, v, step (and prev_norm),
        with hyperparameters, seeds and algorithms in the metadata. Parameters are keyed by ``names``
        (parameter -> name) or by their position."""
        tensors, params = {}, {}
        for p, state in self.state.items():
            if "m" not in state:
                continue
            key = self._key(p, names)
            for field in ("m", "v", "step", "prev_norm"):
                if field in state:
                    tensors[f"{key}.{field}"] = state[field].detach().cpu()
            params[key] = {"algo": state["algo"], "seed": state["seed"], "shape": list(p.shape)}
            if self._tp_group is not None:  # which part of the full tensor (load_state reshards by it)
                sh = self._shard(p)
                params[key]["shard"] = [list(sh.full_shape), sh.dim, [list(x) for x in sh.segments], sh.primary]
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        lst.save_file(
            tensors,
            path,
            metadata={
                "format": "pt",
                "livetrain.optimizer": "apollo/1",
                "groups": json.dumps(groups),
                "params": json.dumps(params),
            },
        )

    def check_state(self, path, names: dict | None = None) -> None:
        """Checks the state files ``path`` (one path or a list, as ``load_state`` takes them) as ``load_state``
        would load them into this optimizer, from their headers alone (no tensor read) and changing nothing: it
        raises what ``load_state`` would. A missing, truncated or foreign file; a parameter stepped with another
        algorithm than this optimizer's configuration gives it; moments that do not fit the parameter at this
        optimizer's rank and tensor-parallel part (``tensor_parallel``), or files whose parts do not make one
        tensor (a part outside it, or a run of it that no file holds: a rank's file missing). A parameter's
        state that this optimizer does not hold (by ``names``: one frozen now) is ignored and one that the files
        lack starts fresh, in both. Safetensors holds no checksum: a byte flipped inside a tensor passes here and
        in ``load_state`` (the checkpoint store checks its files' hashes)."""
        self._plan_load(path, names)

    @staticmethod
    def _state_header(path) -> tuple[dict, dict[str, tuple[int, ...]]]:
        """A state file's parameter table (its metadata) and its tensors' shapes, from its header, once the file
        is known to be a livetrain optimizer state (opening it checks that every tensor's bytes lie within it)."""
        f = _core.SafetensorsFile.open(os.fspath(path))
        meta = f.metadata or {}
        if meta.get("livetrain.optimizer") != "apollo/1":
            raise _core.FormatError(f"{path}: not a livetrain optimizer state (metadata livetrain.optimizer missing)")
        return json.loads(meta["params"]), {t["name"]: tuple(t["shape"]) for t in f.tensors()}

    @staticmethod
    def _has(path, shapes: dict, name: str, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The shape of tensor ``name`` of a state file (``shape``: the one it must have)."""
        if name not in shapes:
            raise _core.FormatError(f"{path}: {name} is missing")
        if shape is not None and shapes[name] != shape:
            raise _core.FormatError(f"{path}: {name} has shape {shapes[name]}, expected {shape}")
        return shapes[name]

    def _fits(self, path, key: str, info: dict, p: torch.Tensor, group: dict) -> tuple[str, int]:
        """``p``'s algorithm and moments' size (``_moments``), once its saved state ``info`` is of that algorithm."""
        algo, k = self._moments(p, group)
        if info["algo"] != algo:
            raise _core.InvalidArgumentError(
                f"{path}: {key} was stepped with {info['algo']}, now configured for {algo}"
            )
        return algo, k

    def load_state(self, path, names: dict | None = None) -> None:
        """Restore what save_state wrote (same parameters, same names or order). ``path`` may also be a list
        of the files that the ranks of a tensor-parallel trainer wrote, at any TP size (one file of a TP-1
        trainer included): each parameter's state is assembled from them and cut to this optimizer's part
        (``tensor_parallel``). Every check (``check_state``) comes before any state changes."""
        paths, plan = self._plan_load(path, names)
        tensors = [lst.load_file(p) for p in paths]
        for item in plan:
            state = self._state(item.p, item.group)
            if item.parts:
                self._assemble(item, state, tensors)
            else:
                for field in ("m", "v"):
                    state[field].copy_(tensors[item.first][f"{item.key}.{field}"])
            for field in ("step", "prev_norm"):  # the same on every rank: the ranks step each parameter together
                if field in state:
                    state[field].copy_(tensors[item.first][f"{item.key}.{field}"])
            state["seed"] = item.seed
            self._calls.pop(id(item.p), None)
        self._batches.clear()  # their items carry the seeds just replaced

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _key(self, p, names) -> str:
        return (names or {}).get(p) or f"param{self._param_index.get(p, 0)}"

    def _plan_load(self, path, names: dict | None) -> tuple[list, list[_Load]]:
        """What ``load_state`` copies into which parameter, from the files' headers alone, with every check it
        makes (``check_state`` is this alone): the files, and each parameter's ``_Load``."""
        if isinstance(path, (str, os.PathLike)):
            params, shapes = self._state_header(path)
            if all(
                list(p.shape) == params.get(self._key(p, names), {}).get("shape", list(p.shape)) for p in self._params()
            ):
                return [path], self._plan_same(path, params, shapes, names)
            files = [(path, params, shapes)]  # written at another tensor-parallel size
        else:
            files = [(p, *self._state_header(p)) for p in path]
        return [f[0] for f in files], self._plan_resharded(files, names)

    def _plan_same(self, path, params: dict, shapes: dict, names: dict | None) -> list[_Load]:
        """A file of an optimizer that held the same part of every parameter: each state as it is."""
        plan = []
        for group in self.param_groups:
            for p in group["params"]:
                key = self._key(p, names)
                if key not in params:
                    continue
                algo, k = self._fits(path, key, params[key], p, group)
                for field, shape in (("m", (k,)), ("v", (k,)), ("step", (1,)), ("prev_norm", (1,))):
                    if field != "prev_norm" or algo == "apollo":
                        self._has(path, shapes, f"{key}.{field}", shape)
                plan.append(_Load(p, group, key, params[key]["seed"], 0))
        return plan

    def _plan_resharded(self, files: list[tuple], names: dict | None) -> list[_Load]:
        """Files written by the ranks of another tensor-parallel size: APOLLO's moments are per channel (rows of
        a tall matrix, columns of a wide one), AdamW's per element, so the full tensor's are put together from
        the parts the files record (``_assemble``) and this optimizer's part is cut out. ``files``: (path,
        parameter table, tensor shapes) each."""
        plan = []
        for group in self.param_groups:
            for p in group["params"]:
                key = self._key(p, names)
                found = [
                    (i, path, params[key], shapes) for i, (path, params, shapes) in enumerate(files) if key in params
                ]
                if not found:
                    continue
                full_shape = list(self._shard(p).full_shape)
                algo, k = self._moments(p, group)
                c = 0 if algo == "apollo" and full_shape[0] >= full_shape[1] else 1  # APOLLO's channels' dim
                parts, whole = [], None  # whole: the full tensor's moments, [channels, rank] (APOLLO) or its shape
                for i, path, info, shapes in found:
                    self._fits(path, key, info, p, group)
                    saved_full, dim, segments, _ = info.get("shard") or [info["shape"], -1, [], True]
                    if list(saved_full) != full_shape:
                        raise _core.FormatError(f"{path}: state of {key} is for shape {saved_full}, not {full_shape}")
                    numel = math.prod(self._has(path, shapes, f"{key}.m"))
                    self._has(path, shapes, f"{key}.v", (numel,))
                    if algo == "apollo":
                        rank = numel // max(info["shape"][c], 1)
                        shape, dim, full = [info["shape"][c], rank], (0 if dim == c else -1), [full_shape[c], rank]
                    else:
                        shape, full = list(info["shape"]), full_shape
                    whole = whole or full
                    if full != whole:
                        raise _core.FormatError(
                            f"{path}: {key}'s moments are of rank {full[1]}; another file's of {whole[1]}"
                        )
                    if math.prod(shape) != numel or not self._part_of(shape, dim, segments, whole):
                        raise _core.FormatError(
                            f"{path}: {key}'s part ({numel} values, shape {shape}, segments {segments}) is not a "
                            f"part of its moments' {whole}"
                        )
                    parts.append((i, shape, dim, segments))
                self._covers(found[0][1], key, parts, whole)
                mine = self._shard(p)
                cut, cut_dim = list(whole), -1  # this optimizer's part of the moments, cut along cut_dim
                if mine.dim >= 0 and (algo != "apollo" or mine.dim == c):
                    cut_dim = 0 if algo == "apollo" else mine.dim
                    cut[cut_dim] = sum(length for _, length in mine.segments)
                if math.prod(cut) != k:
                    raise _core.FormatError(
                        f"{found[0][1]}: {key}'s moments ({whole}, of which this part is {cut}) do not fit this "
                        f"optimizer's part of the parameter ({k} values)"
                    )
                first, path, info, shapes = found[0]
                self._has(path, shapes, f"{key}.step", (1,))
                if algo == "apollo":
                    self._has(path, shapes, f"{key}.prev_norm", (1,))
                plan.append(_Load(p, group, key, info["seed"], first, tuple(parts), tuple(whole), cut_dim))
        return plan

    @staticmethod
    def _covers(path, key: str, parts: list, whole: list) -> None:
        """Raises unless the parts put together make the whole of ``key``'s moments: one part that is the whole,
        or parts along one dim whose runs leave no gap (runs held by more than one file, as a replicated shard's,
        may overlap). A gap would be loaded as zeros."""
        if any(dim < 0 for _, _, dim, _ in parts):
            return
        dims = {dim for _, _, dim, _ in parts}
        if len(dims) > 1:
            raise _core.FormatError(f"{path}: {key}'s parts are cut along different dims {sorted(dims)}")
        (dim,) = dims
        reach = 0
        for start, length in sorted(run for _, _, _, segments in parts for run in segments):
            if start > reach:
                break
            reach = max(reach, start + length)
        if reach < whole[dim]:
            raise _core.FormatError(
                f"{path}: {key}'s parts do not cover its moments {whole}: no file holds index {reach} along dim "
                f"{dim} (a rank's file missing?)"
            )

    @staticmethod
    def _part_of(shape: list, dim: int, segments, whole: list) -> bool:
        """Whether a part of ``shape`` fills runs ``segments`` of ``whole`` along ``dim`` (-1: all of it)."""
        if dim < 0:
            return shape == whole
        return (
            len(shape) == len(whole)
            and bool(segments)
            and sum(length for _, length in segments) == shape[dim]
            and all(start >= 0 and start + length <= whole[dim] for start, length in segments)
            and all(shape[d] == whole[d] for d in range(len(whole)) if d != dim)
        )

    def _assemble(self, item: _Load, state: dict, tensors: list[dict]) -> None:
        """A resharded parameter's moments (``_plan_resharded``): the full tensor's from the files' parts, then
        this optimizer's part of them."""

        def indices(segments):
            return torch.cat([torch.arange(start, start + length) for start, length in segments])

        whole = {f: torch.zeros(item.whole, dtype=torch.float32) for f in ("m", "v")}
        for i, shape, dim, segments in item.parts:
            for f in ("m", "v"):
                src = tensors[i][f"{item.key}.{f}"].view(shape).float()
                if dim < 0:
                    whole[f].copy_(src)
                else:
                    whole[f].index_copy_(dim, indices(segments), src)
        for f in ("m", "v"):
            x = whole[f]
            if item.cut_dim >= 0:
                x = x.index_select(item.cut_dim, indices(self._shard(item.p).segments))
            state[f].copy_(x.reshape(-1))

    def reset_state(self) -> None:
        """Forget every parameter's state (moments, step counts, projection seeds): the next step of each
        parameter starts as the first one did."""
        self.state.clear()
        self._calls.clear()
        self._batches.clear()
        self._routes.clear()


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (α = √128), as in the paper."""

    def __init__(self, params, lr: float = 1e-3, **kw):
        kw.setdefault("rank", 1)
        kw.setdefault("scaling", "tensor")
        kw.setdefault("scale", 128.0)
        super().__init__(params, lr=lr, **kw)


def param_groups(model: torch.nn.Module, embeddings: str = "apollo", weight_decay: float = 0.0) -> list[dict]:
    """Split a model's trainable parameters the usual way: matrices -> APOLLO, 1-D (norms, biases) ->
    AdamW without weight decay, embeddings and lm_head -> ``embeddings`` ("apollo", "adamw" or "frozen")."""
    if embeddings not in ("apollo", "adamw", "frozen"):
        raise ValueError(f"embeddings must be 'apollo', 'adamw' or 'frozen', not {embeddings!r}")
    emb_ids = set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding):
            emb_ids.add(id(mod.weight))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        emb_ids.add(id(out_emb.weight))
    mats, vecs, embs, seen = [], [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in emb_ids:
            embs.append(p)
        elif p.dim() == 2:
            mats.append(p)
        else:
            vecs.append(p)
    groups = [
        {"params": mats, "algo": "apollo", "weight_decay": weight_decay},
        {"params": vecs, "algo": "adamw", "weight_decay": 0.0},
    ]
    if embs and embeddings != "frozen":
        groups.append({"params": embs, "algo": embeddings, "weight_decay": weight_decay})
    elif embs:
        for p in embs:
            p.requires_grad_(False)
    return [g for g in groups if g["params"]]
