"""livetrain.trainer.process.stop_process: the one SIGTERM-then-SIGKILL of the launchers and scripts."""

import os
import signal
import subprocess
import sys
import time

from livetrain.trainer.process import stop_process

# Prints the pid of a sleeping child of its own once its SIGTERM handling is set, then sleeps.
PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, {handler})
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def start(handler: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(handler=handler)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return p, int(p.stdout.readline())


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether `pid` has exited (a zombie not yet reaped by its new parent counts) within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_child_that_exits_on_the_signal_gives_its_status():
    p, child = start("lambda *a: sys.exit(3)")
    try:
        assert stop_process(p) == 3
        assert stop_process(p) == 3  # exited already: nothing is sent
    finally:
        os.kill(child, signal.SIGKILL)


def test_after_the_timeout_the_session_or_the_child_alone_is_killed():
    p, child = start("signal.SIG_IGN")
    assert stop_process(p, signal.SIGTERM, 0.5, session=True) == -signal.SIGKILL
    assert gone(child)  # its whole session

    p, child = start("signal.SIG_IGN")
    try:
        assert stop_process(p, signal.SIGTERM, 0.5) == -signal.SIGKILL
        assert not gone(child, within=0.5)  # it alone
    finally:
        os.kill(child, signal.SIGKILL)


def test_freeze_startup_heap_takes_the_start_s_objects_out_of_the_collector():
    """What the trainer and the engine call once started: the objects alive then leave the collector's
    generations (a full collection no longer walks them); objects made later are collected as before."""
    import gc

    from livetrain.trainer import process

    before = object.__new__(type("Before", (), {}))  # a tracked object made before the freeze
    gc.collect()
    assert any(o is before for o in gc.get_objects(2))
    try:
        process.freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert not any(o is before for o in gc.get_objects())  # in the permanent generation now
        later = [[]]  # a container made after: tracked as usual
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()  # the test process's heap as it was
    assert any(o is before for o in gc.get_objects())
