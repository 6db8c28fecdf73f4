"""The reference engine's scheduler (livetrain.engines.batching.Scheduler) when something fails inside it, on
a tiny random Llama in process: a failure injected into a prefill, a decode step or the rows leaving (static,
rows and masked attention) ends every request it touches with exactly one error answer, the others with
their own, and the scheduler serves the next request as a fresh one would; a failure of its loop itself
answers every request and refuses new ones (``Stopped``, a 503) instead of leaving clients waiting."""

import threading

import pytest
import torch
import transformers

from livetrain.engines import batching, static

import tiny_model
from scheduler_answers import answers


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_model.llama_config(48)).eval()


PROMPTS = [[5, 9, 3, 17], [8, 2], [4, 4, 30, 12, 7, 1]]
LATER = [11, 3, 40, 2, 9]  # a request after the failure


class Injected(RuntimeError):
    pass


def fail_once(monkeypatch, owner, name: str) -> list:
    """Makes ``owner.name`` raise Injected at its first call (later calls as before); returns the calls' list."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise Injected(f"{name} failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def run(sched: batching.Scheduler, prompts: list, max_tokens: list, timeout: float = 60) -> list[list[tuple]]:
    """Each request's events (token, finish, error), all submitted while the scheduler's thread waits (so
    they are admitted together); fails when a request gets no final answer within ``timeout``."""
    events = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink(i):
        def put(tok, finish, error):
            events[i].append((tok, finish, error))
            if finish is not None:
                done.release()

        return put

    with sched._cond:  # reentrant: submit() takes it again
        for i, p in enumerate(prompts):
            sched.submit(batching.Sequence(p, max_tokens[i], 0.0, 1.0, None, sink(i)))
    for _ in prompts:
        assert done.acquire(timeout=timeout), f"a request got no answer: {events}"
    return events


def finishes(events: list[tuple]) -> list:
    return [(finish, error) for _, finish, error in events if finish is not None]


# (attention, where the failure is injected, each request's max_tokens, which requests the failure ends)
CASES = [
    # The static prefill of requests admitted together: the one that ends at its first token leaves at once
    # and the slots are compacted: the compaction fails (it killed the scheduler's thread: every client hung).
    ("static", "compact", [5, 1, 5], {0, 2}),
    # A row that ends in a decode step leaves: the compaction fails after it was answered (it was answered
    # twice: "length", then the error).
    ("static", "compact", [2, 6, 6], {1, 2}),
    ("static", "put_rows", [5, 3, 5], set()),  # the requests of a failed prefill are prefilled again, each alone
    ("static", "step", [5, 3, 5], {0, 1, 2}),
    ("rows", "_eager_step", [5, 3, 5], {0, 1, 2}),
    ("rows", "select_rows", [2, 6, 6], {1, 2}),  # the rows leaving fail after the first was answered
    ("masked", "_eager_step", [5, 3, 5], {0, 1, 2}),
    ("masked", "select_rows", [2, 6, 6], {1, 2}),
    ("rows", "forward", [5, 3, 5], {0}),  # a prefill's forward (one request at a time here): it fails alone
]


@pytest.mark.parametrize("attention,where,max_tokens,failed", CASES)
def test_a_failure_answers_every_request_once_and_the_scheduler_goes_on(
    monkeypatch, attention, where, max_tokens, failed
):
    model = llama()
    want, _ = answers(model, PROMPTS + [LATER], max_tokens + [6], max_batch=1)
    owner = {
        "compact": static.Decoder,
        "put_rows": static.Decoder,
        "step": static.Decoder,
        "_eager_step": batching.Scheduler,
        "select_rows": batching,
        "forward": model,
    }[where]
    calls = fail_once(monkeypatch, owner, where)
    sched = batching.Scheduler(model, set(), max_batch=4, attention=attention, static_length=32)
    try:
        assert (sched.decoder is not None) == (attention == "static")
        got = run(sched, PROMPTS, max_tokens)
        assert calls, f"{where} was not called"
        later = run(sched, [LATER], [6])[0]
    finally:
        sched.close()
    for i, events in enumerate(got):
        assert len(finishes(events)) == 1, (i, events)  # one answer per request
        if i in failed:
            assert finishes(events) == [("error", f"Injected: {where} failed")], (i, events)
        else:
            assert [t for t, _, _ in events] == want[i], (i, events)
    assert [t for t, _, _ in later] == want[len(PROMPTS)]


class LoopFailure(BaseException):
    """Not an Exception: what a request's handling does not catch (the loop itself fails)."""


def test_a_failure_of_the_scheduler_loop_answers_everyone_and_refuses_new_requests(monkeypatch, capsys):
    monkeypatch.setattr(
        batching.Scheduler, "_admit", lambda self, seqs: (_ for _ in ()).throw(LoopFailure("the loop broke"))
    )
    sched = batching.Scheduler(llama(), set(), max_batch=2, max_queue=4)
    try:
        assert sched.failure is None
        got = run(sched, PROMPTS, [4, 4, 4])
        reason = "the engine's scheduler stopped: LoopFailure: the loop broke"
        assert sched.failure == reason  # what the engine's /health answers (503)
        assert [finishes(e) for e in got] == [[("error", reason)]] * len(PROMPTS)
        with pytest.raises(batching.Stopped, match=reason):
            sched.submit(batching.Sequence([5], 4, 0.0, 1.0, None, lambda *e: None))
        assert f"livetrain engine: error: {reason}" in capsys.readouterr().err
    finally:
        sched.close()


def test_a_bad_request_admitted_with_others_fails_alone_in_the_static_prefill(monkeypatch):
    # The static prefill of requests admitted together is one forward: when it fails, each request is
    # prefilled alone, so a bad one (a token the model has no embedding for) fails alone; before, every
    # request admitted with it failed too.
    model = llama()
    want, _ = answers(model, PROMPTS, [5, 3, 5], max_batch=1)
    sched = batching.Scheduler(model, set(), max_batch=4, attention="static", static_length=32)
    try:
        got = run(sched, [PROMPTS[0], [5, 1000, 3], PROMPTS[1], PROMPTS[2]], [5, 4, 3, 5])
    finally:
        sched.close()
    assert [len(finishes(e)) for e in got] == [1] * 4
    (_, finish, error), *_ = got[1]
    assert finish == "error" and error.startswith("IndexError: ")
    assert [[t for t, _, _ in got[i]] for i in (0, 2, 3)] == [want[0], want[1], want[2]]
