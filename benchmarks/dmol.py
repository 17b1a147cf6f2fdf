"""Time and peak memory of the discretized logistic mixture likelihood, forward + backward on the
CPU: hvae_fast.ops.dmol_log_likelihood against the eager PyTorch formulation of PixelCNN++'s
formula (as VDVAE / NVAE write it: per-channel sigmoid differences, the 1e-5 switch to the
density, the 1e-12 clamp, log-sum-exp over log_softmax(logits) + channel sums) and
torch.compile of that formulation.

    python benchmarks/dmol.py [--threads 1 2] [--reps N] [--out]

Each (variant, size, threads) runs in a fresh interpreter. Before timing, every variant's
log-likelihood and gradient are checked against the fused op's (to rounding: the data keep
every interior bin's probability above the 1e-5 switch, where both formulations are the same
function). Peak memory: the most bytes of torch CPU tensors live at once during one
forward+backward beyond the inputs, from torch.profiler's memory events (as
benchmarks/pixel_head_memory.py), against the size of the params gradient.
--out writes benchmarks/results/dmol-cpu.md.
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

SIZES = {"rgb32": (32, 3, 32, 32, 10), "gray28": (64, 1, 28, 28, 10)}  # B, C, H, W, M
VARIANTS = {
    "fused": "`ops.dmol_log_likelihood`",
    "eager": "eager PixelCNN++ formulation",
    "compiled": "`torch.compile` of the eager formulation",
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dmol-cpu.md")


def eager_dmol(params, x, M, K=256, min_log_scale=-7.0):
    """PixelCNN++'s discretized logistic mixture log-likelihood per example, written from the
    formula in eager PyTorch on hvae_fast's params layout [B, P, H, W] (logits [M], means [C, M],
    log-scales [C, M], coefficients [C(C-1)/2, M])."""
    import torch
    import torch.nn.functional as F
    B, _, H, W = params.shape
    C = x.shape[1]
    xs = (x.to(params.dtype) / (K - 1) * 2 - 1).unsqueeze(2)  # [B, C, 1, H, W]
    logits = params[:, :M]
    means = params[:, M:M + C * M].view(B, C, M, H, W)
    log_scales = torch.clamp(params[:, M + C * M:M + 2 * C * M].view(B, C, M, H, W), min=min_log_scale)
    coeffs = torch.tanh(params[:, M + 2 * C * M:].reshape(B, C * (C - 1) // 2, M, H, W))
    mean_list = [means[:, 0]]
    for c in range(1, C):
        m = means[:, c]
        for k in range(c):
            m = m + coeffs[:, c * (c - 1) // 2 + k] * xs[:, k]
        mean_list.append(m)
    means = torch.stack(mean_list, 1)
    centered = xs - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / (K - 1))
    min_in = inv_stdv * (centered - 1.0 / (K - 1))
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(
        xs < -0.999, log_cdf_plus,
        torch.where(xs > 0.999, log_one_minus_cdf_min,
                    torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                                log_pdf_mid - math.log((K - 1) / 2))))
    log_probs = log_probs.sum(1) + F.log_softmax(logits, 1)  # [B, M, H, W]
    return torch.logsumexp(log_probs, 1).sum((1, 2))


def inputs(torch, size, shape=None):
    """params (requiring grad) and x of a size of SIZES, or of shape (B, C, H, W, M) if given."""
    B, C, H, W, M = shape or SIZES[size]
    from hvae_fast import _checks
    g = torch.Generator().manual_seed(0)
    P = _checks.dmol_channels(M, C)
    params = torch.randn(B, P, H, W, generator=g) * 0.5
    params[:, M + C * M:M + 2 * C * M] = torch.rand(B, C * M, H, W, generator=g) * 2.0 - 2.5  # log-scales in [-2.5, -0.5]
    x = ((params[:, M:M + C * M:M].clamp(-1, 1) + 1) * 127.5).round().long()  # at component 0's means: every bin kind
    x.view(-1)[::11] = 0
    x.view(-1)[5::13] = 255
    return params.requires_grad_(), x, M


def run_variant(name, size, threads, reps):
    import torch
    from hvae_fast import ops
    torch.set_num_threads(threads)
    params, x, M = inputs(torch, size)
    if name == "fused":
        fn = lambda p, x: ops.dmol_log_likelihood(p, x, num_mixtures=M)  # noqa: E731
    elif name == "eager":
        fn = lambda p, x: eager_dmol(p, x, M)  # noqa: E731
    else:
        fn = torch.compile(lambda p, x: eager_dmol(p, x, M), dynamic=False)

    def step():
        ll = fn(params, x)
        (g,) = torch.autograd.grad(ll.sum(), params)
        return ll, g

    t0 = time.perf_counter()
    ll, g = step()  # compiles
    first = time.perf_counter() - t0
    p64 = params.detach().double().requires_grad_()
    ll_ref = ops.dmol_log_likelihood(p64, x, num_mixtures=M)
    (g_ref,) = torch.autograd.grad(ll_ref.sum(), p64)
    ll_err = float((ll.double() - ll_ref).abs().max() / ll_ref.abs().max())
    grad_err = float((g.double() - g_ref).abs().max() / g_ref.abs().max())
    del ll, g
    from pixel_head_memory import allocator_peak  # beside this file
    peak, _ = allocator_peak(torch, step)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps(dict(name=name, size=size, threads=threads, peak=peak, grad_bytes=params.numel() * 4,
                          ll_err=ll_err, grad_err=grad_err, first_s=first,
                          ms=sorted(times)[len(times) // 2] * 1e3, ms_min=min(times) * 1e3)))


def main():
    from pixel_head_memory import report  # beside this file
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", action="store_true", help=f"write the table to {os.path.relpath(RESULTS)}")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "SIZE", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_variant(args.child[0], args.child[1], int(args.child[2]), args.reps)

    load = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        for threads in args.threads:
            got = {}
            for name in args.variants:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, size, str(threads),
                                      "--reps", str(args.reps)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr)
                got[name] = json.loads(out.stdout.strip().splitlines()[-1])
                print(got[name], flush=True)
            for name, r in got.items():  # the same function, or the comparison means nothing
                assert r["ll_err"] < 1e-5, (name, size, r["ll_err"])
                assert r["grad_err"] < 2e-3, (name, size, r["grad_err"])
            rows.append(got)

    import torch
    import hvae_fast
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    field = lambda k: next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith(k)), "?")  # noqa: E731
    flags = [f for f in field("Flags").split() if f.startswith(("avx", "fma", "sse4"))]
    lines = [
        "# dmol_log_likelihood on the CPU: fused op vs the eager PixelCNN++ formulation and its torch.compile",
        "",
        f"Command: `python benchmarks/dmol.py --threads {' '.join(map(str, args.threads))} --reps {args.reps}"
        f"{' --out' if args.out else ''}`",
        "",
        f"Machine: {field('Model name')}, {os.cpu_count()} vCPUs (shared with other jobs: times are noisy), "
        f"SIMD flags: {' '.join(flags)}; torch {torch.__version__}, hvae_fast CPU level {hvae_fast.cpu_level()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {load:.1f} at the start.",
        "",
        "float32, forward + backward (gradient of the params). Sizes: rgb32 = B=32, C=3, 32x32, M=10 "
        "(P=100); gray28 = B=64, C=1, 28x28, M=10 (P=30). Each variant runs in a fresh interpreter; all agree "
        "with the fused op in float64: log-likelihoods to < 1e-5 and gradients to < 2e-3 of their largest magnitude (float32 rounding of the eager formulation's σ(plus) − σ(min)). "
        f"Time: median of {args.reps} steps (min in brackets), after one warm-up step (torch.compile's "
        "compile time excluded). *Peak*: most bytes of torch tensors live at once during one step beyond "
        "the inputs (torch.profiler memory events), and as a multiple of the params gradient's size.",
        "",
        "| size | threads | variant | fwd+bwd ms | peak MiB | peak / grad | speed-up of fused |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for got in rows:
        f = got.get("fused")
        for name, r in got.items():
            ratio = f"{r['ms'] / f['ms']:.2f}x" if f and name != "fused" else ""
            lines.append(f"| {r['size']} | {r['threads']} | {VARIANTS[name]} | {r['ms']:.1f} ({r['ms_min']:.1f}) | "
                         f"{r['peak'] / 2**20:.1f} | {r['peak'] / r['grad_bytes']:.2f} | {ratio} |")
    report("\n".join(lines) + "\n", RESULTS if args.out else None)


if __name__ == "__main__":
    main()
