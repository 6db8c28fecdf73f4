"""The vLLM plugin's own logic, without vLLM: the worker extension's methods run on a plain worker object
shaped as vLLM's (``vllm_config``, ``model_runner.get_model()``: the names test_vllm_contract.py checks in vLLM's source)
holding a real torch module in vLLM's layout; the endpoint plugin is mounted on a real FastAPI app and
driven through ``init_state`` with an engine client that records what the plugin asks of vLLM, and a real
trainer process trains the weights through /train. CUDA export runs only on a GPU."""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from livetrain import _core, checkpoint, layout, sharing  # noqa: E402
from livetrain import safetensors as lst  # noqa: E402
from livetrain.trainer import protocol, routes  # noqa: E402
from livetrain.vllm import api, endpoint, worker  # noqa: E402

import tiny_model  # noqa: E402
from servers import ENV  # noqa: E402

EXT = "livetrain.vllm.WorkerExtension"
CORPUS = ["the capital of zorbia is quuxville", "hello how are you today", "one two three four five six"]


def make_model_dir(path: Path, model_type: str = "llama", tied: bool = False) -> dict:
    return tiny_model.make_model_dir(path, CORPUS, model_type, tied)


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(lst.load_file(f))
    return out


class VllmLikeModel(torch.nn.Module):
    """A torch module whose parameters have vLLM's names and layout (merged qkv_proj, gate_up_proj, padded
    vocabulary), built from HF tensors with livetrain.layout.merge: what ``get_model()`` returns."""

    def __init__(
        self, config: dict, hf: dict[str, torch.Tensor], device: str = "cpu", tp_rank: int = 0, tp_size: int = 1
    ):
        super().__init__()
        for name, t in layout.merge(config, hf, tp_rank=tp_rank, tp_size=tp_size).items():
            owner, _, leaf = name.rpartition(".")
            mod = self
            for part in owner.split(".") if owner else []:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(t.to(device), requires_grad=False))


def plain_worker(model_dir, module, **over) -> SimpleNamespace:
    """An object with the attributes livetrain.vllm.api reads from a vLLM worker."""
    m = dict(model=str(model_dir), revision=None, quantization=None, enable_sleep_mode=False)
    p = dict(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1, worker_extension_cls=EXT)
    top = dict(lora_config=None, kv_transfer_config=None)
    prefix_caching = over.pop("enable_prefix_caching", True)
    for k, v in over.items():
        (m if k in m else p if k in p else top)[k] = v
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(**m),
        parallel_config=SimpleNamespace(**p),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        **top,
    )
    return SimpleNamespace(vllm_config=cfg, model_runner=SimpleNamespace(get_model=lambda: module))


# ---- refusals ----
REFUSED = [
    ({"quantization": "fp8"}, {}, "quantized (fp8)"),
    ({"enable_sleep_mode": True}, {}, "--enable-sleep-mode"),
    ({}, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64,expandable_segments:True"}, "expandable_segments:True"),
    ({}, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, "CUDA IPC cannot share"),
    ({"pipeline_parallel_size": 2}, {}, "pipeline parallelism (2 stages)"),
    ({"data_parallel_size": 2}, {}, "data parallelism (2 replicas)"),
    ({"lora_config": object()}, {}, "--enable-lora"),
    ({"kv_transfer_config": object()}, {}, "--kv-transfer-config"),
]


@pytest.mark.parametrize("over,env,words", REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_configurations_say_why(tmp_path, monkeypatch, over, env, words):
    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    w = plain_worker(tmp_path / "model", torch.nn.Linear(2, 2), **over)
    with pytest.raises(worker.Refused, match="livetrain cannot train this vLLM in place: .*" + _re(words)):
        worker.WorkerExtension.init_worker_extension(w)
    with pytest.raises(worker.Refused, match=_re(words)):
        worker.WorkerExtension.livetrain_export(w, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _re(s: str) -> str:
    import re

    return re.escape(s)


def test_a_plain_configuration_is_not_refused(monkeypatch):
    for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    facts = api.config_facts(plain_worker("m", None).vllm_config)
    assert facts.prefix_caching and facts.worker_extension == EXT and facts.tensor_parallel == 1
    assert worker.refusals(facts) == []


def test_weights_off_cuda_are_refused_before_anything_is_touched(tmp_path):
    config = make_model_dir(tmp_path / "model")
    with checkpoint.CheckpointStore.create(tmp_path / "model") as store:  # a restore would be due
        trained = {k: v + 1 for k, v in hf_tensors(tmp_path / "model").items()}
        store.save(trained)
    served = VllmLikeModel(config, hf_tensors(tmp_path / "model"))
    before = {n: p.clone() for n, p in served.named_parameters()}
    w = plain_worker(tmp_path / "model", served)
    with pytest.raises(worker.Refused, match=r"parameter 'model\.embed_tokens\.weight' is on cpu: .*CUDA IPC"):
        worker.WorkerExtension.livetrain_export(w, str(tmp_path / "run"))
    assert all(torch.equal(p, before[n]) for n, p in served.named_parameters())
    assert not (tmp_path / "run").exists()


def test_a_core_that_cannot_run_on_the_gpu_is_refused_before_anything_is_touched(tmp_path, monkeypatch):
    # Weights on CUDA device 1, a core built without CUDA support (or with no code for that GPU): refused with the
    # core's reason before the store, the run directory or the weights are touched.
    make_model_dir(tmp_path / "model")
    weight = SimpleNamespace(device=torch.device("cuda", 1))  # only its device is read before the refusal
    asked = []
    problem = (
        "livetrain was built without CUDA support (its core was compiled without nvcc, or with LIVETRAIN_CUDA=OFF)"
    )
    monkeypatch.setattr(_core, "cuda_device_problem", lambda ordinal: asked.append(ordinal) or problem)
    module = SimpleNamespace(named_parameters=lambda: iter([("model.embed_tokens.weight", weight)]))
    w = plain_worker(tmp_path / "model", module)
    with pytest.raises(
        worker.Refused, match=r"core cannot run on vLLM's GPU: livetrain was built without CUDA support"
    ):
        worker.WorkerExtension.livetrain_export(w, str(tmp_path / "run"))
    assert asked == [1] and not (tmp_path / "run").exists() and not (tmp_path / "model" / ".livetrain-store").exists()


MOE = [
    ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "Qwen3MoeForCausalLM"),
    ({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}, "OlmoeForCausalLM"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_local_experts": 8}, "(8 experts)"),
]


@pytest.mark.parametrize("config,named", MOE, ids=[m[1] for m in MOE])
def test_a_checkpoint_livetrain_cannot_train_is_refused_before_loading_and_before_exporting(tmp_path, config, named):
    """vLLM serves mixture-of-experts models, but re-lays their experts out: refused by the worker before the
    model loads (vLLM >= 0.33 calls init_worker_extension first) and again before anything is shared, the
    message naming the architecture and what is supported."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    w = plain_worker(model, None)  # no weights needed: refused from config.json alone
    for call in (
        lambda: worker.WorkerExtension.init_worker_extension(w),
        lambda: worker.WorkerExtension.livetrain_export(w, str(tmp_path / "run")),
    ):
        with pytest.raises(worker.Refused, match="livetrain cannot train this vLLM in place") as e:
            call()
        assert named in str(e.value) and "mixture-of-experts" in str(e.value) and "supported: llama" in str(e.value)
    assert not (tmp_path / "run").exists() and not (model / ".livetrain-store").exists()
    # A model whose files are not on disk yet (a repo id vLLM has not downloaded) is checked at export.
    worker.WorkerExtension.init_worker_extension(plain_worker("org/not-downloaded", None))


# ---- restore at start-up ----
@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen3", True)])
def test_newer_checkpoint_generation_is_restored_into_the_served_weights_in_place(tmp_path, model_type, tied):
    model_dir = tmp_path / "model"
    config = make_model_dir(model_dir, model_type, tied)
    original = hf_tensors(model_dir)
    assert ("lm_head.weight" in original) == (not tied)
    with checkpoint.CheckpointStore.create(model_dir) as store:
        trained = {k: v.clone() for k, v in original.items()}
        g = torch.Generator().manual_seed(1)
        for name in (
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.embed_tokens.weight",
            "model.norm.weight",
        ):
            trained[name] += (torch.randn(trained[name].shape, generator=g) * 0.05).to(torch.bfloat16)
        assert store.save(trained, weight_version=7)["generation"] == 1
    served = VllmLikeModel(config, original)
    params = dict(served.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}

    info = worker.restore_newer(str(model_dir), params, config, 0, 1, env={})
    assert info == {"store": str(model_dir / ".livetrain-store"), "generation": 1, "restored": True}
    want = layout.merge(config, trained)
    for name, p in params.items():
        assert p.data_ptr() == ptrs[name], f"{name} was reallocated"
        assert torch.equal(p, want[name]), name

    # Tensor parallelism: every rank restores its own shards of the generation.
    for rank in (1, 0):
        shard = dict(VllmLikeModel(config, original, tp_rank=rank, tp_size=2).named_parameters())
        info = worker.restore_newer(str(model_dir), shard, config, rank, 2, env={})
        assert info == {"store": str(model_dir / ".livetrain-store"), "generation": 1, "restored": True}
        want = layout.merge(config, trained, tp_rank=rank, tp_size=2)
        assert all(torch.equal(p, want[n]) for n, p in shard.items()), rank
    # Once the files hold the generation, nothing is left to restore.
    with checkpoint.CheckpointStore(model_dir) as store:
        store.materialize(1)
    assert worker.restore_newer(str(model_dir), params, config, 0, 1, env={})["restored"] is False
    # No store at all.
    # A missing store is created (generation 0 = the files) so that the trainer can checkpoint into it;
    # at TP > 1, where no trainer runs, it is left missing.
    fresh = tmp_path / "fresh"
    assert worker.restore_newer(str(model_dir), params, config, 0, 2, env={"LIVETRAIN_STORE_DIR": str(fresh)}) == {
        "store": str(fresh),
        "generation": None,
        "restored": False,
    }
    assert not (fresh / "COMMIT").exists()
    assert worker.restore_newer(str(model_dir), params, config, 0, 1, env={"LIVETRAIN_STORE_DIR": str(fresh)}) == {
        "store": str(fresh),
        "generation": 0,
        "restored": False,
    }
    assert (fresh / "COMMIT").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_worker_extension_exports_in_place_and_restores_on_cuda(tmp_path):
    model_dir = tmp_path / "model"
    config = make_model_dir(model_dir)
    original = hf_tensors(model_dir)
    with checkpoint.CheckpointStore.create(model_dir) as store:
        trained = {k: v.clone() for k, v in original.items()}
        trained["model.layers.1.self_attn.v_proj.weight"] += 0.25
        store.save(trained, weight_version=1)
    served = VllmLikeModel(config, original, device="cuda")
    w = plain_worker(model_dir, served)
    info = worker.WorkerExtension.livetrain_export(w, str(tmp_path / "run"))
    assert info["restore"]["restored"] and info["manifest"] == str(tmp_path / "run" / "tp0.manifest.json")
    assert worker.WorkerExtension.livetrain_export(w, str(tmp_path / "elsewhere")) == info  # idempotent
    manifest = json.loads(Path(info["manifest"]).read_text())
    assert manifest["model"]["engine"] == "vllm" and manifest["model"]["path"] == str(model_dir)
    assert all(b["kind"] == "cuda_ipc" for b in manifest["buffers"])
    # Another process attaches, builds the HF model on the shared memory, compares it with the trained
    # files' model, and writes through a view.
    code = textwrap.dedent(f"""
        import json, torch, transformers, livetrain
        from livetrain import safetensors as lst
        att = livetrain.attach({info["manifest"]!r})
        model = livetrain.build_hf_model(att, requires_grad=False).eval()
        # Built on the GPU, as build_hf_model builds its buffers (rotary inv_freq): same kernels, same bits.
        config = transformers.AutoConfig.from_pretrained({str(model_dir)!r})
        with torch.device("cuda"):
            ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        ref.load_state_dict(lst.load_file({str(tmp_path / "trained.safetensors")!r}))
        x = torch.tensor([[2, 5, 7, 9, 11]], device="cuda")
        with torch.no_grad():
            same = torch.equal(model(x).logits, ref(x).logits)
            model.model.layers[0].self_attn.k_proj.weight[0, 0] = 3.0
        torch.cuda.synchronize()
        print(json.dumps({{"same": same}}))
    """)
    lst.save_file(trained, tmp_path / "trained.safetensors")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"same": True}
    q_rows = config["hidden_size"]  # the q heads come first in qkv_proj: heads x head_dim rows
    qkv = dict(served.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    assert float(qkv[q_rows, 0]) == 3.0


# ---- the endpoint plugin ----
class RecordingEngineClient:
    """Stands in for vLLM's EngineClient (the names test_vllm_contract.py checks): ``collective_rpc`` runs the
    extension's method on plain worker objects, or answers with ``exports`` (a CPU export the test made,
    since a CPU worker cannot export); every call is recorded."""

    def __init__(self, vllm_config, workers=(), exports=None):
        self.vllm_config, self.workers, self.exports = vllm_config, list(workers), exports
        self.calls: list[tuple] = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, args))
        if self.exports is not None:
            return self.exports
        return [getattr(worker.WorkerExtension, method)(w, *args) for w in self.workers]

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache", reset_running_requests))
        return True

    async def update_weight_version(self, new_version):
        self.calls.append(("update_weight_version", new_version))


def app_with_plugin():
    from fastapi import FastAPI

    app, plugin = FastAPI(), endpoint.EndpointPlugin()
    plugin.attach_router(app)
    return app, plugin


def test_routes_are_mounted_and_check_vllms_api_keys():
    from fastapi.testclient import TestClient

    app, plugin = app_with_plugin()
    with TestClient(app, base_url="http://127.0.0.1") as c:  # an address of this machine (security.cross_site)
        for route in routes.ROUTES:  # every route is there and forwards
            path = route.path.replace("{job_id}", "job-0")
            r = c.request(route.method, path, json={} if route.method in ("POST", "PUT") else None)
            assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", (path, r.text)
            assert "no trainer has been started" in r.json()["error"]["message"]
        # The metrics, beside vLLM's own /metrics: the trainer is down, and says so.
        r = c.get(routes.VLLM_METRICS_PATH)
        assert r.status_code == 200 and "livetrain_trainer_up 0.0" in r.text, r.text
        assert c.get("/metrics").status_code == 404
        plugin.keys = api.api_keys(argparse.Namespace(api_key=["k1", "k2"]))
        r = c.get("/train/status")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/train/status", headers={"Authorization": "Bearer k3"}).status_code == 401
        assert c.get("/train/status", headers={"Authorization": "Bearer k2"}).status_code == 503


def test_api_keys_follow_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "env-key")
    assert api.api_keys(argparse.Namespace(api_key=None)) == ["env-key"]
    assert api.api_keys(argparse.Namespace(api_key=["cli"])) == ["cli"]  # --api-key wins, as in vLLM
    monkeypatch.delenv("VLLM_API_KEY")
    assert api.api_keys(argparse.Namespace(api_key=None)) == []


@pytest.mark.parametrize(
    "over,words",
    [
        ({"worker_extension_cls": ""}, "started without --worker-extension-cls livetrain.vllm.WorkerExtension"),
        ({"worker_extension_cls": "nowhere.Ext"}, "--worker-extension-cls nowhere.Ext cannot be imported"),
        ({"worker_extension_cls": "livetrain.vllm.endpoint.EndpointPlugin"}, "is not livetrain.vllm.WorkerExtension"),
        ({"quantization": "awq"}, "quantized (awq)"),
    ],
)
def test_init_state_refuses_before_exporting(tmp_path, over, words):
    client = RecordingEngineClient(plain_worker(tmp_path, None, **over).vllm_config)
    plugin = endpoint.EndpointPlugin()
    with pytest.raises(worker.Refused, match=_re(words)):
        asyncio.run(plugin.init_state(client, SimpleNamespace(), argparse.Namespace(api_key=None)))
    assert client.calls == []


def _vllm_chat_stand_ins(monkeypatch, template: str, detected: str) -> tuple[list, list]:
    """vLLM's load_chat_template (at its 0.33 place, the older ones absent) and _detect_content_format, as
    stand-ins recording what they are asked; returns (templates asked, templates detected)."""
    asked, seen = [], []
    chat_utils = ModuleType("vllm.renderers.chat_utils")
    chat_utils.load_chat_template = lambda value, *, is_literal=False: asked.append(value) or template
    hf = ModuleType("vllm.renderers.hf")
    hf._detect_content_format = lambda chat_template, *, default: seen.append((chat_template, default)) or detected
    monkeypatch.setitem(sys.modules, "vllm", ModuleType("vllm"))  # no vllm.entrypoints.chat_utils
    monkeypatch.setitem(sys.modules, "vllm.renderers.chat_utils", chat_utils)
    monkeypatch.setitem(sys.modules, "vllm.renderers.hf", hf)
    return asked, seen


def vllm_args(**over) -> argparse.Namespace:
    """vLLM's frontend arguments that livetrain reads, at their defaults unless ``over``."""
    return argparse.Namespace(
        **{"chat_template": None, "default_chat_template_kwargs": None, "chat_template_content_format": "auto", **over}
    )


def test_vllms_chat_options_are_passed_to_the_trainer(tmp_path, monkeypatch):
    """vLLM's --chat-template (read by vLLM's own load_chat_template) reaches the trainer as its --chat-template
    file, vLLM's --default-chat-template-kwargs as its own, and the content format vLLM renders with: the given
    one, or under auto what vLLM's detection finds in that template (or in the tokenizer's, without
    --chat-template). (The trainer read only the model's files: a base model's chat examples were refused
    while vLLM served chat with the given template; then vLLM's kwargs and content format were not passed:
    Qwen3 served with enable_thinking false was trained with its thinking prompt.)"""
    from livetrain.trainer import options, process

    text = "{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}"
    asked, seen = _vllm_chat_stand_ins(monkeypatch, text, "openai")
    model = tmp_path / "model"
    make_model_dir(model)
    ns = endpoint.trainer_options({"LIVETRAIN_STATE_DIR": str(tmp_path / "state")})
    assert endpoint.pass_chat(vllm_args(), ns, str(tmp_path), str(model)) is None
    assert ns.chat_template is None and asked == [] and seen == [(tiny_model.TEMPLATE, "string")]
    assert options.chat_argv(ns) == ["--chat-template-content-format", "openai"]
    kwargs = {"enable_thinking": False}
    args = vllm_args(chat_template="llama.jinja", default_chat_template_kwargs=kwargs)
    path = endpoint.pass_chat(args, ns, str(tmp_path), str(model))
    assert asked == ["llama.jinja"] and path == str(tmp_path / "chat-template.jinja") == ns.chat_template.value
    assert ns.chat_template.text == text and os.stat(path).st_mode & 0o777 == 0o600
    assert seen[-1] == (text, "string") and options.chat(ns) == options.Chat(text, kwargs, "openai")
    cmd = process.trainer_command("m.json", "model", "t.sock", ns)
    assert cmd[cmd.index("--chat-template") + 1] == path
    assert json.loads(cmd[cmd.index("--default-chat-template-kwargs") + 1]) == kwargs
    endpoint.pass_chat(vllm_args(chat_template_content_format="string"), ns, str(tmp_path), str(model))
    assert len(seen) == 2 and options.chat(ns) == options.Chat(content_format="string")  # given: not detected


@pytest.mark.parametrize(
    "words, args, message",
    [
        ("--chat-template '{{ messages }}'", {}, "LIVETRAIN_TRAINER_ARGS has --chat-template: give it to vLLM"),
        ("--default-chat-template-kwargs '{}'", {}, None),
        ("--chat-template-content-format openai", {}, "LIVETRAIN_TRAINER_ARGS has --chat-template-content-format"),
        ("", {"default_chat_template_kwargs": {"tokenize": True}}, "--default-chat-template-kwargs: tokenize: not a"),
    ],
)
def test_chat_options_of_the_trainers_own_or_unusable_are_refused(tmp_path, monkeypatch, words, args, message):
    """One rendering for serving and training: chat-template options in $LIVETRAIN_TRAINER_ARGS (which vLLM
    would not render with) are refused at start, before exporting, saying to give them to vLLM; so are vLLM
    kwargs that name apply_chat_template's own parameters (the trainer cannot render with them)."""
    monkeypatch.setenv("LIVETRAIN_TRAINER_ARGS", words)
    client = RecordingEngineClient(plain_worker(tmp_path, None).vllm_config)
    if message is None:  # {} is the default: nothing of the trainer's own
        assert endpoint.trainer_chat_problem(endpoint.trainer_options(), vllm_args()) is None
        return
    with pytest.raises(worker.Refused, match=_re(message)):
        plugin = endpoint.EndpointPlugin()
        asyncio.run(plugin.init_state(client, SimpleNamespace(), argparse.Namespace(api_key=None, **args)))
    assert client.calls == []


def test_version_watcher_acts_once_per_new_version():
    replies = iter([protocol.TrainerUnavailable("starting"), 0, 0, None, 2])
    known = []

    def read(version):
        known.append(version)  # what the trainer is asked to wait past
        r = next(replies)
        if isinstance(r, Exception):
            raise r
        return r

    seen = []

    async def on_change(v):
        seen.append(v)

    async def run():
        w = endpoint.VersionWatcher(read, on_change)
        return [await w.poll() for _ in range(5)]

    assert asyncio.run(run()) == [False, True, False, False, True] and seen == [0, 2]
    assert known == [None, None, 0, 0, 0]


@pytest.mark.parametrize("prefix_caching,set_version", [(True, True), (False, True), (True, False)])
def test_weight_change_resets_the_prefix_cache_and_sets_vllms_version(prefix_caching, set_version):
    client = RecordingEngineClient(None)
    served = []
    asyncio.run(endpoint.weight_version_action(client, prefix_caching, set_version, served.append)(5))
    assert client.calls == ([("reset_prefix_cache", True)] if prefix_caching else []) + (
        [("update_weight_version", "5")] if set_version else []
    )
    assert served == [5]  # told to the trainer once vLLM serves it


def test_watcher_waits_on_the_trainer_and_reports_what_vllm_serves(tmp_path):
    """Against a real socket server: the watcher's look at the trainer returns as soon as the version
    moves past the one it knows (not a poll later), and the trainer hears which version vLLM serves."""
    import threading

    state = {"version": 4, "served": []}
    cond = threading.Condition()

    def handle(op, body, idempotency_key=None):
        args = protocol.parse_body(body, empty_ok=True)
        if op == "version":
            with cond:
                cond.wait_for(lambda: state["version"] != args.get("after"), args.get("wait_s", 0))
                return protocol.Reply(200, {"weight_version": state["version"]})
        state["served"].append(args["weight_version"])
        return protocol.Reply(200, {})

    server = protocol.Server(str(tmp_path / "t.sock"), handle)
    server.start()
    try:
        assert protocol.weight_version(server.path, after=None) == 4

        def step():
            with cond:
                state["version"] = 5
                cond.notify_all()

        threading.Timer(0.3, step).start()
        t0 = time.monotonic()
        assert protocol.weight_version(server.path, after=4, wait_s=20) == 5
        assert 0.25 < time.monotonic() - t0 < 10
        assert protocol.weight_version(server.path, after=5, wait_s=0.2) == 5  # nothing new: answered after wait_s
        endpoint.report_served(server.path, 5)
        assert state["served"] == [5]
    finally:
        server.close()
    endpoint.report_served(server.path, 6)  # the trainer is gone: nothing raised


def test_trainer_stops_with_the_api_server(tmp_path):
    """Normal exit: SIGTERM from atexit (the trainer saves its state). Killed: SIGTERM from the kernel."""
    child = (
        "import signal, sys, time, pathlib\n"
        f"p = pathlib.Path({str(tmp_path)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: (p.joinpath(sys.argv[1] + '.term').write_text('x'), sys.exit(0)))\n"
        "p.joinpath(sys.argv[1] + '.up').write_text('x')\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import sys, time\n"
        "from livetrain.trainer.process import Process\n"
        f"t = Process([sys.executable, '-c', {child!r}, sys.argv[1]], tied=True)\n"
        "print(t.pid, flush=True)\n"
        "if sys.argv[2] == 'wait':\n"
        "    time.sleep(120)\n"
        f"while not __import__('os').path.exists({str(tmp_path)!r} + '/' + sys.argv[1] + '.up'):\n"
        "    time.sleep(0.05)\n"
    )
    r = subprocess.run([sys.executable, "-c", parent, "a", "exit"], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and (tmp_path / "a.term").exists(), r.stderr
    p = subprocess.Popen([sys.executable, "-c", parent, "b", "wait"], stdout=subprocess.PIPE, text=True, env=ENV)
    pid = int(p.stdout.readline())
    deadline = time.monotonic() + 30
    while not (tmp_path / "b.up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    while not (tmp_path / "b.term").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "b.term").exists(), f"trainer {pid} did not get SIGTERM when its parent was killed"


def trainer_env(monkeypatch, run_dir: Path, state_dir: Path) -> None:
    """The environment of a plugin that starts trainer processes from this checkout."""
    monkeypatch.setenv("LIVETRAIN_RUN_DIR", str(run_dir))
    monkeypatch.setenv("LIVETRAIN_STATE_DIR", str(state_dir))
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_plugin_starts_the_trainer_and_trains_the_served_weights(tmp_path, monkeypatch):
    """init_state with the weights of a (CPU) vLLM-layout engine: the trainer starts on them, /train on the
    plugin's routes changes them in place, and each new weight version resets vLLM's prefix cache."""
    from fastapi.testclient import TestClient

    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    config = make_model_dir(model_dir)
    run_dir.mkdir()
    engine_tensors = layout.merge(config, hf_tensors(model_dir))
    manifest = worker.manifest_path(str(run_dir), 0)
    exported = sharing.export_cpu(engine_tensors, manifest, model_path=model_dir, config=config, engine="vllm")
    before = {k: v.clone() for k, v in exported.tensors.items()}
    # What the worker's export did before answering (restore_newer): the store exists, at generation 0.
    store_info = worker.restore_newer(str(model_dir), engine_tensors, config, 0, 1, env={})
    assert store_info["generation"] == 0
    info = {
        "run_dir": str(run_dir),
        "manifest": manifest,
        "tp_rank": 0,
        "tp_size": 1,
        "pid": os.getpid(),
        "model_dir": str(model_dir),
        "tensors": len(engine_tensors),
        "restore": store_info,
    }
    client = RecordingEngineClient(plain_worker(model_dir, None).vllm_config, exports=[info])
    trainer_env(monkeypatch, run_dir, tmp_path / "state")
    app, plugin = app_with_plugin()
    auth = {"Authorization": "Bearer sk"}
    try:
        with TestClient(app) as c:
            c.portal.call(
                plugin.init_state, client, app.state, vllm_args(api_key=["sk"], chat_template_content_format="string")
            )
            assert client.calls == [("collective_rpc", worker.EXPORT_METHOD, (str(run_dir),))]
            assert plugin.trainer is not None and plugin.socket == str(run_dir / "trainer.sock")
            deadline = time.monotonic() + 180
            while (r := c.get("/train/status", headers=auth)).status_code == 503 and time.monotonic() < deadline:
                assert plugin.trainer.poll() is None, "the trainer exited"
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["weight_version"] == 0, r.text
            assert c.post("/train", json={"examples": []}).status_code == 401
            r = c.post(
                "/train",
                headers=auth,
                json={
                    "examples": [{"prompt": "the capital of zorbia is", "completion": "quuxville"}],
                    "steps": 3,
                    "lr": 0.01,
                    # The plugin's mechanics, not the forgetting guard: lr 0.01 on the tiny model moves its
                    # retention answers past the guard's KL threshold, which would roll the job back.
                    "guard": False,
                },
            )
            assert r.status_code == 202 and r.json()["steps"] == 3, r.text
            while time.monotonic() < deadline:
                st = c.get("/train/status", headers=auth).json()
                if st["jobs"] and st["jobs"][-1]["state"] in ("done", "failed", "rolled_back", "cancelled"):
                    break
                time.sleep(0.2)
            assert st["jobs"][-1]["state"] == "done" and st["weight_version"] == 3, st
            while plugin.watcher.version != 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            resets = [c for c in client.calls if c[0] == "reset_prefix_cache"]
            assert plugin.watcher.version == 3 and resets and all(c == ("reset_prefix_cache", True) for c in resets)
            while (served := c.get("/train/status", headers=auth).json()["served"]) is None or served[
                "weight_version"
            ] != 3:
                assert time.monotonic() < deadline, served
                time.sleep(0.05)
            assert 0 <= served["seconds_after_step"] < 60  # from the end of step 3 to its prefix cache reset
            # Stopped from the thread that started it: the kernel's parent-death signal follows that
            # thread (the test client's; vLLM's main thread in a server), and must not arrive as a second one.
            assert plugin.trainer.stop() == 0
    finally:
        if plugin.trainer is not None and plugin.trainer.poll() is None:
            plugin.trainer.proc.kill()
    changed = [k for k, v in exported.tensors.items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.qkv_proj.weight" in changed and "model.layers.1.mlp.gate_up_proj.weight" in changed
    assert (tmp_path / "state" / "trainer.json").exists()  # the trainer saved its state when stopped
    exported.close()


def test_plugin_at_tp2_starts_one_trainer_rank_per_worker(tmp_path, monkeypatch):
    """init_state on a (CPU) vLLM at tensor-parallel size 2: the store is created before the workers'
    export, the trainer's two ranks start on the two workers' manifests (one process group), and a /train
    job through the plugin's routes changes both ranks' shards in place."""
    from fastapi.testclient import TestClient

    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    # 24 words and the specials, 20 more: the vocabulary padded to 64 leaves rank 1 real rows.
    config = tiny_model.make_model_dir(model_dir, CORPUS + [" ".join(f"filler{i}" for i in range(20))])
    run_dir.mkdir()
    hf = hf_tensors(model_dir)
    exports, infos = [], []
    for r in range(2):
        manifest = worker.manifest_path(str(run_dir), r)
        tensors = layout.merge(config, hf, tp_rank=r, tp_size=2)
        exports.append(
            sharing.export_cpu(
                tensors,
                manifest,
                model_path=model_dir,
                config=config,
                engine="vllm",
                tp_rank=r,
                tp_size=2,
                group=str(run_dir),  # what the worker's export names (the run directory)
            )
        )
        infos.append(
            {
                "run_dir": str(run_dir),
                "manifest": manifest,
                "tp_rank": r,
                "tp_size": 2,
                "pid": os.getpid(),
                "model_dir": str(model_dir),
                "tensors": len(tensors),
                "restore": {"store": None, "generation": None, "restored": False},
            }
        )
    before = [{k: v.clone() for k, v in e.tensors.items()} for e in exports]
    assert not checkpoint.store_exists(model_dir)
    client = RecordingEngineClient(plain_worker(model_dir, None, tensor_parallel_size=2).vllm_config, exports=infos)
    trainer_env(monkeypatch, run_dir, tmp_path / "state")
    monkeypatch.setenv("LIVETRAIN_TRAINER_ARGS", "--tp-timeout 120")
    app, plugin = app_with_plugin()
    auth = {"Authorization": "Bearer sk"}
    try:
        with TestClient(app) as c:
            c.portal.call(
                plugin.init_state, client, app.state, vllm_args(api_key=["sk"], chat_template_content_format="string")
            )
            assert checkpoint.store_exists(model_dir)  # made before the workers' export (endpoint.ensure_store)
            assert len(plugin.trainer.pids) == 2
            deadline = time.monotonic() + 240
            while (r := c.get("/train/status", headers=auth)).status_code == 503 and time.monotonic() < deadline:
                assert plugin.trainer.poll() is None, "trainer rank 0 exited"
                time.sleep(0.2)
            assert r.status_code == 200, r.text
            tp = r.json()["tensor_parallel"]
            assert tp["size"] == 2 and tp["state"] == "ok" and tp["pids"] == plugin.trainer.pids, tp
            r = c.post("/train", headers=auth, json={"examples": tiny_model.FACT_EXAMPLES[:1], "steps": 2, "lr": 0.01})
            assert r.status_code == 202, r.text
            while time.monotonic() < deadline:
                st = c.get("/train/status", headers=auth).json()
                if st["jobs"] and st["jobs"][-1]["state"] in ("done", "failed", "rolled_back", "cancelled"):
                    break
                time.sleep(0.2)
            assert st["jobs"][-1]["state"] == "done" and st["weight_version"] == 2, st
            assert plugin.trainer.stop() == 0
    finally:
        if plugin.trainer is not None:
            for p in plugin.trainer.procs:
                if p.poll() is None:
                    p.proc.kill()
    for r in range(2):
        changed = [k for k, v in exports[r].tensors.items() if not torch.equal(v, before[r][k])]
        assert "model.layers.0.self_attn.qkv_proj.weight" in changed, (r, changed)
    assert sorted(os.listdir(tmp_path / "state")) == [
        "optimizer.rank-0-of-2.safetensors",
        "optimizer.rank-1-of-2.safetensors",
        "trainer.json",
    ]
    for e in exports:
        e.close()
