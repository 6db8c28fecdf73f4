"""The trainer's socket protocol and the training routes on top of it, with a real socket server and a
real FastAPI app but a stand-in handler in place of the Trainer: request bodies reach the handler as the
bytes the client sent and reply bodies reach the client as the bytes the trainer wrote (nothing parsed or
re-serialised in between), every error is the one OpenAI-style body naming its field, and the light
``version`` op answers without the status."""

import json
import math

import pytest

from livetrain.trainer import protocol, routes
from livetrain.trainer.protocol import Invalid, Reply

# A ``metrics`` reply as Trainer.metrics makes it.
METRICS = {
    "weight_version": 12,
    "counts": {"steps": 12, "tokens": 3400, "guard_rollbacks": 1, "nonfinite_stops": 0},
    "loss": 0.25,
    "tokens_per_s": 410.5,
    "jobs": {"queued": 1, "running": 1, "done": 3, "failed": 0, "cancelled": 0, "rolled_back": 1},
    "checkpoint_time": 1000.0,
    "checkpoint_weight_version": 9,
    "running": "job-2",
}


class Recorder:
    """A handler that records what it receives and answers as told."""

    def __init__(self):
        self.seen: list[tuple[str, bytes]] = []
        self.keys: list[str | None] = []

    def __call__(self, op: str, body: bytes, idempotency_key: str | None = None) -> Reply:
        self.seen.append((op, body))
        self.keys.append(idempotency_key)
        if op == "version":
            return Reply(200, {"weight_version": 7})
        if op == "echo":
            return Reply(202, {"op": op, "body": body.decode(), "text": "é ü"})
        if op == "submit":
            job = protocol.parse_body(body, empty_ok=False)
            if not job.get("examples"):
                raise Invalid("examples", "examples must be a non-empty list")
            return Reply(202, {"job_id": "job-1"})
        if op in ("job", "cancel"):
            return Reply(200, {"op": op, **json.loads(body)})
        if op == "metrics":
            return Reply(200, METRICS)
        if op == "nan":
            return Reply(200, {"loss": math.nan, "jobs": [{"id": "j", "loss": math.inf, "step": 3}], "lr": 1e-5})
        if op == "bug":
            raise KeyError("boom")
        return protocol.error(400, f"unknown op {op!r}", "op")


@pytest.fixture
def trainer(tmp_path):
    handler = Recorder()
    server = protocol.Server(str(tmp_path / "trainer.sock"), handler)
    server.start()
    yield server.path, handler
    server.close()


def test_bodies_cross_as_bytes_and_errors_name_the_field(trainer):
    path, handler = trainer
    raw = b'{ "b": 1,\n  "a": [1, 2] }'
    code, body = protocol.call(path, "echo", raw)
    assert code == 202 and handler.seen[-1] == ("echo", raw)
    # What the trainer wrote, compact and UTF-8, as FastAPI's JSONResponse writes a body.
    assert (
        body
        == json.dumps(
            {"op": "echo", "body": raw.decode(), "text": "é ü"}, ensure_ascii=False, separators=(",", ":")
        ).encode()
    )
    assert protocol.call(path, "version") == (200, b'{"weight_version":7}')
    assert protocol.weight_version(path) == 7
    for op, raw, code, param in (
        ("submit", b"{nope", 400, "body"),
        ("submit", b"[]", 400, "body"),
        ("submit", b"{}", 400, "examples"),
        ("frob", b"", 400, "op"),
    ):
        got, body = protocol.call(path, op, raw)
        err = json.loads(body)["error"]
        assert got == code and err["param"] == param and err["type"] == "invalid_request_error", (op, raw, err)
    code, body = protocol.call(path, "bug")  # a handler's bug: 500, and the server keeps going
    assert code == 500 and json.loads(body)["error"]["type"] == "server_error"
    assert protocol.call(path, "version")[0] == 200


def test_non_finite_numbers_are_null_and_flagged(trainer):
    # Regression test for issue #13: a loss of inf (an example weighted 1e300) made every /train/status
    # a 500 until the job aged out, because JSON has no inf.
    path, _ = trainer
    code, body = protocol.call(path, "nan")
    assert code == 200
    assert json.loads(body) == {
        "loss": None,
        "nonfinite": ["loss"],
        "jobs": [{"id": "j", "loss": None, "step": 3, "nonfinite": ["loss"]}],
        "lr": 1e-5,
    }
    assert protocol.finite({"a": 1.5, "b": [1, 2]}) == {"a": 1.5, "b": [1, 2]}


def test_limits_and_a_missing_trainer(trainer, tmp_path):
    path, handler = trainer
    with pytest.raises(Invalid) as e:
        protocol.call(path, "submit", b" " * (protocol.MAX_BODY + 1))
    assert e.value.param == "body" and e.value.reply().code == 400
    with pytest.raises(protocol.TrainerUnavailable, match="trainer socket"):
        protocol.call(str(tmp_path / "nobody.sock"), "status")
    # Not this protocol: a header line without a length the server accepts.
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b'{"op": "submit", "length": -1}\n')
        header = json.loads(s.makefile("rb").readline())
    assert header["code"] == 400


def test_error_bodies_have_one_shape():
    assert protocol.error(429, "full") == Reply(
        429, {"error": {"message": "full", "type": "rate_limit_error", "param": None}}
    )
    for code, kind in protocol.KINDS.items():
        assert protocol.error(code, "x").body["error"]["type"] == kind
    assert Invalid("examples[1]", "bad").reply() == protocol.error(400, "bad", "examples[1]")
    assert protocol.parse_body(b"  ", empty_ok=True) == {}


@pytest.mark.parametrize(
    "raw, param",
    [
        (b"[" * 100_000 + b"]" * 100_000, "body"),  # deeper than Python's parser goes
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "body"),
        (b'{"temperature": NaN}', "body"),  # not JSON, though Python's parser takes it
        (b'{"lr": Infinity}', "body"),
        (b'{"prompt": "\\ud800"}', "prompt"),  # a lone UTF-16 surrogate
        (
            b'{"examples": [{"messages": [{"role": "user", "content": "a\\udfffb"}]}]}',
            "examples[0].messages[0].content",
        ),
        (b'{"\\ud83d": 1}', "body"),
    ],
)
def test_hostile_bodies_are_400_naming_the_field(raw, param):
    # Regression test for issue #13: these were 500s.
    with pytest.raises(Invalid) as e:
        protocol.parse_body(raw, empty_ok=False)
    assert e.value.param == param and e.value.reply().code == 400


def test_routes_forward_bodies_and_replies_unchanged(trainer):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    path, handler = trainer
    app = FastAPI()
    app.include_router(routes.training_router(path, api_key="k"))
    with TestClient(app) as c:
        raw = b'{"examples":  [{"prompt": "a", "completion": "b"}],\n "lr": 1e-5}'
        r = c.post("/train", content=raw, headers={"Authorization": "Bearer k"})
        assert r.status_code == 202 and r.content == b'{"job_id":"job-1"}'
        assert handler.seen[-1] == ("submit", raw)
        r = c.post("/train", content=b"not json", headers={"Authorization": "Bearer k"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
        r = c.get("/train/status")
        assert r.status_code == 401 and r.json()["error"] == {
            "message": routes.MISSING_KEY,
            "type": "authentication_error",
            "param": None,
        }
        r = c.get("/checkpoints", headers={"Authorization": "Bearer k"})  # the stand-in knows no such op
        assert r.status_code == 400 and handler.seen[-1] == ("checkpoints", b"")
    app = FastAPI()
    app.include_router(routes.training_router(lambda: ""))
    with TestClient(app, base_url="http://localhost:8000") as c:
        r = c.post("/rollback", json={"generation": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"


def test_routes_refuse_cross_site_requests_without_a_key(trainer):
    # Regression test for issue #13: with no key, a web page could POST /train (text/plain, its own Origin,
    # or its own domain name rebound to 127.0.0.1) and get 202.
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    path, handler = trainer
    app = FastAPI()
    app.include_router(routes.training_router(path, max_body=1000))
    job = b'{"examples": [{"prompt": "a", "completion": "b"}]}'
    json_type = {"Content-Type": "application/json"}
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        n = len(handler.seen)
        for headers, code, param in (
            ({"Content-Type": "text/plain"}, 415, "Content-Type"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
            ({**json_type, "Origin": "https://evil.example"}, 403, "Origin"),
            ({**json_type, "Origin": "null"}, 403, "Origin"),
            ({**json_type, "Origin": "http://127.0.0.1:9999"}, 403, "Origin"),  # another port, another origin
            ({**json_type, "Host": "evil.example:8000"}, 403, "Host"),  # DNS rebinding
            ({**json_type, "Host": "evil.example:8000", "Origin": "http://evil.example:8000"}, 403, "Host"),
        ):
            for route in ("/train", "/rollback", "/checkpoint"):
                r = c.post(route, content=job, headers=headers)
                assert r.status_code == code and r.json()["error"]["param"] == param, (route, headers, r.json())
        r = c.get("/train/status", headers={"Host": "attacker.example"})
        assert r.status_code == 403
        assert len(handler.seen) == n  # none reached the trainer
        # The server's own origin, clients that are not browsers (no Origin), and IP or localhost names pass.
        for headers in (
            {**json_type, "Origin": "http://127.0.0.1:8000"},
            json_type,
            {**json_type, "Host": "localhost:8000", "Origin": "http://localhost:8000"},
            {**json_type, "Host": "[::1]:8000"},
        ):
            r = c.post("/train", content=job, headers=headers)
            assert r.status_code == 202, (headers, r.json())
        # Bodies over the limit: 413 before they are read (Content-Length) or while they stream in.
        r = c.post("/train", content=b" " * 1001, headers=json_type)
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        r = c.post("/train", content=iter([b" " * 600, b" " * 600]), headers=json_type)
        assert r.status_code == 413
        # The Idempotency-Key travels to the trainer.
        c.post("/train", content=job, headers={**json_type, "Idempotency-Key": "retry-1"})
        assert handler.keys[-1] == "retry-1"
    # With a key, the key is the protection: a browser cannot send it cross-site without a preflight.
    app = FastAPI()
    app.include_router(routes.training_router(path, api_key="k"))
    with TestClient(app, base_url="http://evil.example") as c:
        r = c.post("/train", content=job, headers={"Authorization": "Bearer k", "Origin": "http://evil.example"})
        assert r.status_code == 202


def test_routes_say_why_the_trainer_is_down(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    sock = str(tmp_path / "trainer.sock")
    app = FastAPI()
    app.include_router(routes.training_router(sock))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/train/status").status_code == 503
        protocol.write_down(sock, "the trainer was killed by SIGKILL; it is restarted in 4 s")
        r = c.post("/train", json={"examples": []})
        assert r.status_code == 503 and "killed by SIGKILL" in r.json()["error"]["message"]
        protocol.write_down(sock, None)
        assert "SIGKILL" not in c.get("/train/status").json()["error"]["message"]


def test_metrics_scrapes_without_a_key(trainer):
    # Issue #13's leftover: /metrics takes the same refusal check as the training routes. A Prometheus
    # scraper sends no Origin and a Host naming the target it was given: an IP address, localhost or this
    # machine's name are served; a domain name other than the machine's is refused (DNS rebinding would
    # let a web page read the metrics), and a key (Prometheus' "authorization" setting) serves any name.
    pytest.importorskip("fastapi")
    import socket

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    path, _ = trainer
    app = FastAPI()
    app.include_router(routes.training_router(path))
    scraper = {"User-Agent": "Prometheus/3.0.0", "Accept": "text/plain;version=0.0.4"}
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        for host in ("127.0.0.1:8000", "10.1.2.3:8000", "[::1]:8000", "localhost:8000", socket.gethostname()):
            r = c.get("/metrics", headers={**scraper, "Host": host})
            assert r.status_code == 200 and "livetrain_trainer_up 1.0" in r.text, (host, r.text)
        # A page of another origin may send the GET, but gets no CORS header: the browser hides the answer.
        r = c.get("/metrics", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.get("/metrics", headers={**scraper, "Host": "livetrain.monitoring.svc:8000"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "Host"
    app = FastAPI()
    app.include_router(routes.training_router(path, api_key="k"))
    with TestClient(app, base_url="http://livetrain.monitoring.svc:8000") as c:
        assert c.get("/metrics", headers=scraper).status_code == 401
        assert c.get("/metrics", headers={**scraper, "Authorization": "Bearer k"}).status_code == 200


def test_job_routes_send_the_id_and_metrics_are_prometheus_text(trainer):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    path, handler = trainer
    app = FastAPI()
    app.include_router(routes.training_router(path))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for method, url, op in (
            ("GET", "/train/job-7", "job"),
            ("DELETE", "/train/job-7", "cancel"),
            ("POST", "/train/job-7/cancel", "cancel"),
        ):
            r = c.request(method, url)
            assert r.status_code == 200 and r.json() == {"op": op, "job_id": "job-7"}, (method, url, r.text)
            assert handler.seen[-1] == (op, b'{"job_id": "job-7"}')
        r = c.get("/train/status")  # a fixed path, not a job id
        assert handler.seen[-1] == ("status", b"")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
        }
        assert samples[("livetrain_trainer_up", ())] == 1
        assert samples[("livetrain_steps_total", ())] == 12 and samples[("livetrain_tokens_total", ())] == 3400
        assert samples[("livetrain_weight_version", ())] == 12 and samples[("livetrain_loss", ())] == 0.25
        assert samples[("livetrain_jobs", (("state", "rolled_back"),))] == 1
        assert samples[("livetrain_guard_rollbacks_total", ())] == 1
        assert samples[("livetrain_last_checkpoint_age_seconds", ())] > 0
        assert samples[("livetrain_checkpoint_weight_version", ())] == 9
    app = FastAPI()
    app.include_router(routes.training_router(lambda: ""))
    with TestClient(app, base_url="http://127.0.0.1") as c:  # no trainer: the metrics say so, the scrape works
        r = c.get("/metrics")
        assert r.status_code == 200 and "livetrain_trainer_up 0.0" in r.text and "livetrain_steps" not in r.text


def test_the_train_client_has_a_flag_for_every_job_option(monkeypatch, tmp_path):
    # The client reads a flag for each job option (examples.JOB_OPTIONS) and sends those given: a job option added
    # without a flag there is an AttributeError at every `livetrain train` (learn28's margin was, before its fix).
    from livetrain.trainer import client, examples

    sent = []
    monkeypatch.setattr(
        client, "http", lambda url, body, **kw: sent.append(body) or (202, {"job_id": "j", "examples": 1, "steps": 3})
    )
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert client.main([str(path), "--no-wait", "--anchor", "4", "--replay-select", "similar"]) == 0
    assert sent[0]["anchor"] == 4.0 and sent[0]["replay_select"] == "similar" and "lr" not in sent[0]
    assert set(sent[0]) <= {"examples", *examples.JOB_OPTIONS}


def test_the_train_client_says_what_is_wrong_in_one_line(monkeypatch, tmp_path, capsys):
    # Found by a black-box tester: a server that is down, a missing file and --url notaurl were tracebacks
    # (URLError, FileNotFoundError, ValueError), and an empty file was sent to the server as a job.
    from livetrain.trainer import client

    sent = []
    monkeypatch.setattr(client, "http", lambda url, body, **kw: sent.append(body) or (202, {}))
    good = tmp_path / "ex.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'"caf\xe9"\n')
    for args, error in (
        (
            [str(tmp_path / "missing.jsonl")],
            f"{tmp_path / 'missing.jsonl'}: cannot be read (No such file or directory)",
        ),
        ([str(tmp_path)], f"{tmp_path}: cannot be read (Is a directory)"),
        ([str(empty)], f"{empty}: no examples"),
        ([str(latin)], f"{latin}: not UTF-8 text"),
        ([str(good), "--url", "notaurl"], "--url 'notaurl': expected http://HOST:PORT"),
        ([str(good), "--url", "http://127.0.0.1:99999"], "--url 'http://127.0.0.1:99999': Port out of range"),
    ):
        assert client.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"livetrain train: {error}"), (args, err)
    assert sent == []  # nothing reached the server

    # A server that does not answer: exit 1, one line naming the URL.
    monkeypatch.undo()
    url = f"http://127.0.0.1:{client.free_port()}"
    assert client.main([str(good), "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"livetrain train: {url} cannot be reached: "), err


def test_the_train_client_help_gives_the_exit_statuses(capsys):
    from livetrain.trainer import client

    with pytest.raises(SystemExit):
        client.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 the job is done" in text and "; 1 the server cannot be reached" in text
    assert "; 2 bad input found before anything is sent" in text
