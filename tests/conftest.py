"""Shared fixtures: the `device` parametrization and RNG seeding.

Tests marked `cuda` (and the "cuda" value of the `device` fixture) are skipped
unless a GPU is present and hvae_fast was built with its CUDA kernels.

A session refuses to start when the compiled kernels did not load (every kernel test
would compare the reference with itself), or when a GPU is present and the build has no
CUDA kernels, unless asked for: HVAE_FAST_DISABLE_EXTENSION=1, HVAE_FAST_CUDA=0. It
ends with one line saying which kernels ran.
"""
import os

import pytest
import torch

import hvae_fast


def cuda_ready():
    return torch.cuda.is_available() and bool(hvae_fast.build_info().get("cuda_kernels"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU and hvae_fast's CUDA kernels")


def kernels_problem(info, cuda_available, env):
    """Why a test session must not run with this build, or None."""
    if not info["loaded"] and env.get("HVAE_FAST_DISABLE_EXTENSION") != "1":
        return (f"hvae_fast's compiled kernels are not loaded ({info['why_not_loaded']}), so every kernel test "
                "would compare the reference with itself. Rebuild with `pip install --no-build-isolation -e .`, "
                "or set HVAE_FAST_DISABLE_EXTENSION=1 to test the pure-PyTorch path on purpose.")
    if info["loaded"] and cuda_available and not info.get("cuda_kernels") and env.get("HVAE_FAST_CUDA") != "0":
        return ("a GPU is present but hvae_fast was built without its CUDA kernels, so the CUDA tests would be "
                "skipped. Rebuild with a CUDA torch and nvcc (HVAE_FAST_CUDA=1 makes the build fail if it cannot), "
                "or set HVAE_FAST_CUDA=0 to test the CPU kernels only on purpose.")
    return None


def pytest_sessionstart(session):
    problem = kernels_problem(hvae_fast.build_info(), torch.cuda.is_available(), os.environ)
    if problem:
        raise pytest.UsageError(problem)


def kernels_line(info, cpu_calls, cuda_passed):
    """One line: the build, and the kernels the session ran."""
    if not info["loaded"]:
        return f"hvae_fast kernels: none loaded ({info['why_not_loaded']}); the tests ran the reference"
    cpu = ", ".join(f"{level} {n}" for level, n in cpu_calls.items())
    if info.get("cuda_kernels"):
        cuda = f"CUDA {info['cuda_version']} sm {info['cuda_arch']}: {cuda_passed} GPU tests passed" \
            if torch.cuda.is_available() else f"CUDA {info['cuda_version']} built, no GPU: not run"
    else:
        cuda = "CUDA not built"
    return (f"hvae_fast kernels: torch {info['torch_version']}, CPU levels built {'/'.join(info['cpu_levels'])}, "
            f"calls per level: {cpu}; {cuda}")


def pytest_terminal_summary(terminalreporter):
    info = hvae_fast.build_info()
    calls = hvae_fast._C.cpu_kernel_calls() if info["loaded"] else {}
    cuda_passed = sum(1 for r in terminalreporter.stats.get("passed", []) if "cuda" in r.keywords)
    terminalreporter.write_line(kernels_line(info, calls, cuda_passed))


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a GPU and hvae_fast built with CUDA kernels")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the training tests: small networks, busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
