"""livetrain: fine-tune a language model while it is being served.

The core (formats, memory sharing, kernels, checkpoint store) is C++/CUDA in the extension module
``livetrain._core``; this package wires it to PyTorch.
"""

from livetrain._core import Error, __version__

__all__ = ["Error", "__version__"]
