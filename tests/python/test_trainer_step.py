"""One training step of the real trainer, in process, on the engine's shared CPU weights: every trainable
parameter is stepped exactly once, the output projection's gradient is made after backward (not by
autograd) where it can be, the allocator's cache is released once per step before the first
vocabulary-sized gradient exactly where Trainer(release_cached=True) says, and the served weights change
in place."""

import pytest
import torch

from livetrain.engines.reference import Engine
from livetrain.trainer import options
from livetrain.trainer.examples import parse_job
from livetrain.trainer.service import Trainer

import tiny_model

CORPUS = ["the capital of zorbia is quuxville", "hello how are you today", "one two three four five six"]


@pytest.fixture
def run(tmp_path):
    made = []

    def start(tied: bool = False, embeddings: str = "apollo", words: tuple = (), **kw):
        model = tmp_path / f"model-{tied}"
        if not model.exists():
            tiny_model.make_model_dir(model, CORPUS, tied=tied)
        manifest = str(tmp_path / f"engine-{len(made)}.json")
        engine = Engine(str(model), manifest, "cpu", store=False)
        made.append(engine)
        settings = options.parse(
            [
                "--state-dir",
                str(tmp_path / f"state-{len(made)}"),
                "--lr",
                "1e-2",
                "--no-store",
                "--embeddings",
                embeddings,
                *words,
            ]
        )
        trainer = Trainer(manifest, str(model), settings, **kw)
        made.append(trainer)
        return engine, trainer

    yield start
    for obj in reversed(made):
        (obj.close if isinstance(obj, Trainer) else obj.exported.close)()


def one_step(trainer) -> list[str]:
    """Steps once on one example; returns the log of cache releases and head gradients, in order."""
    log = []
    trainer._release = lambda: log.append("release")
    head = trainer.model.get_output_embeddings().weight
    step_param = trainer.opt.step_param

    def traced(p, grad=None, stream=None):
        # (autograd calls the head's hook without a gradient when the loss left it out: no step then)
        if p is head and (grad is not None or p.grad is not None):
            log.append("head step" + (" (autograd)" if grad is None else " (after backward)"))
        return step_param(p, grad, stream)

    trainer.opt.step_param = traced
    job = parse_job(
        trainer.tokenizer, {"examples": [{"prompt": "the capital of zorbia is", "completion": "quuxville"}]}, 64, 10
    )
    loss, ntok, _ = trainer.step(job["examples"])
    assert loss > 0 and ntok > 0
    return log


def served(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def test_untied_head_is_stepped_after_backward_and_every_parameter_once(run):
    engine, trainer = run()
    before = served(engine)
    log = one_step(trainer)
    # one release, during backward before the embeddings' gradient; the head's reuses that memory
    assert log == ["release", "head step (after backward)"]
    report = trainer.opt.report()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert report["ok"] == len(trainable) and set(report["steps"].values()) == {1}
    assert all(p.grad is None for p in trainable)
    after = served(engine)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not change in the engine's memory"


def test_batched_hooks_step_every_parameter_once_the_head_after_backward(run):
    """--step-batch-mib: the hooks' steps wait in batches (the CPU runs them one by one in the core); every
    trainable parameter is still stepped exactly once, every gradient freed, the untied head after backward as a
    batch of one (Apollo.step_now), never through step_param."""
    engine, trainer = run(words=("--step-batch-mib", "1"))
    before = served(engine)
    log = one_step(trainer)
    assert log == ["release"]
    report = trainer.opt.report()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert report["ok"] == len(trainable) and set(report["steps"].values()) == {1}
    assert all(p.grad is None for p in trainable) and not trainer.opt._ready
    head = trainer.model.get_output_embeddings().weight
    assert any(ids == (id(head),) for kind, _, ids in trainer.opt._batches)  # its batch of one
    after = served(engine)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_a_failed_backward_leaves_no_batched_step_waiting(run):
    """A backward pass that fails after some gradients queued for a batched step (here: the third hook raises)
    drops them (Apollo.drop_ready): nothing stepped, every gradient freed; the next step steps each parameter
    once, with its own gradient."""
    _, trainer = run(words=("--step-batch-mib", "1"))
    step_ready, calls = trainer.opt.step_ready, []

    def failing(p):
        calls.append(p)
        if len(calls) == 3:
            raise RuntimeError("backward failed")
        step_ready(p)

    trainer.opt.step_ready = failing
    for h in trainer.hooks:
        h.remove()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.hooks = [p.register_post_accumulate_grad_hook(trainer.opt.step_ready) for p in trainable]
    with pytest.raises(RuntimeError, match="backward failed"):
        one_step(trainer)
    assert not trainer.opt._ready and all(p.grad is None for p in trainable)
    assert set(trainer.opt.report()["steps"].values()) <= {0}  # nothing stepped: every step waited, was dropped
    calls.append("past")  # the hooks pass through from here
    one_step(trainer)
    assert set(trainer.opt.report()["steps"].values()) == {1}


def test_tied_head_stays_with_autograd(run):
    engine, trainer = run(tied=True)
    log = one_step(trainer)
    assert log == ["release", "head step (autograd)"]  # one tensor: both contributions summed by autograd
    assert set(trainer.opt.report()["steps"].values()) == {1}


def test_without_release_and_with_frozen_embeddings(run):
    _, trainer = run(release_cached=False)
    assert one_step(trainer) == ["head step (after backward)"]
    _, trainer = run()
    trainer.model.get_input_embeddings().weight.requires_grad_(False)  # embeddings frozen, head trained
    assert one_step(trainer) == ["release", "head step (after backward)"]
    _, frozen = run(embeddings="frozen")
    assert one_step(frozen) == []  # neither vocabulary-sized gradient exists
    assert not frozen.model.get_output_embeddings().weight.requires_grad


def test_version_requests_wait_for_the_next_step_and_served_reports_its_delay(run):
    """What the vLLM plugin's watcher relies on: ``version`` with ``after`` answers when a step makes a new
    version (or after ``wait_s``), and ``served`` records how long after that step the engine served it."""
    import threading
    import time

    from livetrain.trainer.protocol import Invalid

    _, trainer = run()
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(trainer.handle("version", b'{"after": 0, "wait_s": 30}')))
    waiter.start()
    time.sleep(0.3)
    assert answers == []  # still waiting: no step yet
    trainer.submit({"examples": [{"prompt": "the capital of zorbia is", "completion": "quuxville"}], "steps": 1})
    trainer.run_job(*trainer.queue.get_nowait())
    waiter.join(30)
    assert answers[0].body == {"weight_version": 1}
    assert trainer.handle("version", b"").body == {"weight_version": 1}
    t0 = time.monotonic()
    assert trainer.handle("version", b'{"after": 1, "wait_s": 0.3}').body == {"weight_version": 1}
    assert time.monotonic() - t0 >= 0.3
    assert trainer.status()["served"] is None  # no engine has said so (the reference engine never does)
    assert trainer.handle("served", b'{"weight_version": 1}').code == 200
    served = trainer.status()["served"]
    assert served["weight_version"] == 1 and 0 <= served["seconds_after_step"] < 60
    for op, body, field in [
        ("served", b'{"weight_version": "1"}', "weight_version"),
        ("served", b"{}", "weight_version"),
        ("version", b'{"after": 0, "wait_s": 99}', "wait_s"),
        ("version", b'{"since": 0}', "since"),
    ]:
        with pytest.raises(Invalid) as e:
            trainer.handle(op, body)
        assert e.value.param == field, (op, body)
