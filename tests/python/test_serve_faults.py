"""`livetrain serve` under faults (issue #13), end to end on CPU with the tiny model: the trainer killed
in the middle of a job (serving goes on, /train says why, the supervisor restarts it, the weight version
does not go back, the OOM killer's choice), the per-step token budget, retries of one /train, the engine
killed (its shared memory removed), run directories and key files that others could have planted or
read, and the modes of the files livetrain writes."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")
pytest.importorskip("uvicorn", reason="fastapi/uvicorn are not installed (requirements/dev.txt)")

import servers  # noqa: E402
import tiny_model  # noqa: E402

ENV = {**servers.ENV, "OMP_NUM_THREADS": "1"}
KEY = "faults-key"
CORPUS = ["the capital of zorbia is quuxville", "one two three four five six seven", "hello how are you today"]
JOB = {"examples": [{"prompt": "one two", "completion": "three"}], "lr": 1e-4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.make_model_dir(path, CORPUS, intermediate_size=128)
    return path


def serve(model_dir: Path, base: Path, *extra: str, key: str | None = None) -> servers.ServeProcess:
    args = ["--model", str(model_dir), "--run-dir", str(base / "run"), "--state-dir", str(base / "state")]
    return servers.ServeProcess([*args, *extra], base / "serve-{port}.log", env=ENV, key=key)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    key_file = base / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    # A budget of 24 tokens per step, and 2 replayed retention rows per step (the default, 8, would not fit it).
    s = serve(model_dir, base, "--api-key-file", str(key_file), "--max-batch-tokens", "24", "--replay", "2", key=KEY)
    s.base = base
    yield s
    s.stop()


def engine_pid(s) -> int:
    import json

    return json.loads((s.base / "run" / "engine.manifest.json").read_text())["owner"]["pid"]


def test_trainer_killed_mid_job_serving_goes_on_and_versions_never_go_back(server):
    # Regression test for issue #13: the trainer's death took the engine down with it (the supervisor
    # stopped both), and after a restart the weight version went back (10 before, 8 after).
    code, job = server.http("/train", {**JOB, "steps": 100000})
    assert code == 202, job
    deadline = time.monotonic() + 120
    while server.status()["weight_version"] < 3:
        assert time.monotonic() < deadline, server.logtext()
        time.sleep(0.2)
    engine = engine_pid(server)
    (trainer,) = [p for p in servers.children_of(server.p.pid) if p != engine]
    # The OOM killer picks the trainer, never the engine.
    assert Path(f"/proc/{trainer}/oom_score_adj").read_text().strip() == "1000"
    assert Path(f"/proc/{engine}/oom_score_adj").read_text().strip() != "1000"
    before = server.status()["weight_version"]
    os.kill(trainer, signal.SIGKILL)
    t0 = time.monotonic()
    code, body = server.http("/train", JOB)
    while "SIGKILL" not in str(body) and time.monotonic() - t0 < 10:  # the supervisor notices within 0.1 s
        time.sleep(0.2)
        code, body = server.http("/train", JOB)
    assert code == 503 and "killed by SIGKILL" in body["error"]["message"], body
    code, done = server.http("/v1/completions", {"prompt": "one two", "max_tokens": 2, "temperature": 0})
    assert code == 200 and server.p.poll() is None, done  # serving goes on
    said = []
    while True:  # restarted after a back-off of 1 s
        code, st = server.http("/train/status")
        if code == 200:
            break
        said.append(st["error"]["message"])
        assert time.monotonic() - t0 < 120, server.logtext()
        time.sleep(0.3)
    assert st["weight_version"] > before, (before, st["weight_version"])
    assert "restarting it in 1 s" in server.logtext()
    # while the new trainer loads (seconds: it imports torch), the 503 says so and keeps the reason
    assert any("killed by SIGKILL" in m and "starting again since" in m for m in said), said


def test_a_job_over_the_token_budget_is_split_or_refused(server):
    # Regression test for issue #13: 8 examples of ~1,050 tokens at the default batch size were accepted
    # and the trainer grew until the OOM killer stopped it; nothing budgeted tokens per step.
    long = {"prompt": " ".join(["one two three"] * 10), "completion": "four"}  # 31 tokens > 24
    code, body = server.http("/train", {"examples": [long]})
    assert code == 400 and body["error"]["param"] == "examples[0]" and "--max-batch-tokens" in body["error"]["message"]
    six = {"prompt": "one two three four five", "completion": "six"}  # 7 tokens: 3 fit in 24
    code, body = server.http("/train", {"examples": [six] * 4, "batch_size": 4, "replay": 0})
    assert code == 400 and body["error"]["param"] == "batch_size" and "at most 3 fit" in body["error"]["message"]
    code, body = server.http("/train", {"examples": [six] * 4, "steps": 1, "replay": 0})
    assert code == 202 and body["batch_size"] == 3 and "--max-batch-tokens" in body["split"], body
    server.wait_job(body["job_id"])
    # The guard's replayed rows (2 per step on this server) join every step: they count (then 1 example fits), and a
    # job whose one example and replayed rows do not fit is refused naming "replay".
    code, body = server.http("/train", {"examples": [six] * 4, "batch_size": 4})
    assert code == 400 and "2 replayed retention rows" in body["error"]["message"] and "at most 1 fit" in str(body)
    code, body = server.http("/train", {"examples": [six] * 4, "replay": 3})
    assert code == 400 and body["error"]["param"] == "replay", body


def test_retries_of_one_train_request_make_one_job(server):
    # Regression test for issue #13: a client retrying a /train that timed out trained twice.
    import json
    import urllib.request

    from livetrain.trainer.client import http

    def post(headers, body=JOB):
        req = urllib.request.Request(
            server.url + "/train",
            json.dumps({**body, "steps": 1}).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **headers},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    first = post({"Idempotency-Key": "retry-abc"})
    again = post({"Idempotency-Key": "retry-abc"})
    assert first["job_id"] == again["job_id"]
    other = post({"Idempotency-Key": "retry-xyz"})
    assert other["job_id"] != first["job_id"]
    mine = post({}, {**JOB, "id": "client-job-1"})
    assert mine["job_id"] == "client-job-1" and post({}, {**JOB, "id": "client-job-1"})["job_id"] == "client-job-1"
    ids = [j["id"] for j in server.status()["jobs"]]
    assert ids.count(first["job_id"]) == 1 and ids.count("client-job-1") == 1
    assert http(server.url + "/train/status", timeout=30)[0] == 401  # the key file's key is required


def test_files_are_private(server):
    # Regression test for issue #13: store and state files were created 0644.
    server.wait_job(server.http("/train", {**JOB, "steps": 1})[1]["job_id"])
    run = server.base / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    files = [p for p in (server.base / "state").rglob("*") if p.is_file()] + [run / "engine.manifest.json"]
    assert any(p.name == "trainer.json" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))
    # The key is on no command line (ps shows those to every local user).
    for pid in [server.p.pid, *servers.children_of(server.p.pid)]:
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_planted_run_dirs_and_readable_key_files_are_refused(model_dir, tmp_path):
    # Regression test for issue #13: a --run-dir another user created first was trusted, and the API key
    # could only be given on the command line, where ps shows it.
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    key = tmp_path / "key"
    key.write_text("k\n")
    key.chmod(0o644)
    for args, words in (
        (["--run-dir", str(loose)], "mode 0755"),
        (["--api-key-file", str(key)], "mode 0644"),
        (["--api-key-file", str(tmp_path / "missing")], "missing"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "livetrain.serve", "--model", str(model_dir), *args],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr[-2000:])
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    r = subprocess.run(
        [sys.executable, "-m", "livetrain.serve", "--model", str(model_dir), "--run-dir", str(link)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "symbolic link" in r.stderr, r.stderr[-2000:]


def test_an_empty_api_key_is_refused_at_start(model_dir, tmp_path):
    # Regression test: --api-key "" or LIVETRAIN_API_KEY="" turned authentication off without a word (an
    # empty first line of --api-key-file was refused already). The engine reads its key the same way.
    for module in ("livetrain.serve", "livetrain.engines.reference"):
        needed = [] if module == "livetrain.serve" else ["--manifest", "m.json", "--trainer-socket", "t.sock"]
        for args, env, words in (
            (["--api-key", ""], ENV, "--api-key is empty"),
            ([], {**ENV, "LIVETRAIN_API_KEY": ""}, "$LIVETRAIN_API_KEY is set but empty"),
        ):
            r = subprocess.run(
                [sys.executable, "-m", module, "--model", str(model_dir), *needed, *args],
                env=env,
                cwd=tmp_path,  # what it writes if it starts anyway (the state directory)
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 2 and words in r.stderr, (module, args, r.stderr[-2000:])


def test_an_engine_killed_leaves_no_shared_memory(model_dir, tmp_path):
    # Regression test for issue #13: after a SIGKILL of the engine the supervisor deleted the manifest, and
    # the segment it named (as large as the model) stayed in /dev/shm for good.
    s = serve(model_dir, tmp_path, "--store", str(tmp_path / "store"))  # the module's server holds the model's
    s.base = tmp_path
    import json

    m = json.loads((tmp_path / "run" / "engine.manifest.json").read_text())
    segments = ["/dev/shm/" + b["name"].lstrip("/") for b in m["buffers"] if b["kind"] == "shm"]
    assert segments and all(os.path.exists(p) for p in segments)
    os.kill(m["owner"]["pid"], signal.SIGKILL)
    assert s.p.wait(300) != 0
    s.log.close()
    assert not [p for p in segments if os.path.exists(p)], Path(s.log.name).read_text()[-2000:]
    assert "removed the engine's shared memory" in Path(s.log.name).read_text()
