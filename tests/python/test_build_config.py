"""The build refuses what would give a wheel without working CUDA kernels (CMakeLists.txt, issue #17): a build
that finds no nvcc fails unless LIVETRAIN_ALLOW_NO_CUDA (which the wheel's build leaves off), and a CMake older
than 3.31, which cannot compile the CUDA code with nvcc 13, is refused naming the version to use. Only CMake's
configure step runs, in a temporary directory."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
VENV_CMAKE = Path(sys.executable).parent / "cmake"


def configure(cmake, build_dir, *defines, env=None):
    return subprocess.run(
        [
            str(cmake),
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DLIVETRAIN_PYTHON=OFF",
            "-DLIVETRAIN_TESTS=OFF",
            *defines,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_the_wheel_build_allows_no_build_without_cuda():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    define = meta["tool"]["scikit-build"]["cmake"]["define"]["LIVETRAIN_ALLOW_NO_CUDA"]
    assert define == {"env": "LIVETRAIN_ALLOW_NO_CUDA", "default": "OFF"}
    assert meta["tool"]["scikit-build"]["cmake"]["version"] == ">=3.31"


@pytest.mark.skipif(not VENV_CMAKE.exists(), reason="no cmake beside this Python (scripts/setup.sh installs it)")
def test_no_nvcc_fails_unless_allowed(tmp_path):
    # CUDACXX names a "compiler" that cannot compile anything: CMake finds no CUDA compiler, as without nvcc.
    env = {"PATH": "/usr/bin:/bin", "CUDACXX": "/bin/false", "HOME": str(tmp_path)}
    r = configure(VENV_CMAKE, tmp_path / "refused", "-DLIVETRAIN_ALLOW_NO_CUDA=OFF", env=env)
    assert r.returncode != 0
    message = " ".join(r.stderr.split())
    assert "no CUDA compiler (nvcc) was found, so this core would have no CUDA kernels" in message, r.stderr
    assert "LIVETRAIN_ALLOW_NO_CUDA=1" in message
    r = configure(VENV_CMAKE, tmp_path / "allowed", "-DLIVETRAIN_ALLOW_NO_CUDA=ON", env=env)
    assert r.returncode == 0, r.stderr
    assert "livetrain: CUDA OFF" in r.stdout


@pytest.mark.skipif(not VENV_CMAKE.exists(), reason="no cmake beside this Python (scripts/setup.sh installs it)")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_release_wheel_configures_every_gpu_code_with_the_cuda_runtime_static(tmp_path):
    # CI builds its wheel without CUDA (scripts/wheel.sh --ci; the main build compiles the CUDA code): the
    # release wheel's configuration is checked here instead, as pyproject.toml sets it (no tests, not in
    # place, no CPU-only fallback, Release, the default architectures), through CMake's configure step.
    defines = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]["cmake"]["define"]
    assert defines["LIVETRAIN_TESTS"] == "OFF" and defines["LIVETRAIN_INPLACE"] == "OFF"
    assert defines["LIVETRAIN_CUDA_GENCODE"] == {"env": "LIVETRAIN_CUDA_GENCODE", "default": ""}
    build = tmp_path / "release"
    r = configure(
        VENV_CMAKE, build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={VENV_CMAKE.parent / 'ninja'}",
        "-DCMAKE_BUILD_TYPE=Release", "-DLIVETRAIN_ALLOW_NO_CUDA=OFF", "-DLIVETRAIN_CUDA_GENCODE=",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "livetrain: CUDA ON sm_80 sm_90a sm_100 compute_100" in r.stdout, r.stdout
    ninja = (build / "build.ninja").read_text()
    link = next(line for line in ninja.splitlines() if line.startswith("build livetrain:"))
    assert "apollo.cu.o" in ninja and "sm_90a" in ninja, "the CUDA kernels are not compiled"
    # Only the NVIDIA driver needed where the wheel is installed: the CUDA runtime is linked statically.
    libs = ninja[ninja.index(link) :].split("\n  LINK_LIBRARIES = ", 1)[1].split("\n", 1)[0]
    assert "libcudart_static.a" in libs and "libcudart.so" not in libs, libs


def old_cmake():
    """A CMake older than 3.31 on PATH (Debian 12's 3.25), or None."""
    for candidate in ("/usr/bin/cmake", shutil.which("cmake")):
        if candidate and Path(candidate).exists():
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            m = re.search(r"version (\d+)\.(\d+)", out)
            if m and (int(m[1]), int(m[2])) < (3, 31):
                return candidate
    return None


@pytest.mark.skipif(old_cmake() is None or shutil.which("nvcc") is None, reason="needs nvcc and a CMake < 3.31")
def test_an_old_cmake_is_refused_when_nvcc_is_there(tmp_path):
    r = configure(old_cmake(), tmp_path / "old")
    assert r.returncode != 0
    message = " ".join(r.stderr.split())
    assert re.search(r"CMake 3\.\d+\.\d+ cannot compile the CUDA code with \S*nvcc; use CMake >= 3\.31", message), (
        r.stderr
    )
