"""bench/learning_sweep.py's loop over its rows, on a stand-in for its in-process trainer (no model): what each
row starts from."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_sweep():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("learning_sweep", ROOT / "bench" / "learning_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_row(sweep) -> dict:
    """A sweep row (bench/learning_sweep.py's ROW keys) with the trainer's shipped learning defaults."""
    from livetrain.trainer import options

    d = options.LEARNING
    keys = {"lr": "lr", "warmup": "warmup", "anchor": "anchor", "replay": "replay", "select": "replay_select"}
    keys |= {"reword": "reword", "restate": "restate", "max_steps": "max_steps", "until": "until_loss"}
    keys |= {"train": "train"}
    return {**sweep.ROW, **{k: d[v] for k, v in keys.items()}}


class FakeInProcess:
    """What the sweep's loop sees of bench/learning_sweep.InProcess: the retention answers are made again
    only when they were made at another weight version (guard.Retention.refresh), a job moves the weight
    version on, ``reset`` puts back the starting weights and their version."""

    made: list = []
    bodies: list = []

    def __init__(self, dtype, device, batch_size):
        self.version, self.answers_at, self.which = 0, None, None
        FakeInProcess.made, FakeInProcess.bodies = [], []

    def retention(self, which):
        if self.answers_at != self.version or self.which != which:
            FakeInProcess.made.append((self.version, which))
            self.answers_at, self.which = self.version, which

    def reset(self):
        self.version = 0

    def ask(self, questions, max_tokens):
        return [""] * len(questions)

    def job(self, body):
        assert self.answers_at == self.version == 0  # the row's job starts from the starting weights' answers
        FakeInProcess.bodies.append({k: v for k, v in body.items() if k != "examples"})
        self.version += 5
        return {
            "guard": {"seconds": 0.5, "kl": 0.01, "answers_kept": 1, "answers_compared": 1, "passed": True},
            "stop_reason": "until_loss",
            "step": 5,
            "reworded": None,
            "restated": None,
            "losses": None,
            "seconds": 1.0,
            "error": None,
            "state": "done",
        }


def test_sweep_rows_keep_the_retention_answers_of_the_starting_weights(monkeypatch, tmp_path):
    # sweep4 on the H200 made the 393 retention answers again after each row on that row's trained weights
    # (then thrown away and made once more at the next job's start: its guard time 35-38 s against 6.3 s).
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "InProcess", FakeInProcess)
    args = ["--facts", "2", "--lr", "5e-5,1e-4", "--anchor", "4", "--replay", "8", "--retention", "all,core"]
    assert sweep.main(args + ["--json", str(tmp_path / "rows.jsonl")]) == 0
    # Made once at the start, then once per change of the retention prompts, always on the starting weights.
    assert FakeInProcess.made == [(0, "all"), (0, "core"), (0, "all"), (0, "core")]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4


def test_sweep5_rows_differ_from_the_defaults_then_in_one_setting():
    sweep = load_sweep()
    # The order of the GPU request (the call's timeout cuts the last); sweep4 as it ran on the H200.
    assert [r["name"] for r in sweep.GRIDS["sweep5"]] == [
        "anchor16 r8 similar",
        "lr1e-4 anchor4 r8 similar",
        "anchor4 r8 similar reword",
        "anchor4 r8 similar core",
    ]
    assert [r["name"] for r in sweep.GRIDS["sweep4"]] == [
        "anchor4 r8 similar",
        "anchor4 r8 similar warmup30",
        "anchor4 r8 similar warmup30 restate",
        "anchor16 r8 similar",
        "anchor4 r8 similar reword",
        "anchor4 r8 similar core",
    ]
    # Each sweep5 row differs in one setting from the defaults it was measured against: sweep4's first row
    # (lr 5e-5 then).
    then = {**sweep.ROW, **sweep.GRIDS["sweep4"][0]}
    for r in sweep.GRIDS["sweep5"]:
        row = {**sweep.ROW, **r}
        differ = {k for k in then if row[k] != then[k]} - {"name", "max_steps"}
        assert len(differ) == 1, (r["name"], differ)
    # The shipped defaults are that row with the budget of sweep5's rewording row, which got no rewordings and
    # so measured it (docs/learning.md, "Shipped defaults": lr 1e-4 is not taken).
    shipped = shipped_row(sweep)
    assert {k for k in shipped if shipped[k] != then[k]} == {"max_steps"}, (shipped, then)
    assert shipped["max_steps"] == sweep.GRIDS["sweep5"][2]["max_steps"] == 400


def test_sweep6_is_the_defaults_without_and_with_rewording():
    sweep = load_sweep()
    shipped = shipped_row(sweep)
    plain, reword = ({**sweep.ROW, **r} for r in sweep.GRIDS["sweep6"])
    assert {k for k in shipped if plain[k] != shipped[k]} == set(), plain
    assert {k for k in shipped if reword[k] != shipped[k]} == {"reword"} and reword["reword"] is True, reword


def test_sweep7_is_the_defaults_against_fewer_larger_steps():
    sweep = load_sweep()
    shipped = shipped_row(sweep)
    rows = [{**sweep.ROW, **r} for r in sweep.GRIDS["sweep7"]]
    differ = [{k for k in shipped if row[k] != shipped[k]} for row in rows]
    assert differ == [set(), {"batch"}, {"batch", "reword"}, {"batch", "train"}], differ
    assert shipped["batch"] is None and [r["batch"] for r in rows[1:]] == [64, 64, 64]
    assert sweep.ROW["batch"] is None  # the other grids' rows: the trainer's --batch-size
    assert sweep.GRIDS["sweep7b"] == sweep.GRIDS["sweep7"][2:]  # the rows its H200 call did not hold


def test_sweep7_jobs_carry_their_batch_size_and_rows_name_the_answers_lost(monkeypatch, tmp_path):
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "InProcess", FakeInProcess)
    answers = iter(["Paris"] + ["Lyon"] * 4)  # before: right; after each job: wrong
    monkeypatch.setattr(FakeInProcess, "ask", lambda self, q, n: [next(answers)] * len(q))
    monkeypatch.setattr(sweep.lq, "load", lambda facts=None: ([], [{"q": "capital of France?", "keywords": ["Paris"]}]))
    assert sweep.main(["--grid", "sweep7", "--json", str(tmp_path / "rows.jsonl")]) == 0
    assert [b.get("batch_size") for b in FakeInProcess.bodies] == [None, 64, 64, 64]
    assert [b["train"] for b in FakeInProcess.bodies] == ["all", "all", "all", "mlp"] and FakeInProcess.bodies[2][
        "reword"
    ]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["general_lost"] for r in rows] == [{"0": "Lyon"}] * 4 and rows[0]["general_right_before_idx"] == [0]


def test_sweep8_mixes_each_jobs_weights_back_toward_the_start(monkeypatch, tmp_path):
    """sweep8: the defaults and batch 64 (each as in sweep7), then each job's weights set to start + a × (end −
    start) for each a, a row of its own with everything asked again; the next row's job starts from the start."""
    import torch

    sweep = load_sweep()
    shipped = shipped_row(sweep)
    rows = [{**sweep.ROW, **r} for r in sweep.GRIDS["sweep8"]]
    assert [{k for k in shipped if row[k] != shipped[k]} for row in rows] == [{"batch"}, set()]
    assert all(r["alphas"] == sweep.ALPHAS and 0 < min(r["alphas"]) and max(r["alphas"]) < 1 for r in rows)

    class Mixing(FakeInProcess):
        def __init__(self, *a):
            super().__init__(*a)
            self.start = {"w": torch.zeros(2)}
            self.trainer = type("T", (), {"weights": {"w": torch.zeros(2)}, "model": None})()
            self.reference = type("R", (), {"kl": lambda _, model: float(self.trainer.weights["w"][0])})()
            self.seen = []

        mix = sweep.InProcess.mix
        mixed = sweep.InProcess.mixed

        def reset(self):
            super().reset()
            self.trainer.weights["w"].copy_(self.start["w"])

        def job(self, body):
            assert float(self.trainer.weights["w"][0]) == 0.0  # from the start, not the last row's mix
            self.trainer.weights["w"].fill_(1.0)
            return super().job(body)

        def losses(self, examples):
            return [1.0 - float(self.trainer.weights["w"][0])] * len(examples)

    monkeypatch.setattr(sweep, "InProcess", Mixing)
    fact = {"train": [["Where is Velmora?", "In Drostane."]], "reworded": "Velmora lies where?", "keyword": "Drostane"}
    general = [{"q": "capital of France?", "keywords": ["Paris"]}]
    monkeypatch.setattr(sweep.lq, "load", lambda facts=None: ([fact], general))
    monkeypatch.setattr(Mixing, "ask", lambda self, q, n: ["Paris"] * len(q))
    assert sweep.main(["--grid", "sweep8", "--json", str(tmp_path / "rows.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    n = len(sweep.ALPHAS)
    assert [r["name"] for r in out] == ["batch 64"] + [f"batch 64 a={a:g}" for a in sweep.ALPHAS] + ["defaults"] + [
        f"defaults a={a:g}" for a in sweep.ALPHAS
    ]
    mixed = out[1 : 1 + n] + out[2 + n :]
    assert [r["kl"] for r in mixed] == [round(a, 5) for a in sweep.ALPHAS] * 2  # the weights at each a
    # The examples' loss at each a (the stand-in's 1 − w): below until_loss 0.1 at none of these a.
    assert [r["loss_max"] for r in mixed] == [round(1 - a, 4) for a in sweep.ALPHAS] * 2
    assert all(r["general_kept"] == 1 and r["below_until"] == 0 and r["examples"] == 1 for r in mixed)


def test_in_process_losses_are_one_per_sequence_of_each_example(tmp_path):
    """InProcess.losses (sweep8's and bench/learning_interp.py's examples' losses) on a real tiny model: one
    loss per sequence the trainer trains (encode_example returns a list of them), each the mean over its
    trained tokens (it unpacked one tuple and failed on every example)."""
    import types

    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests" / "python"))
    from livetrain.trainer.examples import encode_example

    import tiny_model

    tiny_model.make_model_dir(tmp_path, ["what is the capital of zorbia", "the capital of zorbia is quuxville"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).train()
    sweep = load_sweep()
    fake = types.SimpleNamespace(trainer=types.SimpleNamespace(tokenizer=tok, model=model, device=torch.device("cpu")))
    ex = {"prompt": "what is the capital of zorbia", "completion": "quuxville"}
    [got] = sweep.InProcess.losses(fake, [ex])
    [(ids, mask, _)] = encode_example(tok, ex, "x")
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got == pytest.approx(float(nll[torch.tensor(mask[1:])].mean()), rel=1e-5)
    assert model.training  # its mode as it was


def test_the_lost_answers_are_those_right_before_and_wrong_after():
    sys.path.insert(0, str(ROOT / "bench"))
    import learning_questions as lq

    assert lq.lost([True, True, False, True], [True, False, False, False]) == [1, 3]
    asked = [("trained", "q", 0), ("general", "a", 0), ("general", "b", 1), ("general", "c", 2)]
    before = {"general": [True, True, False]}
    after = {"general": [False, True, False]}
    assert lq.lost_answers(asked, ["x", "Lyon", "Paris", "y"], before, after) == {0: "Lyon"}
