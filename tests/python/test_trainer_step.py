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

    def start(tied: bool = False, embeddings: str = "apollo", **kw):
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
