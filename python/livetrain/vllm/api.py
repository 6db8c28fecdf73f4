"""Every vLLM name livetrain relies on, in one place: the functions below are the plugin's only contact
with vLLM objects, and each declares (``_uses``) the vLLM definitions it needs. ``RELIED_ON`` is what
``livetrain.vllm.contract`` checks against the source of each supported vLLM version (tests/python/
test_vllm_contract.py), so a vLLM release that renames or drops one of them fails loudly.

Nothing here imports vLLM at module load; the one function that must (the tensor-parallel rank) imports
it when called.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from livetrain.trainer import routes

# The vLLM versions whose sources the contract tests check (tests/python/vllm_sdists.json pins each
# release in between). 0.26.0 is the first with `vllm.endpoint_plugins`.
SUPPORTED_MIN, SUPPORTED_MAX = "0.26.0", "0.33.0"


@dataclasses.dataclass(frozen=True)
class Api:
    """One vLLM definition livetrain uses.

    kind:
      ``const``    module-level ``name = value`` (a string)
      ``attr``     ``Class.attr``: a class-level (annotated) field, a property, or ``self.attr = ...`` in a method
      ``method``   ``Class.method`` / ``function``: a def whose parameters accept how livetrain calls it:
                   ``params`` positionally (after ``self``), then ``keywords`` by name
      ``call``     somewhere in vLLM, a function that mentions every one of ``words`` calls
                   ``<obj>.name(...)`` with ``nargs`` positional arguments (``awaited``: inside ``await``):
                   how vLLM drives the plugin
      ``mentions`` the body of ``name`` (a function or ``Class.method``; empty: the module) refers to
                   every identifier or string in ``words``
      ``unused``   no string constant anywhere in the ``module`` package equals one of ``words`` (e.g. no
                   vLLM route of its own has one of livetrain's paths)
    module: the dotted module (or modules, the first that defines it wins) where vLLM defines it.
    since: the first vLLM version that has it; livetrain uses it only from that version on.
    """

    kind: str
    module: str | tuple[str, ...]
    name: str
    why: str
    params: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    is_async: bool | None = None
    value: str | None = None
    nargs: int = 0
    awaited: bool = False
    words: tuple[str, ...] = ()
    since: str | None = None

    def __str__(self) -> str:
        mod = self.module if isinstance(self.module, str) else "|".join(self.module)
        return f"{self.kind} {mod}:{self.name}"


RELIED_ON: list[Api] = []


def _uses(*apis: Api) -> None:
    RELIED_ON.extend(apis)


def version_at_least(installed: str, since: str | None) -> bool:
    """Whether ``installed`` (a vLLM version string, e.g. ``0.27.1`` or ``0.28.0.dev3+gabc``) is ``since``
    or newer. Pre-releases of ``since`` count as older."""
    if since is None:
        return True
    from packaging.version import Version

    return Version(installed) >= Version(since)


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from its package metadata (no import of vLLM), or None."""
    from importlib import metadata

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


# ---- plugin groups and the endpoint plugin protocol ----
_INTERFACE = "vllm.plugins.endpoint_plugins.interface"
GENERAL_PLUGINS_GROUP = "vllm.general_plugins"
ENDPOINT_PLUGINS_GROUP = "vllm.endpoint_plugins"
_uses(
    Api(
        "const",
        "vllm.plugins",
        "DEFAULT_PLUGINS_GROUP",
        "the general plugin's entry-point group",
        value=GENERAL_PLUGINS_GROUP,
    ),
    Api(
        "const",
        "vllm.plugins",
        "ENDPOINT_PLUGINS_GROUP",
        "the endpoint plugin's entry-point group",
        value=ENDPOINT_PLUGINS_GROUP,
    ),
    Api(
        "mentions",
        "vllm.plugins",
        "load_endpoint_plugins",
        "endpoint plugins load only when named in VLLM_PLUGINS (docs/vllm.md tells users to set it)",
        words=("VLLM_PLUGINS", "required_tasks"),
    ),
    Api("attr", _INTERFACE, "EndpointPlugin.name", "the plugin's name"),
    Api("attr", _INTERFACE, "EndpointPlugin.required_tasks", "loaded only for servers with these tasks"),
    Api(
        "method",
        _INTERFACE,
        "EndpointPlugin.attach_router",
        "mounts the training routes",
        params=("app",),
        is_async=False,
    ),
    Api(
        "method",
        _INTERFACE,
        "EndpointPlugin.init_state",
        "exports the weights and starts the trainer",
        params=("engine_client", "state", "args"),
        is_async=True,
    ),
    Api(
        "call",
        "vllm",
        "attach_router",
        "vLLM calls plugin.attach_router(app) while building the app",
        nargs=1,
        words=("load_endpoint_plugins",),
    ),
    Api(
        "call",
        "vllm",
        "init_state",
        "vLLM awaits plugin.init_state(engine_client, state, args) before serving",
        nargs=3,
        awaited=True,
        words=("endpoint_plugins",),
    ),
)

# vLLM < 0.31 keeps its own route first when a plugin adds the same path: livetrain's paths must be free
# (trainer.routes: ROUTES, and the metrics at VLLM_METRICS_PATH beside vLLM's own /metrics).
_uses(
    Api(
        "unused",
        "vllm",
        "",
        "the training routes' paths are not vLLM's",
        words=(*dict.fromkeys(r.path for r in routes.ROUTES), routes.VLLM_METRICS_PATH),
    )
)

# ---- the worker extension ----
_uses(
    Api(
        "attr",
        "vllm.config.parallel",
        "ParallelConfig.worker_extension_cls",
        "--worker-extension-cls names livetrain's extension",
    ),
    Api(
        "mentions",
        "vllm.v1.worker.worker_base",
        "WorkerWrapperBase.init_worker",
        "vLLM mixes the extension class into the worker class, so its methods are collective_rpc targets",
        words=("worker_extension_cls", "__bases__"),
    ),
    Api(
        "mentions",
        "vllm.v1.worker.worker_base",
        "WorkerWrapperBase.init_device",
        "init_worker_extension(worker) runs after device init, before the model loads: refusals fail fast",
        words=("init_worker_extension",),
        since="0.33.0",
    ),
)


def worker_config(worker) -> Any:
    """The worker's VllmConfig."""
    return worker.vllm_config


def worker_model(worker):
    """The worker's torch module (unwrapped from CUDA-graph wrappers), whose parameters are served."""
    return worker.model_runner.get_model()


_uses(
    Api("attr", "vllm.v1.worker.worker_base", "WorkerBase.vllm_config", "the worker's configuration"),
    Api("attr", "vllm.v1.worker.worker_base", "WorkerBase.model_runner", "the worker's model runner"),
    Api(
        "method",
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner.get_model",
        "the served torch module",
        is_async=False,
    ),
    Api(
        "method",
        "vllm.v1.worker.gpu.model_runner",
        "GPUModelRunner.get_model",
        "the served torch module (model runner V2)",
        is_async=False,
    ),
)


def tp_rank_size(worker) -> tuple[int, int]:
    """(tensor-parallel rank, size) of a worker."""
    size = int(worker_config(worker).parallel_config.tensor_parallel_size)
    if size == 1:
        return 0, 1
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank()), size


_uses(
    Api(
        "method",
        "vllm.distributed.parallel_state",
        "get_tensor_model_parallel_rank",
        "a worker's TP rank",
        is_async=False,
    )
)


# ---- configuration ----
@dataclasses.dataclass(frozen=True)
class Facts:
    """What livetrain needs to know about a vLLM configuration (VllmConfig), as plain values."""

    model: str
    revision: str | None
    quantization: str | None
    sleep_mode: bool
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    lora: bool
    kv_transfer: bool
    prefix_caching: bool
    worker_extension: str


def config_facts(vllm_config) -> Facts:
    m, p, c = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    return Facts(
        model=str(m.model),
        revision=m.revision,
        quantization=str(m.quantization) if m.quantization else None,
        sleep_mode=bool(m.enable_sleep_mode),
        tensor_parallel=int(p.tensor_parallel_size),
        pipeline_parallel=int(p.pipeline_parallel_size),
        data_parallel=int(p.data_parallel_size),
        lora=vllm_config.lora_config is not None,
        kv_transfer=vllm_config.kv_transfer_config is not None,
        prefix_caching=bool(c.enable_prefix_caching),
        worker_extension=str(p.worker_extension_cls or ""),
    )


_uses(
    *(
        Api("attr", "vllm.config.vllm", f"VllmConfig.{f}", "configuration")
        for f in ("model_config", "parallel_config", "cache_config", "lora_config", "kv_transfer_config")
    ),
    *(
        Api("attr", "vllm.config.model", f"ModelConfig.{f}", "configuration")
        for f in ("model", "revision", "quantization", "enable_sleep_mode")
    ),
    *(
        Api("attr", "vllm.config.parallel", f"ParallelConfig.{f}", "configuration")
        for f in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")
    ),
    Api("attr", "vllm.config.cache", "CacheConfig.enable_prefix_caching", "configuration"),
)


# ---- the engine client (API server side) ----
def engine_config(engine_client):
    return engine_client.vllm_config


async def collective_rpc(engine_client, method: str, *args) -> list:
    """Calls ``method(*args)`` on every worker; one result per worker."""
    return await engine_client.collective_rpc(method, args=args)


async def reset_prefix_cache(engine_client) -> bool:
    """Drops every cached KV block. Running requests are preempted and recomputed: with the default
    (``reset_running_requests=False``) vLLM refuses while any request holds blocks, i.e. always under load."""
    return await engine_client.reset_prefix_cache(reset_running_requests=True)


WEIGHT_VERSION_SINCE = "0.27.0"


async def set_weight_version(engine_client, version: str) -> None:
    """vLLM's own weight-version label (reported with outputs, ``GET /get_weight_version``; 0.27+)."""
    await engine_client.update_weight_version(version)


_CLIENTS = ("vllm.engine.protocol:EngineClient", "vllm.v1.engine.async_llm:AsyncLLM")
_uses(Api("attr", "vllm.engine.protocol", "EngineClient.vllm_config", "the engine's configuration"))
for _where in _CLIENTS:
    _mod, _cls = _where.split(":")
    _uses(
        Api(
            "method",
            _mod,
            f"{_cls}.collective_rpc",
            "reaches the worker extension on every worker",
            params=("method",),
            keywords=("args",),
            is_async=True,
        ),
        Api(
            "method",
            _mod,
            f"{_cls}.reset_prefix_cache",
            "no cached KV from older weights",
            keywords=("reset_running_requests",),
            is_async=True,
        ),
        Api(
            "method",
            _mod,
            f"{_cls}.update_weight_version",
            "vLLM reports livetrain's weight version",
            params=("new_version",),
            is_async=True,
            since=WEIGHT_VERSION_SINCE,
        ),
    )


# ---- the chat template ----
# Where vLLM defines load_chat_template (moved in 0.32, a package from 0.33, which re-exports it).
_CHAT_TEMPLATE_MODULES = (
    "vllm.entrypoints.chat_utils",
    "vllm.renderers.chat_utils",
    "vllm.renderers.chat_utils.chat_template",
)


def chat_template(args) -> str | None:
    """The template vLLM's chat route renders with when it was started with ``--chat-template``: vLLM's own
    ``load_chat_template`` of it (a file, a template vLLM ships, or the template itself), as vLLM's serving
    state does. None without one: vLLM then renders with the tokenizer's, as the trainer does."""
    value = getattr(args, "chat_template", None)
    if value is None:
        return None
    import importlib

    for module in _CHAT_TEMPLATE_MODULES:
        try:
            load = getattr(importlib.import_module(module), "load_chat_template", None)
        except ImportError:
            continue
        if load is not None:
            return load(value)
    raise ImportError(f"vLLM's load_chat_template is in none of {', '.join(_CHAT_TEMPLATE_MODULES)}")


_uses(
    Api(
        "attr",
        ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"),
        "BaseFrontendArgs.chat_template",
        "--chat-template (a field FrontendArgs inherits), passed on to the trainer (moved in 0.29 and 0.32)",
    ),
    Api(
        "method",
        _CHAT_TEMPLATE_MODULES,
        "load_chat_template",
        "what --chat-template holds, read as vLLM reads it",
        params=("chat_template",),
        is_async=False,
    ),
    Api(
        "mentions",
        "vllm.entrypoints.generate.api_router",
        "init_generate_state",
        "vLLM's chat serving renders with load_chat_template(args.chat_template)",
        words=("load_chat_template", "chat_template"),
    ),
)


def default_chat_template_kwargs(args) -> dict:
    """vLLM's ``--default-chat-template-kwargs`` (a dict, vLLM parsed the JSON): the variables every chat
    request's rendering gets unless the request sets its own."""
    return dict(getattr(args, "default_chat_template_kwargs", None) or {})


_CONTENT_FORMAT_MODULE = "vllm.renderers.hf"


def content_format(args, template: str | None) -> str:
    """How vLLM passes a message's string content to ``template`` (the one its chat route renders with):
    ``--chat-template-content-format`` when it is ``string`` or ``openai``; for ``auto`` (the default) what
    vLLM's own detection finds in the template (``openai`` when it loops over a message's content parts)."""
    given = getattr(args, "chat_template_content_format", None) or "auto"
    if given != "auto" or template is None:
        return "string" if given == "auto" else given
    import importlib

    return importlib.import_module(_CONTENT_FORMAT_MODULE)._detect_content_format(template, default="string")


_uses(
    *(
        Api(
            "attr",
            (
                "vllm.entrypoints.common.cli_args",
                "vllm.entrypoints.launchers.cli_args",
                "vllm.entrypoints.openai.cli_args",
            ),
            f"BaseFrontendArgs.{name}",
            f"--{name.replace('_', '-')}, passed on to the trainer (moved in 0.29 and 0.32)",
        )
        for name in ("default_chat_template_kwargs", "chat_template_content_format")
    ),
    Api(
        "mentions",
        ("vllm.entrypoints.generate.api_router",),
        "init_generate_state",
        "vLLM's chat serving renders with both options",
        words=("default_chat_template_kwargs", "chat_template_content_format"),
    ),
    Api(
        "method",
        _CONTENT_FORMAT_MODULE,
        "_detect_content_format",
        "the content format vLLM renders with under auto, detected from the template",
        params=("chat_template",),
        keywords=("default",),
        is_async=False,
    ),
    Api(
        "mentions",
        _CONTENT_FORMAT_MODULE,
        "_resolve_chat_template_content_format",
        "auto is resolved by _detect_content_format on the template",
        words=("_detect_content_format",),
    ),
)


# ---- the API key ----
def api_keys(args) -> list[str]:
    """The keys vLLM's own middleware accepts: ``--api-key`` (a list) or else ``$VLLM_API_KEY``. vLLM guards
    only /v1, /v2, /inference and /cohere, so the training routes check the same keys themselves."""
    return [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]


_uses(
    Api(
        "attr",
        ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"),
        "FrontendArgs.api_key",
        "--api-key (moved in 0.29 and 0.32)",
    ),
    Api("mentions", "vllm.envs", "", "$VLLM_API_KEY", words=("VLLM_API_KEY",)),
)
