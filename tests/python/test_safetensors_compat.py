"""Round trips with the reference `safetensors` package, both ways, for every dtype torch and it share:
files we write load there bit-exactly (and are byte-identical to its own output), files it writes load
here bit-exactly; empty and 0-d tensors and sharded directories included."""

import json

import pytest
import safetensors
import safetensors.torch as ref
import torch

import livetrain
from livetrain import safetensors as lst

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES.append(torch.float8_e8m0fnu)
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (3, 5), (2, 3, 4)]


def random_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    """Every bit pattern is possible (NaNs too): compare bits, not values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sample(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            out[f"t{i}.{j}.{str(dtype).split('.')[-1]}"] = random_tensor(dtype, shape, gen)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert tuple(a[k].shape) == tuple(b[k].shape), k
        assert bits(a[k]) == bits(b[k]), k


def test_ours_loads_in_reference_bit_exact_and_byte_identical(tmp_path):
    tensors = sample(1)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    lst.save_file(tensors, ours, metadata={"format": "pt"})
    ref.save_file(tensors, theirs, metadata={"format": "pt"})
    assert_same(ref.load_file(ours), tensors)
    assert ours.read_bytes() == theirs.read_bytes()


def test_reference_files_load_here_bit_exact(tmp_path):
    tensors = sample(2)
    path = tmp_path / "theirs.safetensors"
    ref.save_file(tensors, path)
    assert_same(lst.load_file(path), tensors)
    assert_same(lst.load_file(path, copy=False), tensors)
    assert lst.read_metadata(path) is None


def test_metadata_is_kept_both_ways(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    lst.save_file(t, tmp_path / "a.safetensors", metadata={"format": "pt", "note": "é ✓"})
    with safetensors.safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "é ✓"}
    lst.save_file(t, tmp_path / "b.safetensors")
    assert lst.read_metadata(tmp_path / "b.safetensors") == {"format": "pt"}


def test_aligned_files_load_in_reference(tmp_path):
    tensors = sample(3)
    path = tmp_path / "aligned.safetensors"
    lst.save_file(tensors, path, alignment=4096)
    data = path.read_bytes()
    assert (8 + int.from_bytes(data[:8], "little")) % 4096 == 0
    assert_same(ref.load_file(path), tensors)


def test_sharded_directory_both_ways(tmp_path):
    tensors = sample(4)
    ours = tmp_path / "ours"
    ours.mkdir()
    files = lst.save_model(ours, tensors, max_shard_bytes=300)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 3
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Load the way transformers does: the index, then each shard with the reference library.
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(ref.load_file(ours / shard))
    assert_same(loaded, tensors)

    # A directory sharded by the reference writer, with a hand-written index, loads through our Model.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        ref.save_file({n: tensors[n] for n in part}, theirs / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (theirs / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = lst.Model(theirs)
    assert model.sharded and len(model) == len(tensors)
    assert_same(model.state_dict(), tensors)
    assert_same(model.state_dict(copy=False), tensors)


def test_f4_packed_values_round_trip(tmp_path):
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    t = torch.randint(0, 256, (3, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    lst.save_file({"q": t}, tmp_path / "f4.safetensors")
    info = livetrain._core.SafetensorsFile.open(str(tmp_path / "f4.safetensors")).tensors()[0]
    assert info["dtype"] == "F4" and info["shape"] == (3, 8)  # the file counts single E2M1 values
    back = lst.load_file(tmp_path / "f4.safetensors")["q"]
    assert back.dtype == t.dtype and bits(back) == bits(t)


def test_errors_are_livetrain_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(livetrain.Error, match=r"bad\.safetensors: tensor \"w\": .* needs 12"):
        lst.load_file(bad)
    with pytest.raises(livetrain.Error, match="no such file"):
        lst.load_file(tmp_path / "missing.safetensors")
    with pytest.raises(livetrain.Error, match='tensor "w": 4 bytes given'):
        livetrain._core.safetensors_write(
            str(tmp_path / "x.safetensors"), [("w", "F32", [2], torch.zeros(4, dtype=torch.uint8).numpy())], None
        )
    assert not (tmp_path / "x.safetensors").exists()
