"""The ``livetrain`` command that pip installs: runs the C++ CLI shipped inside the package
(``livetrain/bin/livetrain``) with ``LIVETRAIN_PYTHON`` set to this interpreter, so that ``livetrain serve``
and ``livetrain train`` run the Python of the environment livetrain is installed in (a venv, conda, --user or
--target install alike: the console script's own interpreter is that Python, where a binary guessing it from
its path would fail for some of them). Every other command is the binary's alone, and the binary also runs
with no Python (cron): ``python -m livetrain.cli --binary`` prints its path.

A ``LIVETRAIN_PYTHON`` already set is kept: it is how a user points serve/train at another interpreter.
"""

from __future__ import annotations

import os
import sys


def binary() -> str:
    """Path of the C++ CLI inside the installed package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "livetrain")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    exe = binary()
    if args == ["--binary"]:
        print(exe)
        return
    if not os.access(exe, os.X_OK):
        # A source checkout: its CLI is build/livetrain (scripts/setup.sh), not part of the package tree.
        sys.exit(
            f"livetrain: the CLI binary {exe} is missing: install livetrain with pip (pip install livetrain), "
            "or build it from source with `bash scripts/setup.sh` and run build/livetrain"
        )
    env = dict(os.environ)
    if not env.get("LIVETRAIN_PYTHON"):
        env["LIVETRAIN_PYTHON"] = sys.executable
    # exec, not a child: signals (Ctrl-C, SIGTERM) and the exit status are the CLI's own, as when run directly.
    os.execve(exe, [exe, *args], env)


if __name__ == "__main__":
    main()
