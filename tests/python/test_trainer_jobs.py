"""Training jobs of the real trainer, in process, on a tiny model's shared CPU weights (no HTTP; the routes
are tested in test_trainer_protocol.py and test_serve.py): a job with only examples trains until every
example's loss is below until_loss and reports its losses before and after; fixed steps stay exact; the
forgetting guard measures the KL divergence and the answers kept, keeps a harmless job and rolls a destructive one back bit for
bit through the checkpoint store (and says it cannot without one); a non-finite loss stops the job before
backward with nothing applied, a step half applied by a non-finite gradient is undone; cancel, the job's
own entry, the metrics snapshot, retention prompts and bad job fields; a model without a chat template."""

import argparse
import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from livetrain.engines.reference import Engine
from livetrain.loss import OutputGradient
from livetrain.trainer import admission, augment, examples, guard, options, schedule
from livetrain.trainer.examples import parse_job
from livetrain.trainer.protocol import Invalid
from livetrain.trainer.service import NonFinite, Trainer

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
# Retention-like rows longer than FACTS' (the anchor's, in the tests of its shared forward).
LONGER = [
    {"prompt": "what is the capital of france", "completion": "paris one two three four five six"},
    {"prompt": "one two three", "completion": "four five six the capital of zorbia is quuxville"},
    {"prompt": "the river", "completion": "of blent"},
]


@pytest.fixture
def run(tmp_path):
    made = []

    def start(
        *words: str,
        store: bool = True,
        dtype: str = "bf16",
        chat_template: bool = True,
        chat: tuple[str, ...] = (),
        settings: argparse.Namespace | None = None,
    ):
        """An engine and its trainer; ``chat``: chat-template options for both, as `livetrain serve` passes them;
        ``settings``: the trainer's options parsed already (``words`` and ``chat`` then unused)."""
        model = tmp_path / ("model" if chat_template else "base-model")
        if not model.exists():
            tiny_model.make_model_dir(model, CORPUS, chat_template=chat_template)
        manifest = str(tmp_path / f"engine-{len(made)}.json")
        base = ["--state-dir", str(tmp_path / f"state-{len(made) + 1}"), "--batch-size", "2", "--lr", "1e-2"]
        base += ["--store", str(tmp_path / "store")] if store else ["--no-store"]
        settings = settings or options.parse(base + list(chat) + list(words))
        engine = Engine(
            str(model),
            manifest,
            "cpu",
            dtype,
            store=store,
            store_dir=str(tmp_path / "store"),
            chat=options.chat(settings),
        )
        made.append(engine)
        trainer = Trainer(manifest, str(model), settings)
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

    def traced(batch, *anchor):
        lrs.append(trainer.opt.param_groups[0]["lr"])
        sizes.append(len(batch))
        return step(batch, *anchor)

    trainer.step = traced
    body = {
        "examples": FACTS,
        "steps": 4,
        "warmup": 3,
        "lr": 0.01,
        "replay": 3,
        "anchor": 0,
        "replay_select": "similar",
    }
    info = job(trainer, body)
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01]) and sizes == [5] * 4
    assert info["plan"]["replay"] == 3 and info["guard"]["replayed_prompts"] > 0
    assert info["plan"]["replay_select"] == info["guard"]["replay_select"] == "similar"
    assert info["guard"]["passed"] is None  # replay without the guard: nothing measured, nothing rolled back


def test_replayed_rows_and_loss_evaluations_stay_within_the_token_budget(run, monkeypatch):
    # Regression test for issue #13's leftover: the per-step token budget (--max-batch-tokens) counted the
    # job's rows only, while the guard's replayed rows joined every step and the held-out retention losses
    # were evaluated in batches of --batch-size rows, whatever their length.
    # The anchor's rows (anchor 1, the default) join the step's own forward: they count there.
    budget = 40
    _, trainer = run("--max-batch-tokens", str(budget), "--batch-size", "8")
    steps, evals = [], []
    logits = guard.answer_logits
    trace_steps(trainer, steps)

    def traced_logits(model, examples, *args, **kwargs):  # every forward of the guard's measures
        evals.append([len(ids) for ids, _, _ in examples])
        return logits(model, examples, *args, **kwargs)

    monkeypatch.setattr(guard, "answer_logits", traced_logits)
    longest = max(
        len(ids) for ids, _, _ in parse_job(trainer.tokenizer, {"examples": FACTS}, trainer.max_len, 100)["examples"]
    )
    reply = trainer.handle("submit", json.dumps({"examples": FACTS * 4, "steps": 3, "replay": 2, "lr": 1e-6}).encode())
    assert reply.code == 202 and reply.body["batch_size"] == budget // longest - 2, reply.body
    jid, queued = trainer.queue.get_nowait()
    trainer.run_job(jid, queued)
    info = trainer.handle("job", json.dumps({"job_id": jid}).encode()).body
    assert info["state"] == "done" and info["guard"]["held_out_prompts"] > 0, info
    # Every step within the budget: the anchor's replayed rows (those that kept an answer token once cut to
    # their share of it) included, in the same forward.
    assert len(steps) == 3 and max(r * w for r, w in steps) <= budget, steps
    assert all(r == queued["plan"].batch_size + 2 for r, _ in steps), steps
    assert evals and all(len(c) * max(c) <= budget or len(c) == 1 for c in evals), evals
    # Refused, naming the field, when even one example and its replayed rows do not fit.
    with pytest.raises(Invalid) as e:
        trainer.handle("submit", json.dumps({"examples": FACTS, "replay": budget}).encode())
    assert e.value.param == "replay" and "--max-batch-tokens" in str(e.value)


def trace_steps(trainer: Trainer, out: list) -> None:
    """Appends (rows, padded width) of every step's forward to ``out``: the batch ``Trainer._batch`` pads."""
    batch = trainer._batch

    def traced(rows):
        out.append((len(rows), max(len(ids) for ids, _, _ in rows)))
        return batch(rows)

    trainer._batch = traced


def test_rewordings_and_replayed_rows_stay_within_the_token_budget(run, monkeypatch):
    # Regression test: the rewordings joined the job after admission had fitted its batches to the
    # per-step budget (--max-batch-tokens) and the replayed rows' width had been cut for the rows it knew,
    # so a job of 2 chats and 2 one-hot replayed rows admitted in 4 rows ran steps of 6.
    chats = [
        {"messages": [{"role": "user", "content": f["prompt"]}, {"role": "assistant", "content": f["completion"]}]}
        for f in FACTS
    ]
    # Every chat gets a rewording (the tiny model's own replies are rarely questions): its words reversed,
    # as many tokens as the question.
    monkeypatch.setattr(augment, "question", lambda reply, original: " ".join(reversed(original.split())))
    _, trainer = run("--batch-size", "8")
    trainer.retention.set_user(
        guard.check_prompts(["what is the capital of france", "one two three", "the sorn"]), False
    )
    longest = max(len(ids) for ids, _, _ in parse_job(trainer.tokenizer, {"examples": chats}, 64, 100)["examples"])
    budget = trainer.max_batch_tokens = 4 * longest  # --max-batch-tokens
    steps = []
    trace_steps(trainer, steps)
    reply = trainer.handle(
        "submit",
        json.dumps({"examples": chats, "steps": 2, "reword": True, "replay": 2, "anchor": 0, "guard": False}).encode(),
    )
    assert reply.code == 202 and reply.body["batch_size"] == 2, reply.body  # 2 of the 4 rows the job may have
    jid, queued = trainer.queue.get_nowait()
    trainer.run_job(jid, queued)
    info = trainer.jobs[jid]
    assert info["state"] == "done" and info["reworded"]["examples"] == 2 and info["examples"] == 4, info
    assert len(steps) == 2 and all(r == 4 and r * w <= budget for r, w in steps), steps
    # A batch size the client chose is refused when the rewordings would not fit with it.
    with pytest.raises(Invalid) as e:
        trainer.handle(
            "submit",
            json.dumps({"examples": chats, "reword": True, "replay": 2, "anchor": 0, "batch_size": 4}).encode(),
        )
    assert e.value.param == "batch_size" and "2 rewordings" in str(e.value)


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
    assert admission.fit_batch(ex, 8, False, 100, replay=2, later=4) == 8  # 8 of 6 + 4 rows, + 2 = 100 tokens
    assert admission.fit_batch(ex, 8, False, 90, replay=2, later=4) == 7


def test_greedy_batches_are_sized_from_a_steps_memory(monkeypatch):
    """guard.greedy's batches (the retention answers, the answers kept, rewording) are at most
    guard.GREEDY_ROWS rows (64 on a GPU, as bench/learning_sweep.py; the server made them in 16s) and at
    most half of the memory a step may take in cache: on Qwen3.5-27B's text model beside its engine on one
    H200, its Gated DeltaNet state (~148 MiB a row) bounds them below 64 rows, while Qwen3-8B gets 64."""
    import importlib.util

    import transformers

    spec = importlib.util.spec_from_file_location(
        "bench_serve", Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    )
    bench_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_serve)  # its model shapes: Qwen3.5-27B's text model and Qwen3-8B's
    shape = {k: v for k, v in bench_serve.SHAPES["qwen3.5-27b"].items() if k != "model_type"}
    q27 = transformers.AutoConfig.for_model("qwen3_5_text", **shape)
    q8 = transformers.AutoConfig.for_model("qwen3", **bench_serve.SHAPES["8b"])
    gib = 2**30
    per_token, per_row = admission.cache_bytes(q27, 2)
    assert per_token == 16 * 2 * 4 * 256 * 2  # the 16 full-attention layers' keys and values, bf16
    assert per_row == 48 * (48 * 128 * 128 * 4 + (2 * 16 * 128 + 48 * 128) * 4 * 2)  # fp32 state, conv window
    assert admission.cache_bytes(q8, 2) == (36 * 2 * 8 * 128 * 2, 0)

    # One H200 (139.8 GiB) beside vLLM at --gpu-memory-utilization 0.9: ~12 GiB free for the trainer.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (12 * gib, int(139.8 * gib)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    lengths = [20 + (7 * i) % 61 for i in range(393)]  # the built-in retention prompts: 20 to 80 tokens
    rows = {}
    for name, cfg in (("27b", q27), ("8b", q8)):
        tokens, _ = admission.auto_max_batch_tokens(cfg.hidden_size, cfg.num_hidden_layers, 2, torch.device("cuda"))
        memory = admission.step_memory(tokens, cfg.hidden_size, cfg.num_hidden_layers, 2, "cuda") / 2
        t, r = admission.cache_bytes(cfg, 2)
        batches = admission.generation_batches(lengths, guard.ANSWER_TOKENS, guard.GREEDY_ROWS["cuda"], memory, t, r)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each prompt once
        for b in batches:
            longest = max(lengths[i] for i in b)
            assert len(b) <= guard.GREEDY_ROWS["cuda"] and len(b) * (r + (longest + guard.ANSWER_TOKENS) * t) <= memory
            assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
        rows[name] = max(len(b) for b in batches)
    assert 16 < rows["27b"] < guard.GREEDY_ROWS["cuda"] == rows["8b"] == 64, rows
    # Without a memory bound: rows alone, in order of length (what greedy did before, in batches of 16).
    assert admission.generation_batches([5, 1, 3], 4, 2, math.inf, 10, 0) == [[1, 2], [0]]
    assert admission.generation_batches([5, 1, 3], 4, 8, 100, 10, 0) == [[1], [2], [0]]  # 2 rows of 7 = 140


def test_guard_keeps_a_harmless_job_and_rolls_a_destructive_one_back(run):
    engine, trainer = run("--builtin-retention", "all")
    info = job(trainer, {"examples": FACTS, "steps": 1, "lr": 1e-6})
    g = info["guard"]
    assert info["state"] == "done" and g["passed"] and not g["rolled_back"], g
    assert g["held_out_prompts"] == len(trainer.retention.held_out()) == len(trainer.retention.builtin) // 2
    assert g["replayed_prompts"] > len(trainer.retention.builtin) // 2  # the replay-only prompts too
    assert 0 <= g["kl"] < g["threshold"] and g["kl_se"] >= 0 and g["answers_made"] and g["seconds"] > 0
    assert g["prepared"]["at_job_start"] == ["kept", "answers", "reference", "anchor"]  # no idle moment before
    # --guard-min-kept 0: the answers kept decide nothing, and are measured after the verdict, off the job's
    # path: at the training thread's next idle moment, as the first measure of the new weights.
    assert g["answers_kept"] is None and g["answers_kept_when"].startswith("pending"), g
    trainer._idle()
    g = trainer.jobs[info["id"]]["guard"]
    assert g["answers_compared"] == g["held_out_prompts"] >= g["answers_kept"] >= 0, g
    assert g["answers_kept_when"].startswith("after the verdict") and trainer.kept_pending is None
    while trainer.status()["guard"]["prepared"]["made"] != ["kept", "answers", "reference", "anchor"]:
        trainer._idle()  # one measure per call, the rest of them: the next job finds them made
    ok = job(trainer, {"examples": FACTS, "steps": 1, "lr": 1e-6})["guard"]
    assert ok["passed"] and not ok["answers_made"] and ok["prepared"]["at_job_start"] == [], ok
    assert ok["prepared"]["seconds_idle"] > 0 and ok["prepared"]["weight_version"] == trainer.weight_version - 1

    before, version = weights(engine), trainer.weight_version
    gens = len(trainer.generations)
    bad = job(trainer, {"examples": FACTS, "steps": 3, "lr": 0.9})
    g = bad["guard"]
    assert bad["state"] == "rolled_back" and not g["passed"] and g["rolled_back"], bad
    assert g["kl"] is None or g["kl"] > g["threshold"] or g["answers_kept"] < g["min_kept"] * g["answers_compared"]
    assert g["answers_kept_when"] == "before the verdict" and g["answers_compared"] == g["held_out_prompts"]
    # The undo point (the weights changed since the head: saved at the job's start as a new generation),
    # restored bit for bit; it is the head, so the rollback has nothing new to commit.
    assert len(trainer.generations) == gens + 1 and g["rollback"]["rolled_back_to"] == gens
    assert same_bits(weights(engine), before)
    assert trainer.weight_version == version + 3 + 1 == g["rollback"]["weight_version"]
    assert trainer.metrics()["counts"]["guard_rollbacks"] == 1
    assert trainer.metrics()["jobs"]["rolled_back"] == 1
    # The weights are those the job started from, bit for bit: so are the guard's measures of them, which
    # the next job reuses (nothing made again at its start).
    again = job(trainer, {"examples": FACTS, "steps": 1, "lr": 1e-6})["guard"]
    assert again["passed"] and again["prepared"]["at_job_start"] == [] and not again["answers_made"], again


def test_the_measures_between_jobs_give_way_to_a_job(run):
    _, trainer = run()
    reply = trainer.handle("submit", json.dumps({"examples": FACTS, "steps": 1, "guard": False}).encode())
    assert reply.code == 202
    trainer._idle()  # a job waits: the measure is given up before its first token, and nothing is kept
    assert trainer.status()["guard"]["prepared"]["made"] == [] and trainer.prepare_failed is None
    # Asked after each new token: a measure between jobs stops within a token of a job's arrival.
    calls = []

    def interrupt():
        calls.append(1)
        return len(calls) > 3

    ids = [examples.prompt_ids(trainer.tokenizer, [{"role": "user", "content": "one two"}])]
    with pytest.raises(guard.Interrupted):
        guard.greedy(trainer.model, ids, 30, [], trainer.pad, interrupt=interrupt)
    assert 4 <= len(calls) <= 6, len(calls)
    jid, queued = trainer.queue.get_nowait()
    trainer.run_job(jid, queued)
    assert trainer.jobs[jid]["state"] == "done"


def test_the_measures_between_jobs_are_made_only_where_the_trainer_prepares_idle(run):
    """Trainer.prepares_idle is _idle's gate; /train/status guard.between_jobs says off, failed, making or done
    (bench/serve.py waits on it for a trainer with nothing left to make)."""
    _, trainer = run()

    def between() -> str:
        return trainer.status()["guard"]["between_jobs"]

    assert trainer.prepares_idle()  # the default plan: the guard on, --guard-prepare idle
    assert between() == "making"  # nothing made yet
    trainer.ranks = object()  # tensor parallelism: the guard is off
    assert not trainer.prepares_idle() and trainer.between_jobs() == "off"
    trainer._idle()
    trainer.ranks = None
    assert trainer.status()["guard"]["prepared"] is None  # nothing made under it
    trainer.prepare_failed = trainer.weight_version
    assert not trainer.prepares_idle() and between() == "failed"
    trainer.prepare_failed = trainer.weight_version - 1  # failed at older weights: made again
    assert trainer.prepares_idle()
    trainer._idle()
    assert trainer.status()["guard"]["prepared"]["made"] == ["kept"]
    # /train/status says when there is nothing left: an idle call that found every measure made.
    for _ in range(10):
        if between() == "done":
            break
        assert between() == "making"
        trainer._idle()
    assert between() == "done" and trainer.status()["guard"]["prepared"]["made"] == [
        "kept",
        "answers",
        "reference",
        "anchor",
    ]
    trainer.retention.set_user(trainer.retention.user, builtin=True)  # new retention prompts: answers to make
    assert between() == "making"
    trainer._idle()
    trainer._idle()
    assert between() == "done"


def test_the_status_names_the_guards_measure_being_made(run, monkeypatch, capfd):
    """A job at step 0 may wait minutes for the guard's measures (a CPU, the 393 retention answers): /train/status
    names the one being made and since when, and the log has a line before and after each."""
    _, trainer = run()
    seen = []
    refresh = trainer.retention.refresh

    def watched(*a, **k):
        seen.append(trainer.status()["guard"]["prepared"]["making"])
        return refresh(*a, **k)

    monkeypatch.setattr(trainer.retention, "refresh", watched)
    info = job(trainer, {"examples": FACTS, "steps": 1})
    assert info["state"] == "done", info
    assert len(seen) == 1 and seen[0]["what"] == "answers" and seen[0]["where"] == "at the job's start", seen
    assert seen[0]["seconds"] >= 0
    assert trainer.status()["guard"]["prepared"]["making"] is None  # nothing being made once the job ran
    err = capfd.readouterr().err
    assert "guard: making the model's answers to the retention prompts" in err and "guard: answers made in" in err


def test_an_anchor_joins_each_step_with_the_replayed_sequences(run):
    _, trainer = run()
    anchors = []
    step = trainer.step

    def traced(batch, anchor=None):
        anchors.append((len(batch), anchor))
        return step(batch, anchor)

    trainer.step = traced
    info = job(trainer, {"examples": FACTS, "steps": 3, "replay": 2, "anchor": 2.0, "replay_select": "cycle"})
    assert info["state"] == "done" and info["plan"]["anchor"] == 2.0 and info["guard"]["anchor"] == 2.0, info
    # The anchor's sequences are the replayed ones (not added to the batch), two per step, cycling.
    reference = anchors[0][1][0]
    assert len(reference) == info["guard"]["replayed_prompts"]
    assert [a[1][1] for a in anchors] == [[0, 1], [2, 3], [4, 5]] and all(a[1][2] == 2.0 for a in anchors)
    assert [a[0] for a in anchors] == [len(FACTS)] * 3
    # After the job's steps the replayed sequences' KL is above zero, and the term carries a gradient.
    loss = reference.anchor(trainer.model, [0, 1])
    assert loss.requires_grad and float(loss.detach()) > 0
    # The KL's standard error as a sample of prompts (a ratio estimator over the examples' token sums).
    with torch.no_grad():
        per = [reference._kl(trainer.model, [i]).double() for i in range(len(reference))]
    sums, counts = torch.stack([x.sum() for x in per]), torch.tensor([x.numel() for x in per], dtype=torch.double)
    m = float(sums.sum() / counts.sum())
    k = len(per)
    se = math.sqrt(k / (k - 1) * float(((sums - m * counts) ** 2).sum())) / float(counts.sum())
    got_m, got_se = reference.kl_spread(trainer.model)
    assert got_m == pytest.approx(m, rel=1e-4) and got_se == pytest.approx(se, rel=1e-3) and got_se > 0
    assert reference.kl(trainer.model) == got_m


def test_the_anchor_shares_the_batchs_forward_and_backward(run):
    # One forward over the job's rows and the anchor's, one backward: the same loss and gradient (fp32, to
    # float rounding) as the anchor's rows in a forward of their own.
    _, trainer = run(store=False, dtype="fp32")
    # Anchor rows of several lengths, as the model answers them (no generation: the test stays quick).
    replay = parse_job(trainer.tokenizer, {"examples": LONGER}, trainer.max_len, 100)["examples"]
    reference = guard.Reference(trainer.model, replay, trainer.pad, batch=2)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the reference: at it, the KL's gradient is zero
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = parse_job(trainer.tokenizer, {"examples": FACTS}, trainer.max_len, 100)["examples"]
    # The longest anchor row first: both widths differ from the examples'.
    order = sorted(range(len(replay)), key=lambda i: -len(replay[i][0]))
    anchor = (reference, [order[0], order[-1]], 3.0)
    assert len(replay[order[0]][0]) > max(len(ids) for ids, _, _ in batch)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    forwards = []
    hook = trainer.model.model.register_forward_hook(lambda m, i, o: forwards.append(i))

    def grads(separate: bool, later, with_anchor=True):
        forwards.clear()
        loss, value, ntok, per = trainer.loss(batch, anchor if with_anchor else None, later, separate)
        g = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        deferred = later.gradient() if later is not None else None
        return float(loss.detach()), value, ntok, per.tolist(), g, deferred, len(forwards)

    try:
        for later in (None, OutputGradient()):  # the projection's gradient through autograd, or deferred
            one = grads(False, later)
            two = grads(True, later)
            plain = grads(False, later, with_anchor=False)
            assert one[6] == 1 and two[6] == 2 and plain[6] == 1  # forwards of the model's body
            assert one[0] == pytest.approx(two[0], rel=1e-5) and one[0] > plain[0] + 1e-3
            for other in (two, plain):  # the examples' own loss, tokens and per-example losses
                assert one[2] == other[2] and [one[1], *one[3]] == pytest.approx([other[1], *other[3]], rel=1e-5)
            for a, b, c in zip(one[4], two[4], plain[4]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            # The anchor's term moves the gradient (the comparison above can fail).
            assert max(float((a - c).abs().max()) for a, c in zip(one[4], plain[4])) > 1e-4
            if later is not None:
                torch.testing.assert_close(one[5], two[5], rtol=1e-4, atol=1e-6)
    finally:
        hook.remove()


def as_chats(facts: list[dict]) -> list[dict]:
    """Prompt/completion facts as chat examples: the prompt as a question, the completion as the answer."""
    return [
        {
            "messages": [
                {"role": "user", "content": f["prompt"] + "?"},
                {"role": "assistant", "content": f["completion"]},
            ]
        }
        for f in facts
    ]


def traced_batches(trainer: Trainer) -> list[list]:
    """The batches of the trainer's steps from now on, each its list of (ids, mask, weight) rows."""
    batches, step = [], trainer.step

    def traced(batch, *anchor):
        batches.append(list(batch))
        return step(batch, *anchor)

    trainer.step = traced
    return batches


def test_reword_trains_the_models_rewordings_too(run):
    _, trainer = run("--no-guard")
    chats = as_chats(FACTS)
    batches = traced_batches(trainer)
    info = job(trainer, {"examples": chats + FACTS, "steps": 2, "reword": True, "batch_size": 8})
    r = info["reworded"]
    # The tiny model's replies are rarely questions: whatever it made joined the job, nothing else.
    assert (
        r["examples"] == len(r["questions"]) <= len(chats)
        and info["examples"] == len(chats) + len(FACTS) + r["examples"]
    )
    assert [len(b) for b in batches] == [info["examples"]] * 2 and info["plan"]["reword"] is True
    assert augment.question('"Which city is the capital of Zorbia?"\nok', "the capital of zorbia is?") == (
        "Which city is the capital of Zorbia?"
    )
    assert augment.question("Quuxville.", "q?") is None and augment.question("What is X?", "what is x") is None
    assert job(trainer, {"examples": chats, "steps": 1})["reworded"] is None


def test_reword_with_the_anchor_and_the_guard(run, monkeypatch):
    # bench/learning_sweep.py's sweep5 row "anchor4 r8 similar reword" on the GPU: the rewordings join a guarded
    # job whose replayed rows are the anchor's, picked by similarity (no GPU row has run this combination).
    # Every chat gets a rewording (the tiny model's own replies are rarely questions): its words reversed.
    monkeypatch.setattr(augment, "question", lambda reply, original: " ".join(reversed(original.split())))
    _, trainer = run("--guard-prepare", "job", store=False)
    chats = as_chats(FACTS)
    batches = traced_batches(trainer)
    body = {"examples": chats, "reword": True, "anchor": 4, "replay": 8, "replay_select": "similar"}
    info = job(trainer, body | {"until_loss": 0.1, "max_steps": 2})
    g, r = info["guard"], info["reworded"]
    assert info["state"] == "done" and info["stop_reason"] in ("until_loss", "max_steps"), info
    assert r["examples"] == len(chats) and info["examples"] == 2 * len(chats), info
    assert g["anchor"] == 4.0 and g["replay_select"] == "similar" and g["replayed_prompts"] > 0, g
    assert g["kl"] is not None and g["passed"] is not None and g["answers_kept"] is not None, g
    # The anchor's rows join the step's forward, not its batch: every step's batch holds the job's rows only.
    assert [len(b) for b in batches] == [min(info["plan"]["batch_size"], info["examples"])] * info["step"]


def test_restate_trains_each_answer_as_plain_text_too(run):
    _, trainer = run("--no-guard")
    chats = as_chats(FACTS)
    batches = traced_batches(trainer)
    info = job(trainer, {"examples": chats + FACTS, "steps": 1, "restate": True, "batch_size": 8})
    # One plain-text row per chat example (the completions are not chats): its answer and the end-of-text token,
    # every token trained.
    assert info["restated"] == len(chats) and info["examples"] == len(chats) + len(FACTS) + len(chats)
    assert info["plan"]["restate"] is True and [len(b) for b in batches] == [info["examples"]]
    tok = trainer.tokenizer
    for f, (ids, mask, weight) in zip(FACTS, batches[0][-len(chats) :]):
        assert ids == tok(f["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert all(mask) and weight == 1.0
    assert job(trainer, {"examples": chats, "steps": 1})["restated"] is None
    # A job that trains until learned waits for its own examples only: the restated rows are in its batches
    # but not in its stop (nor its losses' summary).
    info = job(trainer, {"examples": chats, "restate": True, "until_loss": 50.0, "batch_size": 8})
    assert info["stop_reason"] == "until_loss" and info["step"] == 1 and info["losses"]["counted"] == len(chats)
    assert augment.restated(tok, chats, max_len=1) == []  # longer than the trainer's rows: left out


def test_replayed_rows_cycle_or_follow_the_steps_prompts():
    # Prompts as token ids; token 0 is in every prompt (a chat template's): it weighs nothing.
    pool = [[0, 1, 2], [0, 3, 4], [0, 5, 6], [0, 1, 7]]
    cycle = schedule.Replayed(pool)
    assert [cycle.pick(2, [[0, 5]]) for _ in range(3)] == [[0, 1], [2, 3], [0, 1]]
    assert schedule.Replayed(pool).pick(6, []) == [0, 1, 2, 3, 0, 1]  # more than there are: repeats
    similar = schedule.Replayed(pool, "similar")
    assert similar.weights([[0, 5, 9]]) == pytest.approx([0, 0, math.log(4), 0])
    assert similar.pick(2, [[0, 5, 9]]) == [2, 0]  # the row that shares token 5, then the cycle
    assert similar.pick(2, [[0, 1]]) == [3, 1]  # rows 0 and 3 share token 1: 3 was picked longer ago
    assert similar.pick(2, [[0, 5]]) == [2, 3]  # the cycle's next (2) is picked already: the one after
    assert similar.pick(2, [[9]]) == [0, 1]  # nothing shared: the row picked longest ago
    # 3 "similar" (the least recently picked), then the cycle's rows not picked yet, then repeats.
    assert similar.pick(5, [[9]]) == [2, 3, 0, 1, 2]
    # Several forms in one step: a row of each (greedy cover), not the two rows of the same tokens.
    forms = schedule.Replayed([[0, 1, 2], [0, 1, 2, 3], [0, 5], [0, 6]], "similar")
    assert forms.weights([[0, 1, 2], [0, 5]]) == pytest.approx([2 * math.log(2), 2 * math.log(2), math.log(4), 0])
    assert forms.pick(4, [[0, 1, 2], [0, 5]]) == [0, 2, 1, 3]
    with pytest.raises(ValueError):
        schedule.Replayed(pool, "random")


def test_topk_kl_and_the_reference():
    torch.manual_seed(0)
    ref = torch.randn(5, 50)
    now = ref + 0.5 * torch.randn(5, 50)
    full = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - now.log_softmax(-1))).sum(-1)
    lp, ids = ref.log_softmax(-1).topk(50, dim=-1)
    assert torch.allclose(guard.topk_kl(now, ids, lp), full, atol=1e-5)  # k = vocabulary: the full KL
    lp, ids = ref.log_softmax(-1).topk(8, dim=-1)
    coarse = guard.topk_kl(now, ids, lp)
    assert (coarse >= -1e-6).all() and (coarse <= full + 1e-5).all() and coarse.sum() > 0
    assert torch.allclose(guard.topk_kl(ref, ids, lp), torch.zeros(5), atol=1e-5)  # unchanged: zero
    assert guard.kept([[1, 2, 3], [4, 5], [6]], [[1, 2, 9], [4, 5], [7]], tokens=2) == [True, True, False]


def test_guard_rolls_back_a_job_that_changes_answers_even_at_a_small_kl(run):
    engine, trainer = run("--guard-min-kept", "1", "--guard-threshold", "1000")
    before = weights(engine)
    info = job(trainer, {"examples": FACTS, "steps": 3, "lr": 0.05, "replay": 0})
    g = info["guard"]
    assert g["kl"] < g["threshold"] and g["answers_kept"] < g["answers_compared"], g
    assert info["state"] == "rolled_back" and g["rolled_back"] and same_bits(weights(engine), before)


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
    # One field says the weights were put back, as after the guard's verdict; the rollbacks count it.
    g = info["guard"]
    assert g["rolled_back"] is True and g["passed"] is None, g
    assert g["rollback"]["rolled_back_to"] == int(info["error"].split("generation ")[1].split(",")[0])
    assert g["rollback"]["weight_version"] == trainer.weight_version
    assert trainer.status()["guard"]["rollbacks"] == trainer.metrics()["counts"]["guard_rollbacks"] == 1
    assert trainer.metrics()["counts"]["nonfinite_stops"] == 1


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
            # what a user after a trainer restart reads: the list is this process's, not a lost job
            assert (
                "since it started" in r.body["error"]["message"]
                and "earlier trainer process" in r.body["error"]["message"]
            )
    finally:
        trainer.stopping.set()
        runner.join(60)


def test_a_cancelled_queued_job_frees_its_slot_at_once(run):
    # A cancelled queued job kept its queue slot until the training thread reached it (behind a long job:
    # /train/status showed queue [] while /train answered 429 "the training queue is full"), and each 202's
    # "queued" counted it.
    _, trainer = run("--no-guard", "--queue-size", "2")

    def submit():
        return trainer.handle("submit", json.dumps({"examples": FACTS, "steps": 1}).encode())

    for _ in range(3):
        r = submit()
        assert r.code == 202 and r.body["queued"] == 1, r.body
        assert trainer.handle("cancel", json.dumps({"job_id": r.body["job_id"]}).encode()).code == 200
    assert trainer.status()["queue"] == [] and trainer.queue.empty()
    assert [submit().body["queued"] for _ in range(2)] == [1, 2]
    assert submit().code == 429  # the two live ones fill it


def test_a_save_that_fails_after_a_job_is_reported_not_raised(run):
    """The optimizer state every job saves at its end cannot be written (a full disk; here a directory in
    its place): the job stays done, /train/status says why, the next job trains and saves (the error went
    out of the training thread and ended the trainer, with the job it had just finished)."""
    _, trainer = run("--no-guard")
    os.makedirs(trainer.opt_path)
    assert job(trainer, {"examples": FACTS, "steps": 1})["state"] == "done"
    err = trainer.status()["optimizer"]["save_error"]
    assert err and trainer.opt_path in err, err
    os.rmdir(trainer.opt_path)
    assert job(trainer, {"examples": FACTS, "steps": 1})["state"] == "done"
    assert trainer.status()["optimizer"]["save_error"] is None and os.path.isfile(trainer.opt_path)


def test_a_rollback_whose_optimizer_state_cannot_be_read_changes_nothing(run):
    """The generation's optimizer-state file is damaged: the rollback fails before it writes the weights (it
    wrote them, reset the optimizer, then failed reading the state: the weights were the generation's under
    the old weight version, the optimizer's moments lost, nothing committed); the next job trains."""
    from livetrain import _core

    engine, trainer = run("--no-guard")
    job(trainer, {"examples": FACTS, "steps": 2})
    assert trainer.checkpoint().code == 200
    job(trainer, {"examples": FACTS, "steps": 2})
    before, steps, version = weights(engine), trainer._optimizer_steps(), trainer.weight_version
    gen = trainer.generations[-1]
    with open(os.path.join(trainer.store.dir, gen["optimizer_state"]), "r+b") as f:
        f.truncate(100)
    with pytest.raises(_core.FormatError):
        trainer.rollback(gen["generation"])
    assert same_bits(weights(engine), before) and trainer._optimizer_steps() == steps
    assert trainer.weight_version == version  # nothing changed: not even the version (docs/serve.md)
    assert job(trainer, {"examples": FACTS, "steps": 1})["state"] == "done"


def test_a_rollback_to_the_generation_the_weights_already_are_hands_out_no_version(run, monkeypatch):
    # POST /rollback {"generation": G} twice in a row: the second wrote nothing (written: false) but raised
    # weight_version by one, which /metrics then counted not yet durable though the weights were the head's.
    engine, trainer = run("--no-guard")
    job(trainer, {"examples": FACTS, "steps": 2})
    assert trainer.checkpoint().code == 200
    g = trainer.generations[-1]["generation"]
    job(trainer, {"examples": FACTS, "steps": 2})
    first = trainer.rollback(g).body
    assert first["rolled_back_to"] == g and first["weight_version"] == trainer.weight_version
    before, steps, version, gens = (
        weights(engine),
        trainer._optimizer_steps(),
        trainer.weight_version,
        trainer.generations,
    )
    again = trainer.rollback(g).body
    assert again["weight_version"] == version == trainer.weight_version and not again["written"], again
    assert again["rolled_back_to"] == g and again["generation"] == gens[-1]["generation"]
    assert trainer.generations == gens and same_bits(weights(engine), before) and trainer._optimizer_steps() == steps
    # A step since, even one that failed (it may have been half applied): the rollback writes again, a new version.
    job(trainer, {"examples": FACTS, "steps": 1})
    assert trainer.rollback(g).body["weight_version"] == trainer.weight_version == version + 2
    assert same_bits(weights(engine), before)

    def half_applied(*args, **kwargs):  # a step that changed a weight, then met a non-finite gradient
        with torch.no_grad():
            next(trainer.model.parameters()).add_(1)
        raise NonFinite("a non-finite gradient", applied=True, parameters=[])

    monkeypatch.setattr(trainer, "step", half_applied)
    with pytest.raises(NonFinite):
        trainer.train_step([], 0.0)
    trainer.rollback(g)
    assert same_bits(weights(engine), before)


def test_a_failed_job_says_why_in_the_log(run, monkeypatch, capfd):
    """The job's line in the server's log carries its error (it said "an error (see error)" and no more)."""
    _, trainer = run("--no-guard")

    def fails(*args, **kwargs):
        raise RuntimeError("the step broke here")

    monkeypatch.setattr(trainer, "train_step", fails)
    info = job(trainer, {"examples": FACTS, "steps": 1})
    assert info["state"] == "failed" and "the step broke here" in info["error"]
    line = next(x for x in capfd.readouterr().out.splitlines() if f"{info['id']} failed" in x)
    assert "RuntimeError: the step broke here" in line, line


def test_a_job_trains_only_the_parameters_it_names(run):
    # "train": "mlp" / "layers" (options.TRAIN): the other parameters keep their bits, for that job alone; the
    # job says what it trained. The tiny model's output projection is untied (its gradient deferred otherwise).
    engine, trainer = run("--no-guard")
    names = [n for n, p in engine.model.named_parameters()]
    tables = {n for n in names if "embed" in n or "lm_head" in n}
    assert any("lm_head" in n for n in tables) and any(".mlp." in n for n in names)
    for train, changes in (
        ("mlp", lambda n: ".mlp." in n),
        ("layers", lambda n: n not in tables),
        ("all", lambda n: True),
    ):
        before = weights(engine)
        info = job(trainer, {"examples": FACTS, "steps": 2, "train": train})
        after = weights(engine)
        changed = {n for n in names if not same_bits({n: before[n]}, {n: after[n]})}
        assert changed and all(changes(n) for n in changed), (train, sorted(changed))
        if train != "all":
            assert not any(n in changed for n in tables)
        want = [p for p in trainer.names if changes(trainer.names[p])]
        assert info["plan"]["train"] == train and info["trains"] == {
            "train": train,
            "tensors": len(want),
            "parameters": sum(p.numel() for p in want),
        }, info["trains"]
    # Every parameter trains again after a job that froze some: the last job ("all") changed the embeddings.
    assert any(n in changed for n in tables) and all(p.requires_grad for p in trainer.names)
    assert schedule.plan({}, options.parse(["--train", "mlp"]), 2).train == "mlp"
    assert schedule.plan({"train": "all"}, options.parse(["--train", "mlp"]), 2).train == "all"
    assert options.parse([]).train == options.LEARNING["train"] == trainer.status()["train"] == "all"


@pytest.mark.parametrize("reword", [False, True])
def test_a_cancel_or_shutdown_ends_the_measures_before_the_first_step(run, monkeypatch, reword):
    """Regression: a job cancelled (or the trainer stopped) while the guard made its measures at the job's
    start, or while the model reworded its questions, went on with them (minutes on a CPU) before it ended."""
    _, trainer = run()
    jid = None
    real = guard.greedy

    finished = []

    def slow(model, prompts, *a, **kw):  # the cancel arrives during the first measure at the job's start
        trainer.jobs[jid]["cancel"] = True
        out = real(model, prompts, *a, **kw)
        finished.append(len(prompts))  # the measure went on to its end
        return out

    monkeypatch.setattr(guard, "greedy", slow)
    monkeypatch.setattr(augment.guard, "greedy", slow)
    body = {
        "examples": [
            {
                "messages": [
                    {"role": "user", "content": "what is the capital of zorbia"},
                    {"role": "assistant", "content": "quuxville"},
                ]
            }
        ],
        "reword": reword,
    }
    reply = trainer.handle("submit", json.dumps(body).encode())
    jid, queued = trainer.queue.get_nowait()
    version = trainer.weight_version
    trainer.run_job(jid, queued)
    info = trainer.jobs[jid]
    assert info["state"] == "cancelled" and info["stop_reason"] == "cancelled" and info["step"] == 0, info
    assert trainer.weight_version == version and reply.code == 202 and finished == [], finished
    # A shutdown ends them the same way: the job fails, "stopped by shutdown", nothing trained.
    monkeypatch.setattr(guard, "greedy", lambda *a, **kw: (trainer.stopping.set(), real(*a, **kw), finished.append(1)))
    monkeypatch.setattr(trainer, "prepared", None)
    jid = trainer.handle("submit", json.dumps({"examples": FACTS}).encode()).body["job_id"]
    trainer.run_job(*trainer.queue.get_nowait())
    info = trainer.jobs[jid]
    assert info["stop_reason"] == "shutdown" and info["error"] == "stopped by shutdown" and info["step"] == 0, info
    assert finished == []


def test_a_shutdown_in_a_guarded_job_says_it_was_not_judged_and_marks_its_generations(run, monkeypatch):
    """A guarded job stopped by a shutdown after 2 steps, with a periodic checkpoint between its steps: the
    job says it stopped before the guard's verdict (its weights unjudged, the undo point named), and
    /checkpoints marks the generations taken in its middle (job, step, guarded, verdict: none), in
    STATE_DIR/generations.json too; one left pending by a trainer that died reads as never judged. (The job
    said only "stopped by shutdown", and a mid-job generation was listed like any other.)"""
    _, trainer = run()
    trainer.checkpoint_every = 1e-9  # due as soon as the weights changed: before every step after the first
    real, steps = trainer.train_step, []

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            trainer.stopping.set()
        return out

    monkeypatch.setattr(trainer, "train_step", step)
    info = job(trainer, {"examples": FACTS, "steps": 5, "lr": 1e-6})
    g = info["guard"]
    assert (info["state"], info["stop_reason"], info["step"], g["passed"]) == ("failed", "shutdown", 2, None), info
    listed = {x["generation"]: x["mid_job"] for x in trainer.checkpoints()["generations"]}
    marked = {gen: m for gen, m in listed.items() if m}
    undo = max(gen for gen, m in listed.items() if m is None)  # the job's start: here the model files'
    assert [m["step"] for m in marked.values()] == [1, 2] and undo == 0 and min(marked) > undo, listed
    assert "before the guard's verdict" in info["error"] and f"generation {undo} holds them" in info["error"], info
    assert g["rollback"].startswith("not judged: stopped by shutdown") and not g["rolled_back"], g
    for m in marked.values():
        assert m["job"] == info["id"] and m["guarded"] and m["verdict"].startswith("none: stopped by shutdown"), m
    saved = json.loads(Path(trainer.mid_job_path).read_text())
    assert {int(k): v for k, v in saved.items()} == marked
    # A trainer that died before the verdict left it pending: read back, it was never given.
    first = min(marked)
    saved[str(first)]["verdict"] = "pending"
    Path(trainer.mid_job_path).write_text(json.dumps(saved))
    assert trainer._read_mid_job()[first]["verdict"] == "none: the trainer stopped before the job's verdict"
    # The file only informs: one that cannot be read (edited by hand) gives no marks, not a trainer that fails.
    for text in ("{not json", '{"1": 5}', "[]"):
        Path(trainer.mid_job_path).write_text(text)
        assert trainer._read_mid_job() == {}, text


def test_a_generations_json_that_cannot_be_written_fails_neither_a_checkpoint_nor_the_job(run, capsys):
    """STATE_DIR/generations.json cannot be written (a full disk; here a directory in its place): the periodic
    checkpoints in a guarded job's middle are taken and marked in /checkpoints, and the job ends with its
    verdict, logged, its optimizer state saved. (The error made each such checkpoint a failed one though its
    generation was committed, and escaped run_job's finally at the verdict: no log line, no save, the training
    thread ended.)"""
    _, trainer = run()
    trainer.checkpoint_every = 1e-9  # due as soon as the weights changed: before every step after the first
    os.mkdir(trainer.mid_job_path)
    info = job(trainer, {"examples": FACTS, "steps": 3, "lr": 1e-6})
    g = info["guard"]
    assert info["state"] == "done" and g["passed"] is not None, info
    verdict = "rolled back" if g["rolled_back"] else "kept" if g["passed"] else None
    marks = [x["mid_job"] for x in trainer.checkpoints()["generations"] if x["mid_job"]]
    assert [m["step"] for m in marks] == [1, 2] and all(m["verdict"] == verdict for m in marks), (marks, g)
    assert trainer.checkpoint_error is None and trainer.status()["optimizer"]["save_error"] is None
    out = capsys.readouterr().out
    assert "generations.json failed" in out and f"{info['id']} done after" in out, out
    assert os.path.isdir(trainer.mid_job_path) and os.path.isfile(trainer.opt_path)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"examples": FACTS, "until_loss": 0}, "until_loss"),
        ({"examples": FACTS, "until_loss": -1.5}, "until_loss"),
        ({"examples": FACTS, "until_loss": "0.1"}, "until_loss"),
        ({"examples": FACTS, "max_steps": 0}, "max_steps"),
        ({"examples": FACTS, "max_steps": 2.5}, "max_steps"),
        ({"examples": FACTS, "steps": 3, "max_steps": 5}, "max_steps"),
        ({"examples": FACTS, "steps": 2, "epochs": 3}, "epochs"),  # was taken as 2 steps, the conflict unsaid
        # ids that name another route under /train/ (GET /train/status answered the server's status)
        ({"examples": FACTS, "id": "status"}, "id"),
        ({"examples": FACTS, "id": "retention"}, "id"),
        ({"examples": FACTS, "id": ".."}, "id"),
        # a message that is not an object was "messages[0].role must be one of ..."
        ({"examples": [{"messages": ["hello", {"role": "assistant", "content": "a"}]}]}, "examples[0].messages[0]"),
        ({"examples": FACTS * 51, "epochs": 1000, "batch_size": 1}, "epochs"),  # 102,000 steps: over steps' bound
        ({"examples": FACTS, "guard": "yes"}, "guard"),
        ({"examples": FACTS, "guard": 1}, "guard"),
        ({"examples": FACTS, "warmup": -1}, "warmup"),
        ({"examples": FACTS, "replay": True}, "replay"),
        ({"examples": FACTS, "until": 0.1}, "until"),
        ({"examples": FACTS, "anchor": -1}, "anchor"),
        ({"examples": FACTS, "anchor": "1"}, "anchor"),
        ({"examples": FACTS, "replay_select": "random"}, "replay_select"),
        ({"examples": FACTS, "restate": "yes"}, "restate"),
        ({"examples": FACTS, "train": "attention"}, "train"),
        ({"examples": FACTS, "train": ["mlp"]}, "train"),
        ({"examples": [{**FACTS[0], "wieght": 2}]}, "examples[0].wieght"),  # not silently dropped
        ({"examples": [FACTS[0], {**FACTS[1], "messages": [{"role": "user", "content": "a"}]}]}, "examples[1]"),
        # OpenAI allows a null content only for an assistant message with tool calls (it was taken as empty)
        (
            {
                "examples": [
                    FACTS[0],
                    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
                ]
            },
            "examples[1].messages[0].content",
        ),
    ],
)
def test_bad_job_fields_are_refused_naming_them(run, body, param):
    _, trainer = run("--no-guard")
    with pytest.raises(Invalid) as e:
        trainer.handle("submit", json.dumps(body).encode())
    assert e.value.param == param and param in str(e.value)
    assert trainer.queue.empty() and not trainer.jobs


def test_a_model_without_a_chat_template_trains_with_the_guard_and_refuses_chat_examples(run):
    """A base model's tokenizer has no chat template: the guard's retention prompts are rendered as plain
    text (examples.prompt_ids) and a prompt/completion job trains with the guard's replay, anchor and
    measures; a job with chat examples is refused naming the field, nothing queued. (The guard's answers
    failed the job at once with transformers' "tokenizer.chat_template is not set".)"""
    _, trainer = run(chat_template=False)
    tok = trainer.tokenizer
    assert not tok.chat_template
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"}]
    assert examples.prompt_ids(tok, chat) == tok("be brief\none two\n")["input_ids"]
    body = {"examples": [FACTS[0], {"messages": [*chat, {"role": "assistant", "content": "three"}]}], "steps": 1}
    with pytest.raises(Invalid) as e:
        trainer.handle("submit", json.dumps(body).encode())
    assert e.value.param == "examples[1].messages" and "no chat template" in str(e.value), e.value
    assert trainer.queue.empty() and not trainer.jobs
    # Rewording asks the model through the same rendering; a chat example it would add is not trainable here.
    assert augment.reworded(trainer.model, tok, [body["examples"][1]], trainer.pad, 40) == ([], [])
    # PUT /train/retention's chat prompts are accepted: rendered as plain text too.
    assert trainer.set_retention(*trainer.parse_retention({"prompts": ["three four", {"messages": chat}]})).code == 200

    info = job(trainer, {"examples": FACTS, "steps": 1, "lr": 1e-6})
    g = info["guard"]
    assert info["state"] == "done" and g["passed"] and g["answers_made"], info
    assert g["held_out_prompts"] == len(trainer.retention.held_out()) > 0 and g["replayed_prompts"] > 0
    assert g["kl"] is not None and 0 <= g["kl"] < g["threshold"], g
    assert info["plan"]["anchor"] > 0 and info["plan"]["replay"] > 0, info["plan"]
    assert [isinstance(p["answer"], str) for p in trainer.retention.describe()["prompts"][-2:]] == [True, True]
    first = trainer.retention.prompts[0]
    assert (
        trainer.retention.replay()[0][0][: len(examples.prompt_ids(tok, first))]
        == tok("\n".join(m["content"] for m in first) + "\n")["input_ids"]
    )


# Another template than tiny_model.TEMPLATE: what a user gives with --chat-template.
GIVEN = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.mark.parametrize("files_have_one", [False, True])
def test_a_given_chat_template_is_what_the_trainer_and_the_engine_render_with(run, tmp_path, files_have_one):
    """--chat-template (a file, as vLLM's: the plugin passes vLLM's on): chat examples, the guard's prompts and
    the engine's chat requests are rendered with it, on a base model (whose chat examples were refused) and on
    a model whose files have another template (training rendered with the files' while serving used the
    given one)."""
    path = tmp_path / "given.jinja"
    path.write_text(GIVEN)
    engine, trainer = run(chat_template=files_have_one, chat=("--chat-template", str(path)))
    tok = trainer.tokenizer
    chat = [{"role": "user", "content": "one two"}]
    text = "[user] one two [assistant] "
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert examples.prompt_ids(tok, chat) == ids == engine.encode_chat(chat)
    body = {"examples": [{"messages": [*chat, {"role": "assistant", "content": "three"}]}], "steps": 1}
    reply = trainer.handle("submit", json.dumps(body).encode())
    assert reply.code == 202, reply.body
    jid, queued = trainer.queue.get_nowait()
    (got, mask, _), *_ = queued["examples"]
    assert got == tok(text + "three </s> ", add_special_tokens=False)["input_ids"]
    assert [t for t, m in zip(got, mask) if m] == got[len(ids) :]  # the assistant's tokens, from the template
    # The guard's retention prompts too (rendered as chat now, not as a base model's plain text).
    first = trainer.retention.prompts[0]
    rendered = "".join(f"[{m['role']}] {m['content']} " for m in first) + "[assistant] "
    assert examples.prompt_ids(tok, first) == tok(rendered, add_special_tokens=False)["input_ids"]
    trainer.run_job(jid, queued)
    assert trainer.jobs[jid]["state"] == "done", trainer.jobs[jid]


# As Qwen3's template drops an answer's reasoning once a later user turn follows: the last answer renders with
# what the generation prompt opened ("one"), earlier ones without it.
DROPS = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% if loop.last %}one {% endif %}"
    "{{ m['content'] }} </s> {% else %}<|{{ m['role'] }}|> {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> one {% endif %}"
)


def test_a_conversation_its_template_renders_otherwise_later_trains_turn_by_turn(run):
    """A chat example whose template renders an earlier answer otherwise once a later turn follows trains each
    answer as a sequence of its own (examples.encode_example): the job's entry says how many sequences its
    examples train as, and ``examples`` counts them as the job's rows; the job runs."""
    _, trainer = run("--no-guard", chat=("--chat-template", DROPS))
    chat = [
        {"role": "user", "content": "what is the capital of zorbia"},
        {"role": "assistant", "content": "quuxville"},
        {"role": "user", "content": "what is the river of blent"},
        {"role": "assistant", "content": "the sorn"},
    ]
    info = job(trainer, {"examples": [{"messages": chat}, FACTS[0]], "steps": 2})
    assert info["state"] == "done" and info["sequences"] == info["examples"] == 3, info
    plain = job(trainer, {"examples": FACTS, "steps": 1})
    assert plain["sequences"] == plain["examples"] == 2, plain


def test_chat_template_values_are_files_or_templates(tmp_path):
    """A --chat-template value is a file's text, or the template itself when it has a brace or a newline (vLLM's
    rule); passed on as given."""
    path = tmp_path / "t.jinja"
    path.write_text(GIVEN)
    assert options.parse(["--chat-template", str(path)]).chat_template == options.ChatTemplate(str(path), GIVEN)
    ns = options.parse(["--chat-template", GIVEN])
    assert ns.chat_template.text == GIVEN and options.chat(ns).template == GIVEN
    assert options.argv(ns)[options.argv(ns).index("--chat-template") + 1] == GIVEN
    assert "--chat-template" not in options.argv(options.parse([]))


def test_a_bad_chat_template_is_refused_at_start_in_one_wording(tmp_path, capsys):
    """A --chat-template that is missing, not UTF-8 or not valid Jinja is refused when the options are parsed,
    with one message naming the option, whichever process reads it (the trainer's options, which `livetrain
    serve` and the vLLM plugin parse too, and the reference engine's). (Regression: each of three places read
    and worded it; an invalid template passed the start and failed every chat request and example.)"""
    from livetrain.engines import reference

    (tmp_path / "latin1.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    bad = {
        str(tmp_path / "nowhere.jinja"): "nowhere.jinja' looks like a file's path, but it cannot be read",
        str(tmp_path / "latin1.jinja"): "latin1.jinja' is not UTF-8 text",
        str(tmp_path / "broken.jinja"): "broken.jinja' is not a valid Jinja template (line 1: ",
        "{{ messages ": "the template is not a valid Jinja template (line 1: ",
    }
    for value, what in bad.items():
        with pytest.raises(ValueError) as e:
            options.parse(["--chat-template", value])
        assert str(e.value).startswith("argument --chat-template: ") and what in str(e.value), e.value
        with pytest.raises(SystemExit):
            reference.main(["--model", "m", "--manifest", "m.json", "--trainer-socket", "s", "--chat-template", value])
        assert str(e.value) in capsys.readouterr().err


def test_the_trainer_renders_with_the_template_read_once(run, tmp_path):
    """The trainer renders with the template its options read at start, and does not read the file again
    (regression: Trainer.__init__ read it a second time; a file gone since start failed the trainer)."""
    path = tmp_path / "given.jinja"
    path.write_text(GIVEN)
    settings = options.parse(["--no-store", "--state-dir", str(tmp_path / "state"), "--chat-template", str(path)])
    path.unlink()
    engine, trainer = run(store=False, settings=settings)
    chat = [{"role": "user", "content": "one two"}]
    assert trainer.tokenizer.apply_chat_template(chat, tokenize=False) == "[user] one two "
    assert examples.prompt_ids(trainer.tokenizer, chat) == engine.encode_chat(chat)


def test_a_chat_prompt_with_a_template_is_the_templates_text(tmp_path):
    """With a chat template, a chat prompt's ids are the template's text with the generation prompt, without
    added special tokens: what the engines tokenize for a chat request (unchanged by the plain rendering)."""
    import transformers

    tiny_model.make_model_dir(tmp_path, CORPUS)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "system", "content": "one two"}, {"role": "user", "content": "three four"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|> one two <|user|> three four <|assistant|> "
    assert examples.prompt_ids(tok, chat) == tok(text, add_special_tokens=False)["input_ids"]


def test_a_plain_chat_prompt_is_tokenized_as_a_completion_prompt():
    """Without a chat template, a chat prompt's plain text takes the special tokens the tokenizer adds to a
    /v1/completions prompt (here a BOS), as the engine's answers to that text were made from."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=tiny_model.SPECIALS))
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>")
    chat = [{"role": "system", "content": "one two"}, {"role": "user", "content": "three four"}]
    assert examples.plain_text(chat) == "one two\nthree four\n"
    ids = examples.prompt_ids(tok, chat)
    assert ids == tok("one two\nthree four\n")["input_ids"] and ids[0] == bos and len(ids) == 5


def test_builtin_retention_is_the_core_set_on_a_cpu_unless_asked(run):
    """--builtin-retention auto (default): the 313 replay-only prompts on a GPU only; on a CPU their answers
    take minutes before a job's first step (docs/learning.md), so the 80 alone."""
    n, replay_only = len(guard.builtin_prompts()), len(guard.builtin_replay())
    for words, want, name in (((), n, "core"), (("--builtin-retention", "all"), n + replay_only, "all")):
        _, trainer = run(*words, store=False)  # two trainers: one store takes one
        st = trainer.status()["guard"]
        assert len(trainer.retention.prompts) == st["retention_prompts"] == want and st["builtin_retention"] == name
        trainer.retention.set_user([[{"role": "user", "content": "one two"}]] * 2)  # kept by PUT /train/retention
        assert len(trainer.retention.prompts) == want + 2
    with pytest.raises(ValueError, match="--builtin-retention"):
        options.parse(["--builtin-retention", "some"])


def test_status_says_how_the_trainers_own_generations_render_their_prompts(run):
    """/train/status's guard entry and GET /train/retention say how the retention answers' prompts render
    (and rewording's): thinking off under a template that renders a thinking generation prompt as served (the
    Qwen3.5-like one, as Qwen3.5-27B's by default), as served under one without the switch (the tiny model's)."""
    qwen35 = Path(__file__).parent / "data" / "qwen3.5-like-chat-template.jinja"
    for chat, want in (((), {}), (("--chat-template", str(qwen35)), {"enable_thinking": False})):
        _, trainer = run(store=False, chat=chat)
        rendering = trainer.status()["guard"]["rendering"]
        assert rendering["chat_template_kwargs"] == want and rendering["why"].startswith("thinking off") == bool(want)
        assert trainer.retention.describe()["rendering"] == rendering  # GET /train/retention's body


def test_retention_prompts(run, tmp_path):
    _, trainer = run("--builtin-retention", "all")
    n, replay_only = len(guard.builtin_prompts()), len(guard.builtin_replay())
    assert n >= 30 and replay_only >= 300 and len(trainer.retention.prompts) == n + replay_only
    runner = threading.Thread(target=trainer.run, daemon=True)  # the retention ops run between steps
    runner.start()
    try:
        chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"}]}
        r = trainer.handle("set_retention", json.dumps({"prompts": ["hello how are you", chat]}).encode())
        assert r.code == 200 and r.body["user"] == 2 and r.body["builtin"] == n + replay_only
        assert r.body["answers_version"] is None
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
        # The built-in alternating prompts and the user's alternate; the replay-only ones are all replayed.
        assert trainer.jobs[jid]["guard"]["held_out_prompts"] == (n + 2) // 2
        listed = trainer.handle("retention", b"").body
        assert listed["answers_version"] is not None and listed["prompts"][-1]["source"] == "user"
        uses = [p["use"] for p in listed["prompts"]]
        assert uses.count("held_out") == (n + 2) // 2 and uses[n : n + replay_only] == ["replay"] * replay_only
        assert uses[-2:] == ["replay", "held_out"] if n % 2 == 0 else ["held_out", "replay"]
        assert all(isinstance(p["answer"], str) for p in listed["prompts"])
    finally:
        trainer.stopping.set()
        runner.join(60)
    path = tmp_path / "retention.jsonl"
    path.write_text('"a question"\n{"messages": [{"role": "user", "content": "b"}]}\n[1]\n')
    with pytest.raises(ValueError, match=r"retention.jsonl:3"):
        guard.read_prompts(str(path))


def test_retention_prompts_refuse_null_content_and_an_empty_question_as_examples_do(run, tmp_path):
    # PUT /train/retention and --retention FILE took a system/user message with a null (or missing) content
    # (measured as an empty one), and a {messages} prompt whose question is empty, which the string form
    # refuses: a 400 naming the field, nothing stored, as /train's examples refuse them.
    _, trainer = run()
    before = list(trainer.retention.prompts)
    user = {"role": "user", "content": "one two"}
    runner = threading.Thread(target=trainer.run, daemon=True)  # a prompt set taken is set between steps
    runner.start()
    try:
        for messages, param in (
            ([{"role": "user", "content": None}], "prompts[1].messages[0].content"),
            ([{"role": "user"}], "prompts[1].messages[0].content"),
            ([{"role": "system", "content": None}, user], "prompts[1].messages[0].content"),
            ([{"role": "system"}, user], "prompts[1].messages[0].content"),
            ([{"role": "user", "content": " \n"}], "prompts[1].messages[0].content"),
            ([{"role": "user", "content": []}], "prompts[1].messages[0].content"),
            (
                [user, {"role": "assistant", "content": "x"}, {"role": "user", "content": ""}],
                "prompts[1].messages[2].content",
            ),
        ):
            body = {"prompts": ["a question", {"messages": messages}]}
            with pytest.raises(Invalid) as e:
                trainer.handle("set_retention", json.dumps(body).encode())
            assert e.value.param == param, (messages, e.value.param)
            assert trainer.retention.prompts == before
            path = tmp_path / "retention.jsonl"
            path.write_text('"a question"\n' + json.dumps({"messages": messages}) + "\n")
            with pytest.raises(ValueError, match=rf"^{path}:2\.messages\[\d\]\.content"):
                guard.read_prompts(str(path))
    finally:
        trainer.stopping.set()
        runner.join(60)
    # A chat request's null content stays an empty one (vLLM's), and an assistant's in a prompt's conversation
    # (OpenAI: with tool calls) too; an empty earlier user turn is context, as in an example.
    assert examples.check_messages([{"role": "user", "content": None}]) == [{"role": "user", "content": []}]
    kept = [{"role": "user", "content": ""}, {"role": "assistant", "content": None}, user]
    assert guard.check_prompts([{"messages": kept}]) == [examples.check_messages(kept)]


def test_a_retention_prompt_that_leaves_no_room_for_an_answer_is_refused(run, tmp_path):
    # PUT /train/retention took a prompt over the trainer's sequence limit (200,000 tokens: every guarded job
    # then failed making its answer, a 40 GB allocation; a 100-token one over a 64-token context left the set
    # silently): a 400 naming prompts[i] and the limit, /train's for its examples, as --retention FILE at start.
    from livetrain import _core

    _, trainer = run()
    assert trainer.max_len == 64  # the tiny model's context
    before = list(trainer.retention.prompts)
    fits = "one two " * 10
    for prompt in ("zorbia " * 100, {"messages": [{"role": "user", "content": "one " * 64}]}):
        with pytest.raises(Invalid) as e:
            trainer.handle("set_retention", json.dumps({"prompts": [fits, prompt], "builtin": False}).encode())
        assert (
            e.value.param == "prompts[1]" and "prompts[1] is " in str(e.value) and "limit of 64 tokens" in str(e.value)
        )
        assert trainer.retention.prompts == before
    assert guard.check_prompts([fits], tokenizer=trainer.tokenizer, max_len=64)  # within it: taken
    path = tmp_path / "retention.jsonl"
    path.write_text(json.dumps(fits) + "\n" + json.dumps("zorbia " * 100) + "\n")
    with pytest.raises(_core.InvalidArgumentError, match=rf"^--retention: {path}:2 is \d+ tokens .* limit of 64"):
        run("--retention", str(path), store=False)


def test_at_most_max_prompts_of_the_users_retention_prompts_the_builtin_ones_not_counted(tmp_path):
    # guard.MAX_PROMPTS's comment said "built-in + the user's" and the docs "at most 1000 in all", but only
    # the user's prompts were counted (and the refusal did not say which): the limit is the user's alone.
    n = guard.MAX_PROMPTS
    prompts = [f"question {i}" for i in range(n + 1)]
    assert len(guard.check_prompts(prompts[:n])) == n
    with pytest.raises(Invalid) as e:
        guard.check_prompts(prompts)
    assert e.value.param == "prompts"
    assert str(e.value) == f"prompts has {n + 1} prompts; at most {n} (the built-in retention prompts are not counted)"
    path = tmp_path / "retention.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts[:n]))
    assert len(guard.read_prompts(str(path))) == n
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    with pytest.raises(ValueError, match=rf"retention.jsonl: {n + 1} prompts; at most {n} \(the built-in"):
        guard.read_prompts(str(path))
    # The built-in ones come on top: a set of the user's n prompts holds more than n in all.
    retention = guard.Retention(None, guard.check_prompts(prompts[:n]))
    assert len(retention.prompts) == n + len(guard.builtin_prompts()) + len(guard.builtin_replay()) > n


def test_builtin_retention_prompts_are_not_the_benchmarks_questions():
    # bench/learning.py and bench/learning_sweep.py count general answers kept on their own questions: a
    # retention prompt among them would be trained on (replay) or be the guard's own measure.
    import os
    import re

    def norm(q):
        return re.sub(r"[^a-z0-9 ]", "", q.lower()).strip()

    data = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "learning_data.json")
    with open(data) as f:
        asked = {norm(g["q"]) for g in json.load(f)["general"]}
    prompts = [norm(p[-1]["content"]) for p in guard.builtin_prompts() + guard.builtin_replay()]
    assert len(prompts) == len(set(prompts)) >= 380
    assert not asked & set(prompts), asked & set(prompts)


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
    assert p.anchor == defaults.anchor and p.reword == defaults.reword
    p = schedule.plan({"anchor": 3, "reword": True}, options.parse(["--anchor", "0", "--no-reword"]), 10)
    assert (p.anchor, p.reword) == (3.0, True)
    assert schedule.plan({}, options.parse(["--restate"]), 10).restate is True
    assert schedule.plan({"restate": False}, options.parse(["--restate"]), 10).restate is False
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
        "counted": 3,
    }
    # Examples aside (restated answers) are trained but neither waited for nor summarized.
    aside = schedule.Losses(3, aside=[1])
    aside.record([0, 1], [0.05, 3.0])
    assert not aside.learned(0.1)  # example 2 not seen yet
    aside.record([2], [0.07])
    assert aside.learned(0.1) and aside.summary(0.1)["max_after"] == 0.07 and aside.summary(0.1)["counted"] == 2


def test_the_token_budget_is_chosen_from_memory_unless_given(run, monkeypatch):
    # --max-batch-tokens auto (the default): the budget follows the memory the step may take (a tenth of the
    # device's, at most 80% of what is free) and the model's size, and /train/status says how it was chosen.
    gib = 2**30
    monkeypatch.setattr(admission, "_host_memory", lambda: (64 * gib, 60 * gib))
    _, trainer = run(store=False)
    big = trainer.status()["max_batch_tokens"]
    assert big["chosen"].startswith("auto:") and "hidden" in big["chosen"]
    monkeypatch.setattr(admission, "_host_memory", lambda: (64 * gib, 3 * gib))  # little free: 80% of it counts
    _, trainer = run(store=False)
    small = trainer.status()["max_batch_tokens"]
    assert 256 <= small["tokens"] < big["tokens"] and trainer.max_batch_tokens == small["tokens"]
    monkeypatch.setattr(admission, "_host_memory", lambda: (64 * gib, 1 * gib))  # less than the workspace
    _, trainer = run(store=False)
    assert trainer.status()["max_batch_tokens"]["tokens"] == 256
    _, trainer = run("--max-batch-tokens", "24", store=False)
    assert trainer.status()["max_batch_tokens"] == {"tokens": 24, "chosen": "--max-batch-tokens"}


def test_the_hooks_batched_steps_train_the_same_bits(run):
    """--step-batch-mib N: the backward hooks' optimizer steps wait in batches of gradients (and the output
    projection's deferred gradient steps as a batch of one, Apollo.step_now); the weights are those of stepping
    each parameter alone as its gradient arrives (0, the CPU's default)."""
    engine0, alone = run("--no-guard", store=False)
    engine1, batched = run("--no-guard", "--step-batch-mib", "1", store=False)
    assert alone.step_batch_bytes == 0 and batched.step_batch_bytes == 1 << 20
    for trainer in (alone, batched):
        info = job(trainer, {"examples": FACTS, "steps": 3})
        assert info["state"] == "done" and info["step"] == 3, info
    assert same_bits(weights(engine0), weights(engine1))
    assert {kind for kind, _, _ in batched.opt._batches} == {"apollo", "adamw"} and not alone.opt._batches
    assert all(p.grad is None for p in batched.model.parameters())


def test_the_gradients_waiting_for_a_batched_step_count_in_a_steps_memory(monkeypatch):
    """--step-batch-mib: auto is a sixteenth of the trained weights' bytes, at most 1 GiB, on a GPU, 0 on the CPU;
    the waiting gradients' bytes join a step's memory and come out of the auto token budget."""
    gib = 2**30
    assert admission.step_batch_bytes("auto", 15 * gib, "cuda") == 15 * gib // 16  # 8B: 15.3 GiB of weights
    assert admission.step_batch_bytes("auto", 54 * gib, "cuda") == gib  # 27B: the cap
    assert admission.step_batch_bytes("auto", 2 * gib, "cuda") == gib // 8
    assert admission.step_batch_bytes("auto", 54 * gib, "cpu") == 0
    assert admission.step_batch_bytes(3, 54 * gib, "cpu") == 3 << 20
    assert (
        admission.step_memory(100, 64, 2, 2, "cuda", batch_bytes=gib)
        == admission.step_memory(100, 64, 2, 2, "cuda") + gib
    )
    monkeypatch.setattr(admission, "_host_memory", lambda: (640 * gib, 600 * gib))
    device = torch.device("cpu")
    tokens, how = admission.auto_max_batch_tokens(4096, 32, 2, device)
    fewer, how_fewer = admission.auto_max_batch_tokens(4096, 32, 2, device, batch_bytes=8 * gib)
    per_token = admission.step_bytes_per_token(4096, 32, 2, "cpu")
    assert abs((tokens - fewer) - 8 * gib / per_token) <= 1
    assert "8.00 GiB of gradients waiting for a batched step" in how_fewer and "waiting" not in how
    for bad in ("-1", "1.5", "lots"):
        with pytest.raises(ValueError, match="--step-batch-mib"):
            options.parse(["--state-dir", "/nonexistent", "--no-store", "--step-batch-mib", bad])


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "lots", ""])
def test_a_bad_token_budget_is_refused(value):
    with pytest.raises(ValueError, match="--max-batch-tokens"):
        options.parse(["--state-dir", "/nonexistent", "--no-store", "--max-batch-tokens", value])


def test_padding_waste_of_one_shared_forward():
    # On CPU the anchor's rows get a forward of their own when sharing the batch's would pad too much
    # (service.padding_waste > 0.1): 8 rows of 57 tokens and 2 of 83 as one forward compute 830 tokens
    # where two compute 622 (the case bench/learning_step.py measured slower shared).
    from livetrain.trainer.service import padding_waste

    row = lambda n: ([0] * n, [True] * n, 1.0)  # noqa: E731
    assert padding_waste([row(57)] * 8, [row(83)] * 2) == pytest.approx(830 / 622 - 1)
    assert padding_waste([row(50)] * 8, [row(50)] * 2) == 0.0
    assert padding_waste([row(40), row(50)], [row(52)]) < 0.1


def test_a_trainer_json_write_that_fails_is_written_again_by_the_next(tmp_path):
    """Trainer.reserve records a weight version durably before it is used, and _name_state the optimizer
    state's files after a save: when trainer.json cannot be written (here a directory stands in its place)
    neither is counted as made, so that the next reservation or save (the same one, retried) writes it.
    One writer, _write_meta, owns that rule for both."""
    from types import SimpleNamespace

    from livetrain import _core

    path = tmp_path / "trainer.json"
    t = SimpleNamespace(reserved=3, state_version=2, state_files=["a"], engine={"pid": 1}, ranks=None)
    t.meta_path = str(path)
    t._write_meta = lambda **fields: Trainer._write_meta(t, **fields)
    path.mkdir()
    with pytest.raises(_core.IoError):
        Trainer.reserve(t, 4)
    with pytest.raises(_core.IoError):
        Trainer._name_state(t, 5, ["b"])
    assert (t.reserved, t.state_version, t.state_files) == (3, 2, ["a"])
    path.rmdir()
    Trainer.reserve(t, 4)
    assert json.loads(path.read_text()) == {"weight_version": 2, "reserved": 4, "engine": {"pid": 1}, "files": ["a"]}
    Trainer._name_state(t, 5, ["b"])
    assert json.loads(path.read_text()) == {"weight_version": 5, "reserved": 4, "engine": {"pid": 1}, "files": ["b"]}
    # Not rewritten when nothing changes (a directory in its place would fail a write).
    path.unlink()
    path.mkdir()
    Trainer.reserve(t, 4)
    Trainer._name_state(t, 5, ["b"])
