"""livetrain: fine-tune a language model while it is being served.

The core (formats, memory sharing, kernels, checkpoint store) is C++/CUDA in the extension module
``livetrain._core``; this package wires it to PyTorch. Every error of the core is a ``livetrain.Error``,
raised as the subclass of its kind (``BusyError`` for a lease or store held by another process, ...).
"""

from livetrain._core import (
    BusyError,
    CudaError,
    Error,
    FormatError,
    InvalidArgumentError,
    IoError,
    NotFoundError,
    SizeOverflowError,
    StaleError,
    UnsupportedError,
    __version__,
)

__all__ = [
    "Error",
    "BusyError",
    "CudaError",
    "FormatError",
    "InvalidArgumentError",
    "IoError",
    "NotFoundError",
    "SizeOverflowError",
    "StaleError",
    "UnsupportedError",
    "__version__",
    "Attached",
    "Exported",
    "attach",
    "build_hf_model",
    "export_cpu",
    "export_cuda",
]
_SHARING = {"Attached", "Exported", "attach", "build_hf_model", "export_cpu", "export_cuda"}


def __getattr__(name: str):
    # Sharing needs torch; importing it lazily keeps `import livetrain` light for tools that do not.
    if name in _SHARING:
        from livetrain import sharing

        return getattr(sharing, name)
    raise AttributeError(f"module 'livetrain' has no attribute {name!r}")
