"""Shared fixtures: the `device` parametrization and RNG seeding.

Tests marked `cuda` (and the "cuda" value of the `device` fixture) are skipped
unless a GPU is present and hvae_fast was built with its CUDA kernels.
"""
import pytest
import torch

import hvae_fast


def cuda_ready():
    return torch.cuda.is_available() and bool(hvae_fast.build_info().get("cuda_kernels"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a GPU and hvae_fast's CUDA kernels")


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
