"""Smoke check: every hvae_fast op in every dtype of the device, forward and backward, against
hvae_fast.reference in float64 on the CPU, on the same (rounded) inputs.

    python tools/gpu_smoke.py [--rehearse]

Prints one line per case, then one summary line per op, "smoke: <op>: ok ..." or
"smoke: <op>: FAILED ...", and exits 1 if a case failed. The error of a case is the largest
||out - ref|| / ||ref|| over its outputs and gradients (NaN fails). tools/gpu_session.sh runs it
with CUDA_LAUNCH_BLOCKING=1, so that a kernel's error is reported at its own launch, and again
under compute-sanitizer memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1. Sizes are small (the
sanitizer slows kernels down a hundredfold) but cover several blocks and odd tails.

--rehearse: on the CPU (its kernels: float32 and float64), through the same Device as
benchmarks/gpu_quick.py (torch.cuda's calls stood in for).
"""
import argparse
import os
import signal
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from gpu_quick import Device  # noqa: E402
from hvae_fast import ops, reference  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
RAW = torch.ops.hvae_fast


def randn(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def randint(gen, high, *shape):
    return torch.randint(0, high, shape, generator=gen)


# Each case: (op, label, make) with make(gen) -> (inputs as float64/int CPU tensors, which of them
# are differentiable, fast(*inputs), ref(*inputs)). The harness casts the float inputs to the dtype
# and device for fast, and gives ref the same rounded values in float64 on the CPU.

def posterior(shape, prior, noise):
    def make(gen):
        ts = [randn(gen, *shape), randn(gen, *shape, scale=3.0)]  # delta_logvar often beyond the clamp
        ts += [randn(gen, *shape)] if noise else []
        ts += [randn(gen, *shape), randn(gen, *shape, scale=0.5)] if prior else []
        diff = [True, True] + ([False] if noise else []) + ([True, True] if prior else [])

        def call(module):
            def f(dmu, dlv, *rest):
                eps, rest = (rest[0], rest[1:]) if noise else (None, rest)
                mu_p, lvp = rest if prior else (None, None)
                kw = {} if noise else dict(generator=torch.Generator().manual_seed(7))
                return module.posterior_sample(dmu, dlv, eps, mu_p, lvp, **kw)
            return f

        return ts, diff, call(ops), call(reference)

    label = f"{'x'.join(map(str, shape))} {'prior' if prior else 'top'} {'eps given' if noise else 'eps=None'}"
    return "posterior_sample", label, make


def categorical(shape, overwrite, x_float):
    def make(gen):
        x = randint(gen, shape[-1], *shape[:-1])
        fast = (lambda lg, x: ops.categorical_log_likelihood(lg.mul(1), x, overwrite_logits=True)) if overwrite \
            else ops.categorical_log_likelihood
        return [randn(gen, *shape, scale=3.0), x.double() if x_float else x], [True, False], \
            fast, reference.categorical_log_likelihood

    return "categorical_log_likelihood", f"{'x'.join(map(str, shape))}{' in place' if overwrite else ''}", make


def bernoulli(shape):
    def make(gen):
        return [randn(gen, *shape, scale=3.0), randint(gen, 2, *shape).double()], [True, False], \
            ops.bernoulli_log_likelihood, reference.bernoulli_log_likelihood

    return "bernoulli_log_likelihood", "x".join(map(str, shape)), make


def linear_head(B, H, D, K, bias):
    def make(gen):
        ts = [randn(gen, B, H), randn(gen, D * K, H, scale=H ** -0.5), randn(gen, D * K) if bias else None,
              randint(gen, K, B, D)]
        return ts, [True, True, bias, False], ops.linear_categorical_log_likelihood, \
            reference.linear_categorical_log_likelihood

    return "linear_categorical_log_likelihood", f"h [{B},{H}] D={D} K={K}{'' if bias else ' no bias'}", make


def pixel_head(B, C, channels, H, W, K, bias):
    def make(gen):
        ts = [randn(gen, B, C, H, W), randn(gen, channels * K, C, scale=C ** -0.5),
              randn(gen, channels * K) if bias else None, randint(gen, K, B, channels, H, W)]
        return ts, [True, True, bias, False], ops.pixel_categorical_log_likelihood, \
            reference.pixel_categorical_log_likelihood

    return "pixel_categorical_log_likelihood", f"[{B},{C},{H},{W}] channels={channels} K={K}", make


def adamax(shapes):
    def make(gen):
        n = len(shapes)
        ts = [randn(gen, *s) for s in shapes] + [randn(gen, *s) for s in shapes] + \
             [randn(gen, *s, scale=0.1) for s in shapes] + [randn(gen, *s).abs() for s in shapes]
        neg_clrs = [-1e-3 * (j + 1) for j in range(n)]

        def step(module):
            def f(*ts):
                p, g, m, u = ([t.detach().clone() for t in ts[i * n:(i + 1) * n]] for i in range(4))
                module.adamax_(p, g, m, u, neg_clrs, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
                return tuple(p + m + u)
            return f

        return ts, [False] * len(ts), step(ops), step(reference)

    return "adamax_", " ".join("x".join(map(str, s)) for s in shapes), make


def dmol(B, C, H, W, M, num_vals):
    def make(gen):
        P = M * (1 + 2 * C + C * (C - 1) // 2)
        ts = [randn(gen, B, P, H, W), randint(gen, num_vals, B, C, H, W).to(torch.uint8)]

        def call(module):
            return lambda p, x: module.dmol_log_likelihood(p, x, num_mixtures=M, num_vals=num_vals)

        return ts, [True, False], call(ops), call(reference)

    return "dmol_log_likelihood", f"[{B},{C},{H},{W}] M={M} num_vals={num_vals}", make


CASES = [posterior((3, 37), False, True), posterior((2, 3, 70), True, True), posterior((5, 1000), True, False),
         posterior((3, 65), False, False),
         categorical((3, 70, 17), False, False), categorical((2, 5, 256), False, True),
         categorical((4, 3, 1000), True, False),
         bernoulli((3, 500)), bernoulli((2, 3, 4, 5)),
         linear_head(4, 16, 5, 17, True), linear_head(3, 8, 7, 256, False),
         pixel_head(2, 8, 1, 5, 6, 17, True), pixel_head(2, 4, 3, 3, 5, 256, False),
         adamax([(3, 5), (1000,), (7,)]),
         dmol(2, 3, 5, 7, 4, 256), dmol(3, 1, 9, 4, 10, 16)]


def run_case(dev, dtype, make, seed):
    """The case's worst relative error over outputs and gradients."""
    gen = torch.Generator().manual_seed(seed)
    ts, diff, fast, ref = make(gen)

    def cast(t, d, device, float_dtype):
        if t is None or not t.is_floating_point():
            return None if t is None else t.to(device)
        t = t.to(dtype).to(float_dtype).to(device)  # the dtype's rounding, for both sides
        return t.requires_grad_() if d else t

    a = [cast(t, d, dev.torch, dtype) for t, d in zip(ts, diff)]
    b = [cast(t, d, "cpu", torch.float64) for t, d in zip(ts, diff)]
    results = []
    for fn, args in ((fast, a), (ref, b)):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        leaves = [t for t, d in zip(args, diff) if d]
        cot_gen = torch.Generator().manual_seed(seed + 1)
        cots = [torch.randn(o.shape, generator=cot_gen, dtype=torch.float64).to(o.dtype).to(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, cots) if leaves else ()
        results.append([t.detach().to("cpu", torch.float64) for t in list(outs) + list(grads)])
    dev.synchronize()
    errs = [((x - y).norm() / y.norm().clamp_min(1e-300)).item() if x.shape == y.shape else float("inf")
            for x, y in zip(*results)]
    return max(errs) if all(e == e for e in errs) else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rehearse", action="store_true", help="on the CPU, through the CPU stand-ins")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the caller's shell ignores SIGINT
    dev = Device(args.rehearse)
    dtypes = (torch.float32, torch.float64) + dev.size((torch.float16, torch.bfloat16), ())
    import hvae_fast
    info = hvae_fast.build_info()
    print(f"smoke check on {dev.name()}, torch {torch.__version__}, dtypes {[str(d)[6:] for d in dtypes]}, "
          f"CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING')}, PYTORCH_NO_CUDA_MEMORY_CACHING="
          f"{os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING')}, hvae_fast kernels loaded {info['loaded']}, "
          f"CUDA kernels {info.get('cuda_kernels')} (sm {info.get('cuda_arch')})", flush=True)
    summary, t0 = {}, time.perf_counter()
    for i, (op, label, make) in enumerate(CASES):
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            s = summary.setdefault(op, dict(cases=0, worst={}, failed=[]))
            s["cases"] += 1
            try:
                err = run_case(dev, dtype, make, seed=100 * i)
                ok = err <= TOL[dtype]
                line = f"{err:.1e} ({'ok' if ok else 'OVER'} tol {TOL[dtype]:.0e})"
                s["worst"][name] = max(s["worst"].get(name, 0.0), err)
            except Exception as e:  # a failing case must not hide the others
                ok, line = False, f"ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                traceback.print_exc()
            if not ok:
                s["failed"].append(f"{label} {name}: {line}")
            print(f"  {op} [{label}] {name}: {line}", flush=True)
    for op, s in summary.items():
        worst = ", ".join(f"{d} {e:.1e}" for d, e in s["worst"].items())
        status = "ok" if not s["failed"] else f"FAILED {len(s['failed'])} ({'; '.join(s['failed'])[:400]})"
        print(f"smoke: {op}: {status}; {s['cases']} cases, worst error per dtype: {worst}")
    failed = sum(len(s["failed"]) for s in summary.values())
    print(f"smoke: {'all ok' if not failed else f'{failed} FAILED'}: {len(summary)} ops, "
          f"{sum(s['cases'] for s in summary.values())} cases in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
