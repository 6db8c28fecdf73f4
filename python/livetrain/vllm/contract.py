"""Checks a vLLM source tree against ``livetrain.vllm.api.RELIED_ON`` by parsing it (``ast``): nothing is
imported or run, so it works on a CPU machine, on an sdist, or on an installed vLLM of any build.

usage: python -m livetrain.vllm.contract [SRC_DIR] [--version V]
  SRC_DIR holds the ``vllm`` package (an unpacked sdist, or site-packages); without it the installed vLLM
  is checked (found without importing it). Exit 0 when every relied-on definition is there.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from typing import Iterable

from livetrain.vllm.api import RELIED_ON, Api, version_at_least


class Source:
    """A vLLM source tree: files parsed on demand and kept."""

    def __init__(self, root: str):
        self.root = root
        if not os.path.isdir(os.path.join(root, "vllm")):
            raise FileNotFoundError(f"{root}: no vllm package directory in it")
        self._trees: dict[str, ast.Module] = {}

    def path(self, module: str) -> str | None:
        base = os.path.join(self.root, *module.split("."))
        for p in (os.path.join(base, "__init__.py"), base + ".py"):
            if os.path.isfile(p):
                return p
        return None

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            with open(path, encoding="utf-8") as f:
                self._trees[path] = ast.parse(f.read(), filename=path)
        return self._trees[path]

    def files_containing(self, package: str, text: str) -> Iterable[str]:
        top = os.path.join(self.root, *package.split("."))
        for d, dirs, files in os.walk(top):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    p = os.path.join(d, f)
                    with open(p, encoding="utf-8", errors="replace") as fh:
                        if text in fh.read():
                            yield p

    def version(self) -> str | None:
        """The version from vllm/_version.py (written by setuptools-scm into sdists and wheels)."""
        p = os.path.join(self.root, "vllm", "_version.py")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                m = re.search(r"""^__version__\s*=[^'"\n]*['"]([^'"]+)['"]""", f.read(), re.M)
            if m:
                return m.group(1)
        return None


def _top(tree: ast.Module, name: str):
    """A module-level class, function or assignment named ``name``."""
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
    return None


def _find(src: Source, api: Api):
    """(node, path) of ``api.name`` in the first of its modules that defines it; node None if none does."""
    modules = (api.module,) if isinstance(api.module, str) else api.module
    first = None
    for module in modules:
        path = src.path(module)
        if path is None:
            continue
        first = first or path
        tree = src.tree(path)
        if not api.name:
            return tree, path
        owner, _, member = api.name.rpartition(".")
        if not owner:
            node = _top(tree, member)
            if node is not None:
                return node, path
            continue
        cls = _top(tree, owner)
        if not isinstance(cls, ast.ClassDef):
            continue
        node = _member(cls, member, api.kind == "attr")
        if node is not None:
            return node, path
    return None, first


def _member(cls: ast.ClassDef, name: str, attribute: bool):
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if (
            attribute
            and isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
        ):
            return node
        if (
            attribute
            and isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ):
            return node
    if attribute:  # self.name = ... in a method
        for node in ast.walk(cls):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for t in targets:
                if (
                    isinstance(t, ast.Attribute)
                    and t.attr == name
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                ):
                    return node
    return None


def _where(api: Api) -> str:
    return api.module if isinstance(api.module, str) else " or ".join(api.module)


def _check_signature(api: Api, fn) -> list[str]:
    problems = []
    if api.is_async is not None and isinstance(fn, ast.AsyncFunctionDef) != api.is_async:
        problems.append(
            f"is {'not ' if api.is_async else ''}async, livetrain "
            f"{'awaits' if api.is_async else 'calls'} it {'' if api.is_async else 'without await'}"
        )
    a = fn.args
    positional = [x.arg for x in a.posonlyargs + a.args]
    if positional and positional[0] in ("self", "cls") and "." in api.name:
        positional = positional[1:]
    n_defaults = len(a.defaults)
    required_pos = positional[: len(positional) - n_defaults] if n_defaults else positional
    if len(api.params) > len(positional) and a.vararg is None:
        problems.append(
            f"takes {len(positional)} positional parameters ({', '.join(positional)}); livetrain passes "
            f"{len(api.params)} ({', '.join(api.params)})"
        )
    for i, want in enumerate(api.params):
        if i < len(positional) and positional[i] != want:
            problems.append(f"positional parameter {i + 1} is {positional[i]!r}, expected {want!r}")
    named = set(positional[len(api.params) :]) | {x.arg for x in a.kwonlyargs}
    posonly = {x.arg for x in a.posonlyargs}
    for kw in api.keywords:
        if (kw not in named or kw in posonly) and a.kwarg is None:
            problems.append(f"has no keyword parameter {kw!r}")
    passed = set(api.params) | set(api.keywords)
    for name in required_pos[len(api.params) :]:
        if name not in passed:
            problems.append(f"requires parameter {name!r}, which livetrain does not pass")
    for x, default in zip(a.kwonlyargs, a.kw_defaults):
        if default is None and x.arg not in passed:
            problems.append(f"requires keyword parameter {x.arg!r}, which livetrain does not pass")
    return problems


def _words(node) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
    return out


def _check_call(src: Source, api: Api) -> list[str]:
    for path in src.files_containing(api.module, f".{api.name}("):
        tree = src.tree(path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not set(api.words) <= _words(fn):
                continue
            awaited = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Await)}
            for n in ast.walk(fn):
                if (
                    isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute)
                    and n.func.attr == api.name
                    and len(n.args) == api.nargs
                    and not any(isinstance(x, ast.Starred) for x in n.args)
                    and not n.keywords
                    and (not api.awaited or id(n) in awaited)
                ):
                    return []
    how = f"{'await ' if api.awaited else ''}<obj>.{api.name}({', '.join(['_'] * api.nargs)})"
    near = f" in a function that mentions {', '.join(api.words)}" if api.words else ""
    return [f"{api}: no call {how}{near} anywhere in {api.module} ({api.why})"]


def _check_unused(src: Source, api: Api) -> list[str]:
    problems = []
    for word in api.words:
        for path in src.files_containing(api.module, word):
            if any(isinstance(n, ast.Constant) and n.value == word for n in ast.walk(src.tree(path))):
                problems.append(f"{api}: {os.path.relpath(path, src.root)} uses {word!r} ({api.why})")
    return problems


def check_api(src: Source, api: Api) -> list[str]:
    """Problems with one relied-on definition in this source tree (empty: it is there as livetrain uses it)."""
    if api.kind == "call":
        return _check_call(src, api)
    if api.kind == "unused":
        return _check_unused(src, api)
    node, path = _find(src, api)
    if path is None:
        return [f"{api}: module {_where(api)} does not exist ({api.why})"]
    if node is None:
        return [f"{api}: {api.name} is not defined in {_where(api)} ({api.why})"]
    if api.kind == "const":
        value = None
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            value = node.value.value
        return [] if value == api.value else [f"{api}: is {value!r}, livetrain expects {api.value!r} ({api.why})"]
    if api.kind == "attr":
        return []
    if api.kind == "method":
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return [f"{api}: is not a function ({api.why})"]
        return [f"{api}: {p} ({api.why})" for p in _check_signature(api, node)]
    if api.kind == "mentions":
        missing = [w for w in api.words if w not in _words(node)]
        return [f"{api}: does not mention {', '.join(missing)} ({api.why})"] if missing else []
    raise ValueError(f"unknown kind {api.kind!r}")


def check(root: str, version: str | None = None, apis: Iterable[Api] = RELIED_ON) -> list[str]:
    """Every problem found in the vLLM source tree under ``root`` for ``version`` (default: the tree's own
    version); definitions whose ``since`` is newer than the version are not required."""
    src = Source(root)
    version = version or src.version()
    if version is None:
        raise ValueError(f"{root}: cannot tell the vLLM version (no vllm/_version.py); pass it explicitly")
    problems = []
    for api in apis:
        if version_at_least(version, api.since):
            problems += check_api(src, api)
    return problems


def installed_root() -> str | None:
    """The directory holding the installed ``vllm`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m livetrain.vllm.contract", description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", help="directory holding the vllm package (default: the installed vLLM)")
    p.add_argument("--version", help="the vLLM version of that tree (default: from vllm/_version.py)")
    a = p.parse_args(argv)
    root = a.root or installed_root()
    if root is None:
        print("vLLM is not installed here; pass the directory of an unpacked vLLM source", file=sys.stderr)
        return 2
    if a.version is None:
        from livetrain.vllm.api import installed_vllm_version

        a.version = Source(root).version() or (installed_vllm_version() if a.root is None else None)
    problems = check(root, a.version)
    for line in problems:
        print(line)
    print(f"vLLM {a.version} at {root}: {len(RELIED_ON)} definitions checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
