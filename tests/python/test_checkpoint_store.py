"""livetrain.checkpoint: the store from Python on torch tensors (save, list, restore, verify, errors), and
restore_latest, which engines call at start-up."""

import os
import shutil

import pytest
import torch

import livetrain
from livetrain import _core
from livetrain import safetensors as lst
from livetrain.checkpoint import CheckpointStore, open_store, restore_latest, store_exists, store_path

from weights import load_dir, perturb, same_bits, snapshot


def test_save_list_restore_verify(sharded_model, tmp_path):
    d, live = sharded_model
    g0 = snapshot(live)
    with CheckpointStore.create(d) as store:
        assert store.head == 0 and store.verify() == []
        assert store.save(live)["written"] is False  # nothing changed
        perturb(live, 0.01, 1)
        r1 = store.save(live, weight_version=7)
        g1 = snapshot(live)
        assert r1["written"] and r1["generation"] == 1 and 0 < r1["changed"] < r1["elements"]
        perturb(live, 0.2, 2)
        r2 = store.save(live)
        g2 = snapshot(live)
        assert r2["generation"] == 2 and r2["bytes"] > r1["bytes"]
        gens = store.list()
        assert [g["generation"] for g in gens] == [0, 1, 2]
        assert gens[1]["weight_version"] == 7 and gens[1]["changed"] == r1["changed"]

        store.restore(1, live)
        assert same_bits(live, g1)
        assert store.compare(2, live)["elements"] > 0
        store.restore(0, live)
        assert same_bits(live, g0)
        store.restore(2, out_dir=tmp_path / "g2")
        assert same_bits(load_dir(tmp_path / "g2"), g2)
        assert store.verify() == []
    # Reopened, the head is generation 2.
    with CheckpointStore(d) as store:
        assert store.head == 2
        assert store.compare(2, g2)["elements"] == 0


USAGE_KEYS = {
    "wall_seconds",
    "user_seconds",
    "system_seconds",
    "minor_faults",
    "major_faults",
    "voluntary_switches",
    "involuntary_switches",
}


@pytest.mark.parametrize("early_writer", [1, 0])
def test_save_reports_what_its_threads_used(tmp_path, early_writer):
    """A save's "usage": the encoder's chunks (thread time against the CPU time they got) and the process over
    the save, on both writers' paths; a save after no change encoded nothing. 24 MiB of bf16, so that the
    encode takes CPU time getrusage can see (tens of milliseconds)."""
    torch.manual_seed(0)
    live = {
        f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(1024, 4096) * 0.02).to(torch.bfloat16) for i in range(3)
    }
    d = tmp_path / "model"
    d.mkdir()
    lst.save_model(d, live)
    _core.tuning_set("checkpoint.early_writer", early_writer)
    try:
        with CheckpointStore.create(d) as store:
            perturb(live, 0.3, 3)
            r = store.save(live)
            u = r["usage"]
            enc, proc = u["encode"], u["process"]
            assert set(enc) == USAGE_KEYS and set(proc) == USAGE_KEYS
            assert enc["wall_seconds"] > 0 and enc["user_seconds"] + enc["system_seconds"] > 0
            assert proc["wall_seconds"] >= r["encode_seconds"] > 0
            # every thread of the process, the encoder's among them (getrusage's times are rescaled: a margin)
            cpu = proc["user_seconds"] + proc["system_seconds"]
            assert cpu >= enc["user_seconds"] + enc["system_seconds"] - 0.05
            assert u["encode_wait_seconds"] >= -1e-6
            again = store.save(live)
            assert again["written"] is False and again["usage"]["encode"]["wall_seconds"] == 0
    finally:
        _core.tuning_reset()


def test_check_restore_reads_what_restore_would_and_writes_nothing(sharded_model, tmp_path):
    """check_restore passes where restore would succeed and raises what it would (a delta on the way flipped
    inside, an optimizer state replaced) with the live weights untouched, from the head copy and from the
    model files alike (held=[]: every region from the files)."""
    d, live = sharded_model
    state = tmp_path / "optimizer.safetensors"
    state.write_bytes(b"state one")
    with CheckpointStore.create(d) as store:
        perturb(live, 0.05, 4)
        store.save(live, optimizer_state=state)
        perturb(live, 0.05, 5)
        store.save(live)
        now = snapshot(live)
        for g in (0, 1, 2):
            store.check_restore(g, live)
        gens = store.list()
        delta = os.path.join(store.dir, gens[1]["delta"])
        good = open(delta, "rb").read()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x10  # a byte inside generation 1's delta, not its size: only checksums tell
        open(delta, "wb").write(bad)
        with pytest.raises(livetrain.FormatError, match="checksum"):
            store.check_restore(0, live)  # from the head copy: back through 2 and 1
        store.check_restore(1, live)  # back through 2 alone
        assert same_bits(live, now)
    with CheckpointStore(d, held=[]) as store:
        with pytest.raises(livetrain.FormatError, match="checksum"):
            store.check_restore(1, live)  # from the files: 1's delta on the way
        store.check_restore(0, live)
        open(delta, "wb").write(good)
        store.check_restore(1, live)
        with open(os.path.join(store.dir, gens[1]["optimizer_state"]), "wb") as f:
            f.write(b"state two")  # the same size, another content
        with pytest.raises(livetrain.FormatError, match="optimizer state .* has hash"):
            store.check_restore(1, live)
    assert same_bits(live, now)


def test_save_after_rollback_and_materialize(sharded_model):
    d, live = sharded_model
    with CheckpointStore.create(d) as store:
        perturb(live, 0.05, 3)
        store.save(live)
        g1 = snapshot(live)
        store.materialize(1)
        assert store.materialized == 1
        assert same_bits(load_dir(d), g1)
        store.gc(1)
        assert store.oldest == 1


def test_bad_input_is_a_livetrain_error(sharded_model, tmp_path):
    d, live = sharded_model
    with pytest.raises(livetrain.Error, match="no checkpoint store|COMMIT|not"):
        CheckpointStore(d)
    with CheckpointStore.create(d) as store:
        with pytest.raises(livetrain.Error, match="in use by another process"):
            CheckpointStore(d)
        wrong = dict(live)
        wrong["model.norm.weight"] = torch.ones(64)
        with pytest.raises(livetrain.Error, match="model.norm.weight"):
            store.save(wrong)
        renamed = {("model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in live.items()}
        with pytest.raises(livetrain.Error, match="model.language_model.*is not in the checkpoint store"):
            store.save(renamed)
        with pytest.raises(ValueError, match="not contiguous"):
            store.save({**live, "model.layers.0.mlp.up_proj.weight": live["model.layers.0.mlp.up_proj.weight"].t()})
        with pytest.raises(livetrain.Error, match="generation 5"):
            store.restore(5, live)
        with pytest.raises(ValueError):
            store.restore(0)
    with pytest.raises(livetrain.Error, match="already exists"):
        CheckpointStore.create(d)


def test_restore_latest_creates_the_store_then_restores_its_head(sharded_model, tmp_path):
    d, live = sharded_model
    files = snapshot(live)
    # No store yet: created, generation 0 = the files, the tensors untouched.
    r = restore_latest(live, d)
    assert r == {
        "store": store_path(d),
        "generation": 0,
        "weight_version": 0,
        "restored": False,
        "created": True,
        "not_served": [],
    }
    assert same_bits(live, files)
    with CheckpointStore(d) as store:  # closed by restore_latest: it opens
        perturb(live, 0.05, 5)
        store.save(live, weight_version=12)
        g1 = snapshot(live)
    # An engine starting from the files gets generation 1.
    fresh = snapshot(files)
    r = restore_latest(fresh, d)
    assert r["generation"] == 1 and r["weight_version"] == 12 and r["restored"] and not r["created"]
    assert same_bits(fresh, g1)
    # Materialized into the files: nothing to restore.
    with CheckpointStore(d) as store:
        store.materialize(1)
    r = restore_latest(g1, d)
    assert r["generation"] == 1 and not r["restored"]
    # Another dtype than the one generations were saved in is refused before anything is written, naming the
    # tensor and both dtypes (test_checkpoint_served_dtype.py: a served dtype set before any save).
    other = {k: v.float() for k, v in files.items()}
    with pytest.raises(livetrain.Error, match=r'"model.embed_tokens.weight" is served as F32 .* saved as BF16'):
        restore_latest(other, d)
    # A tensor the engine does not serve keeps the files' bytes; one the store lacks is refused.
    served = {k: v.clone() for k, v in files.items() if k != "model.norm.weight"}
    with CheckpointStore(d) as store:
        store.materialize(0)
    r = restore_latest(served, d)
    assert r["restored"] and r["not_served"] == ["model.norm.weight"]
    assert same_bits(served, {k: v for k, v in g1.items() if k != "model.norm.weight"})
    with pytest.raises(livetrain.Error, match="live weights have a tensor 'lm_head.weight' that the checkpoint store"):
        restore_latest({**g1, "lm_head.weight": g1["model.norm.weight"]}, d)
    # Elsewhere, and without create: a missing store is an error.
    with pytest.raises(livetrain.Error, match="no checkpoint store"):
        restore_latest(g1, d, tmp_path / "elsewhere", create=False)
    assert restore_latest(g1, d, tmp_path / "elsewhere")["created"]


def test_create_opens_with_the_given_options(sharded_model):
    """create() opens the new store as CheckpointStore() would with the same options: with held=[] no head copy
    (it restores, and refuses to save naming the tensor); open_store(create=True) passes them through."""
    d, live = sharded_model
    files = snapshot(live)
    with CheckpointStore.create(d, held=[]) as store:
        assert store.head == 0 and store.rank == 0 and store.ranks == 1
        perturb(live, 0.05, 9)
        with pytest.raises(livetrain.Error, match="model.embed_tokens.weight"):
            store.save(live)
        store.restore(0, live)
        assert same_bits(live, files)
    with pytest.raises(livetrain.Error, match="already exists"):
        CheckpointStore.create(d)
    shutil.rmtree(store_path(d))
    with open_store(d, create=True, held=[]) as store:
        assert store.created
        with pytest.raises(livetrain.Error, match="model.embed_tokens.weight"):
            store.save(live)


# A first save that failed left the store open_store(create=True) had made (`livetrain checkpoint save` removes
# it since store27): it tied the model files to a store nobody saved in, which refuses them once they change.
def test_a_failed_first_save_of_a_store_open_store_created_leaves_no_store(sharded_model, tmp_path):
    d, live = sharded_model
    wrong = {**live, "model.norm.weight": torch.ones(64)}
    with open_store(d, create=True) as store:
        assert store.created
        with pytest.raises(livetrain.Error, match="model.norm.weight"):
            store.save(wrong)
    assert not os.path.exists(store_path(d))
    # A directory given that was there before stays, without the store's files.
    given = tmp_path / "given"
    given.mkdir()
    with open_store(d, given, create=True) as store:
        with pytest.raises(ValueError, match="not contiguous"):
            store.save({**live, "model.layers.0.mlp.up_proj.weight": live["model.layers.0.mlp.up_proj.weight"].t()})
    assert list(given.iterdir()) == []
    # Only the first save: one that succeeded (here writing nothing) keeps the store through later failures...
    with open_store(d, create=True) as store:
        assert store.save(live)["written"] is False
        with pytest.raises(livetrain.Error, match="model.norm.weight"):
            store.save(wrong)
    assert store_exists(d)
    # ...and a store open_store opened, not created, stays whatever fails.
    with open_store(d, create=True) as store:
        assert not store.created
        with pytest.raises(livetrain.Error, match="model.norm.weight"):
            store.save(wrong)
    assert store_exists(d)


def _twin_model_dirs(tmp_path, live):
    """The same model files in tmp_path/cpu and tmp_path/gpu (1 MiB shards): one store each."""
    a, b = tmp_path / "cpu", tmp_path / "gpu"
    a.mkdir()
    lst.save_model(a, live, max_shard_bytes=1 << 20)
    shutil.copytree(a, b)
    return a, b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_cuda_save_matches_cpu_save_and_round_trips(tmp_path):
    """Saves from CUDA tensors (diffed on the GPU against the page-locked head) write the same delta bytes
    as saves from the same weights on the CPU, over several generations and a tensor of several blocks;
    every generation restores bit-exact, into a directory and into the CUDA tensors."""
    torch.manual_seed(1)
    live = {
        "model.embed_tokens.weight": (torch.randn(1100, 1024) * 0.02).to(torch.bfloat16),  # 1.1M: 2 blocks
        "model.layers.0.mlp.up_proj.weight": (torch.randn(112, 64) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(65),
    }
    a, b = _twin_model_dirs(tmp_path, live)
    cuda = {k: v.cuda() for k, v in live.items()}
    snaps = [snapshot(live)]
    with CheckpointStore.create(a) as cpu_store, CheckpointStore.create(b) as gpu_store:
        for g, fraction in enumerate([0.2, 0.001, 1.0], start=1):
            perturb(live, fraction, 10 + g)
            for k in cuda:
                cuda[k].copy_(live[k])
            rc, rg = cpu_store.save(live, weight_version=g), gpu_store.save(cuda, weight_version=g)
            assert rc["generation"] == rg["generation"] == g
            assert rc["changed"] == rg["changed"] > 0
            assert rc["bytes"] == rg["bytes"]
            name = f"gen-{g:020d}.delta"
            assert (a / ".livetrain-store" / name).read_bytes() == (b / ".livetrain-store" / name).read_bytes()
            snaps.append(snapshot(live))
        assert gpu_store.compare(3, cuda)["elements"] == 0
        for g, want in enumerate(snaps):
            gpu_store.restore(g, cuda)
            assert same_bits({k: v.cpu() for k, v in cuda.items()}, want), g
            assert gpu_store.compare(g, cuda)["elements"] == 0
            gpu_store.restore(g, out_dir=tmp_path / f"out{g}")
            assert same_bits(load_dir(tmp_path / f"out{g}"), want), g
        perturb(live, 0.5, 99)
        assert gpu_store.compare(0, {k: v.cuda() for k, v in live.items()})["elements"] > 0
        with pytest.raises(ValueError, match="several devices"):
            gpu_store.save({**cuda, "model.norm.weight": live["model.norm.weight"]})
    with CheckpointStore(b) as reopened:
        assert reopened.head == 3
        assert reopened.compare(3, {k: v.cuda() for k, v in snaps[3].items()})["elements"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_cuda_save_after_prepare_gpu_writes_the_cpu_saves_bytes(tmp_path):
    """prepare_gpu page-locks the head copy on a thread of its own (here in two registrations of whole tensors:
    checkpoint.pin_chunk_mib 2, an embedding of 2.25 MB, then the norm); the saves after it (the first may
    still wait for it) write the CPU save's bytes, and close waits for it."""
    torch.manual_seed(2)
    live = {
        "model.embed_tokens.weight": (torch.randn(1100, 1024) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(65),
    }
    a, b = _twin_model_dirs(tmp_path, live)
    with CheckpointStore.create(a) as cpu_store, CheckpointStore.create(b) as gpu_store:
        _core.tuning_set("checkpoint.pin_chunk_mib", 2)
        try:
            gpu_store.prepare_gpu("cuda")
            gpu_store.prepare_gpu(torch.cuda.current_device())  # once per open: a no-op
        finally:
            _core.tuning_reset()
        for g, fraction in enumerate([0.2, 0.05], start=1):
            perturb(live, fraction, 20 + g)
            rc, rg = cpu_store.save(live), gpu_store.save({k: v.cuda() for k, v in live.items()})
            assert rc["generation"] == rg["generation"] == g and rc["changed"] == rg["changed"] > 0
            assert gpu_store.gpu_prepared  # the save waited for it
            name = f"gen-{g:020d}.delta"
            assert (a / ".livetrain-store" / name).read_bytes() == (b / ".livetrain-store" / name).read_bytes()
    with CheckpointStore.create(tmp_path / "gpu", tmp_path / "other") as fresh:
        fresh.prepare_gpu(0)  # closed while it may still run: close waits for it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"checkpoint.diff": 1},
        {"checkpoint.diff": 2, "checkpoint.diff_slots": 2},
        {"checkpoint.diff": 1, "checkpoint.pipeline": 1, "checkpoint.digests": 1},
        {"checkpoint.diff": 1, "checkpoint.pipeline": 1, "checkpoint.digests": 1, "checkpoint.early_writer": 1},
    ],
)
def test_cuda_save_of_odd_sized_mixed_dtypes_in_small_groups(tmp_path, knobs):
    """Regression test for issue #15's cudaErrorMisalignedAddress on the Qwen3.5-27B shapes: a bf16 tensor
    of odd size that 1 MiB groups of the GPU diff split (odd changed counts), followed in the same group by
    fp32 ones (A_log [48]) and odd-sized bf16 ones (conv1d [C, 1, 4], norms); the GPU save writes the CPU
    save's bytes under the shipped diff and its variants."""
    import shutil

    from livetrain import _core

    torch.manual_seed(2)
    live = {
        "model.layers.0.linear_attn.in_proj_qkvz.weight": (torch.randn(777777) * 0.02).to(torch.bfloat16),
        "model.layers.0.linear_attn.A_log": torch.randn(48),
        "model.layers.0.linear_attn.dt_bias": (torch.randn(48)).to(torch.bfloat16),
        "model.layers.0.linear_attn.conv1d.weight": (torch.randn(1281, 1, 4) * 0.1).to(torch.bfloat16),
        "model.layers.0.linear_attn.norm.weight": torch.randn(129),
        "model.layers.1.mlp.down_proj.weight": (torch.randn(300001) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.randn(5121),
    }
    a, b = tmp_path / "cpu", tmp_path / "gpu"
    a.mkdir()
    lst.save_model(a, live)
    shutil.copytree(a, b)
    cuda = {k: v.cuda() for k, v in live.items()}
    try:
        _core.tuning_reset()
        _core.tuning_set("checkpoint.group_mib", 1)
        for name, value in knobs.items():
            _core.tuning_set(name, value)
        with CheckpointStore.create(a) as cpu_store, CheckpointStore.create(b) as gpu_store:
            for g, fraction in enumerate([0.5, 0.3], start=1):
                split = "model.layers.0.linear_attn.in_proj_qkvz.weight"
                perturb({k: v for k, v in live.items() if k != split}, fraction, 40 + g)
                # One change in the split tensor's first group (its next group then starts at an offset of
                # 2 mod 4) and more after the 1 MiB boundary; the fp32 norm that follows has changes too.
                live[split][0] += 1.0
                tail = live[split][700000:]
                perturb({"t": tail}, fraction, 50 + g)
                for k in cuda:
                    cuda[k].copy_(live[k])
                rc, rg = cpu_store.save(live), gpu_store.save(cuda)
                assert rc["changed"] == rg["changed"] > 0
                name = f"gen-{g:020d}.delta"
                assert (a / ".livetrain-store" / name).read_bytes() == (b / ".livetrain-store" / name).read_bytes()
            assert gpu_store.save(cuda)["written"] is False
            assert gpu_store.compare(2, cuda)["elements"] == 0
    finally:
        _core.tuning_reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
@pytest.mark.parametrize(
    "knobs",
    [
        {"checkpoint.diff": 2, "checkpoint.diff_slots": 2},
        {"checkpoint.diff": 2, "checkpoint.diff_slots": 3},
        {"checkpoint.diff": 2, "checkpoint.diff_slots": 16},
        {"checkpoint.diff": 2, "checkpoint.diff_slots": 3, "checkpoint.digests": 0},
        {"checkpoint.diff": 1},
    ],
    ids=["slots2", "slots3", "slots16", "slots3-no-digests", "diff1"],
)
def test_cuda_save_with_many_groups_per_slot(tmp_path, knobs):
    """The GPU diff with its copies in and out overlapped (checkpoint.diff 2) reuses each slot's device buffers
    for every slots-th group while the others are in flight, and takes the counts and value offsets through
    mapped host memory: with 1 MiB groups over ~13 MB of odd-sized bf16, fp32 and int8 tensors (a dozen groups
    and more, group boundaries inside tensors), a dense step (the values outgrow what the store reserved), a
    sparse one touching a few groups, one element in the last tensor, and no change: every delta is the CPU
    save's, byte for byte, and the live weights equal the head afterwards."""
    torch.manual_seed(3)
    live = {}
    for i, (n, dt) in enumerate(
        [(1234567, torch.bfloat16), (48, torch.float32), (999999, torch.bfloat16), (77777, torch.float32)]
        + [(333331, torch.bfloat16), (5, torch.int8), (2000003, torch.bfloat16), (129, torch.float32)]
        + [(1500001, torch.float32), (31, torch.bfloat16)]
    ):
        t = torch.randint(-100, 100, (n,), dtype=torch.int8) if dt == torch.int8 else (torch.randn(n) * 0.02).to(dt)
        live[f"model.layers.{i}.weight"] = t
    a, b = _twin_model_dirs(tmp_path, live)
    cuda = {k: v.cuda() for k, v in live.items()}
    last = f"model.layers.{len(live) - 1}.weight"
    try:
        _core.tuning_reset()
        _core.tuning_set("checkpoint.group_mib", 1)
        for name, value in knobs.items():
            _core.tuning_set(name, value)
        with CheckpointStore.create(a) as cpu_store, CheckpointStore.create(b) as gpu_store:
            steps = [
                lambda: perturb({k: v for k, v in live.items() if v.dtype != torch.int8}, 0.6, 61),
                lambda: perturb({k: live[k] for k in list(live)[2:4]}, 0.01, 62),
                lambda: live[last].view(torch.int16)[-1].bitwise_xor_(1),
            ]
            for g, step in enumerate(steps, start=1):
                step()
                for k in cuda:
                    cuda[k].copy_(live[k])
                rc, rg = cpu_store.save(live), gpu_store.save(cuda)
                assert rc["generation"] == rg["generation"] == g
                assert rc["changed"] == rg["changed"] > 0
                name = f"gen-{g:020d}.delta"
                assert (a / ".livetrain-store" / name).read_bytes() == (b / ".livetrain-store" / name).read_bytes(), g
            assert rg["changed"] == 1
            assert gpu_store.save(cuda)["written"] is False
            assert gpu_store.compare(3, cuda)["elements"] == 0
    finally:
        _core.tuning_reset()
