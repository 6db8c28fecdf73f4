"""Training jobs of the real trainer, in process, on a tiny model's shared CPU weights (no HTTP; the routes
are tested in test_trainer_protocol.py and test_serve.py): a job with only examples trains until every
example's loss is below until_loss and reports its losses before and after; fixed steps stay exact; the
forgetting guard measures the retention loss, keeps a harmless job and rolls a destructive one back bit for
bit through the checkpoint store (and says it cannot without one); a non-finite loss stops the job before
backward with nothing applied, a step half applied by a non-finite gradient is undone; cancel, the job's
own entry, the metrics snapshot, retention prompts and bad job fields."""

import json
import math
import threading
import time

import pytest
import torch

from livetrain.engines.reference import Engine
from livetrain.trainer import admission, guard, options, schedule
from livetrain.trainer.examples import parse_job
from livetrain.trainer.protocol import Invalid
from livetrain.trainer.service import Trainer

import tiny_model
from weights import same_bits, snapshot

CORPUS = [
    "the capital of zorbia is quuxville",
    "the river of blent is the sorn",
    "what is the capital of france paris",
    "one two three four five six",
]
FACTS = [
    {"prompt": "the capital of zorbia is", "completion": "quuxville"},
    {"prompt": "the river of blent is", "completion": "the sorn"},
]


@pytest.fixture
def run(tmp_path):
    made = []

    def start(*words: str, store: bool = True):
        model = tmp_path / "model"
        if not model.exists():
            tiny_model.make_model_dir(model, CORPUS)
        manifest = str(tmp_path / f"engine-{len(made)}.json")
        engine = Engine(str(model), manifest, "cpu", store=store, store_dir=str(tmp_path / "store"))
        made.append(engine)
        base = ["--state-dir", str(tmp_path / f"state-{len(made)}"), "--batch-size", "2", "--lr", "1e-2"]
        base += ["--store", str(tmp_path / "store")] if store else ["--no-store"]
        trainer = Trainer(manifest, str(model), options.parse(base + list(words)))
        made.append(trainer)
        return engine, trainer

    yield start
    for obj in reversed(made):
        (obj.close if isinstance(obj, Trainer) else obj.exported.close)()


def job(trainer: Trainer, body: dict) -> dict:
    """Submits and runs one job on this thread; its entry."""
    reply = trainer.handle("submit", json.dumps(body).encode())
    assert reply.code == 202, reply.body
    jid, queued = trainer.queue.get_nowait()
    trainer.run_job(jid, queued)
    return trainer.handle("job", json.dumps({"job_id": jid}).encode()).body


def weights(engine) -> dict:
    return snapshot({n: p.detach() for n, p in engine.model.named_parameters()})


def test_a_job_with_only_examples_trains_until_learned(run):
    _, trainer = run("--no-guard")
    info = job(trainer, {"examples": FACTS})
    assert info["state"] == "done" and info["stop_reason"] == "until_loss", info
    assert 1 < info["step"] < info["steps"] == trainer.settings.max_steps
    losses = info["losses"]
    assert losses["max_after"] < info["until_loss"] == trainer.settings.until_loss
    assert losses["below"] == len(FACTS) and info["loss_before"] > 1 > info["until_loss"] > info["loss_after"]
    assert info["plan"]["steps"] is None and info["plan"]["replay"] == 0 and info["guard"] is None
    # A fixed number of steps is exact, whatever the loss; until_loss ends one early only when asked.
    fixed = job(trainer, {"examples": FACTS, "steps": 3})
    assert fixed["step"] == 3 and fixed["stop_reason"] == "steps" and fixed["until_loss"] is None
    early = job(trainer, {"examples": FACTS, "steps": 50, "until_loss": 5.0})
    assert early["step"] == 1 and early["stop_reason"] == "until_loss"
    budget = job(trainer, {"examples": FACTS, "until_loss": 1e-9, "max_steps": 2})
    assert budget["step"] == 2 and budget["stop_reason"] == "max_steps" and budget["state"] == "done"


def test_warmup_and_replay_shape_the_steps(run):
    _, trainer = run("--no-guard")
    lrs, sizes = [], []
    step = trainer.step

    def traced(batch):
        lrs.append(trainer.opt.param_groups[0]["lr"])
        sizes.append(len(batch))
        return step(batch)

    trainer.step = traced
    info = job(trainer, {"examples": FACTS, "steps": 4, "warmup": 3, "lr": 0.01, "replay": 3})
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01]) and sizes == [5] * 4
    assert info["plan"]["replay"] == 3 and info["guard"]["replayed_prompts"] > 0
    assert info["guard"]["passed"] is None  # replay without the guard: nothing measured, nothing rolled back


def test_replayed_rows_and_loss_evaluations_stay_within_the_token_budget(run):
    # Regression test for issue #13's leftover: the per-step token budget (--max-batch-tokens) counted the
    # job's rows only, while the guard's replayed rows joined every step and the held-out retention losses
    # were evaluated in batches of --batch-size rows, whatever their length.
    budget = 40
    _, trainer = run("--max-batch-tokens", str(budget), "--batch-size", "8")
    steps, evals = [], []
    step, losses = trainer.step, trainer.example_losses

    def traced(batch):
        steps.append(len(batch) * max(len(ids) for ids, _, _ in batch))
        return step(batch)

    def traced_losses(examples, batch_size=None):
        evals.append([len(ids) for ids, _, _ in examples])
        return losses(examples, batch_size)

    trainer.step, trainer.example_losses = traced, traced_losses
    longest = max(
        len(ids) for ids, _, _ in parse_job(trainer.tokenizer, {"examples": FACTS}, trainer.max_len, 100)["examples"]
    )
    reply = trainer.handle("submit", json.dumps({"examples": FACTS * 4, "steps": 3, "replay": 2, "lr": 1e-6}).encode())
    assert reply.code == 202 and reply.body["batch_size"] == budget // longest - 2, reply.body
    jid, queued = trainer.queue.get_nowait()
    trainer.run_job(jid, queued)
    info = trainer.handle("job", json.dumps({"job_id": jid}).encode()).body
    assert info["state"] == "done" and info["guard"]["held_out_prompts"] > 0, info
    # Every step within the budget: the replayed rows (those that kept an answer token once cut to their
    # share of it) included.
    assert len(steps) == 3 and max(steps) <= budget, steps
    assert evals and all(
        len(c) * max(c) <= budget or len(c) == 1
        for lengths in evals
        for b, e in admission.chunks(lengths, 8, budget)
        for c in [lengths[b:e]]
    )
    # Refused, naming the field, when even one example and its replayed rows do not fit.
    with pytest.raises(Invalid) as e:
        trainer.handle("submit", json.dumps({"examples": FACTS, "replay": budget}).encode())
    assert e.value.param == "replay" and "--max-batch-tokens" in str(e.value)


def test_admission_chunks_and_fit():
    assert admission.chunks([3, 3, 3, 3], 8, 9) == [(0, 3), (3, 4)]
    assert admission.chunks([2, 10, 2], 8, 12) == [(0, 1), (1, 2), (2, 3)]  # 2 rows of 10 would be 20
    assert admission.chunks([20, 1, 1], 8, 10) == [(0, 1), (1, 3)]  # a row over the budget goes alone
    assert admission.chunks([1] * 5, 2, 100) == [(0, 2), (2, 4), (4, 5)]
    assert admission.chunks([], 2, 100) == []
    ex = [([0] * 10, [True] * 10, 1.0)] * 6
    assert admission.fit_batch(ex, 8, False, 100) == 8
    assert admission.fit_batch(ex, 8, False, 100, replay=2) == 8  # 6 rows + 2 = 80 tokens
    assert admission.fit_batch(ex, 8, False, 60, replay=2) == 4
    with pytest.raises(Invalid) as e:
        admission.fit_batch(ex, 8, True, 60, replay=2)
    assert e.value.param == "batch_size" and "2 replayed retention rows" in str(e.value) and "at most 4" in str(e.value)
    assert admission.replay_width(60, 4, 2) == 10


def test_guard_keeps_a_harmless_job_and_rolls_a_destructive_one_back(run):
    engine, trainer = run()
    info = job(trainer, {"examples": FACTS, "steps": 1, "lr": 1e-6})
    g = info["guard"]
    assert info["state"] == "done" and g["passed"] and not g["rolled_back"], g
    assert g["held_out_prompts"] == len(trainer.retention.prompts) // 2 and g["replayed_prompts"] > 0
    assert g["retention_loss_before"] > 0 and abs(g["rise"]) < g["threshold"]
    assert g["answers_made"] and g["seconds"] > 0

    before, version = weights(engine), trainer.weight_version
    gens = len(trainer.generations)
    bad = job(trainer, {"examples": FACTS, "steps": 3, "lr": 0.9})
    g = bad["guard"]
    assert bad["state"] == "rolled_back" and not g["passed"] and g["rolled_back"], bad
    assert g["rise"] is None or g["rise"] > g["threshold"]
    # The undo point (the weights changed since the head: saved at the job's start as a new generation),
    # restored bit for bit; it is the head, so the rollback has nothing new to commit.
    assert len(trainer.generations) == gens + 1 and g["rollback"]["rolled_back_to"] == gens
    assert same_bits(weights(engine), before)
    assert trainer.weight_version == version + 3 + 1 == g["rollback"]["weight_version"]
    assert trainer.metrics()["counts"]["guard_rollbacks"] == 1
    assert trainer.metrics()["jobs"]["rolled_back"] == 1


def test_guard_without_a_store_measures_but_cannot_roll_back(run):
    engine, trainer = run(store=False)
    bad = job(trainer, {"examples": FACTS, "steps": 2, "lr": 0.9})
    g = bad["guard"]
    assert bad["state"] == "done" and g["passed"] is False and not g["rolled_back"]
    assert "no checkpoint store" in g["rollback"]
    assert trainer.status()["guard"]["can_roll_back"] is False


def test_a_nonfinite_loss_stops_the_job_before_backward(run):
    engine, trainer = run("--no-guard")
    norm = trainer.model.model.norm.weight
    with torch.no_grad():
        norm[0] = math.inf  # the forward overflows: the loss is not finite
    before = weights(engine)
    info = job(trainer, {"examples": FACTS, "steps": 3})
    assert info["state"] == "failed" and info["stop_reason"] == "nonfinite" and info["step"] == 0
    assert "nothing of that step was applied" in info["error"]
    assert same_bits(weights(engine), before)
    assert json.dumps(trainer.status(), allow_nan=False)  # every value stays JSON
    assert trainer.metrics()["counts"]["nonfinite_stops"] == 1


def test_a_half_applied_step_is_undone(run):
    engine, trainer = run()
    job(trainer, {"examples": FACTS, "steps": 1, "lr": 1e-6})  # the weights differ from the head now
    before = weights(engine)
    # One parameter's gradient becomes NaN in the second step; the others are stepped from their hooks.
    p = trainer.model.model.layers[0].mlp.up_proj.weight
    calls = []

    def poison(grad):
        calls.append(1)
        return torch.full_like(grad, math.nan) if len(calls) == 2 else grad

    handle = p.register_hook(poison)
    try:
        info = job(trainer, {"examples": FACTS, "steps": 3})
    finally:
        handle.remove()
    assert info["state"] == "failed" and info["stop_reason"] == "nonfinite" and info["step"] == 1, info
    assert info["skipped_nonfinite"] == ["model.layers.0.mlp.up_proj.weight"]
    assert "rolled back to generation" in info["error"]
    assert same_bits(weights(engine), before)


def test_cancel_a_queued_and_a_running_job(run):
    _, trainer = run("--no-guard")
    runner = threading.Thread(target=trainer.run, daemon=True)
    runner.start()
    try:
        first = trainer.handle("submit", json.dumps({"examples": FACTS, "steps": 10_000}).encode()).body["job_id"]
        second = trainer.handle("submit", json.dumps({"examples": FACTS}).encode()).body["job_id"]
        r = trainer.handle("cancel", json.dumps({"job_id": second}).encode())
        assert r.code == 200 and r.body["state"] == "cancelled" and r.body["stop_reason"] == "cancelled"
        deadline = time.monotonic() + 60
        while trainer.jobs[first]["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = trainer.handle("cancel", json.dumps({"job_id": first}).encode())
        assert r.code == 202 and r.body["state"] == "running"
        while trainer.jobs[first]["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = trainer.jobs[first]
        assert info["state"] == "cancelled" and 1 <= info["step"] < 10_000 and info["stop_reason"] == "cancelled"
        assert trainer.jobs[second]["step"] == 0
        for jid in (first, second):  # ended: 409
            r = trainer.handle("cancel", json.dumps({"job_id": jid}).encode())
            assert r.code == 409 and r.body["error"]["param"] == "job_id"
        for op in ("job", "cancel"):
            r = trainer.handle(op, json.dumps({"job_id": "job-nope"}).encode())
            assert r.code == 404 and r.body["error"]["param"] == "job_id"
    finally:
        trainer.stopping.set()
        runner.join(60)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"examples": FACTS, "until_loss": 0}, "until_loss"),
        ({"examples": FACTS, "until_loss": -1.5}, "until_loss"),
        ({"examples": FACTS, "until_loss": "0.1"}, "until_loss"),
        ({"examples": FACTS, "max_steps": 0}, "max_steps"),
        ({"examples": FACTS, "max_steps": 2.5}, "max_steps"),
        ({"examples": FACTS, "steps": 3, "max_steps": 5}, "max_steps"),
        ({"examples": FACTS, "guard": "yes"}, "guard"),
        ({"examples": FACTS, "guard": 1}, "guard"),
        ({"examples": FACTS, "warmup": -1}, "warmup"),
        ({"examples": FACTS, "replay": True}, "replay"),
        ({"examples": FACTS, "until": 0.1}, "until"),
    ],
)
def test_bad_job_fields_are_refused_naming_them(run, body, param):
    _, trainer = run("--no-guard")
    with pytest.raises(Invalid) as e:
        trainer.handle("submit", json.dumps(body).encode())
    assert e.value.param == param and param in str(e.value)
    assert trainer.queue.empty() and not trainer.jobs


def test_retention_prompts(run, tmp_path):
    _, trainer = run()
    n = len(guard.builtin_prompts())
    assert n >= 30 and len(trainer.retention.prompts) == n
    runner = threading.Thread(target=trainer.run, daemon=True)  # the retention ops run between steps
    runner.start()
    try:
        chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"}]}
        r = trainer.handle("set_retention", json.dumps({"prompts": ["hello how are you", chat]}).encode())
        assert r.code == 200 and r.body["user"] == 2 and r.body["builtin"] == n and r.body["answers_version"] is None
        for body, param in (
            ({"prompts": "x"}, "prompts"),
            ({"prompts": [""]}, "prompts[0]"),
            ({"prompts": [{"messages": [{"role": "assistant", "content": "x"}]}]}, "prompts[0].messages"),
            ({"prompts": ["a"], "builtin": False}, "prompts"),
            ({"prompts": [], "extra": 1}, "extra"),
        ):
            with pytest.raises(Invalid) as e:
                trainer.handle("set_retention", json.dumps(body).encode())
            assert e.value.param == param, (body, e.value.param)
        jid = trainer.handle("submit", json.dumps({"examples": FACTS, "steps": 1, "lr": 1e-6}).encode()).body["job_id"]
        deadline = time.monotonic() + 120
        while trainer.jobs[jid]["state"] not in schedule.FINAL:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert trainer.jobs[jid]["guard"]["held_out_prompts"] == (n + 2) // 2
        listed = trainer.handle("retention", b"").body
        assert listed["answers_version"] is not None and listed["prompts"][-1]["source"] == "user"
        assert all(isinstance(p["answer"], str) for p in listed["prompts"])
    finally:
        trainer.stopping.set()
        runner.join(60)
    path = tmp_path / "retention.jsonl"
    path.write_text('"a question"\n{"messages": [{"role": "user", "content": "b"}]}\n[1]\n')
    with pytest.raises(ValueError, match=r"retention.jsonl:3"):
        guard.read_prompts(str(path))


def test_plan_resolution():
    defaults = options.parse([])
    p = schedule.plan({}, defaults, 10)
    assert p.steps is None and p.budget == defaults.max_steps and p.until_loss == defaults.until_loss
    assert p.guard and p.replay == defaults.replay and p.lr == defaults.lr
    p = schedule.plan({"epochs": 2, "batch_size": 4}, defaults, 10)
    assert p.steps == 6 and p.until_loss is None
    assert schedule.plan({"guard": False}, defaults, 10).replay == 0
    assert schedule.plan({"guard": False, "replay": 1}, defaults, 10).replay == 1
    assert schedule.plan({}, options.parse(["--no-guard"]), 10).guard is False
    assert [schedule.plan({"warmup": 2, "lr": 0.3}, defaults, 1).lr_at(s) for s in range(4)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.3]
    )
    batches = schedule.batches(5, 2)
    assert [next(batches) for _ in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    losses = schedule.Losses(3)
    losses.record([0, 1], [2.0, 0.05])
    assert not losses.learned(0.1)
    losses.record([2, 0], [0.01, 0.02])
    assert losses.learned(0.1) and losses.summary(0.1) == {
        "before": pytest.approx(0.68667, abs=1e-5),
        "after": pytest.approx(0.02667, abs=1e-5),
        "max_after": 0.05,
        "below": 3,
    }
