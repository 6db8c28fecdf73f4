"""The core's durable writes as Python sees them (_core.write_file_atomic, _core.publish_directory): the
one implementation of docs/durable-writes.md that every file livetrain writes goes through."""

import os
import stat

import pytest

from livetrain import _core


def test_write_file_atomic_replaces_content_and_sets_mode(tmp_path):
    path = tmp_path / "state.json"
    _core.write_file_atomic(str(path), b'{"weight_version": 1}')
    assert path.read_bytes() == b'{"weight_version": 1}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    _core.write_file_atomic(str(path), b"\x00\xff" * 1000, 0o600)
    assert path.read_bytes() == b"\x00\xff" * 1000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary left behind


def test_write_file_atomic_replaces_a_symlink_instead_of_writing_through(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"shared cache blob")
    link = tmp_path / "link"
    link.symlink_to("blob")
    _core.write_file_atomic(str(link), b"new")
    assert blob.read_bytes() == b"shared cache blob"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_write_file_atomic_errors_name_the_file(tmp_path):
    missing = tmp_path / "no-such-dir" / "f"
    with pytest.raises(_core.IoError, match=str(missing)):
        _core.write_file_atomic(str(missing), b"x")
    with pytest.raises(_core.InvalidArgumentError, match="mode"):
        _core.write_file_atomic(str(tmp_path / "f"), b"x", 0o170000)
    assert not (tmp_path / "f").exists()
    with pytest.raises(TypeError):
        _core.write_file_atomic(str(tmp_path / "f"), "text is not bytes")


def fill(d):
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "sub").mkdir()
    (d / "sub" / "config.json").write_text("{}")


def test_publish_directory_moves_a_filled_directory_into_place(tmp_path):
    tmp = tmp_path / ".model.tmp"
    fill(tmp)
    _core.publish_directory(str(tmp), str(tmp_path / "model"))
    assert not tmp.exists()
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "model" / "sub" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("existing", ["empty dir", "full dir", "file"])
def test_publish_directory_never_replaces_what_exists(tmp_path, existing):
    tmp = tmp_path / ".model.tmp"
    fill(tmp)
    final = tmp_path / "model"
    if existing == "empty dir":
        final.mkdir()
    elif existing == "full dir":
        fill(final)
        (final / "model.safetensors").write_bytes(b"the other writer's")
    else:
        final.write_text("x")
    with pytest.raises(_core.IoError, match=f"{final} already exists"):
        _core.publish_directory(str(tmp), str(final))
    assert (tmp / "model.safetensors").read_bytes() == b"weights"  # nothing moved
    if existing == "full dir":
        assert (final / "model.safetensors").read_bytes() == b"the other writer's"


def test_publish_directory_of_a_missing_directory_is_not_found(tmp_path):
    with pytest.raises(_core.NotFoundError, match="absent"):
        _core.publish_directory(str(tmp_path / "absent"), str(tmp_path / "model"))
