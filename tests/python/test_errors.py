"""The core's error codes reach Python as exception classes: _core.Error and one subclass per
livetrain::ErrorCode (bindings/module.cpp), raised from real failures of the bound functions."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from livetrain import _core

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"

# livetrain::ErrorCode (include/livetrain/error.hpp) → its Python class.
CLASSES = [
    "IoError",
    "FormatError",
    "InvalidArgumentError",
    "NotFoundError",
    "SizeOverflowError",
    "UnsupportedError",
    "CudaError",
    "StaleError",
    "BusyError",
]


@pytest.mark.parametrize("name", CLASSES)
def test_each_code_has_a_subclass_of_error(name):
    cls = getattr(_core, name)
    assert issubclass(cls, _core.Error) and cls is not _core.Error
    assert cls.__module__ == "livetrain._core" and cls.__doc__
    assert issubclass(_core.Error, Exception)


def test_the_classes_are_distinct():
    classes = [getattr(_core, n) for n in CLASSES]
    assert len(set(classes)) == len(classes)
    for a in classes:
        for b in classes:
            assert issubclass(a, b) == (a is b)


def safetensors_bytes(header: str, data: bytes = b"") -> bytes:
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + data


# A bad header's code: its message names the file or the tensor.
BAD_HEADERS = {
    "malformed_is_a_format_error": ('{"a":', _core.FormatError, "bad.safetensors"),
    "shape_overflowing_64_bits_is_a_size_overflow": (
        '{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}',
        _core.SizeOverflowError,
        '"a"',
    ),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_bad_safetensors_header_raises_its_code(tmp_path, case):
    header, error, match = BAD_HEADERS[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(safetensors_bytes(header))
    with pytest.raises(error, match=match):
        _core.SafetensorsFile.open(str(bad))


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(_core.NotFoundError, match="no such file"):
        _core.SafetensorsFile.open(str(tmp_path / "absent.safetensors"))


def test_unknown_dtype_is_an_invalid_argument(tmp_path):
    data = np.zeros(4, dtype=np.uint8)
    with pytest.raises(_core.InvalidArgumentError, match='unknown dtype "F17"'):
        _core.safetensors_write(str(tmp_path / "x.safetensors"), [("x", "F17", [4], data)], None)


def test_writing_into_a_missing_directory_is_an_io_error(tmp_path):
    data = np.zeros(4, dtype=np.uint8)
    with pytest.raises(_core.IoError, match="no-such-dir"):
        _core.safetensors_write(str(tmp_path / "no-such-dir" / "x.safetensors"), [("x", "U8", [4], data)], None)


def test_mixture_of_experts_layout_is_unsupported():
    with pytest.raises(_core.UnsupportedError, match="mixture-of-experts"):
        _core.layout_plan('{"model_type": "mixtral"}', "vllm", 0, 1)


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    _core.safetensors_write_model(str(d), [("w", "BF16", [8], np.arange(16, dtype=np.uint8))], 1 << 30, None)
    return d


def test_a_store_open_twice_is_busy(tmp_path):
    d = model_dir(tmp_path)
    first = _core.CheckpointStore.create(str(d))
    try:
        with pytest.raises(_core.BusyError, match="in use by another process"):
            _core.CheckpointStore.open(str(d))
    finally:
        first.close()
    _core.CheckpointStore.open(str(d)).close()  # free again once closed


def test_a_held_lease_is_busy_and_a_dead_owner_is_stale(tmp_path):
    manifest = tmp_path / "engine.manifest.json"
    exp = _core.Export()
    buf = exp.add_shm(16)
    exp.add_tensor("w", "BF16", [8], [1], buf, 0)
    exp.write_manifest(str(manifest), "", "{}", "reference")
    holder = _core.Attachment.open(str(manifest))
    with pytest.raises(_core.BusyError):
        _core.Attachment.open(str(manifest))
    holder.release_lease()
    del holder, exp

    # An engine process that exported and exited: its manifest names a dead owner.
    gone = tmp_path / "gone.manifest.json"
    code = (
        "import sys; from livetrain import _core; e = _core.Export(); b = e.add_shm(16); "
        "e.add_tensor('w', 'BF16', [8], [1], b, 0); e.write_manifest(sys.argv[1], '', '{}', 'reference')"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, str(gone)], check=True, env=env)
    with pytest.raises(_core.StaleError, match="stale manifest"):
        _core.Attachment.open(str(gone))


def test_python_side_errors_are_still_plain_error():
    # Python code may raise the base class itself, as livetrain.sharing does for wrong tensor devices.
    with pytest.raises(_core.Error):
        raise _core.Error("raised from Python")
