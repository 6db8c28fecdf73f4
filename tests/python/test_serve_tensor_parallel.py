"""`livetrain serve --tensor-parallel 2` end to end: two reference-engine ranks, each serving its vLLM-layout
shards of a tiny Llama from its own shared memory, and two trainer ranks attached one per engine rank
(gloo on CPU; NCCL and one GPU per rank on CUDA, which skips without two GPUs). Greedy completions equal
TP 1's (transformers' own greedy decoding of the same weights, which the TP 1 engine's batching matches
bit for bit: test_engine_batching.py); a /train job teaches the fact on both ranks, and what TP 2 then
serves equals TP 1's greedy answers on the trained weights read back from the two ranks' shards; the
checkpoint the two ranks write restores at TP 1 into whole tensors equal to them, and survives SIGKILL of
every process (the restarted TP 2 server serves the same answers from bit-identical shards); a killed trainer rank makes /train answer 503 naming it while
completions go on; a killed engine rank makes generation 503 with the reason and stops the server. A model
whose heads 3 ranks cannot divide is refused at start, naming the field."""

import os
import re
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

from livetrain import checkpoint, layout, sharing  # noqa: E402
from livetrain import safetensors as lst  # noqa: E402

import servers  # noqa: E402
import tiny_model  # noqa: E402
from tiny_model import FACT, FACT_PROMPT  # noqa: E402
from weights import state_steps  # noqa: E402

ENV = {**servers.ENV, "OMP_NUM_THREADS": "1"}
CORPUS = [
    "the capital of zorbia is quuxville",
    "the sky is blue and the grass is green",
    "hello how are you today",
    "one two three four five six seven",
    # More words: the vocabulary padded to 64 is split in two blocks of 32, and rank 1 must hold some of it.
    " ".join(f"filler{i}" for i in range(20)),
]
PROMPTS = [FACT_PROMPT, "the sky is", "hello how", "one two three"]
SIZE = 2


def _cuda_pair() -> bool:
    from livetrain import _core

    return torch.cuda.device_count() >= 2 and not _core.cuda_device_problem(0) and not _core.cuda_device_problem(1)


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda" and not _cuda_pair():
        pytest.skip("needs two CUDA GPUs and a core with code for them")
    return request.param


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-tp")
    tiny_model.make_model_dir(path, CORPUS, intermediate_size=128)
    # fp32 files: the store keeps the files' dtype, and fp32 sums over ranks round as TP 1's one sum does
    # (bf16 activations summed over ranks are rounded after the sum: docs/tensor-parallel.md).
    transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).save_pretrained(path)
    return path


class Serve(servers.ServeProcess):
    def __init__(self, model: Path, base: Path, device: str):
        self.run, self.model = base / "run", model
        super().__init__(
            [
                "--model",
                str(model),
                "--device",
                device,
                "--dtype",
                "fp32",
                "--tensor-parallel",
                str(SIZE),
                "--state-dir",
                str(base / "state"),
                "--run-dir",
                str(self.run),
                "--max-seq-len",
                "32",
                "--no-guard",
                "--tp-timeout",
                "120",
            ],
            base / "serve-{port}.log",
            env=ENV,
            wait_s=240,
        )
        self.wait_trainer()

    def wait_trainer(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = self.http("/train/status")
            if code == 200 and body.get("tensor_parallel", {}).get("state") == "ok":
                return body
            assert self.p.poll() is None, self.logtext()
            time.sleep(0.3)
        raise AssertionError(f"the trainer ranks did not become ready: {self.logtext()}")

    def answers(self, max_tokens: int = 4) -> list[str]:
        out = []
        for prompt in PROMPTS:
            code, body = self.http("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            assert code == 200, body
            out.append(body["choices"][0]["text"])
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """The whole Hugging Face tensors, assembled (on the CPU) from every engine rank's shards, read
        through the ranks' manifests without the trainer's lease."""
        files = lst.load_file(self.model / "model.safetensors")
        full = {n: torch.full(t.shape, float("nan")) for n, t in files.items()}
        for r in range(SIZE):
            a = sharing.attach(self.run / f"tp{r}.manifest.json", take_lease=False)
            model = a.manifest["model"]
            assert (model["tp_rank"], model["tp_size"], model["engine"]) == (r, SIZE, "vllm")
            assert model["group"] == str(self.run)
            lay = layout.build(model["config"], a.tensors, engine="vllm", tp_rank=r, tp_size=SIZE)
            for region in checkpoint.shards(lay, layout.views(lay, a.tensors), r):
                whole = full[region.name]
                for d, (first, length) in enumerate(zip(region.start, region.tensor.shape)):
                    whole = whole.narrow(d, first, length)
                whole.copy_(region.tensor.float().cpu())
        return full

    def pids(self) -> dict[str, list[int]]:
        """The engine and trainer ranks' pids, as the supervisor's log last gave them."""
        text = Path(self.log.name).read_text()
        found = {k: re.findall(rf"{k} pids ([0-9, ]+)", text) for k in ("engine", "trainer")}
        return {k: [int(p) for p in v[-1].split(",") if p.strip()] for k, v in found.items()}


def tp1_answers(model_dir: Path, weights: dict | None, device: str, max_tokens: int = 4) -> list[str]:
    """TP 1: transformers' greedy decoding of the model (``weights``, else its files), in fp32."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    model = model.to(device).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def server(model_dir, device, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"serve-tp-{device}")
    holder = {"base": base, "server": Serve(model_dir, base, device)}
    yield holder
    s = holder["server"]
    if s.p.poll() is None:
        s.kill()


def test_a_size_that_does_not_divide_the_model_is_refused(model_dir, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "livetrain.serve", "--model", str(model_dir), "--tensor-parallel", "3"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    # 3 divides neither the 4 heads nor the vocabulary padded to 64: the layout names the first field it checks.
    assert "--tensor-parallel 3" in r.stderr and ("num_attention_heads" in r.stderr or "vocab_size" in r.stderr)


def test_a_rank_without_vocabulary_rows_is_refused(tmp_path):
    """In the supervisor, without importing torch (which crashed on the GPU machine after the core was loaded)."""
    tiny_model.make_model_dir(tmp_path, CORPUS[:2])  # fewer than 33 tokens: rank 1's block would be padding
    check = (
        "import sys; from livetrain import serve; "
        f"print(serve.check_tensor_parallel({str(tmp_path)!r}, 2)); "
        f"assert serve.check_tensor_parallel({str(tmp_path)!r}, 1) is None; "
        "assert 'torch' not in sys.modules, 'the supervisor imported torch'"
    )
    r = subprocess.run([sys.executable, "-c", check], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vocab_size" in r.stdout and "rank 1" in r.stdout, r.stdout


def test_greedy_answers_equal_tp1(server, model_dir, device):
    s = server["server"]
    assert s.answers() == tp1_answers(model_dir, None, device)
    status = s.status()
    assert status["tensor_parallel"]["size"] == SIZE and status["weight_version"] == 0


def test_train_checkpoint_sigkill_restart(server, model_dir, device):
    s = server["server"]
    before = s.answers()
    code, job = s.http("/train", {"examples": tiny_model.FACT_EXAMPLES, "steps": 12, "lr": 3e-3})
    assert code == 202, job
    done = s.wait_job(job["job_id"])
    assert done["state"] == "done", done
    trained = s.answers()
    assert trained != before and trained[0].split()[:1] == [FACT], (before, trained, done)
    # TP 2 serves what TP 1 would serve on the same (trained) weights.
    weights = s.weights()
    assert not any(torch.isnan(t).any() for t in weights.values())
    assert trained == tp1_answers(model_dir, weights, device)

    code, saved = s.http("/checkpoint", {})
    assert code == 200 and saved["written"], saved
    s.kill()  # every process, no clean-up: the next server starts from the store
    # Killed engines are zombies until something reaps them (the supervisor is gone); the next server refuses
    # a run directory whose engine still looks alive.
    from livetrain import _core

    deadline = time.monotonic() + 60
    for r in range(SIZE):
        m = str(s.run / f"tp{r}.manifest.json")
        while os.path.exists(m) and _core.manifest_owner_state(m)[0]:
            assert time.monotonic() < deadline, f"engine rank {r} still looks alive"
            time.sleep(0.2)
    # The generation the two ranks wrote, restored at TP 1 into whole tensors: the trained weights.
    whole = {n: t.clone() for n, t in lst.load_file(model_dir / "model.safetensors").items()}
    with checkpoint.CheckpointStore(model_dir, held=[]) as store:
        store.restore(saved["generation"], whole)
    assert all(torch.equal(whole[n], weights[n]) for n in weights)
    s2 = Serve(model_dir, server["base"], device)
    server["server"] = s2
    assert s2.answers() == trained
    restored = s2.weights()
    assert all(torch.equal(restored[n], weights[n]) for n in weights)
    assert s2.status()["checkpoint"]["generation"] == saved["generation"]


def test_a_killed_trainer_rank_is_503_with_the_reason(server):
    s = server["server"]
    # A step after the head generation: the state dir's optimizer state is newer than the head's.
    code, job = s.http("/train", {"examples": tiny_model.FACT_EXAMPLES, "steps": 1, "lr": 1e-4})
    assert code == 202 and s.wait_job(job["job_id"])["state"] == "done"
    rank1_file = server["base"] / "state" / f"optimizer.rank-1-of-{SIZE}.safetensors"
    deadline = time.monotonic() + 30
    while (steps := state_steps(rank1_file)) != state_steps(
        rank1_file.with_name(f"optimizer.rank-0-of-{SIZE}.safetensors")
    ):
        assert time.monotonic() < deadline, "the job's state was not saved"  # saved after the job is done
        time.sleep(0.1)
    rank1 = s.status()["tensor_parallel"]["pids"][1]
    os.kill(rank1, signal.SIGKILL)
    deadline, reply = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        code, reply = s.http("/checkpoint", {})
        if code == 503 and "rank 1" in reply["error"]["message"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no 503 naming rank 1: {reply}")
    assert str(rank1) in reply["error"]["message"], reply
    assert s.http("/v1/completions", {"prompt": "hello", "max_tokens": 2, "temperature": 0})[0] == 200
    s.wait_trainer()  # the supervisor restarts the group
    # Every rank restored the state dir's state, as rank 0 did (rank 1 took the head generation's, older:
    # trainer.json names rank 0's engine, so rank 1 never saw "the same engine"); a checkpoint saves it again.
    assert s.status()["optimizer"]["restored_from"] == "state-dir"
    assert s.http("/checkpoint", {})[0] == 200
    assert state_steps(rank1_file) == steps


def test_a_killed_engine_rank_is_503_and_stops_the_server(server):
    s = server["server"]
    rank1 = s.pids()["engine"][1]
    os.kill(rank1, signal.SIGKILL)
    try:
        code, body = s.http("/v1/completions", {"prompt": "hello", "max_tokens": 2, "temperature": 0})
    except OSError:  # the supervisor stopped the server while the request waited
        code = None
    if code != 503:  # the supervisor may have stopped the server already
        assert s.p.wait(timeout=120) != 0
    else:
        assert "rank 1" in body["error"]["message"] and str(rank1) in body["error"]["message"], body
    assert s.p.wait(timeout=120) != 0
    assert f"engine rank 1 (pid {rank1}) was killed by SIGKILL" in s.logtext()
    assert not any(n.startswith(f"livetrain-{rank1}-") for n in os.listdir("/dev/shm"))
