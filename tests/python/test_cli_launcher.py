"""The `livetrain` console command of an installed package (livetrain.cli): it runs the C++ CLI inside the
package, with LIVETRAIN_PYTHON set to its own interpreter so that serve/train run that Python and no other.
Here the package's binary is the development build's (scripts/wheel_test.sh checks the installed wheel)."""

import subprocess
import sys

from servers import ENV

# Runs livetrain.cli.main with the development build standing in for the package's binary.
LAUNCH = "import sys, livetrain.cli as c; c.binary = lambda: sys.argv[1]; c.main(sys.argv[2:])"


def launch(cli, *args, env=None):
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, cli, *args], capture_output=True, text=True, env=env or ENV, timeout=120
    )


def test_core_commands_are_the_binary(cli):
    r = launch(cli, "--version")
    assert r.returncode == 0 and r.stdout == subprocess.run([cli, "--version"], capture_output=True, text=True).stdout
    r = launch(cli, "inspect", "/nonexistent/model.safetensors")
    assert r.returncode == 1 and "no such file" in r.stderr  # the binary's exit status and message, unchanged


def test_serve_runs_the_launchers_python(cli):
    # No python3 on PATH: `serve --help` reaches Python's option list only through LIVETRAIN_PYTHON.
    env = {k: v for k, v in ENV.items() if k != "LIVETRAIN_PYTHON"} | {"PATH": "/nonexistent"}
    r = launch(cli, "serve", "--help", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: livetrain serve") and "--checkpoint-every" in r.stdout
    # Without the launcher the binary falls back to python3 and says what to do when there is none.
    r = subprocess.run([cli, "serve", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "cannot run python3" in r.stderr and "LIVETRAIN_PYTHON" in r.stderr


def test_a_chosen_python_is_kept(cli):
    env = ENV | {"LIVETRAIN_PYTHON": "/nonexistent/python"}
    r = launch(cli, "train", "--help", env=env)
    assert r.returncode == 1 and "cannot run /nonexistent/python" in r.stderr


def test_missing_binary_says_how_to_get_it():
    r = subprocess.run([sys.executable, "-m", "livetrain.cli", "--version"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 1 and "is missing" in r.stderr and "pip install livetrain" in r.stderr
    r = subprocess.run([sys.executable, "-m", "livetrain.cli", "--binary"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.strip().endswith("/livetrain/bin/livetrain")
