"""The vLLM plugin's contract with vLLM, checked against vLLM's real source: every vLLM definition the
plugin uses (livetrain.vllm.api.RELIED_ON) exists, with parameters that accept how the plugin calls it, in
every pinned release (vllm_sdists.json), and in the installed vLLM when there is one. Nothing of vLLM is
imported or run: the sources are parsed (livetrain.vllm.contract), so this runs on any CPU machine.

The sdists come from PyPI once (sha256-checked) and their .py files are cached under
$LIVETRAIN_CACHE/vllm-src (default ~/.cache/livetrain/vllm-src). Without network the tests FAIL, saying
how to provide the files ($LIVETRAIN_VLLM_SDISTS: a directory holding vllm-X.tar.gz); only
LIVETRAIN_VLLM_CONTRACT_OFFLINE=1 turns that into a skip, for machines known to be offline.
"""

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import pytest

from livetrain.vllm import api, contract

from servers import ENV, ROOT

PINS = json.loads((Path(__file__).with_name("vllm_sdists.json")).read_text())["sdists"]
PLUGIN = ROOT / "python" / "livetrain" / "vllm"


def cache_root() -> Path:
    return Path(os.environ.get("LIVETRAIN_CACHE") or Path.home() / ".cache" / "livetrain") / "vllm-src"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(pin: dict, dest: Path) -> Path:
    """The sdist: from $LIVETRAIN_VLLM_SDISTS if it has it, else downloaded; sha256-checked either way."""
    name = f"vllm-{pin['version']}.tar.gz"
    local = os.environ.get("LIVETRAIN_VLLM_SDISTS")
    if local and (Path(local) / name).is_file():
        path = Path(local) / name
    else:
        path = dest / name
        try:
            with urllib.request.urlopen(pin["url"], timeout=300) as r, open(path, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except OSError as e:
            msg = (
                f"cannot download {pin['url']} ({e}). Put {name} in a directory named by "
                "$LIVETRAIN_VLLM_SDISTS, or set LIVETRAIN_VLLM_CONTRACT_OFFLINE=1 to skip the vLLM contract tests"
            )
            if os.environ.get("LIVETRAIN_VLLM_CONTRACT_OFFLINE") == "1":
                pytest.skip(msg)
            pytest.fail(msg)
    digest = _sha256(path)
    if digest != pin["sha256"]:
        pytest.fail(f"{path}: sha256 {digest}, pinned {pin['sha256']} (vllm_sdists.json)")
    return path


def vllm_source(pin: dict) -> Path:
    """A directory holding the ``vllm`` package (its .py files) of one pinned release, cached."""
    out = cache_root() / pin["version"]
    stamp = out / "SHA256"
    if stamp.is_file() and stamp.read_text().strip() == pin["sha256"]:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        sdist = _fetch(pin, tmp)
        prefix = f"vllm-{pin['version']}/"
        tree = tmp / "tree"
        with tarfile.open(sdist) as tar:
            for m in tar:
                rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
                if (
                    m.isfile()
                    and rel
                    and rel.startswith("vllm/")
                    and rel.endswith(".py")
                    and ".." not in Path(rel).parts
                ):
                    target = tree / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        (tree / "SHA256").write_text(pin["sha256"] + "\n")  # last: a cache without it is rebuilt
        if out.exists():
            shutil.rmtree(out)
        tree.rename(out)
    return out


def test_pins_cover_the_supported_range():
    versions = [p["version"] for p in PINS]
    assert versions[0] == api.SUPPORTED_MIN and versions[-1] == api.SUPPORTED_MAX
    minors = [tuple(map(int, v.split(".")[:2])) for v in versions]
    assert minors == [(0, m) for m in range(minors[0][1], minors[-1][1] + 1)], "one release per minor version"
    assert all(
        re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) and p["url"].endswith(f"vllm-{p['version']}.tar.gz") for p in PINS
    )


@pytest.mark.parametrize("pin", PINS, ids=[p["version"] for p in PINS])
def test_vllm_release_has_everything_the_plugin_uses(pin):
    src = vllm_source(pin)
    assert contract.Source(str(src)).version() == pin["version"]
    problems = contract.check(str(src), pin["version"])
    assert problems == [], "\n".join(problems)


def test_installed_vllm_has_everything_the_plugin_uses():
    root = contract.installed_root()
    if root is None:
        pytest.skip("vLLM is not installed here (the pinned releases are checked above)")
    version = api.installed_vllm_version()
    problems = contract.check(root, version)
    assert problems == [], "\n".join(problems)


# ---- the checker fails when vLLM changes: each edit of a real source must be reported ----
NEWEST = PINS[-1]


@pytest.fixture(scope="module")
def newest_copy(tmp_path_factory):
    """A copy of the newest pinned release to edit; it starts with no problem, and every test puts back what
    it edits (checked once here: the check reads a large part of vLLM's tree, so each edit runs it once)."""
    dst = tmp_path_factory.mktemp("vllm") / "src"
    shutil.copytree(vllm_source(NEWEST), dst)
    assert contract.check(str(dst), NEWEST["version"]) == []
    return dst


def _edit(root: Path, module: str, old: str, new: str) -> str:
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))
    return text


# (what vLLM might change, module, old text, new text, words the problem report must contain)
EDITS = [
    (
        "endpoint group renamed",
        "vllm.plugins",
        'ENDPOINT_PLUGINS_GROUP = "vllm.endpoint_plugins"',
        'ENDPOINT_PLUGINS_GROUP = "vllm.api_plugins"',
        ["ENDPOINT_PLUGINS_GROUP", "vllm.api_plugins"],
    ),
    (
        "collective_rpc drops args",
        "vllm.v1.engine.async_llm",
        '        args: tuple = (),\n        kwargs: dict | None = None,\n    ):\n        """Perform a collective RPC',
        '        kwargs: dict | None = None,\n    ):\n        """Perform a collective RPC',
        ["AsyncLLM.collective_rpc", "no keyword parameter 'args'"],
    ),
    (
        "reset_prefix_cache renamed",
        "vllm.engine.protocol",
        "async def reset_prefix_cache(",
        "async def reset_kv_prefix_cache(",
        ["EngineClient.reset_prefix_cache", "not defined"],
    ),
    (
        "update_weight_version made sync",
        "vllm.v1.engine.async_llm",
        "    async def update_weight_version(",
        "    def update_weight_version(",
        ["AsyncLLM.update_weight_version", "not async"],
    ),
    (
        "init_state takes a new required argument",
        "vllm.plugins.endpoint_plugins.interface",
        'self, engine_client: "EngineClient | None", state: State, args: Namespace\n    ) -> None:',
        'self, engine_client: "EngineClient | None", state: State, args: Namespace, tasks\n    ) -> None:',
        ["EndpointPlugin.init_state", "requires parameter 'tasks'"],
    ),
    (
        "plugins no longer attached",
        "vllm.plugins.endpoint_plugins.interface",
        "        plugin.attach_router(app)",
        "        pass",
        ["attach_router", "no call"],
    ),
    (
        "worker extension no longer mixed in",
        "vllm.v1.worker.worker_base",
        "__bases__",
        "__mro_extra__",
        ["WorkerWrapperBase.init_worker", "__bases__"],
    ),
    (
        "prefix caching flag renamed",
        "vllm.config.cache",
        "    enable_prefix_caching: bool = True",
        "    prefix_caching: bool = True",
        ["CacheConfig.enable_prefix_caching", "not defined"],
    ),
    (
        "get_model removed",
        "vllm.v1.worker.gpu_model_runner",
        "    def get_model(self) -> nn.Module:",
        "    def model_module(self) -> nn.Module:",
        ["GPUModelRunner.get_model", "not defined"],
    ),
    (
        "vLLM routes /checkpoint itself",
        "vllm.entrypoints.serve.instrumentator.health",
        '@router.get("/health"',
        '@router.get("/checkpoint"',
        ["vllm/entrypoints/serve/instrumentator/health.py uses '/checkpoint'"],
    ),
]


@pytest.mark.parametrize("what,module,old,new,words", EDITS, ids=[e[0] for e in EDITS])
def test_checker_reports_a_changed_vllm(newest_copy, what, module, old, new, words):
    original = _edit(newest_copy, module, old, new)
    try:
        problems = contract.check(str(newest_copy), NEWEST["version"])
    finally:
        path = newest_copy / (module.replace(".", "/") + ".py")
        (path if path.exists() else newest_copy / module.replace(".", "/") / "__init__.py").write_text(original)
    assert len(problems) >= 1 and any(all(w in p for w in words) for p in problems), problems


def test_since_skips_definitions_newer_than_the_version(newest_copy):
    # update_weight_version exists from 0.27.0: required there, not in 0.26.
    original = _edit(
        newest_copy, "vllm.engine.protocol", "async def update_weight_version(", "async def set_weight_label("
    )
    try:
        assert any("EngineClient.update_weight_version" in p for p in contract.check(str(newest_copy), "0.27.0"))
        assert not any("update_weight_version" in p for p in contract.check(str(newest_copy), "0.26.0"))
    finally:
        (newest_copy / "vllm/engine/protocol.py").write_text(original)


def test_contract_cli(newest_copy):
    env = ENV
    r = subprocess.run(
        [sys.executable, "-m", "livetrain.vllm.contract", str(newest_copy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0 and f"vLLM {NEWEST['version']} at" in r.stdout and "0 problems" in r.stdout, (
        r.stdout + r.stderr
    )


# ---- the plugin's side of the contract ----
def test_only_the_adapter_imports_vllm_and_it_declares_what_it_imports():
    declared = {(a.module, a.name) for a in api.RELIED_ON if isinstance(a.module, str)}
    for path in sorted(PLUGIN.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = (
                [(a.name, None) for a in node.names]
                if isinstance(node, ast.Import)
                else [(node.module, a.name) for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for mod, name in mods:
                if mod == "vllm" or (mod or "").startswith("vllm."):
                    assert path.name == "api.py", f"{path.name} imports {mod}: only api.py may touch vLLM"
                    assert (mod, name) in declared, f"api.py imports {mod}.{name} without declaring it in RELIED_ON"


def test_entry_points_match_the_groups_vllm_loads():
    tomllib = pytest.importorskip("tomllib")
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps[api.GENERAL_PLUGINS_GROUP] == {"livetrain": "livetrain.vllm:register"}
    assert eps[api.ENDPOINT_PLUGINS_GROUP] == {"livetrain": "livetrain.vllm.endpoint:EndpointPlugin"}
    import importlib

    for target in (t for group in eps.values() for t in group.values()):
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_general_plugin_is_idempotent_and_imports_neither_torch_nor_vllm():
    code = (
        "import sys, livetrain.vllm as v\n"
        "v.register(); v.register()\n"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
