"""Weight sharing between an engine and a trainer: export (engine side), attach (trainer side), and a
Hugging Face model whose parameters are views of the engine's memory.

The core (manifest format, shared memory, CUDA IPC, owner liveness, the single-trainer lease) is C++;
this module only converts between torch tensors and the core's pointers.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from typing import Callable, Mapping

import torch

from livetrain import _core, layout
from livetrain.safetensors import dtype_name, torch_dtype

__all__ = ["Attached", "Exported", "attach", "export_cpu", "export_cuda", "build_hf_model", "layout_views"]

# Placement of each tensor in a shared-memory segment: aligned to 64 bytes (a cache line, and enough
# for every vectorised CPU kernel torch uses).
_ALIGN = 64


class Attached:
    """An attached engine: holds the exclusive trainer lease (unless ``take_lease=False``) and the
    mappings. ``tensors`` maps engine names to zero-copy torch tensors on CPU or CUDA; they keep the
    mappings alive even after :meth:`close`, which gives the lease up."""

    def __init__(
        self,
        manifest_path: str | os.PathLike,
        *,
        check_owner: bool = True,
        take_lease: bool = True,
        owner_uid: int | None = None,
    ):
        self.path = os.fspath(manifest_path)
        self._a = _core.Attachment.open(self.path, check_owner, take_lease, owner_uid)
        self.manifest: dict = json.loads(self._a.manifest_json())
        self.tensors: dict[str, torch.Tensor] = {}
        for name, dtype, t in self._a.tensors():
            want = torch_dtype(dtype)
            # 8-bit float formats have no DLPack code and cross as uint8: reinterpret, same bytes.
            self.tensors[name] = t if t.dtype == want else t.view(want)

    @property
    def config(self) -> dict:
        """The model's config.json, as the engine recorded it."""
        return self.manifest["model"]["config"]

    @property
    def lease_held(self) -> bool:
        return self._a.lease_held

    def buffers(self) -> list[tuple[int, int, int]]:
        """(address, size, device) of each mapped buffer; device -1 is host memory."""
        return self._a.buffers()

    def close(self) -> None:
        """Release the lease now; another trainer may attach."""
        self._a.release_lease()

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(
    manifest_path: str | os.PathLike, *, check_owner: bool = True, take_lease: bool = True, owner_uid: int | None = None
) -> Attached:
    """Attach to an engine's weights. Raises livetrain.Error if the manifest is malformed or stale (its
    owner has exited, or the machine rebooted since, or it is not the process that maps the memory), if
    the engine or its memory belongs to another user than ``owner_uid`` (default: this process's), or if
    another trainer holds the lease (keyed on the memory, whatever path the manifest is read from)."""
    return Attached(manifest_path, check_owner=check_owner, take_lease=take_lease, owner_uid=owner_uid)


class Exported:
    """What an engine has shared. Keep it alive as long as trainers may attach: for CPU exports,
    destroying it unlinks the shared-memory segment (mappings that trainers already hold stay valid).
    ``tensors`` are the shared tensors: for CPU, views of the segment that the engine must use as its
    weights from now on; for CUDA, the engine's own tensors."""

    def __init__(self, export, tensors: dict[str, torch.Tensor], manifest_path: str):
        self._export = export
        self.tensors = tensors
        self.manifest_path = manifest_path
        # The segments' names must go at exit even if torch still holds views (so the C++ destructor
        # would never run): /dev/shm would otherwise keep the whole model until reboot.
        self._unlink = weakref.finalize(self, export.unlink_segments)

    def close(self) -> None:
        """Stop sharing: new trainers can no longer attach (mappings already made stay valid)."""
        self._unlink()
        self._export = None
        self.tensors = {}


def _model_args(
    manifest_path: str | os.PathLike,
    *,
    model_path: str | os.PathLike = "",
    config: Mapping | None = None,
    engine: str = "reference",
    tp_rank: int = 0,
    tp_size: int = 1,
    group: str = "",
) -> dict:
    """The manifest's path and model record, the keyword arguments of ``export_cpu`` and ``export_cuda``:
    the model's directory and config.json (what a trainer builds its model from), the engine's kind (its
    layout, livetrain.layout.engine_layout), its tensor-parallel rank of ``tp_size``, and at ``tp_size`` > 1
    the ``group`` that names this engine's ranks (the same string in every rank's manifest, e.g. a run
    directory or a random id: how the trainer's ranks tell two engines of the same model apart)."""
    return dict(
        path=os.fspath(manifest_path),
        model_path=os.fspath(model_path) if model_path else "",
        config_json=json.dumps(dict(config or {})),
        engine=engine,
        tp_rank=tp_rank,
        tp_size=tp_size,
        group=group,
    )


def export_cpu(tensors: Mapping[str, torch.Tensor], manifest_path: str | os.PathLike, **model) -> Exported:
    """Copy ``tensors`` once into a new POSIX shared-memory segment and write the manifest (``model``: see
    ``_model_args``). Returns the segment's views under the same names: the engine must serve from those
    (e.g. ``param.data = view``), so that a trainer's in-place updates reach it. Entries that are the same
    tensor share one place."""
    manifest = _model_args(manifest_path, **model)  # a wrong keyword fails before the segment exists
    placed: dict[tuple, int] = {}
    offsets: list[tuple[str, torch.Tensor, int]] = []
    size = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device) if t.numel() else None
        if key is not None and key in placed:
            offsets.append((name, t, placed[key]))
            continue
        size = (size + _ALIGN - 1) // _ALIGN * _ALIGN
        offsets.append((name, t, size))
        if key is not None:
            placed[key] = size
        size += t.numel() * t.element_size()
    exp = _core.Export()
    buf = exp.add_shm(max(size, 1))
    raw = exp.shm_tensor(buf)  # uint8, the whole segment
    views: dict[str, torch.Tensor] = {}
    copied: set[int] = set()
    for name, t, offset in offsets:
        n = t.numel() * t.element_size()
        view = raw[offset : offset + n].view(t.dtype).view(t.shape)
        if offset not in copied:
            view.copy_(t.detach())
            copied.add(offset)
        views[name] = view
        exp.add_tensor(name, dtype_name(t.dtype), list(t.shape), list(view.stride()), buf, offset)
    exp.write_manifest(**manifest)
    return Exported(exp, views, os.fspath(manifest_path))


def export_cuda(tensors: Mapping[str, torch.Tensor], manifest_path: str | os.PathLike, **model) -> Exported:
    """Share CUDA tensors in place (no copy) and write the manifest (``model``: see ``_model_args``): one
    IPC handle per underlying cudaMalloc allocation, each tensor recorded by offset and strides. Refuses
    VMM memory (``expandable_segments``, vLLM sleep mode) with an error saying what to change. Run it
    after the engine's last reallocation of its weights."""
    manifest = _model_args(manifest_path, **model)
    exp = _core.Export()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            raise _core.InvalidArgumentError(
                f"tensor {name!r}: export_cuda needs CUDA tensors (got "
                f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__})"
            )
        if t.numel() == 0:
            continue  # no allocation to point into
        if any(s < 0 for s in t.stride()):
            raise _core.UnsupportedError(f"tensor {name!r}: negative strides cannot be shared")
        exp.add_cuda_tensor(name, dtype_name(t.dtype), list(t.shape), list(t.stride()), t.data_ptr())
    exp.write_manifest(**manifest)
    return Exported(exp, dict(tensors), os.fspath(manifest_path))


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside goes to the meta device (no memory, no init cost), while buffers
    (rotary inv_freq and the like, which are not in the engine's weights) are computed for real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


# The name-mapping hook. A function from the attached engine to {Hugging Face name: tensor view}. The
# identity is right when the engine stores weights under their HF names (livetrain's reference engine);
# the layout subsystem provides the mapping for engines that merge or shard them (vLLM's qkv_proj,
# gate_up_proj, TP shards): its views are slices of the engine tensors, never copies.
HfViews = Callable[[Attached], Mapping[str, torch.Tensor]]


def _identity_views(attached: Attached) -> Mapping[str, torch.Tensor]:
    return attached.tensors


def layout_views(attached: Attached) -> Mapping[str, torch.Tensor]:
    """HF name -> zero-copy view for an engine that lays its weights out its own way (vLLM's merged
    qkv_proj and gate_up_proj, padded vocabularies, ...), from the manifest's config and engine kind
    (livetrain.layout). A tensor-parallel rank holds shards, from which no full HF model can be built."""
    model = attached.manifest["model"]
    if model["tp_size"] != 1:
        raise _core.UnsupportedError(
            f"{attached.path}: the engine is tensor-parallel rank {model['tp_rank']} of "
            f"{model['tp_size']}; building a full Hugging Face model needs tp_size 1"
        )
    lay = layout.build(model["config"], attached.tensors, engine=layout.engine_layout(model["engine"]))
    return layout.views(lay, attached.tensors)


def _default_views(attached: Attached) -> Mapping[str, torch.Tensor]:
    # An "hf" layout maps every tensor to itself: no views to compute (and any model family works).
    if layout.engine_layout(attached.manifest["model"]["engine"]) == "hf":
        return _identity_views(attached)
    return layout_views(attached)


def _text_model_views(config: Mapping, model: torch.nn.Module, views: Mapping[str, torch.Tensor]) -> dict:
    """A multimodal checkpoint's views, named as its files name the text model (``model.language_model.*``:
    what the layout of a vLLM engine gives), under the names of the text-only class transformers builds for
    it (``model.*``). The layout of config.json maps the one to the other, with the prefixes the checkpoint
    store uses for the same model (livetrain.checkpoint.by_file_names)."""
    params = [(n, dtype_name(p.dtype), list(p.shape)) for n, p in model.named_parameters()]
    lay = layout.build(dict(config), params, engine="hf")
    return {v["engine_name"]: views[v["hf_name"]] for v in lay["views"] if v["hf_name"] in views}


def build_hf_model(
    attached: Attached,
    *,
    hf_views: HfViews | None = None,
    requires_grad: bool = True,
    model_class=None,
    config: Mapping | None = None,
) -> torch.nn.Module:
    """A transformers model for the engine's config whose parameters are the engine's memory.

    The model is built with its parameters on the meta device, then each parameter is replaced by the
    view of the same HF name (``hf_views``; by default the layout views for a ``vllm`` engine, the engine's
    own tensors otherwise); tied parameters stay one Parameter. ``config`` replaces the engine's config.json
    (a tensor-parallel rank's, whose sizes are its shards': livetrain.tensor_parallel). A multimodal
    checkpoint is built as its text model (``AutoModelForCausalLM``'s class for it), its views renamed from
    the files' names.
    Buffers are computed on the device of the weights, exactly as ``from_pretrained`` computes them.
    Raises livetrain.Error naming the parameter when a view is missing or has another shape or dtype."""
    import transformers

    views = dict((hf_views or _default_views)(attached))
    if not views:
        raise _core.FormatError(f"{attached.path}: the engine shares no tensors")
    multimodal = "text_config" in attached.config
    # The model's dtype: any view's but one an engine keeps in float32 whatever the model's (vLLM's A_log).
    first = next((v for n, v in views.items() if not layout.served_in_fp32(n)), next(iter(views.values())))
    device, dtype = first.device, first.dtype
    cfg = dict(attached.config if config is None else config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise _core.FormatError(f"{attached.path}: model.config has no model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with _parameters_on_meta(), torch.device(device):
        if model_class is None:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = model_class._from_config(config, dtype=dtype)

    if multimodal and any(n not in views for n, _ in model.named_parameters()):
        views = _text_model_views(attached.config, model, views)  # served as its text model (files' names)
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        new = replaced.get(id(param))
        if new is None:
            view = views.get(name)
            if view is None:
                raise _core.NotFoundError(
                    f"{attached.path}: the engine has no tensor for parameter {name!r} "
                    f"(shape {tuple(param.shape)}, {param.dtype})"
                )
            served_fp32 = view.dtype == torch.float32 and layout.served_in_fp32(name)  # vLLM's A_log
            if tuple(view.shape) != tuple(param.shape) or (view.dtype != param.dtype and not served_fp32):
                raise _core.InvalidArgumentError(
                    f"{attached.path}: tensor {name!r} is {tuple(view.shape)} {view.dtype}, the "
                    f"model expects {tuple(param.shape)} {param.dtype}"
                )
            new = torch.nn.Parameter(view, requires_grad=requires_grad)
            replaced[id(param)] = new
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = new
    for name, buf in model.named_buffers():
        if buf.device.type == "meta":
            raise _core.UnsupportedError(f"buffer {name!r} was not computed (still on the meta device)")
    return model
