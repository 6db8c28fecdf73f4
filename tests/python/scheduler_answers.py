"""Greedy answers of the reference engine's scheduler (livetrain.engines.batching.Scheduler) run in this
process, for the engine tests: every prompt submitted while the scheduler's thread waits, so that they are
admitted together (up to max_batch)."""

import threading

from livetrain.engines import batching


def answers(model, prompts, max_tokens=None, **kw) -> tuple[dict, dict]:
    """Each prompt's greedy tokens (or error) from a Scheduler on ``model``, all submitted while its thread
    waits (so that they are admitted together, up to max_batch); and its load()."""
    sched = batching.Scheduler(model, set(), **kw)
    max_tokens = max_tokens or [6 + 3 * (i % 3) for i in range(len(prompts))]
    got, done = {}, threading.Semaphore(0)

    def sink(i):
        def put(tok, finish, error):
            got.setdefault(i, []).append(error or tok)
            if finish is not None:
                done.release()

        return put

    try:
        with sched._cond:  # a reentrant lock: submit() takes it again
            for i, p in enumerate(prompts):
                sched.submit(batching.Sequence(p, max_tokens[i], 0.0, 1.0, None, sink(i)))
        for _ in prompts:
            assert done.acquire(timeout=120)
        return got, sched.load()
    finally:
        sched.close()
