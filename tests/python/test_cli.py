"""The `livetrain` CLI: inspect as a table and as JSON, help for every command, one clear line and a
non-zero exit on bad input."""

import json
import subprocess

import torch

import livetrain
from livetrain import safetensors as lst


def run(cli, *args):
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60)


def make_model(path):
    path.mkdir()
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 16).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16).to(torch.bfloat16),
        "model.norm.weight": torch.ones(16),
    }
    lst.save_model(path, tensors, max_shard_bytes=1024)
    return tensors


def test_inspect_table_and_json(cli, tmp_path):
    make_model(tmp_path / "m")
    r = run(cli, "inspect", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "model.layers.0.self_attn.q_proj.weight  BF16" in r.stdout
    assert "3 tensors, 1296 elements" in r.stdout and "sharded" in r.stdout
    r = run(cli, "inspect", str(tmp_path / "m"), "--json")
    doc = json.loads(r.stdout)
    assert doc["sharded"] is True and doc["total_bytes"] == 64 * 16 * 2 + 16 * 16 * 2 + 16 * 4
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["model.norm.weight"]["shape"] == [16] and by_name["model.norm.weight"]["dtype"] == "F32"
    assert {f["name"] for f in doc["files"]} == set(t["file"] for t in doc["tensors"])


def test_help_for_every_command(cli):
    top = run(cli, "--help")
    assert top.returncode == 0 and "inspect" in top.stdout and "devices" in top.stdout
    for cmd in ("inspect", "devices"):
        for form in ([cmd, "--help"], ["help", cmd]):
            r = run(cli, *form)
            assert r.returncode == 0 and r.stdout.startswith(f"usage: livetrain {cmd}"), form
    assert run(cli, "--version").stdout.startswith("livetrain ")


def test_bad_input_is_one_line_and_nonzero(cli, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b'\x05\0\0\0\0\0\0\0{"a":')
    r = run(cli, "inspect", str(bad))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(bad) in r.stderr and "unexpected end of input" in r.stderr
    r = run(cli, "inspect", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "no such file" in r.stderr
    for args in (["inspect"], ["inspect", "--bogus", "x"], ["frobnicate"], []):
        r = run(cli, *args)
        assert r.returncode == 2 and r.stderr.strip(), args


def test_devices_reports_without_failing(cli):
    r = run(cli, "devices", "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert isinstance(doc["devices"], list)
    if not doc["devices"]:
        assert doc["reason"]


# A manifest exported without config.json (export_cpu(..., config=None)): diagnose said "config.json:
# missing string field "model_type"", sending the user to the model directory's config.json, which has it.
def test_diagnose_of_a_manifest_without_a_config_names_the_manifest(cli, tmp_path):
    tensors = make_model(tmp_path / "m")
    exported = livetrain.export_cpu(tensors, tmp_path / "e.json", model_path=str(tmp_path / "m"))
    try:
        r = run(cli, "diagnose", "--manifest", str(tmp_path / "e.json"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{tmp_path / 'e.json'}: the engine recorded no config.json in it" in r.stderr, r.stderr
    finally:
        exported.close()
