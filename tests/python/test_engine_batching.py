"""The reference engine under load and hostile input (issue #13), in process on a tiny random Llama: greedy
answers decoded in a batch equal one-at-a-time decoding; a stream left unread never stops other requests
(the deadlock of issue #13); a full admission queue is 503 with Retry-After; bodies over the limit are
413 and a huge prompt is refused without stalling other routes; hostile bodies are 400s, and so is chat on
a model without a chat template; cross-site requests are refused when no key is set."""

import copy
import http.client as httpclient
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("fastapi", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")
pytest.importorskip("uvicorn", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")

import uvicorn  # noqa: E402

from livetrain.engines import batching  # noqa: E402
from livetrain.engines.reference import Engine, build_app  # noqa: E402
from livetrain.trainer import options  # noqa: E402
from livetrain.trainer.client import free_port, http  # noqa: E402

import tiny_model  # noqa: E402
from scheduler_answers import answers  # noqa: E402

CORPUS = [
    "the capital of zorbia is quuxville",
    "the sky is blue and the grass is green",
    "hello how are you today",
    "i am fine thank you",
    "the cat sat on the mat",
    "one two three four five six seven",
]
PROMPTS = [
    "the capital of zorbia is",
    "hello how",
    "the cat sat on the mat and the",
    "one two three",
    "the sky",
    "zorbia",
    "i am fine thank",
    "the grass is green and the sky is blue and the cat",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.make_model_dir(path, CORPUS, intermediate_size=128)
    return path


class Server:
    """The engine's app under uvicorn in a thread of this process (no trainer: the training routes 503)."""

    def __init__(self, engine: Engine, tmp: Path, **app):
        self.engine, port = engine, free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(build_app(engine, str(tmp / "trainer.sock"), **app), port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    s = Server(Engine(str(model_dir), str(tmp / "m.json"), "cpu", store=False, max_batch=8, max_queue=64), tmp)
    yield s
    s.close()


def one_at_a_time(model_dir: Path, prompt: str, n: int) -> str:
    """Greedy decoding as the engine did before batching: the model's own forward, one token at a time."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    x, past, out = torch.tensor([tok(prompt)["input_ids"]]), None, []
    with torch.inference_mode():
        for _ in range(n):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past, t = o.past_key_values, int(o.logits[0, -1].float().argmax())
            if t == tok.eos_token_id:
                break
            out.append(t)
            x = torch.tensor([[t]])
    return tok.decode(out, skip_special_tokens=True)


def concurrently(fn, args: list) -> list:
    out = [None] * len(args)

    def run(i):
        try:
            out[i] = fn(*args[i])
        except Exception as e:  # reported, not lost in its thread
            out[i] = repr(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_batched_greedy_answers_equal_one_at_a_time_decoding(model_dir, tmp_path, server):
    n = 12
    want = [one_at_a_time(model_dir, p, n) for p in PROMPTS]
    alone = Engine(str(model_dir), str(tmp_path / "one.json"), "cpu", store=False, max_batch=1)
    try:
        assert not alone.scheduler.batchable or alone.scheduler.max_batch == 1
        got_alone = ["".join(t for t, _, _ in alone.generate(alone.encode_prompt(p), n, 0.0, 1.0, [])) for p in PROMPTS]
    finally:
        alone.close()
    engine = server.engine
    assert engine.scheduler.batchable and engine.scheduler.max_batch == 8
    steps = engine.scheduler.load()["steps"]

    def gen(p):
        return "".join(t for t, _, _ in engine.generate(engine.encode_prompt(p), n, 0.0, 1.0, []))

    got = concurrently(gen, [(p,) for p in PROMPTS])
    assert got_alone == want
    assert got == want
    load = engine.scheduler.load()
    assert load["peak_batch"] >= 4 and load["steps"] - steps < len(PROMPTS) * n / 2  # decoded together
    # Seeded sampling gives the same text alone and among others.
    seeded = [(PROMPTS[0], 0.9, 0.8, 7), (PROMPTS[1], 1.0, 1.0, 3)]
    ref = [list(engine.generate(engine.encode_prompt(p), 10, t, tp, [], s)) for p, t, tp, s in seeded]

    def sample(p, t, tp, s):
        return list(engine.generate(engine.encode_prompt(p), 10, t, tp, [], s))

    mixed = concurrently(sample, seeded + [(p, 0.0, 1.0, None) for p in PROMPTS])
    assert mixed[:2] == ref


def greedy(engine: Engine, prompt: str, n: int) -> str:
    return "".join(t for t, _, _ in engine.generate(engine.encode_prompt(prompt), n, 0.0, 1.0, []))


def alone_and_together(model_dir: Path, tmp_path: Path, device: str, dtype: str, attention: str, n: int = 12):
    """PROMPTS' greedy answers from an engine with --max-batch 1, then sent at once to one with --max-batch
    8 and ``attention`` (that engine's most rows in one step too)."""
    alone = Engine(str(model_dir), str(tmp_path / "one.json"), device, dtype, store=False, max_batch=1)
    try:
        want = [greedy(alone, p, n) for p in PROMPTS]
    finally:
        alone.close()
    engine = Engine(
        str(model_dir), str(tmp_path / "m.json"), device, dtype, store=False, max_batch=8, batch_attention=attention
    )
    try:
        got = concurrently(lambda p: greedy(engine, p, n), [(p,) for p in PROMPTS])
        return want, got, engine.scheduler.load()["peak_batch"]
    finally:
        engine.close()


def test_masked_batch_attention_decodes_together_with_the_same_greedy_answers(model_dir, tmp_path, monkeypatch):
    # --batch-attention masked: one attention call per layer over the left-padded batch (fewer kernel
    # launches on a GPU). In fp32 the masked padding changes nothing but the order of the sums, so greedy
    # answers equal one-at-a-time decoding's; the rows really ran in one step, in one call per layer.
    from transformers import AttentionInterface  # the model looks its attention up by name at each call

    calls = []
    base = AttentionInterface._global_mapping["sdpa"]

    def counted(module, query, *args, **kwargs):
        calls.append((query.shape[0], batching._ROWS.starts))
        return base(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counted)  # what the row wrapper calls
    want, got, peak = alone_and_together(model_dir, tmp_path, "cpu", "fp32", "masked")
    assert got == want and peak >= 4
    assert any(rows > 1 for rows, _ in calls) and all(starts is None for _, starts in calls)
    with pytest.raises(ValueError, match="attention must be one of auto, rows, masked, static"):
        batching.Scheduler(torch.nn.Linear(1, 1), set(), attention="padded")


def test_static_cache_engine_answers_as_one_at_a_time_and_refuses_what_does_not_fit(model_dir, tmp_path):
    # --batch-attention static (livetrain.engines.static: a preallocated cache, CUDA graphs on a GPU, eager
    # here): in fp32 the greedy answers of requests decoded together equal one-at-a-time decoding's; a
    # completion longer than the cache's slot is a 400 naming it.
    want, got, peak = alone_and_together(model_dir, tmp_path, "cpu", "fp32", "static")
    assert got == want and peak >= 4
    engine = Engine(
        str(model_dir),
        str(tmp_path / "s.json"),
        "cpu",
        "fp32",
        store=False,
        max_batch=2,
        batch_attention="static",
        static_cache_len=24,
    )
    s = Server(engine, tmp_path)
    try:
        code, body = http(s.url + "/v1/completions", {"prompt": "the cat sat", "max_tokens": 40})
        assert code == 400 and body["error"]["param"] == "max_tokens"
        assert "exceeds the engine's context of 24 tokens" in body["error"]["message"]
        assert "--static-cache-len" in body["error"]["message"]
        code, body = http(s.url + "/v1/completions", {"prompt": "the cat sat", "max_tokens": 4, "temperature": 0})
        assert code == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        s.close()


def test_a_second_scheduler_on_the_same_model_and_where_its_time_goes():
    # A second scheduler on a model the first already switched to row attention decodes as the first did
    # (it wrapped the row attention around itself: RecursionError at the first batched step); load() says
    # where the scheduler thread's time went.
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_model.llama_config(32)).eval()
    runs = []
    for _ in range(2):
        got, load = answers(model, [list(range(1, 3 + 2 * i)) for i in range(3)], [6] * 3, max_batch=4)
        runs.append(got)
        assert load["peak_batch"] >= 2
        t = load["seconds"]
        assert t["prefill"] > 0 and 0 < t["forward"] < t["decode"] and 0 < t["sample"] < t["decode"]
    assert runs[0] == runs[1] and all(isinstance(tok, int) for a in runs[0].values() for tok in a)


def test_two_schedulers_in_one_process_each_run_their_models_own_attention(monkeypatch):
    # The row attention's per-step state is its thread's (each scheduler's own thread), but which attention a
    # switched model wraps was thread state too (batching._ROWS.base, set by the scheduler's thread): called
    # from any other thread, a model served with an attention other than sdpa ran sdpa's. Two schedulers in
    # one process, on sdpa and on an attention the user registered, decode at the same time with
    # one-at-a-time decoding's answers, each model through its own attention, whichever thread calls it.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    sdpa, calls = AttentionInterface._global_mapping["sdpa"], []

    def mine(module, query, *args, **kwargs):
        calls.append(threading.current_thread().name)
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "livetrain_test_mine", mine)
    masks = AttentionMaskInterface._global_mapping
    monkeypatch.setitem(masks, "livetrain_test_mine", masks["sdpa"])
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(tiny_model.llama_config(32)).eval()
    other = copy.deepcopy(plain)
    other.set_attn_implementation("livetrain_test_mine")
    prompts = [list(range(1, 3 + 2 * i)) for i in range(3)]
    want, _ = answers(plain, prompts, [6] * 3, max_batch=1)
    results = {}

    def run(name, model):
        results[name] = answers(model, prompts, [6] * 3, max_batch=4, attention="rows")

    threads = [threading.Thread(target=run, args=item) for item in (("plain", plain), ("mine", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name in ("plain", "mine"):
        got, load = results[name]
        assert got == want and load["peak_batch"] == 3, name
    assert calls and set(calls) == {"livetrain-scheduler"}
    calls.clear()
    with torch.inference_mode():  # from this thread, which runs no scheduler: still the model's own attention
        other(input_ids=torch.tensor([prompts[2]]))
    assert calls == [threading.current_thread().name] * other.config.num_hidden_layers


def test_a_stream_left_unread_does_not_stop_other_requests(server):
    # Regression test for issue #13: one streaming completion followed by >= 40 plain ones deadlocked the
    # engine for good (its generation lock was held across the stream's yield, while the stream needed a
    # worker thread of the pool the waiting requests filled).
    host, port = server.url[len("http://") :].split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"prompt": PROMPTS[0], "max_tokens": 50, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"},
    )
    stream = conn.getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")  # then left unread

    t0 = time.monotonic()
    body = {"prompt": "hello how", "max_tokens": 8, "temperature": 0}
    codes = concurrently(lambda: http(server.url + "/v1/completions", body, timeout=120)[0], [()] * 45)
    assert codes == [200] * 45, codes
    code, status = http(server.url + "/train/status", timeout=30)  # no trainer here: answered, 503
    assert code == 503 and status["error"]["type"] == "unavailable"
    assert time.monotonic() - t0 < 240
    rest = stream.read().decode()  # the stream ran on meanwhile, and ends properly
    assert rest.rstrip().endswith("data: [DONE]")
    conn.close()


def test_a_full_admission_queue_is_503_with_retry_after(model_dir, tmp_path):
    s = Server(Engine(str(model_dir), str(tmp_path / "m.json"), "cpu", store=False, max_batch=1, max_queue=0), tmp_path)
    try:
        release = threading.Event()
        seq = batching.Sequence(s.engine.encode_prompt("hello"), 40, 0.0, 1.0, None, lambda *e: release.wait(5))
        s.engine.scheduler.submit(seq)  # holds the one place (its sink is slow)
        code, body = http(s.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert code == 503 and "busy" in body["error"]["message"]

        req = urllib.request.Request(
            s.url + "/v1/completions", json.dumps({"prompt": "hi"}).encode(), {"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("not refused")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and e.headers["Retry-After"] == "1"
        s.engine.scheduler.cancel(seq)
        release.set()
        deadline = time.monotonic() + 60
        while http(s.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        s.close()


def test_a_failed_step_is_a_500_with_its_reason_and_a_stopped_scheduler_a_503(model_dir, tmp_path):
    # A decode step that fails answers its requests with a 500 naming the error, and the next request is
    # served; once the scheduler serves no more (closed, or its loop failed) a request is a 503 with the
    # reason (it was an unhandled RuntimeError: a bare 500 without a JSON body).
    s = Server(Engine(str(model_dir), str(tmp_path / "m.json"), "cpu", store=False, max_batch=2), tmp_path)
    try:
        sched, failed = s.engine.scheduler, []
        real = sched._decode

        def decode():
            if not failed:
                failed.append(1)
                raise RuntimeError("the step broke")
            real()

        sched._decode = decode  # the scheduler's thread looks it up at each step
        body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        code, out = http(s.url + "/v1/completions", body)
        assert failed, out  # the request reached a decode step
        assert code == 500 and out["error"]["message"] == "generation failed: RuntimeError: the step broke", out
        assert http(s.url + "/v1/completions", body)[0] == 200
        sched.close()
        code, out = http(s.url + "/v1/completions", body)
        assert code == 503 and out["error"]["message"] == "the engine cannot generate: the engine is shutting down"
    finally:
        s.close()


class LoopFailure(BaseException):
    """Not an Exception: what a request's handling does not catch (the scheduler's loop itself fails)."""


def test_health_is_200_while_the_engine_generates_and_503_naming_why_once_its_scheduler_stopped(model_dir, tmp_path):
    # A scheduler whose loop died refused every request with 503, but nothing told a load balancer or a
    # liveness probe: the engine had no /health (vLLM's answers non-200 once its engine is dead).
    s = Server(Engine(str(model_dir), str(tmp_path / "m.json"), "cpu", store=False, max_batch=2), tmp_path)
    try:
        code, out = http(s.url + "/health")
        assert code == 200, out
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        assert http(s.url + "/v1/completions", body)[0] == 200
        assert http(s.url + "/health")[0] == 200  # after a request, too

        def broken(seqs):
            raise LoopFailure("the loop broke")

        s.engine.scheduler._admit = broken  # the scheduler's thread looks it up at each turn of its loop
        reason = "the engine's scheduler stopped: LoopFailure: the loop broke"
        code, out = http(s.url + "/v1/completions", body)  # the request the loop died with: answered, 503
        assert code == 503 and out["error"]["message"] == f"generation failed: {reason}", out
        for path, request in (("/health", None), ("/v1/completions", body)):
            code, out = http(s.url + path, request)
            assert code == 503 and out["error"]["message"] == f"the engine cannot generate: {reason}", (path, out)
    finally:
        s.close()


def test_health_gives_the_reason_of_a_503_only_with_the_api_key(model_dir, tmp_path):
    # /health answers a probe without the key; what broke is the key holder's to read.
    s = Server(Engine(str(model_dir), str(tmp_path / "m.json"), "cpu", store=False, max_batch=2), tmp_path, api_key="k")
    try:
        assert http(s.url + "/health")[0] == 200
        s.engine.scheduler.close()
        code, out = http(s.url + "/health")
        assert code == 503 and out["error"]["message"] == "the engine cannot generate (the reason: with the API key)"
        code, out = http(s.url + "/health", key="k")
        assert code == 503 and out["error"]["message"].startswith("the engine cannot generate: "), out
        assert len(out["error"]["message"]) > len("the engine cannot generate: ")
    finally:
        s.close()


def test_bodies_over_the_limit_and_huge_prompts(server, model_dir, tmp_path):
    # Regression test for issue #13: a 20 MiB prompt took 53 s and 1.7 GiB and stalled every route; a
    # /train body over 64 MiB was a 503 "Broken pipe".
    big = json.dumps({"prompt": "the cat " * (2 << 20)}).encode()  # 16 MiB of prompt
    for path in ("/v1/completions", "/train"):
        code, body = http(server.url + path, raw=big + b" " * (1 << 20), timeout=120)
        assert code == 413 and body["error"]["param"] == "body", (path, body)
    # Under a larger limit, the same prompt is refused from its beginning, and other routes answer meanwhile.
    s = Server(
        Engine(str(model_dir), str(tmp_path / "m.json"), "cpu", store=False, max_batch=2),
        tmp_path,
        max_body=64 << 20,
    )
    try:
        answered = []

        def probe():
            t = time.monotonic()
            answered.append((http(s.url + "/v1/models", timeout=30)[0], time.monotonic() - t))

        t0 = time.monotonic()
        refuse = threading.Thread(target=lambda: answered.append(http(s.url + "/v1/completions", raw=big, timeout=120)))
        refuse.start()
        time.sleep(0.3)
        probe()
        refuse.join(120)
        assert time.monotonic() - t0 < 60
        # In either order: the refusal may be over before the probe is sent.
        (models, latency), (code, body) = sorted(answered, key=lambda a: isinstance(a[1], dict))
        assert models == 200 and latency < 5, answered
        assert code == 400 and body["error"]["param"] == "prompt" and "context" in body["error"]["message"]
    finally:
        s.close()


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"prompt": "hi", "seed": 18446744073709551616}', "seed"),  # >= 2^64
        (b'{"prompt": "hi", "seed": -9223372036854775809}', "seed"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
        (b'{"prompt": "\\ud800 hi"}', "prompt"),
        (b'{"prompt": "hi", "temperature": NaN}', "body"),
        (b'{"prompt": "hi", "max_tokens": 1e400}', "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": 100000000000000000000000}', "max_tokens"),
        (b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop[0]"),
    ],
)
def test_hostile_completion_bodies_are_400(server, raw, param):
    # Regression test for issue #13: deeply nested JSON, seed >= 2^64 and a lone UTF-16 surrogate were 500s.
    code, body = http(server.url + "/v1/completions", raw=raw, timeout=60)
    assert code == 400 and body["error"]["param"] == param, body


def test_a_temperature_near_zero_never_fails_its_batch(server):
    # Regression test: a temperature in (0, ~1e-38] passed the [0, 2] check, the logits divided by it were
    # inf/NaN, and the multinomial's error failed every request of its decode batch with a 500. It is
    # sampled at batching.MIN_TEMPERATURE (vLLM's lowest) now.
    def complete(prompt, temperature):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": temperature}
        return http(server.url + "/v1/completions", body, timeout=120)

    args = [(p, 0) for p in PROMPTS[:6]] + [(PROMPTS[0], 1e-39), (PROMPTS[1], 1e-45)]
    answers = concurrently(complete, args)
    assert [a[0] for a in answers] == [200] * len(args), answers
    assert batching.Sequence([1], 1, 1e-39, 1.0, None, print).temperature == batching.MIN_TEMPERATURE
    assert batching.Sequence([1], 1, 0, 1.0, None, print).temperature == 0.0


def test_a_row_whose_probabilities_are_not_finite_fails_alone(server):
    # One row's non-finite logits (weights trained into NaN) made the multinomial raise, which failed every
    # row of the batch; now that row's request fails alone, naming why, and the others get their tokens.
    events = [[] for _ in range(4)]
    seqs = [
        batching.Sequence([1], 4, t, top_p, 0, lambda *e, out=out: out.append(e))
        for (t, top_p), out in zip(((0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.0, 0.5)), events)
    ]
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7], logits[3, 2] = float("nan"), float("inf")
    toks = server.engine.scheduler._sample(logits, seqs)
    assert toks[0] == int(logits[0].argmax()) and isinstance(toks[2], int) and toks[1] is None and toks[3] is None
    assert events[0] == events[2] == []
    for i in (1, 3):
        ((tok, finish, error),) = events[i]
        assert tok is None and finish == "error" and "probabilities are not finite" in error, error
        assert "1 of the model's logits are not finite" in error, error


def test_unknown_routes_and_methods_answer_the_error_shape(server):
    # Regression test: the router's 404 and 405 were FastAPI's {"detail": "Not Found"}, not the documented
    # {"error": {"message", "type", "param"}}.
    for method, path, code, allow in (
        ("GET", "/nope", 404, None),
        ("GET", "/train", 405, "POST"),
        ("POST", "/health", 405, "GET, HEAD"),
        ("GET", "/rollback", 405, "POST"),
    ):
        req = urllib.request.Request(server.url + path, b"{}" if method == "POST" else None, method=method)
        req.add_header("Content-Type", "application/json")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        body = json.loads(e.value.read())
        got = e.value.headers.get("Allow")
        # The router lists the allowed methods in no fixed order (a set): compared as sets.
        assert e.value.code == code, (path, e.value.code)
        assert (got and set(got.split(", "))) == (allow and set(allow.split(", "))), (path, e.value.headers)
        assert (
            set(body) == {"error"}
            and body["error"]["type"] == {404: "not_found_error", 405: "invalid_request_error"}[code]
        )
        assert body["error"]["message"].startswith(f"{method} {path}: ") and body["error"]["param"] is None, body


def test_the_bearer_scheme_is_case_insensitive(model_dir, tmp_path):
    # Regression test: "Authorization: bearer KEY" was a 401 (RFC 7235: the scheme's name is case-insensitive).
    s = Server(Engine(str(model_dir), str(tmp_path / "m.json"), "cpu", store=False, max_batch=2), tmp_path, api_key="k")
    try:

        def status(authorization: str) -> int:
            req = urllib.request.Request(s.url + "/v1/models", headers={"Authorization": authorization})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            assert status(f"{scheme} k") == 200, scheme
        for header in ("bearer wrong", "Basic k", "Bearerk", "k", "bearer"):
            assert status(header) == 401, header
    finally:
        s.close()


def test_chat_on_a_model_without_a_chat_template_is_400_naming_messages(tmp_path):
    # A base model's tokenizer has no chat template: transformers' ValueError was a 500.
    model = tmp_path / "base-model"
    tiny_model.make_model_dir(model, CORPUS, intermediate_size=128, chat_template=False)
    s = Server(Engine(str(model), str(tmp_path / "m.json"), "cpu", store=False), tmp_path)
    try:
        chat = {"messages": [{"role": "user", "content": "hello how"}], "max_tokens": 2}
        code, body = http(s.url + "/v1/chat/completions", chat)
        assert code == 400 and body["error"]["param"] == "messages", body
        assert "no chat template" in body["error"]["message"], body
        code, body = http(s.url + "/v1/completions", {"prompt": "hello how", "max_tokens": 2})
        assert code == 200, body
    finally:
        s.close()
    # With --chat-template (livetrain serve passes it to the engine and the trainer alike): chat is served, with
    # --default-chat-template-kwargs and a request's own chat_template_kwargs over them (as vLLM merges them).
    template = (
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('begin with a user message') }}{% endif %}"
        + tiny_model.TEMPLATE
        + "{% if loud %}one {% endif %}"
    )
    chat_options = options.Chat(template, {"loud": True})
    engine = Engine(str(model), str(tmp_path / "m2.json"), "cpu", store=False, chat=chat_options)
    s = Server(engine, tmp_path)
    try:
        code, body = http(s.url + "/v1/chat/completions", chat)
        n = len(engine.encode_chat(chat["messages"]))
        assert code == 200 and body["usage"]["prompt_tokens"] == n == len(engine.encode_chat(chat["messages"], {})), (
            body
        )
        code, body = http(s.url + "/v1/chat/completions", {**chat, "chat_template_kwargs": {"loud": False}})
        assert code == 200 and body["usage"]["prompt_tokens"] == n - 1, body
        # A request's own template, kwargs livetrain sets itself, a template that refuses the messages: 400s.
        for extra, param, words in (
            ({"chat_template": "{{ messages }}"}, "chat_template", "a request cannot bring its own"),
            ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "tokenize: not a template variable"),
            ({"messages": [{"role": "assistant", "content": "one"}]}, "messages", "begin with a user message"),
        ):
            code, body = http(s.url + "/v1/chat/completions", {**chat, **extra})
            assert code == 400 and body["error"]["param"] == param and words in body["error"]["message"], body
    finally:
        s.close()


def test_cross_site_requests_are_refused_without_a_key(server):
    # Regression test for issue #13: with no key, text/plain with a foreign Origin and Host was served.

    def post(path, headers, body=b'{"prompt": "hi", "max_tokens": 2}'):
        req = urllib.request.Request(server.url + path, body, headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post("/v1/completions", {"Content-Type": "text/plain"}) == 415
    assert post("/v1/completions", {"Content-Type": "application/json", "Origin": "http://evil.example"}) == 403
    assert (
        post("/train", {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"}) == 403
    )
    assert post("/rollback", {"Content-Type": "application/json", "Host": "rebound.example:80"}) == 403
    assert post("/v1/completions", {"Content-Type": "application/json", "Origin": server.url}) == 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("attention,dtype", [("rows", "bf16"), ("masked", "fp32"), ("static", "fp32")])
def test_batched_greedy_answers_on_cuda_equal_one_at_a_time_decoding(model_dir, tmp_path, attention, dtype):
    # The same scheduler on the GPU (CUDA IPC export): greedy answers decoded together equal each answer
    # decoded alone by the same engine with --max-batch 1 (bit for bit per row; the masked batch in fp32,
    # where only the order of its sums differs).
    want, got, peak = alone_and_together(model_dir, tmp_path, "cuda", dtype, attention)
    assert got == want and peak >= 2


def test_row_attention_without_enable_gqa_makes_transformers_own_call_row_by_row(monkeypatch):
    # Where transformers repeats a grouped model's keys instead of passing enable_gqa (an older torch, or a
    # device where it does not use it), the row attention makes transformers' own sdpa call row by row: the
    # greedy answers are still one-at-a-time decoding's, and no row went through _row_sdpa's own call.
    from transformers.integrations import sdpa_attention

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_model.llama_config(32)).eval()
    assert model.model.layers[0].self_attn.num_key_value_groups > 1
    prompts = [list(range(1, 3 + 2 * i)) for i in range(3)]
    want, _ = answers(model, prompts, [6] * 3, max_batch=1)
    sdpa = []
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *a, **kw: False)
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        sdpa.append(kwargs.get("enable_gqa", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    got, load = answers(model, prompts, [6] * 3, max_batch=4, attention="rows")
    assert got == want and load["peak_batch"] == 3
    assert sdpa and not any(sdpa)  # the keys repeated by transformers, never enable_gqa
