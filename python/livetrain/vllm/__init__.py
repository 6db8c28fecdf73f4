"""livetrain's vLLM plugin: ``vllm serve`` with /train, /train/status, /checkpoint, /checkpoints and
/rollback on its own port, and a livetrain trainer updating vLLM's weights in place. docs/vllm.md.

Three vLLM extension points, each loaded by vLLM itself:
- ``register`` (entry point ``vllm.general_plugins``): runs in every vLLM process;
- ``WorkerExtension`` (``--worker-extension-cls livetrain.vllm.WorkerExtension``): each worker's weights;
- ``livetrain.vllm.endpoint.EndpointPlugin`` (entry point ``vllm.endpoint_plugins``): the routes.

Importing this package imports neither vLLM nor torch; the parts that need them load on use.
"""

from __future__ import annotations

import logging

from livetrain.vllm.api import SUPPORTED_MAX, SUPPORTED_MIN

__all__ = ["register", "WorkerExtension", "EndpointPlugin", "SUPPORTED_MIN", "SUPPORTED_MAX"]

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point. vLLM runs it in every process it starts (API server,
    engine core, workers), possibly several times, for every ``vllm`` command in an environment where
    livetrain is installed, so it must be idempotent, cheap and harmless: it only warns, once per process,
    when the installed vLLM is outside the range whose sources livetrain's contract tests check. The
    work is done where the user opted in: the worker extension and the endpoint plugin."""
    global _registered
    if _registered:
        return
    _registered = True
    from livetrain.vllm.api import installed_vllm_version, version_at_least

    version = installed_vllm_version()
    if version is None or (version_at_least(version, SUPPORTED_MIN) and not _newer(version, SUPPORTED_MAX)):
        return
    logging.getLogger("vllm.livetrain").warning(
        "livetrain supports vLLM %s to %s; this is vLLM %s. Check it with: python -m livetrain.vllm.contract",
        SUPPORTED_MIN,
        SUPPORTED_MAX,
        version,
    )


def _newer(version: str, than: str) -> bool:
    from packaging.version import Version

    return Version(version).release > Version(than).release


def __getattr__(name: str):
    if name == "WorkerExtension":
        from livetrain.vllm.worker import WorkerExtension

        return WorkerExtension
    if name == "EndpointPlugin":
        from livetrain.vllm.endpoint import EndpointPlugin

        return EndpointPlugin
    raise AttributeError(f"module 'livetrain.vllm' has no attribute {name!r}")
