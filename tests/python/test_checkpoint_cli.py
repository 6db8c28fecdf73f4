"""`livetrain checkpoint` end to end: live weights in shared memory (export_cpu) saved as generations,
restored into the live weights and into a new directory, materialized forwards and backwards, the CLI
killed at random instants during materialize (every model file must then load with the `safetensors`
package to the committed state), and one clear error line for bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

import livetrain
from livetrain import safetensors as lst

from weights import load_dir, perturb, same_bits, snapshot


def run(cli, *args):
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60)


def ok_json(cli, *args):
    r = run(cli, *args, "--json", "-q")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def live(sharded_model, tmp_path):
    """The sharded model's tensors as live weights in shared memory (export_cpu), as an engine shares them."""
    model, tensors = sharded_model
    exported = livetrain.export_cpu(tensors, tmp_path / "m.json", model_path=str(model))
    yield model, tmp_path / "m.json", exported.tensors
    exported.close()


def test_save_restore_materialize_rollback(cli, live, tmp_path):
    model, manifest, tensors = live
    states = [snapshot(tensors)]
    sizes = []
    for g, frac in enumerate([0.001, 0.3, 0.01], start=1):
        perturb(tensors, frac, g)
        states.append(snapshot(tensors))
        r = ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest), "--weight-version", str(g))
        assert r["written"] and r["generation"] == g
        sizes.append((frac, r["bytes"], r["model_bytes"]))
    assert sizes[0][1] * 20 < sizes[0][2], sizes  # a 0.1% change writes a small delta
    print("measured (fraction, delta bytes, model bytes):", sizes)
    assert not ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))["written"]
    lst_ = ok_json(cli, "checkpoint", "list", str(model))
    assert [g["generation"] for g in lst_["generations"]] == [0, 1, 2, 3] and lst_["head"] == 3
    assert [g["weight_version"] for g in lst_["generations"]] == [0, 1, 2, 3]
    assert ok_json(cli, "checkpoint", "verify", str(model), "--manifest", str(manifest))["ok"]

    # Restore into the live weights, then the live weights no longer equal the head.
    ok_json(cli, "checkpoint", "restore", str(model), "1", "--manifest", str(manifest))
    assert same_bits(snapshot(tensors), states[1])
    r = run(cli, "checkpoint", "verify", str(model), "--manifest", str(manifest))
    assert r.returncode == 1 and "differ from generation 3" in r.stdout
    assert ok_json(cli, "checkpoint", "verify", str(model), "--manifest", str(manifest), "--generation", "1")["ok"]

    # Into a new directory, loadable by the reference library.
    ok_json(cli, "checkpoint", "restore", str(model), "2", "--out", str(tmp_path / "out"))
    assert same_bits(load_dir(tmp_path / "out"), states[2])

    # Materialize forwards, then roll back to an older generation.
    ok_json(cli, "checkpoint", "materialize", str(model), "3")
    assert same_bits(load_dir(model), states[3])
    ok_json(cli, "checkpoint", "materialize", str(model), "0")
    assert same_bits(load_dir(model), states[0])
    assert ok_json(cli, "checkpoint", "gc", str(model), "--keep-from", "2")["oldest"] == 2
    assert same_bits(load_dir(model), states[2])
    assert ok_json(cli, "checkpoint", "verify", str(model))["ok"]


def test_killed_during_materialize_leaves_loadable_committed_files(cli, live):
    model, manifest, tensors = live
    states = [snapshot(tensors)]
    for g in range(1, 4):
        perturb(tensors, 0.5, g)
        states.append(snapshot(tensors))
        ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    rng = random.Random(1)
    for _ in range(12):
        p = subprocess.Popen(
            [cli, "checkpoint", "materialize", str(model), str(rng.randrange(4)), "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, 0.02))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert ok_json(cli, "checkpoint", "verify", str(model))["ok"]  # opening recovers
        mat = ok_json(cli, "checkpoint", "list", str(model))["materialized"]
        assert same_bits(load_dir(model), states[mat])


def test_bad_input_is_one_line_and_nonzero(cli, live, tmp_path):
    model, manifest, tensors = live
    r = run(cli, "checkpoint", "list", str(tmp_path / "nothing"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no checkpoint store" in r.stderr
    perturb(tensors, 0.1, 7)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    delta = next((model / ".livetrain-store").glob("gen-*.delta"))
    data = bytearray(delta.read_bytes())
    data[50] ^= 1
    delta.write_bytes(bytes(data))
    before = {f.name: f.read_bytes() for f in model.glob("*.safetensors")}
    r = run(cli, "checkpoint", "materialize", str(model), "1", "-q")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and delta.name in r.stderr and "checksum" in r.stderr
    assert {f.name: f.read_bytes() for f in model.glob("*.safetensors")} == before
    for args in (
        ["checkpoint"],
        ["checkpoint", "save", str(model)],
        ["checkpoint", "frob", str(model)],
        ["checkpoint", "materialize", str(model), "x"],
    ):
        r = run(cli, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, args
    for form in (["checkpoint", "--help"], ["help", "checkpoint"]):
        r = run(cli, *form)
        assert r.returncode == 0 and r.stdout.startswith("usage: livetrain checkpoint")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_cli_checkpoints_gpu_weights_through_a_cuda_manifest(cli, tmp_path):
    """The cron case against a GPU engine: this process exports CUDA weights (CUDA IPC), the CLI attaches,
    diffs them on the GPU, saves, verifies and restores them in place."""
    torch.manual_seed(1)
    host = {
        "model.embed_tokens.weight": (torch.randn(1100, 1024) * 0.02).to(torch.bfloat16),  # two blocks
        "model.norm.weight": torch.ones(64),
    }
    model = tmp_path / "model"
    model.mkdir()
    lst.save_model(model, host, max_shard_bytes=1 << 20)
    tensors = {k: v.cuda() for k, v in host.items()}
    exported = livetrain.export_cuda(tensors, tmp_path / "m.json", model_path=str(model))
    manifest = str(tmp_path / "m.json")
    try:
        states = [{k: v.cpu() for k, v in tensors.items()}]
        for g, frac in enumerate([0.2, 0.01], start=1):
            with torch.no_grad():
                for t in tensors.values():
                    mask = torch.rand(t.shape, device="cuda") < frac
                    t[mask] = (t[mask].float() * 1.01 + 1e-3).to(t.dtype)
            torch.cuda.synchronize()
            states.append({k: v.cpu() for k, v in tensors.items()})
            r = ok_json(cli, "checkpoint", "save", str(model), "--manifest", manifest, "--weight-version", str(g))
            assert r["written"] and r["generation"] == g and r["changed"] > 0
        assert ok_json(cli, "checkpoint", "verify", str(model), "--manifest", manifest)["ok"]
        ok_json(cli, "checkpoint", "restore", str(model), "1", "--manifest", manifest)
        assert same_bits({k: v.cpu() for k, v in tensors.items()}, states[1])
        ok_json(cli, "checkpoint", "restore", str(model), "2", "--out", str(tmp_path / "out"))
        assert same_bits(load_dir(tmp_path / "out"), states[2])
    finally:
        exported.close()


# Regression test for issue #13 item 10: verify said "store OK" for a truncated optimizer-state file (and
# then `serve` refused to start on that store). COMMIT now records its size and hash.
def test_verify_reports_a_truncated_optimizer_state(cli, live, tmp_path):
    model, manifest, tensors = live
    state = tmp_path / "optim.safetensors"
    lst.save_file({"exp_avg": torch.randn(1000)}, state)
    perturb(tensors, 0.1, 9)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest), "--optimizer-state", str(state))
    assert ok_json(cli, "checkpoint", "verify", str(model))["ok"]
    copy = next((model / ".livetrain-store").glob("gen-*.optim"))
    copy.write_bytes(copy.read_bytes()[:-100])
    r = run(cli, "checkpoint", "verify", str(model))
    assert r.returncode == 1 and copy.name in r.stdout and "truncated" in r.stdout, r.stdout


# Arguments a subcommand does not take were ignored: `checkpoint gc MODEL 2` said nothing of the 2 (only that
# --keep-from was missing), `checkpoint save MODEL 7` saved generation 1, `list MODEL --keep-from 3` listed
# everything, `verify MODEL --generation 1` without a manifest checked nothing of generation 1; "-1" was
# "an unknown option". Each is now an error naming the argument, exit code 2, nothing done.
def test_arguments_a_subcommand_does_not_take_are_refused(cli, live):
    model, manifest, tensors = live
    perturb(tensors, 0.1, 3)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    commit = (model / ".livetrain-store" / "COMMIT").read_bytes()
    for args, named in (
        (["save", str(model), "7", "--manifest", str(manifest)], "unexpected argument '7'"),
        (["list", str(model), "5"], "unexpected argument '5'"),
        (["gc", str(model), "1"], "unexpected argument '1' (the generation to keep from is --keep-from GEN)"),
        (["verify", str(model), "1"], "unexpected argument '1' (the generation to compare with is --generation GEN)"),
        (["list", str(model), "--keep-from", "1"], "--keep-from does not apply"),
        (["materialize", str(model), "1", "--manifest", str(manifest)], "--manifest does not apply"),
        (["save", str(model), "--manifest", str(manifest), "--out", "x"], "--out does not apply"),
        (["gc", str(model), "--keep-from", "1", "--round-to-file-dtype"], "--round-to-file-dtype does not apply"),
        (["verify", str(model), "--generation", "1"], "--generation GEN compares the live weights"),
        (["restore", str(model), "-1", "--out", "x"], "GEN must be a non-negative integer, not '-1'"),
        (["materialize", str(model), "99999999999999999999"], "GEN '99999999999999999999' is too large"),
        (["save", str(model), "--manifest", str(manifest), "--weight-version", str(2**64)], f"'{2**64}' is too large"),
    ):
        r = run(cli, "checkpoint", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and named in r.stderr, (args, r.stderr)
    assert (model / ".livetrain-store" / "COMMIT").read_bytes() == commit
    assert ok_json(cli, "checkpoint", "list", str(model))["head"] == 1


# `restore MODEL GEN --out MODEL` replaced the model files the store names by the generation's: every
# later command then refused the store ("changed outside livetrain"). Any existing directory is refused.
def test_restore_out_refuses_an_existing_directory(cli, live, tmp_path):
    model, manifest, tensors = live
    perturb(tensors, 0.2, 4)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    before = {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for out in (model, model / ".livetrain-store", tmp_path / "other"):
        r = run(cli, "checkpoint", "restore", str(model), "1", "--out", str(out), "-q")
        assert r.returncode == 1 and f"{out}: it already exists" in r.stderr, r.stderr
    assert {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()} == before
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory (tempfile.mkdtemp) is taken
    ok_json(cli, "checkpoint", "restore", str(model), "1", "--out", str(tmp_path / "empty"))
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(
        p.name for p in model.glob("*.safetensors*")
    )
    assert ok_json(cli, "checkpoint", "verify", str(model), "--manifest", str(manifest))["ok"]


# A store file (or a manifest) that is a device or a FIFO: COMMIT symlinked to /dev/zero made every command
# read without end (until memory ran out), `manifest inspect /dev/zero` died with std::bad_alloc (exit 3).
def test_a_device_or_fifo_in_a_files_place_is_refused(cli, live, tmp_path):
    model, manifest, tensors = live
    perturb(tensors, 0.2, 5)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    commit = model / ".livetrain-store" / "COMMIT"
    text = commit.read_bytes()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in ("/dev/zero", str(fifo)):
        commit.unlink()
        commit.symlink_to(target)
        for args in (["list", str(model)], ["verify", str(model), "-q"]):
            r = run(cli, "checkpoint", *args)
            assert r.returncode == 1 and f"{commit}: not a regular file" in r.stderr, (target, r.stderr)
        r = run(cli, "manifest", "inspect", target)
        assert r.returncode == 1 and f"{target}: not a regular file" in r.stderr, r.stderr
    commit.unlink()
    commit.write_bytes(text)
    assert ok_json(cli, "checkpoint", "verify", str(model))["ok"]


def _as_nobody():
    """preexec_fn: root ignores file modes; the test's checks need them to apply."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


# `materialize` with model files it cannot write (a read-only model directory, another user's files) wrote
# its journal first and then failed: the journal stayed, and every later command (save, restore, verify)
# redid it on open and failed the same way until the files became writable. Now it fails before the journal.
def test_materialize_of_files_it_cannot_write_leaves_no_journal(cli, sharded_model):
    model_src, tensors = sharded_model
    top = Path(tempfile.mkdtemp())  # not under pytest's 0700 directory: the other user must reach it
    try:
        model = top / "model"
        shutil.copytree(model_src, model)
        exported = livetrain.export_cpu(tensors, top / "m.json", model_path=str(model))
        perturb(exported.tensors, 0.2, 6)
        ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(top / "m.json"))
        exported.close()
        if os.geteuid() == 0:
            for p in [top, *top.rglob("*")]:
                os.chown(p, 65534, 65534)
        files = sorted(model.glob("*.safetensors"))
        before = {f.name: f.read_bytes() for f in files}
        for f in files:
            f.chmod(0o444)
        r = subprocess.run(
            [cli, "checkpoint", "materialize", str(model), "1", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_as_nobody,
        )
        assert r.returncode == 1, r.stderr
        assert not (model / ".livetrain-store" / "materialize.journal").exists()
        assert "materialize writes the model files in place; cannot open" in r.stderr, r.stderr
        assert {f.name: f.read_bytes() for f in files} == before
        r = subprocess.run(
            [cli, "checkpoint", "verify", str(model), "--json", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_as_nobody,
        )
        assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)


# A store this user may read but not write (another user's, read-only media): `verify` and `restore --out`
# failed with "open .../LOCK: Permission denied", though they write nothing in it. They work now (the LOCK
# opened for reading still keeps a writer out), and the store is left as it was.
def test_a_store_this_user_cannot_write_is_verified_and_restored_from(cli, live):
    model, manifest, tensors = live
    perturb(tensors, 0.2, 8)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    generation_1 = snapshot(tensors)
    top = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(model, top / "model")
        store = top / "model" / ".livetrain-store"
        for p in [top, *top.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        store.chmod(0o555)
        (store / "LOCK").chmod(0o444)
        out = top / "out"
        out.mkdir()
        if os.geteuid() == 0:
            os.chown(out, 65534, 65534)
        before = {p.name: p.read_bytes() for p in store.iterdir()}
        for args in (["verify", str(top / "model")], ["restore", str(top / "model"), "1", "--out", str(out / "g1")]):
            r = subprocess.run(
                [cli, "checkpoint", *args, "--json", "-q"],
                capture_output=True,
                text=True,
                timeout=60,
                preexec_fn=_as_nobody,
            )
            assert r.returncode == 0, (args, r.stderr)
        assert same_bits(load_dir(out / "g1"), generation_1)
        assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    finally:
        store.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


# gc materializes its generation first when the files are older; with linked model files that refusal said
# "use --copy-symlinks", which gc ignored (and then refused) while the same refusal came back.
def test_gc_takes_copy_symlinks_for_the_materialize_it_needs(cli, live, tmp_path):
    model, manifest, tensors = live
    for g in (1, 2):
        perturb(tensors, 0.2, 10 + g)
        ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    head = snapshot(tensors)
    shard = sorted(model.glob("*.safetensors"))[0]
    other = tmp_path / "other-name"
    os.link(shard, other)
    original = other.read_bytes()
    r = run(cli, "checkpoint", "gc", str(model), "--keep-from", "2", "-q")
    assert r.returncode == 1 and "hard links" in r.stderr and "--copy-symlinks" in r.stderr, r.stderr
    assert ok_json(cli, "checkpoint", "gc", str(model), "--keep-from", "2", "--copy-symlinks")["oldest"] == 2
    assert other.read_bytes() == original
    assert same_bits(load_dir(model), head)


# A first save that failed (review27: another model's live weights) created the store all the same: the model
# files were then tied to a store nobody saved in ("list" showed generation 0; once the files changed, every
# command refused them as "changed outside livetrain"). It now leaves nothing behind.
def test_a_first_save_that_fails_leaves_no_store(cli, live, tmp_path):
    model, manifest, tensors = live
    other = {n: torch.zeros(3, dtype=t.dtype) for n, t in tensors.items()}  # same names, other shapes
    exported = livetrain.export_cpu(other, tmp_path / "other.json")
    try:
        (tmp_path / "mine").mkdir()
        for extra in ([], ["--store", str(tmp_path / "new")], ["--store", str(tmp_path / "mine")]):
            r = run(cli, "checkpoint", "save", str(model), "--manifest", str(tmp_path / "other.json"), *extra, "-q")
            assert r.returncode == 1 and "model.embed_tokens.weight" in r.stderr, r.stderr
            r = run(cli, "checkpoint", "list", str(model), *extra)
            assert r.returncode == 1 and "no checkpoint store" in r.stderr, r.stderr
        assert not (model / ".livetrain-store").exists() and not (tmp_path / "new").exists()
        assert list((tmp_path / "mine").iterdir()) == []  # the user's directory stays, empty
    finally:
        exported.close()
    perturb(tensors, 0.1, 20)
    r = run(cli, "checkpoint", "save", str(model), "--manifest", str(manifest), "--optimizer-state", "/no/such")
    assert r.returncode == 1 and "/no/such" in r.stderr and not (model / ".livetrain-store").exists()
    assert ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))["generation"] == 1
    # A store that holds a generation stays when a later save fails.
    exported = livetrain.export_cpu(other, tmp_path / "other.json")
    try:
        r = run(cli, "checkpoint", "save", str(model), "--manifest", str(tmp_path / "other.json"), "-q")
        assert r.returncode == 1
    finally:
        exported.close()
    assert ok_json(cli, "checkpoint", "list", str(model))["head"] == 1


# A materialize interrupted (review27): `list` did not say that a journal was pending, and a journal that
# cannot be redone gave no advice. `list` now names it and the command that finishes it; the error says what
# state the model files are in and what to do.
@pytest.mark.parametrize("point", ["journal-written", "apply-half"])
def test_an_interrupted_materialize_is_listed_and_a_bad_journal_explained(cli, live, point):
    model, manifest, tensors = live
    states = [snapshot(tensors)]
    perturb(tensors, 0.5, 21)
    states.append(snapshot(tensors))
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    journal = model / ".livetrain-store" / "materialize.journal"

    def interrupt():
        env = dict(os.environ, LIVETRAIN_CHECKPOINT_CRASH_AT=point)
        p = subprocess.run([cli, "checkpoint", "materialize", str(model), "1", "-q"], env=env, timeout=60)
        assert p.returncode == -signal.SIGKILL and journal.exists()

    interrupt()
    r = run(cli, "checkpoint", "list", str(model))
    assert r.returncode == 0 and "a materialize of generation 0 to 1 was interrupted" in r.stdout, r.stdout
    assert f"livetrain checkpoint verify {model}" in r.stdout and "materialize 0 undoes it" in r.stdout
    pending = ok_json(cli, "checkpoint", "list", str(model))["pending_materialize"]
    assert (pending["from"], pending["to"], pending["journal"]) == (0, 1, str(journal))
    assert ok_json(cli, "checkpoint", "verify", str(model))["ok"]  # opening finishes it
    assert ok_json(cli, "checkpoint", "list", str(model))["pending_materialize"] is None
    assert same_bits(load_dir(model), states[1])
    ok_json(cli, "checkpoint", "materialize", str(model), "0")

    # A journal that cannot be read: whether the files were written decides the advice. `list` reads its header
    # only (the entries hold every changed byte, about the model's size): a header it cannot read is named...
    interrupt()
    data = bytearray(journal.read_bytes())
    journal.write_bytes(b"X" + bytes(data[1:]))
    r = run(cli, "checkpoint", "list", str(model))
    assert "cannot be redone" in r.stdout and "bad magic" in r.stdout, r.stdout
    # ...a bad checksum past it is the opening's to find (it checks the journal before the redo).
    data[-1] ^= 1
    journal.write_bytes(bytes(data))
    r = run(cli, "checkpoint", "list", str(model))
    assert "a materialize of generation 0 to 1 was interrupted" in r.stdout, r.stdout
    assert "checks the journal and finishes it" in r.stdout, r.stdout
    r = run(cli, "checkpoint", "verify", str(model), "-q")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "checksum" in r.stderr, r.stderr
    if point == "journal-written":
        assert "the model files still hold generation 0" in r.stderr and f"remove {journal}" in r.stderr, r.stderr
        journal.unlink()
        assert ok_json(cli, "checkpoint", "verify", str(model))["ok"]
        assert same_bits(load_dir(model), states[0])
    else:
        assert "no longer holds generation 0" in r.stderr and "put back a copy of them" in r.stderr, r.stderr


# `restore --out` wrote the safetensors files and the index only: no config.json, no tokenizer, so the
# directory did not load as a model (test_serve_default_model copied them by hand). The other top-level files
# are copied as they are; hidden files, subdirectories and other weight formats are not.
def test_restore_out_copies_the_model_directorys_other_files(cli, live, tmp_path):
    model, manifest, tensors = live
    perturb(tensors, 0.2, 22)
    ok_json(cli, "checkpoint", "save", str(model), "--manifest", str(manifest))
    small = {"config.json": '{"model_type": "llama"}', "tokenizer.json": "{}", "generation_config.json": "{}"}
    for name, text in small.items():
        (model / name).write_text(text)
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    os.symlink(tmp_path / "chat_template.jinja", model / "chat_template.jinja")  # as in a Hugging Face cache
    for name in ("pytorch_model.bin", "consolidated.pth", ".gitattributes"):
        (model / name).write_bytes(b"old")
    (model / "original").mkdir()
    (model / "original" / "params.json").write_text("{}")
    r = ok_json(cli, "checkpoint", "restore", str(model), "1", "--out", str(tmp_path / "out"))
    assert r["copied"] == sorted([*small, "chat_template.jinja"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*small, "chat_template.jinja", *(p.name for p in model.glob("*.safetensors*"))]
    )
    assert all((out / name).read_text() == text for name, text in small.items())
    assert not (out / "chat_template.jinja").is_symlink()
    assert same_bits(load_dir(out), snapshot(tensors))
    r = run(cli, "checkpoint", "restore", str(model), "1", "--out", str(tmp_path / "out2"))
    assert r.returncode == 0 and "copied from" in r.stdout and "config.json" in r.stdout, r.stdout


# `save A --manifest M` where M's engine serves another model B: nothing compared the two, so B's weights,
# when their names and shapes fit, became a generation of A (and `restore --manifest` overwrote B's live
# weights with A's). The manifest's config is compared with A's config.json; a copy of A elsewhere passes.
def test_a_manifest_of_another_model_is_refused_naming_both(cli, live, tmp_path):
    model, manifest, tensors = live
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 257}
    (model / "config.json").write_text(json.dumps(config))
    perturb(tensors, 0.2, 23)
    other = dict(config, num_hidden_layers=2, torch_dtype="bfloat16")
    b = livetrain.export_cpu(tensors, tmp_path / "b.json", model_path="/models/b", config=other)
    # A copy of the model at another path, its config as an engine writes it (defaults added): accepted.
    served = dict(config, transformers_version="4.57.0", rope_theta=10000.0, use_cache=True)
    copy = livetrain.export_cpu(tensors, tmp_path / "copy.json", model_path="/elsewhere/a", config=served)
    try:
        for args in (["save"], ["save", "--manifest", str(tmp_path / "copy.json")], ["restore", "1"], ["verify"]):
            if args[1:2] == ["--manifest"]:
                assert ok_json(cli, "checkpoint", "save", str(model), *args[1:])["generation"] == 1
                continue
            r = run(cli, "checkpoint", args[0], str(model), *args[1:], "--manifest", str(tmp_path / "b.json"), "-q")
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert f"is of another model than {model}" in r.stderr and "/models/b" in r.stderr, r.stderr
            assert "num_hidden_layers 2" in r.stderr and "num_hidden_layers 1" in r.stderr, r.stderr
            assert (model / ".livetrain-store").exists() == (args[0] != "save")
    finally:
        b.close()
        copy.close()
    assert ok_json(cli, "checkpoint", "list", str(model))["head"] == 1
