"""Launching the trainer: its options are defined once and survive the trip through argv (what `livetrain
serve` and the vLLM plugin pass to `python -m livetrain.trainer`), bad combinations and bad
$LIVETRAIN_TRAINER_ARGS are refused with argparse's words, and a child that ignores SIGTERM is killed
after the timeout."""

import argparse
import asyncio
import signal
import subprocess
import sys
import time

import pytest

from livetrain import serve
from livetrain.trainer import options, process
from livetrain.vllm import endpoint


def trainer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    options.add_options(p)
    return p


def test_options_survive_argv():
    p = trainer_parser()
    for words in (
        [],
        [
            "--store",
            "/s",
            "--checkpoint-every",
            "2.5",
            "--lr",
            "3e-05",
            "--batch-size",
            "2",
            "--max-seq-len",
            "40",
            "--queue-size",
            "3",
            "--embeddings",
            "frozen",
            "--anchor",
            "2.5",
            "--reword",
            "--replay-select",
            "similar",
            "--train",
            "mlp",
            "--guard-min-kept",
            "0.5",
            "--guard-prepare",
            "job",
            "--no-grad-checkpointing",
            "--state-dir",
            "st",
            "--chat-template",
            "{{ messages[0]['content'] }}",
            "--default-chat-template-kwargs",
            '{"enable_thinking": false}',
            "--chat-template-content-format",
            "openai",
        ],
        ["--no-store", "--embeddings", "adamw"],
    ):
        ns = p.parse_args(words)
        again = p.parse_args(options.argv(ns))
        assert vars(again) == vars(ns), words
    # livetrain serve takes the same options, with the same defaults, and passes them on.
    a = serve.parse(["--model", "m", "--lr", "0.001", "--no-store"])
    assert vars(p.parse_args(options.argv(a))) == vars(p.parse_args(["--lr", "0.001", "--no-store"]))
    assert options.store_argv(a) == ["--no-store"]
    cmd = process.trainer_command("/run/m.json", "/model", "/run/t.sock", a)
    assert cmd[:3] == [sys.executable, "-m", "livetrain.trainer"] and cmd[3:9] == [
        "--manifest",
        "/run/m.json",
        "--model",
        "/model",
        "--socket",
        "/run/t.sock",
    ]
    assert cmd[9:] == options.argv(a)
    # The chat-template options reach both processes: one rendering for serving and training (regression: the
    # kwargs and the content format were not options at all).
    chat = ["--chat-template", "{{ messages }}", "--default-chat-template-kwargs", '{"enable_thinking": false}']
    chat += ["--chat-template-content-format", "openai"]
    a = serve.parse(["--model", "m", *chat])
    for cmd in (serve.engine_command(a, "/run/m.json", "/run/t.sock"), options.argv(a)):
        assert [w for w in cmd if w in chat] == chat, cmd


def test_bad_options_are_refused():
    assert "cannot be combined" in options.check(trainer_parser().parse_args(["--no-store", "--store", "x"]))
    with pytest.raises(SystemExit):
        serve.parse(["--no-store", "--checkpoint-every", "5"])
    for words, words_in_error in (
        (["--lr", "x"], "--lr: 'x': expected a number in"),
        (["--frob"], "unrecognized"),
        (["--checkpoint-every", "-2"], ">= 0"),
    ):
        with pytest.raises(ValueError, match=words_in_error):
            options.parse(words)


# Found by a black-box tester: each of these was accepted when parsed; the trainer then died at start (a
# traceback, restarted in a loop while /train answered 503), the engine exited with an OverflowError (the
# port), or the value meant something else than it says (a queue of 0 or -3 jobs is unbounded, NaN seconds
# never checkpoint). Each is refused when parsed now, naming the option, the value and what it takes.
@pytest.mark.parametrize(
    "words, allowed",
    [
        (["--port", "-1"], "a TCP port from 0 to 65535"),
        (["--port", "99999"], "a TCP port from 0 to 65535"),
        (["--queue-size", "-3"], "an integer >= 1"),
        (["--queue-size", "0"], "an integer >= 1"),
        (["--checkpoint-every", "nan"], "a finite number of seconds >= 0"),
        (["--checkpoint-every", "inf"], "a finite number of seconds >= 0"),
        (["--until-loss", "inf"], "a finite number > 0"),
        (["--until-loss", "nan"], "a finite number > 0"),
        (["--guard-threshold", "inf"], "a finite number > 0"),
        (["--guard-min-kept", "nan"], "a number from 0 to 1"),
        (["--tp-timeout", "nan"], "a finite number of seconds > 0"),
        (["--tp-timeout", "0"], "a finite number of seconds > 0"),
        (["--max-seq-len", "-1"], "an integer >= 1"),
        (["--max-seq-len", "0"], "an integer >= 1"),
        (["--replay", "5000"], "an integer from 0 to 1024"),
        (["--batch-size", "1025"], "an integer from 1 to 1024"),
        (["--warmup", "100001"], "an integer from 0 to 100000"),
        (["--max-steps", "100001"], "an integer from 1 to 100000"),
        (["--anchor", "nan"], "a number from 0 to 1000"),
        (["--lr", "nan"], "a number in (0, 1)"),
    ],
)
def test_out_of_range_options_are_refused_when_parsed(words, allowed, capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse(["--model", "m", *words])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {words[0]}: {words[1]!r}: expected {allowed}" in err, err


def test_job_fields_and_options_share_their_ranges():
    from livetrain.trainer import examples

    # The largest value an option takes is the largest a job's field takes (--replay 5000 was a default that
    # every job refused: /train's replay is at most 1024).
    for key in ("lr", "until_loss", "max_steps", "warmup", "replay", "anchor", "batch_size"):
        assert examples.JOB_OPTIONS[key][1:] == options.RANGES[key], key
    assert options.parse(["--replay", "1024"]).replay == 1024


def test_state_dir_and_retention_are_checked_when_parsed(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    retention = tmp_path / "r.jsonl"
    retention.write_text('"what is 2+2"\n')
    for words, error in (
        (["--state-dir", str(a_file)], f"--state-dir: '{a_file}': it exists and is not a directory"),
        (["--state-dir", str(a_file / "x")], f"--state-dir: '{a_file / 'x'}': {a_file} exists and is not a"),
        (["--retention", "/nonexistent"], "--retention: '/nonexistent' cannot be read (No such file or directory)"),
        (["--retention", str(tmp_path)], "cannot be read (Is a directory)"),
    ):
        with pytest.raises(ValueError) as e:
            options.parse(words)
        assert error in str(e.value), (words, str(e.value))
        with pytest.raises(SystemExit) as e:
            serve.parse(["--model", "m", *words])
        assert e.value.code == 2 and error in capsys.readouterr().err
    # A state dir that does not exist yet is the trainer's to make; a readable retention file is the trainer's
    # to check (trainer.guard.read_prompts).
    ns = options.parse(["--state-dir", str(tmp_path / "new" / "state"), "--retention", str(retention)])
    assert (ns.state_dir, ns.retention) == (str(tmp_path / "new" / "state"), str(retention))


def test_switch_help_says_the_real_default(capsys):
    # --help said "by default, the served model rewords ... (default False)": both "by default" and False.
    with pytest.raises(SystemExit):
        serve.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("reword", "restate"):
        assert f'when the job does not set "{key}" itself (default off: --no-{key})' in text
        assert options.LEARNING[key] is False
    assert "by default, " not in text


def test_the_vllm_plugin_reads_trainer_options_from_the_environment():
    ns = endpoint.trainer_options(
        {
            "LIVETRAIN_STATE_DIR": "/st",
            "LIVETRAIN_STORE_DIR": "/store",
            "LIVETRAIN_TRAINER_ARGS": "--lr 2e-5 --batch-size 4",
        }
    )
    assert (ns.state_dir, ns.store, ns.lr, ns.batch_size, ns.no_store) == ("/st", "/store", 2e-5, 4, False)
    assert endpoint.trainer_options({}).state_dir == options.DEFAULT_STATE_DIR
    with pytest.raises(ValueError, match="LIVETRAIN_TRAINER_ARGS: .*--bacth-size"):
        endpoint.trainer_options({"LIVETRAIN_TRAINER_ARGS": "--bacth-size 4"})


def test_init_state_refuses_bad_trainer_args_before_exporting(monkeypatch):
    from types import SimpleNamespace

    from livetrain.vllm import worker

    monkeypatch.setenv("LIVETRAIN_TRAINER_ARGS", "--lr")
    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    m = SimpleNamespace(model="m", revision=None, quantization=None, enable_sleep_mode=False)
    p = SimpleNamespace(
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        data_parallel_size=1,
        worker_extension_cls="livetrain.vllm.WorkerExtension",
    )
    config = SimpleNamespace(
        model_config=m,
        parallel_config=p,
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        lora_config=None,
        kv_transfer_config=None,
    )

    class Client:
        vllm_config = config

        async def collective_rpc(self, *a, **kw):
            calls.append(a)

    with pytest.raises(worker.Refused, match="LIVETRAIN_TRAINER_ARGS: argument --lr: expected one argument"):
        asyncio.run(endpoint.EndpointPlugin().init_state(Client(), SimpleNamespace(), argparse.Namespace(api_key=None)))
    assert calls == []


def test_stop_kills_a_child_that_ignores_sigterm():
    child = process.Process(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.proc.stdout.readline() == b"up\n" and child.poll() is None
    t0 = time.monotonic()
    assert child.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 10
    env = process.environment({"A": "1"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and env["A"] == "1"
    assert process.environment({"PYTORCH_CUDA_ALLOC_CONF": "x"})["PYTORCH_CUDA_ALLOC_CONF"] == "x"
