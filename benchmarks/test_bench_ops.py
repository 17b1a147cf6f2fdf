"""A few representative small cases of benchmarks/run.py for pytest-benchmark.

Run with `pytest benchmarks/ --benchmark-only`. They check the outputs are finite, never times.
"""
import pytest
import torch

import variants as V

pytest.importorskip("pytest_benchmark")

CASES = [(o, s, v) for o, s in [("categorical", "digits"), ("posterior", "tiny"), ("posterior_eps", "tiny"),
                                ("bernoulli", "mnist")] for v in V.OPS[o].variants]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op_name,size,variant", CASES, ids=[f"{o}-{s}-{v}" for o, s, v in CASES])
def test_op(benchmark, op_name, size, mode, variant):
    torch.manual_seed(0)
    op = V.OPS[op_name]
    leaves, wrt = V.make_case(op, size, "cpu", torch.float32)
    fwd, fwd_bwd, _ = V.closures(op.variants[variant], leaves, wrt)
    benchmark.group = f"{op_name}/{size}/{mode}"
    out = benchmark(fwd if mode == "fwd" else fwd_bwd)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("variant", list(V.TRAIN_VARIANTS))
def test_train_step_digits(benchmark, variant):
    v = V.TRAIN_VARIANTS[variant]
    model = V.make_model("digits", "cpu", torch.float32).train()
    model.backend = v.backend
    model.in_kernel_noise = v.in_kernel_noise
    opt = v.optimizer(model.parameters(), lr=1e-3)
    x = V.make_batches("digits", 1, "cpu", torch.float32)[0]

    def step():
        opt.zero_grad(set_to_none=True)
        out = v.loss(model, x)
        out.backward()
        opt.step()
        return out

    benchmark.group = "train/digits"
    assert torch.isfinite(benchmark(step))
