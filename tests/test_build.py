"""The build switches and the import-time checks of the compiled extension."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import hvae_fast
from hvae_fast import _extension

ROOT = Path(__file__).resolve().parents[1]


def run_setup(env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bad_cuda_switch_is_refused():
    r = run_setup({"HVAE_FAST_CUDA": "maybe"})
    assert r.returncode != 0
    assert "HVAE_FAST_CUDA must be auto, 1 or 0" in r.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_cuda_required_with_cpu_torch_fails_clearly():
    r = run_setup({"HVAE_FAST_CUDA": "1"})
    assert r.returncode != 0
    assert "CPU-only build" in r.stderr or "nvcc was not found" in r.stderr


def test_cuda_required_without_nvcc_fails_clearly(tmp_path):
    r = run_setup({"HVAE_FAST_CUDA": "1", "PATH": str(tmp_path) + os.pathsep + os.path.dirname(sys.executable),
                   "CUDA_HOME": str(tmp_path / "none")})
    assert r.returncode != 0
    # /usr/local/cuda may still hold a toolkit; then the CPU torch is what is refused
    assert "nvcc was not found" in r.stderr or "CPU-only build" in r.stderr


def test_build_info_reports_the_build():
    info = hvae_fast.build_info()
    assert info["loaded"] == hvae_fast.extension_available()
    if info["loaded"]:
        assert info["torch_version"] == torch.__version__
        assert isinstance(info["cuda_kernels"], bool)
        assert info["cpu_levels"][0] == "generic"
        assert set(info["cpu_levels"]) <= {"generic", "avx2", "avx512"}
        assert info["cpu_level"] in info["cpu_levels_supported"]
        assert set(info["cpu_levels_supported"]) <= set(info["cpu_levels"])
        # without OpenMP in the build, at::parallel_for in the kernels runs on one thread
        assert info["openmp"] == (torch.backends.openmp.is_available() and sys.platform.startswith("linux"))
    else:
        assert info["why_not_loaded"]


def test_torch_mismatch_is_named_not_an_undefined_symbol(tmp_path, monkeypatch):
    info_file = tmp_path / "_build_info.json"
    info_file.write_text(json.dumps({"torch_version": "1.0.0", "cpu_levels": ["generic"]}))
    monkeypatch.setattr(_extension, "_INFO_FILE", info_file)
    info, why = _extension.load()
    assert info["torch_version"] == "1.0.0"
    assert "built for torch 1.0.0" in why and torch.__version__ in why and "--no-build-isolation" in why


@pytest.mark.parametrize("content, message", [(None, "without its compiled extension"),
                                              ("{not json", "unreadable")])
def test_missing_or_corrupt_build_info(tmp_path, monkeypatch, content, message):
    info_file = tmp_path / "_build_info.json"
    if content is not None:
        info_file.write_text(content)
    monkeypatch.setattr(_extension, "_INFO_FILE", info_file)
    assert message in _extension.load()[1]


def test_disable_switch(monkeypatch):
    monkeypatch.setenv("HVAE_FAST_DISABLE_EXTENSION", "1")
    assert "HVAE_FAST_DISABLE_EXTENSION" in _extension.load()[1]


LOADED = {"loaded": True, "why_not_loaded": None, "cuda_kernels": False, "torch_version": torch.__version__,
          "cpu_levels": ["generic"]}
MISSING = {"loaded": False, "why_not_loaded": "hvae_fast._C failed to load (undefined symbol)"}


@pytest.mark.parametrize("info, cuda, env, expected", [
    (MISSING, False, {}, "not loaded (hvae_fast._C failed to load"),
    (MISSING, False, {"HVAE_FAST_DISABLE_EXTENSION": "1"}, None),
    (LOADED, True, {}, "a GPU is present but hvae_fast was built without its CUDA kernels"),
    (LOADED, True, {"HVAE_FAST_CUDA": "0"}, None),
    (LOADED, False, {}, None),
    ({**LOADED, "cuda_kernels": True}, True, {}, None),
])
def test_a_session_without_the_kernels_refuses_to_start(info, cuda, env, expected):
    from conftest import kernels_problem
    problem = kernels_problem(info, cuda, env)
    assert (problem is None) if expected is None else (expected in problem)


def test_a_session_reports_the_kernels_it_ran():
    from conftest import kernels_line
    assert "the tests ran the reference" in kernels_line(MISSING, {}, 0)
    line = kernels_line({**LOADED, "cpu_levels": ["generic", "avx2"]}, {"generic": 3, "avx2": 120}, 0)
    assert "CPU levels built generic/avx2" in line and "generic 3, avx2 120" in line and "CUDA not built" in line


@pytest.mark.skipif(not hvae_fast.extension_available(), reason="hvae_fast._C is not loaded")
def test_kernel_calls_are_counted_at_the_active_level():
    before = hvae_fast._C.cpu_kernel_calls()
    hvae_fast.ops.bernoulli_log_likelihood(torch.zeros(2, 3), torch.ones(2, 3))
    after = hvae_fast._C.cpu_kernel_calls()
    level = hvae_fast.cpu_level()
    assert after[level] == before[level] + 1
    assert all(after[n] == before[n] for n in after if n != level)


def test_a_build_of_an_older_version_is_refused_by_name(tmp_path, monkeypatch):
    info_file = tmp_path / "_build_info.json"
    info_file.write_text(json.dumps({"torch_version": torch.__version__, "cpu_simd": "avx2"}))
    monkeypatch.setattr(_extension, "_INFO_FILE", info_file)
    info, why = _extension.load()
    assert "older hvae_fast" in why and "--no-build-isolation" in why


def test_the_sdist_ships_every_source_the_build_needs(tmp_path):
    pytest.importorskip("build")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with tarfile.open(next(tmp_path.glob("hvae_fast-*.tar.gz"))) as sdist:
        shipped = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {"csrc/formulas.h", "csrc/cpu/kernels.h", "csrc/cuda/launch.cuh"} <= sources
    assert sources - shipped == set()
    assert {"setup.py", "pyproject.toml", "README.md", "tests/conftest.py"} <= shipped
    assert "hvae_fast/_build_info.json" not in shipped  # describes the build that made it, not the next one
    models = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hvae_fast" / "checkpoints").glob("*")}
    assert "hvae_fast/checkpoints/fashion-mnist.pt" in models and models - shipped == set()  # hvae_fast.pretrained


@pytest.mark.skipif(not hvae_fast.extension_available() or shutil.which("readelf") is None,
                    reason="needs the compiled module and readelf")
def test_a_release_build_carries_no_debug_info():
    info = hvae_fast.build_info()
    if info["debug"] or info["sanitize"]:
        pytest.skip("a DEBUG=1 or sanitizer build keeps its debug info on purpose")
    sections = subprocess.run(["readelf", "-S", "-W", hvae_fast._C.__file__], capture_output=True, text=True,
                              check=True).stdout
    assert ".text" in sections and ".debug_info" not in sections


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by name: a subpackage left out is missing from the wheel
    (the sdist still ships it, and a source tree with an egg-info can hide the gap)."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hvae_fast").rglob("__init__.py")}
    assert "hvae_fast.ops" in found
    assert found == listed
