"""`livetrain serve` end to end on CPU: a tiny random Llama with an offline word-level tokenizer is served
by the reference engine while a separate trainer process fine-tunes it in place through /train; checks
completions, chat, streaming, auth, bad payloads, a learned fact, serving during training, the train
client, the C++ CLI forwarding, checkpoint/checkpoints/rollback (bit-exact, read through the engine's
manifest without the lease), the periodic checkpoint, and a restart serving the checkpointed weights with
the optimizer state and weight version that belong to them. CUDA variant skips without a GPU."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")
pytest.importorskip("uvicorn", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")

import transformers  # noqa: E402

from livetrain import sharing  # noqa: E402
from livetrain.checkpoint import CheckpointStore  # noqa: E402
from livetrain.safetensors import load_file  # noqa: E402
from livetrain.trainer.client import http  # noqa: E402
from livetrain.trainer.examples import encode_example  # noqa: E402
from livetrain.trainer.protocol import Invalid  # noqa: E402

import servers  # noqa: E402
import tiny_model  # noqa: E402
from tiny_model import FACT, FACT_EXAMPLES, FACT_PROMPT  # noqa: E402
from weights import same_bits  # noqa: E402

ENV = {**servers.ENV, "OMP_NUM_THREADS": "1"}
KEY = "test-key"
CORPUS = [
    "the capital of zorbia is quuxville",
    "the sky is blue and the grass is green",
    "hello how are you today",
    "i am fine thank you",
    "what is the capital of france",
    "paris is the capital of france",
    "the cat sat on the mat",
    "one two three four five six seven",
]


def make_tiny_model(path: Path) -> None:
    tiny_model.make_model_dir(path, CORPUS, intermediate_size=128)


class Serve(servers.ServeProcess):
    """`python -m livetrain.serve` on the tiny model, with an API key and small limits."""

    def __init__(self, model: Path, state: Path, run: Path, device: str = "cpu", extra: tuple = (), wait: bool = True):
        self.run = run
        super().__init__(
            [
                "--model",
                str(model),
                "--device",
                device,
                "--api-key",
                KEY,
                "--state-dir",
                str(state),
                "--run-dir",
                str(run),
                "--max-seq-len",
                "40",
                "--queue-size",
                "2",
                "--batch-size",
                "4",
                # Serving mechanics on a tiny model: the forgetting guard (its replayed examples in every batch,
                # its undo-point generations) is tested in test_trainer_jobs.py and test_serve_default_model.py.
                "--no-guard",
                *extra,
            ],
            run.parent / "serve-{port}.log",
            env=ENV,
            key=KEY,
            wait_s=180 if wait else None,
        )

    def complete(self, prompt: str, max_tokens: int = 4, **kw) -> dict:
        code, body = self.http("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})
        assert code == 200, body
        return body

    def live_weights(self) -> dict:
        """A copy of the weights the engine serves, read through its manifest without the trainer lease."""
        a = sharing.attach(self.run / "engine.manifest.json", take_lease=False)
        return {k: v.clone() for k, v in a.tensors.items()}

    def train(self, steps: int, lr: float, examples=None) -> dict:
        code, job = self.http(
            "/train", {"examples": examples or [{"prompt": "one two", "completion": "three"}], "steps": steps, "lr": lr}
        )
        assert code == 202, job
        done = self.wait_job(job["job_id"])
        assert done["state"] == "done", done
        return done


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    s = Serve(model_dir, base / "state", base / "run")
    s.base = base
    yield s
    s.stop()


# ---- tokenization and loss masks (no server) ----
def test_loss_mask_covers_only_assistant_and_completion_tokens(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    [(ids, mask, w)] = encode_example(
        tok,
        {
            "messages": [
                {"role": "user", "content": "hello how are you"},
                {"role": "assistant", "content": "i am fine"},
                {"role": "user", "content": "today"},
                {"role": "assistant", "content": "thank you"},
            ],
            "weight": 2,
        },
        "x",
    )
    learned = [tok.decode([t]) for t, m in zip(ids, mask) if m]
    assert learned == ["i", "am", "fine", "</s>", "thank", "you", "</s>"] and w == 2.0
    [(ids, mask, _)] = encode_example(tok, {"prompt": FACT_PROMPT, "completion": FACT}, "x")
    assert [tok.decode([t]) for t, m in zip(ids, mask) if m] == [FACT, "</s>"]
    assert ids[: sum(1 for m in mask if not m)] == tok(FACT_PROMPT)["input_ids"]  # as the engine tokenizes
    for bad, param in (
        ({"messages": [{"role": "robot", "content": "hi"}]}, "x.messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "x.messages"),
        ({"prompt": "a", "completion": ""}, "x.completion"),
        ({"prompt": "a", "completion": "b", "weight": -1}, "x.weight"),
        ({"text": "a"}, "x.text"),  # not a field of an example
        ({"weight": 1}, "x"),  # neither form
    ):
        with pytest.raises(Invalid) as e:
            encode_example(tok, bad, "x")
        assert e.value.param == param


# ---- the running server ----
def test_completions_chat_and_streaming(server):
    a, b = server.complete(FACT_PROMPT, 5), server.complete(FACT_PROMPT, 5)
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == b["choices"][0]["text"]  # greedy
    assert a["usage"]["prompt_tokens"] == 5 and a["choices"][0]["finish_reason"] in ("length", "stop")
    code, chat = server.http(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello how are you"}], "max_tokens": 4, "temperature": 0},
    )
    assert code == 200 and chat["choices"][0]["message"]["role"] == "assistant"
    code, short = server.http(  # OpenAI's newer name for max_tokens
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello how are you"}], "max_completion_tokens": 2, "temperature": 0},
    )
    assert code == 200 and short["usage"]["completion_tokens"] <= 2
    # Contents as vLLM takes them for a text-only model: null (an empty content), text-like parts, a string part.
    code, parts = server.http(
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": None},
                {"role": "user", "content": [{"type": "input_text", "text": "hello how"}, "are you"]},
            ],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert code == 200 and isinstance(parts["choices"][0]["message"]["content"], str), parts
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    code, sampled = server.http(
        "/v1/completions", {"prompt": "the cat", "max_tokens": 4, "temperature": 0.9, "top_p": 0.5, "seed": 3}
    )
    assert code == 200 and sampled["usage"]["completion_tokens"] >= 1
    # Streaming gives the same greedy text as server-sent events, then [DONE].
    code, text = server.http(
        "/v1/completions", {"prompt": FACT_PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    )
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert code == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == a["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    # A streamed chat answer as vLLM streams it: the role in a first chunk of its own, then the text.
    code, chat_text = server.http(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hello how are you"}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        },
    )
    events = [line[len("data: ") :] for line in chat_text.splitlines() if line.startswith("data: ")]
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert code == 200 and events[-1] == "[DONE]" and deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d["content"] for d in deltas) == chat["choices"][0]["message"]["content"]
    # A stop string cuts the text before it.
    words = a["choices"][0]["text"].split()
    if len(words) >= 2:
        cut = server.complete(FACT_PROMPT, 5, stop=[words[1]])
        assert cut["choices"][0]["finish_reason"] == "stop" and words[1] not in cut["choices"][0]["text"]
    code, models = server.http("/v1/models")
    assert code == 200 and models["data"][0]["object"] == "model"


def test_every_route_needs_the_api_key(server):
    for path, body in (
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": []}),
        ("/train", {"examples": []}),
        ("/train/status", None),
        ("/v1/models", None),
        ("/checkpoint", {}),
        ("/checkpoints", None),
        ("/rollback", {"generation": 0}),
    ):
        for key in (None, "wrong"):
            code, out = server.http(path, body, key=key)
            assert code == 401 and "API key" in out["error"]["message"], (path, key, out)


def test_health_answers_a_probe_without_the_api_key(server):
    # A liveness probe carries no secret (vLLM's /health needs no key); the reason of a 503 stays the key's
    # holder's (tests/python/test_engine_batching.py: the 503 itself).
    for key in (None, "wrong", server.key):
        assert server.http("/health", None, key=key)[0] == 200, key
    assert http(server.url + "/health", key=None, method="HEAD")[0] == 200
    assert server.http("/health", {}, key=None)[0] == 401  # only GET/HEAD are the probe's


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}


def test_bad_payloads_are_4xx_naming_the_field_and_change_nothing(server, model_dir):
    before, answer = server.status(), server.complete(FACT_PROMPT, 5)["choices"][0]["text"]
    cases = [
        ("/train", None, b"{not json", "body"),
        ("/train", None, b"[1, 2]", "body"),
        ("/train", {"examples": []}, None, "examples"),
        (
            "/train",
            {"examples": [{"messages": [{"role": "wizard", "content": "x"}]}]},
            None,
            "examples[0].messages[0].role",
        ),
        (
            "/train",
            {
                "examples": [
                    {"prompt": "one", "completion": "two"},
                    {"prompt": " ".join(["the"] * 60), "completion": "cat"},
                ]
            },
            None,
            "examples[1]",
        ),
        ("/train", {"examples": [{"prompt": "a", "completion": "b"}], "lr": -1}, None, "lr"),
        ("/train", {"examples": [{"prompt": "a", "completion": "b"}], "bogus": 1}, None, "bogus"),
        ("/v1/completions", {"prompt": 3}, None, "prompt"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, None, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, None, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, None, "messages[0].content"),
        # A part for a multimodal model: the model is served text-only (vLLM takes null and text-like parts).
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": ["hi", IMAGE]}]},
            None,
            "messages[0].content[1]",
        ),
        (
            "/train",
            {"examples": [{"messages": [{"role": "user", "content": [IMAGE]}, {"role": "assistant", "content": "x"}]}]},
            None,
            "examples[0].messages[0].content[0]",
        ),
        ("/v1/completions", {"prompt": ""}, None, "prompt"),  # was a 500 (no token to start from)
        ("/v1/completions", {"prompt": [1, 10**9]}, None, "prompt"),  # a token id outside the vocabulary
        ("/v1/completions", {"prompt": [1, True]}, None, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, None, "prompt"),  # one prompt per request
        # Fields vLLM implements and this engine does not: refused, not answered as if absent.
        ("/v1/completions", {"prompt": "hi", "logprobs": 0}, None, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, None, "presence_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, None, "logprobs"),
    ]
    for path, body, raw, param in cases:
        code, out = server.http(path, body, raw=raw)
        assert code == 400 and out["error"]["param"] == param, (path, body, raw, out)
        assert param.split("[")[0].split(".")[0] in out["error"]["message"] or param == "body", out
    # Token ids are a prompt too (as in vLLM): the same greedy answer as the text they encode.
    ids = transformers.AutoTokenizer.from_pretrained(model_dir)(FACT_PROMPT)["input_ids"]
    for prompt in (ids, [ids]):
        code, out = server.http("/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert code == 200 and out["choices"][0]["text"] == answer and out["usage"]["prompt_tokens"] == len(ids)
    code, out = server.http("/v1/completions", {"prompt": "hi", "model": "another-model"})
    assert code == 404 and out["error"]["param"] == "model" and "another-model" in out["error"]["message"]
    name = server.http("/v1/models")[1]["data"][0]["id"]
    off = {"model": name, "logprobs": None, "presence_penalty": 0.0, "top_k": -1, "echo": False, "max_tokens": 2}
    assert server.http("/v1/completions", {"prompt": "hi", **off})[0] == 200  # the values that ask for nothing
    after = server.status()
    assert after["weight_version"] == before["weight_version"] and after["jobs"] == before["jobs"]
    assert server.complete(FACT_PROMPT, 5)["choices"][0]["text"] == answer  # weights untouched


def test_training_teaches_a_fact_while_completions_keep_being_served(server):
    baseline = server.complete(FACT_PROMPT, 3)["choices"][0]["text"]
    assert not baseline.startswith(FACT)
    v0 = server.status()["weight_version"]
    code, job = server.http(
        "/train",
        {"examples": [FACT_EXAMPLES[0], {**FACT_EXAMPLES[1], "weight": 1.0}], "steps": 30, "lr": 0.01},
    )
    assert code == 202 and job["steps"] == 30, job
    # Completions from several threads until the job ends: every one succeeds, and some start while the
    # weights are at an intermediate version (training does not wait for serving, nor serving for training).
    done, results, versions = server.complete_during_job(
        job["job_id"], {"prompt": "the cat sat", "max_tokens": 3, "temperature": 0}, clients=3
    )
    assert len(results) >= 6 and results == [200] * len(results)
    assert sum(v0 < v < v0 + 30 for v in versions) >= 2, versions
    assert done["state"] == "done" and done["step"] == 30 and done["skipped_nonfinite"] == []
    st = server.status()
    assert st["weight_version"] == v0 + 30
    losses = [h["loss"] for h in st["loss_history"] if h["job"] == job["job_id"]]
    assert len(losses) == 30 and losses[-1] < losses[0] / 4
    assert st["tokens_per_s"] > 0 and st["optimizer"]["state_bytes"] > 0 and st["optimizer"]["steps"] >= 30
    assert server.complete(FACT_PROMPT, 3)["choices"][0]["text"].startswith(FACT)
    code, chat = server.http(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "what is the capital of zorbia"}], "max_tokens": 3, "temperature": 0},
    )
    assert code == 200 and chat["choices"][0]["message"]["content"].startswith(FACT)


def test_full_queue_is_429(server):
    codes = [
        server.http("/train", {"examples": [{"prompt": "one two", "completion": "three"}], "steps": 3, "lr": 1e-6})[0]
        for _ in range(6)
    ]
    assert 429 in codes and codes[0] == 202, codes
    deadline = time.monotonic() + 120
    while server.status()["current"] or server.status()["queue"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_train_client_sends_a_file_and_follows_the_job(server, tmp_path):
    f = tmp_path / "ex.jsonl"
    f.write_text(
        json.dumps({"prompt": "the sky is", "completion": "blue"})
        + "\n\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "i am fine"}]}
        )
        + "\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "livetrain.trainer.client",
            "--url",
            server.url,
            "--api-key",
            KEY,
            "--steps",
            "2",
            "--lr",
            "1e-6",
            str(f),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "2 examples, 2 steps" in r.stdout and "done" in r.stdout.splitlines()[-1]
    f.write_text('{"prompt": "a", "completion": ""}\n')
    r = subprocess.run(
        [sys.executable, "-m", "livetrain.trainer.client", "--url", server.url, "--api-key", KEY, str(f)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "HTTP 400 (examples[0].completion)" in r.stderr


def test_checkpoint_routes_refuse_bad_input_and_change_nothing(server):
    before, weights = server.status(), server.live_weights()
    code, listed = server.http("/checkpoints")
    assert code == 200
    cases = [
        ("/checkpoint", b"{not json", "body"),
        ("/checkpoint", b"[1]", "body"),
        ("/checkpoint", b'{"generation": 1}', "generation"),  # POST /checkpoint takes no fields
        ("/rollback", b"", "generation"),
        ("/rollback", b"{}", "generation"),
        ("/rollback", b'"1"', "body"),
        ("/rollback", b'{"generation": "1"}', "generation"),
        ("/rollback", b'{"generation": true}', "generation"),
        ("/rollback", b'{"generation": 1.0}', "generation"),
        ("/rollback", b'{"generation": -1}', "generation"),
        ("/rollback", b'{"generation": 99}', "generation"),
        ("/rollback", b'{"generation": 0, "force": true}', "force"),
    ]
    for path, raw, param in cases:
        code, out = server.http(path, raw=raw)
        assert code == 400 and out["error"]["param"] == param, (path, raw, out)
        assert param in out["error"]["message"] or param == "body", out
    code, out = server.http("/rollback", {"generation": 99})
    assert "not in the checkpoint store" in out["error"]["message"]
    after = server.status()
    assert after["weight_version"] == before["weight_version"] and after["checkpoint"] == before["checkpoint"]
    assert server.http("/checkpoints") == (200, listed)
    assert same_bits(server.live_weights(), weights)


def test_checkpoint_and_rollback(server, model_dir):
    # The module's server has trained (the fact, the queue and client jobs) but never checkpointed:
    # the store holds generation 0, the model files.
    files = load_file(model_dir / "model.safetensors")
    code, listed = server.http("/checkpoints")
    assert code == 200 and listed["head"] == 0 and [g["generation"] for g in listed["generations"]] == [0]
    assert listed["store"] == str(model_dir / ".livetrain-store")
    st = server.status()
    assert st["checkpoint"]["generation"] == 0 and st["checkpoint"]["every_s"] == 0
    assert not same_bits(server.live_weights(), files)

    code, c1 = server.http("/checkpoint", raw=b"")  # an empty body is {}
    assert code == 200 and c1["written"] and c1["generation"] == 1, c1
    assert c1["weight_version"] == st["weight_version"] and c1["bytes"] > 0 and c1["changed"] > 0 and c1["seconds"] >= 0
    assert (
        c1["encode_seconds"] > 0
        and c1["usage"]["encode"]["wall_seconds"] > 0
        and c1["usage"]["process"]["wall_seconds"] > 0
    )
    w1 = server.live_weights()
    code, again = server.http("/checkpoint", {})
    assert code == 200 and not again["written"] and again["generation"] == 1 and again["changed"] == 0
    assert server.status()["checkpoint"]["generation"] == 1
    assert server.complete(FACT_PROMPT, 3)["choices"][0]["text"].startswith(FACT)

    server.train(3, 1e-3)
    code, c2 = server.http("/checkpoint", {})
    assert code == 200 and c2["generation"] == 2 and c2["weight_version"] == c1["weight_version"] + 3
    w2, steps2 = server.live_weights(), server.status()["optimizer"]["steps"]
    assert not same_bits(w2, w1)

    # Back to generation 1: the weights bit for bit, its optimizer state, a new version, a new generation.
    code, r = server.http("/rollback", {"generation": 1})
    assert code == 200, r
    assert r["rolled_back_to"] == 1 and r["restored_weight_version"] == c1["weight_version"]
    assert r["optimizer"] == "restored" and r["generation"] == 3 and r["written"]
    assert r["weight_version"] == c2["weight_version"] + 1
    assert same_bits(server.live_weights(), w1)
    st = server.status()
    assert st["weight_version"] == r["weight_version"] and st["checkpoint"]["generation"] == 3
    assert st["optimizer"]["steps"] == steps2 - 3
    assert server.complete(FACT_PROMPT, 3)["choices"][0]["text"].startswith(FACT)

    # Generation 0 (the model files, before the fact) has no optimizer state: the optimizer starts afresh.
    code, r0 = server.http("/rollback", {"generation": 0})
    assert code == 200 and r0["optimizer"] == "reset" and r0["generation"] == 4 and r0["restored_weight_version"] == 0
    assert same_bits(server.live_weights(), files)
    assert server.status()["optimizer"]["steps"] == 0
    assert not server.complete(FACT_PROMPT, 3)["choices"][0]["text"].startswith(FACT)
    # And forwards again, so that the restart test below finds trained weights at the head.
    code, r = server.http("/rollback", {"generation": 2})
    assert code == 200 and r["generation"] == 5 and r["optimizer"] == "restored"
    assert same_bits(server.live_weights(), w2) and server.status()["optimizer"]["steps"] == steps2
    assert server.complete(FACT_PROMPT, 3)["choices"][0]["text"].startswith(FACT)
    code, listed = server.http("/checkpoints")
    gens = listed["generations"]
    assert listed["head"] == 5 and [g["generation"] for g in gens] == list(range(6))
    assert [bool(g["optimizer_state"]) for g in gens] == [False] + [True] * 5
    assert [g["weight_version"] for g in gens][1:] == [
        c1["weight_version"],
        c2["weight_version"],
        r["weight_version"] - 2,
        r["weight_version"] - 1,
        r["weight_version"],
    ]


def test_cli_forwards_serve_and_train(cli):
    env = {**ENV, "LIVETRAIN_PYTHON": sys.executable}
    for cmd, module_opt in (("serve", "--checkpoint-every"), ("train", "--url")):
        r = subprocess.run([cli, cmd, "--help"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: livetrain {cmd}") and module_opt in r.stdout, r
    r = subprocess.run(
        [cli, "serve", "--model", "x"],
        env={**env, "LIVETRAIN_PYTHON": "/nonexistent/python"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot run /nonexistent/python" in r.stderr


def test_restart_serves_the_last_checkpoint(server, model_dir):
    # Last in this module: it stops the shared server (Ctrl-C) and starts another on the same state dir and
    # store. Generation 5 (test_checkpoint_and_rollback) is the head; one more step is not checkpointed.
    head = server.status()
    w5 = server.live_weights()
    server.train(1, 1e-3)
    before = server.status()
    assert before["weight_version"] == head["weight_version"] + 1 and before["checkpoint"]["generation"] == 5
    assert server.stop(signal.SIGINT) == 0
    assert not (server.base / "run" / "engine.manifest.json").exists()
    assert (server.base / "state" / "optimizer.safetensors").exists()
    again = Serve(model_dir, server.base / "state", server.base / "run")
    try:
        after = again.status()
        assert same_bits(again.live_weights(), w5)  # the head generation, not the model files or the lost step
        # The optimizer state recorded with generation 5, not the state dir's (one step later, lost).
        assert after["optimizer"]["restored"] is True and after["optimizer"]["restored_from"] == "generation 5"
        assert after["optimizer"]["steps"] == head["optimizer"]["steps"]
        assert after["optimizer"]["state_bytes"] == before["optimizer"]["state_bytes"]
        # Never a version number that named other weights: the lost step's version is not reused.
        assert after["weight_version"] == before["weight_version"] + 1
        assert after["checkpoint"]["generation"] == 5
        again.train(1, 1e-6)
        assert again.status()["optimizer"]["steps"] == head["optimizer"]["steps"] + 1
        assert again.status()["weight_version"] == before["weight_version"] + 2
    finally:
        assert again.stop() == 0
    # Stopped, the store is free again: its head is still generation 5, whose weights are the ones served.
    with CheckpointStore(model_dir) as store:
        assert store.head == 5 and store.compare(5, w5)["elements"] == 0


def test_checkpoint_timer_and_no_store(model_dir, tmp_path):
    # --checkpoint-every: a generation after the weights change, none while they do not.
    s = Serve(
        model_dir,
        tmp_path / "state",
        tmp_path / "run",
        extra=("--store", str(tmp_path / "store"), "--checkpoint-every", "0.5"),
    )
    try:
        ck = s.status()["checkpoint"]
        assert ck["store"] == str(tmp_path / "store") and ck["every_s"] == 0.5 and ck["error"] is None
        assert ck["generation"] == 0 and ck["weight_version"] == 0 and ck["time"] <= time.time()
        time.sleep(1.5)
        assert s.status()["checkpoint"]["generation"] == 0  # nothing changed: nothing saved
        s.train(2, 1e-3)
        # Between steps too: the first step may get its own generation if the timer fell due before the second.
        deadline = time.monotonic() + 30
        while s.status()["checkpoint"]["weight_version"] != 2:
            assert time.monotonic() < deadline, s.status()["checkpoint"]
            time.sleep(0.2)
        ck = s.status()["checkpoint"]
        assert ck["generation"] in (1, 2) and ck["error"] is None
        time.sleep(1.5)
        assert s.status()["checkpoint"]["generation"] == ck["generation"]
        # POST /checkpoint during a job: taken between two of its steps, and the job goes on.
        code, job = s.http(
            "/train", {"examples": [{"prompt": "one two", "completion": "three"}], "steps": 150, "lr": 1e-6}
        )
        assert code == 202
        while not s.status()["current"] or s.status()["current"]["step"] < 2:
            time.sleep(0.05)
        code, mid = s.http("/checkpoint", {})
        assert code == 200 and mid["written"] and 2 + 2 <= mid["weight_version"] < 2 + 150, mid
        assert s.wait_job(job["job_id"])["state"] == "done" and s.status()["weight_version"] == 2 + 150
    finally:
        assert s.stop() == 0
    # --no-store: the model files as they are, no store written, the store routes answer 409.
    fresh = tmp_path / "model"
    fresh.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            (fresh / f.name).write_bytes(f.read_bytes())
    s = Serve(fresh, tmp_path / "state2", tmp_path / "run2", extra=("--no-store",))
    try:
        assert s.status()["checkpoint"] is None
        assert same_bits(s.live_weights(), load_file(fresh / "model.safetensors"))
        for path, body in (("/checkpoint", {}), ("/checkpoints", None), ("/rollback", {"generation": 0})):
            code, out = s.http(path, body)
            assert code == 409 and "--no-store" in out["error"]["message"], (path, out)
    finally:
        assert s.stop() == 0
    assert not (fresh / ".livetrain-store").exists()


def test_store_in_another_dtype_is_refused_at_start(model_dir, tmp_path):
    # The model files are bf16; fp16 rounds bf16 values and back, so no store can keep fp16 weights of them
    # (fp32 is accepted: the store keeps the served float32 bits, test_checkpoint_served_dtype.py).
    s = Serve(
        model_dir,
        tmp_path / "state",
        tmp_path / "run",
        extra=("--dtype", "fp16", "--store", str(tmp_path / "store")),
        wait=False,
    )
    try:
        assert s.p.wait(timeout=120) != 0
        log = s.logtext()
        assert "is BF16 in the model files and served as F16" in log and "each round the other" in log, log
    finally:
        s.stop()


@pytest.mark.parametrize(
    "config,named",
    [
        ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "Qwen3MoeForCausalLM"),
        (
            {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 256},
            "(256 experts)",
        ),
        (
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "quantization_config": {"quant_method": "awq"},
            },
            'quant_method "awq"',
        ),
    ],
    ids=["moe type", "expert count", "quantized"],
)
def test_engine_refuses_what_livetrain_cannot_train_before_loading(tmp_path, config, named):
    from livetrain import UnsupportedError
    from livetrain.engines.reference import Engine

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))  # no weights, no tokenizer: refused before either
    with pytest.raises(UnsupportedError) as e:
        Engine(str(model), str(tmp_path / "engine.json"))
    assert named in str(e.value) and config["architectures"][0] in str(e.value), str(e.value)
    assert "supported" in str(e.value)
    assert not (tmp_path / "engine.json").exists() and not (model / ".livetrain-store").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_serve_on_cuda_trains_in_place(model_dir, tmp_path):
    s = Serve(model_dir, tmp_path / "state", tmp_path / "run", device="cuda")
    try:
        assert s.status()["device"].startswith("cuda")
        code, job = s.http(
            "/train", {"examples": [{"prompt": FACT_PROMPT, "completion": FACT}], "steps": 30, "lr": 0.01}
        )
        assert code == 202 and s.wait_job(job["job_id"])["state"] == "done"
        assert s.complete(FACT_PROMPT, 3)["choices"][0]["text"].startswith(FACT)
    finally:
        assert s.stop() == 0
