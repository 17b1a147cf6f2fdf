"""Peak memory and time of an image decoder's last 1x1 conv with its categorical likelihood,
forward and backward: ops.pixel_categorical_log_likelihood (in pixel chunks) against the
unfused head (F.conv2d, then F.cross_entropy(reduction="none") summed per example).

    python benchmarks/pixel_head_memory.py [--threads N] [--reps N] [--out]

Each variant runs in a fresh interpreter. Two peaks are measured, both above what is live
before the step (inputs, parameters):
  * torch allocator peak: the most bytes of torch CPU tensors live at once during one
    forward+backward, from torch.profiler's memory events (exact, what the tensors need);
  * RSS growth: ru_maxrss after one step minus the resident set before it (what the OS
    saw, malloc's own slack included).
--out writes the table to benchmarks/results/pixel-head-memory.md.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

B, C, H, W, CHANNELS, K = 128, 32, 28, 28, 1, 256
VARIANTS = {
    "fused": "`ops.pixel_categorical_log_likelihood` (pixel chunks)",
    "unfused": "`F.conv2d` + `F.cross_entropy(reduction='none')`",
    "conv+kernel": "`F.conv2d` + `ops.categorical_log_likelihood` (full logits, `overwrite_logits`)",
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pixel-head-memory.md")


def make_step(name, torch, F, ops):
    def step(f, w, b, x):
        if name == "fused":
            ll = ops.pixel_categorical_log_likelihood(f, w, b, x)
        elif name == "unfused":
            logits = F.conv2d(f, w[:, :, None, None], b)  # [B, channels*K, H, W]
            n, _, h, wd = logits.shape
            logits = logits.view(n, x.shape[1], -1, h, wd).transpose(1, 2)  # classes in dim 1
            ll = -F.cross_entropy(logits, x, reduction="none").flatten(1).sum(1)
        else:
            logits = F.conv2d(f, w[:, :, None, None], b)
            n, _, h, wd = logits.shape
            logits = logits.view(n, x.shape[1], -1, h, wd).movedim(2, -1).contiguous()
            ll = ops.categorical_log_likelihood(logits, x, overwrite_logits=True)
        grads = torch.autograd.grad(ll.sum(), (f, w, b))
        return ll, grads
    return step


def rss_now():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def allocator_peak(torch, fn):
    """Most bytes of torch CPU tensors live at once while fn runs, beyond those live before."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e["args"] for e in json.load(fh)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type", 0) == 0]
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base, max(e["Bytes"] for e in events)


def run_variant(name, threads, reps):
    """One variant in this interpreter; prints one JSON line."""
    import torch
    import torch.nn.functional as F
    from hvae_fast import ops
    torch.set_num_threads(threads)
    step = make_step(name, torch, F, ops)

    def inputs(b, c, h, w, channels, k):
        g = torch.Generator().manual_seed(0)
        f = torch.randn(b, c, h, w, generator=g).requires_grad_()
        wt = (torch.randn(channels * k, c, generator=g) / c ** 0.5).requires_grad_()
        bias = torch.zeros(channels * k).requires_grad_()
        x = torch.randint(0, k, (b, channels, h, w), generator=g)
        return f, wt, bias, x

    step(*inputs(2, C, 3, 3, CHANNELS, K))  # loads the kernels, BLAS, thread pools
    args = inputs(B, C, H, W, CHANNELS, K)
    before = rss_now()
    ll, grads = step(*args)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    check = [float(ll.double().sum())] + [float(g.double().norm()) for g in grads]
    del ll, grads
    peak, largest = allocator_peak(torch, lambda: step(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - t)
    print(json.dumps(dict(name=name, peak=peak, largest=largest, rss_growth=rss_growth, check=check,
                          ms=sorted(times)[len(times) // 2] * 1e3, ms_min=min(times) * 1e3)))


def report(text, path=None):
    """Prints the table, and writes it to path when given."""
    print(text)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {path}")


def mib(n):
    return f"{n / 2**20:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", action="store_true", help=f"write the table to {os.path.relpath(RESULTS)}")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.variant:
        return run_variant(args.variant, args.threads, args.reps)

    load = os.getloadavg()[0]
    rows = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", name, "--threads",
                              str(args.threads), "--reps", str(args.reps)], capture_output=True, text=True,
                             check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = rows["unfused"]
    for name, r in rows.items():  # the same numbers, or the comparison means nothing
        for a, e in zip(r["check"], ref["check"]):
            assert abs(a - e) <= 1e-4 * max(1.0, abs(e)), (name, r["check"], ref["check"])

    import torch
    import hvae_fast
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    logits = B * CHANNELS * K * H * W * 4
    lines = [
        "# Pixel head memory: fused 1x1 conv + categorical likelihood vs unfused",
        "",
        f"Command: `python benchmarks/pixel_head_memory.py --threads {args.threads} --reps {args.reps} --out`",
        "",
        f"B={B}, C={C}, H=W={H}, channels={CHANNELS}, K={K}, float32, forward + backward (gradients of features, "
        f"weight, bias). The full logits are {mib(logits)} MiB; the features {mib(B * C * H * W * 4)} MiB. "
        f"Fused chunk: `ops.LINEAR_CHUNK_BYTES` = {mib(hvae_fast.ops.LINEAR_CHUNK_BYTES)} MiB of logits.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} vCPUs (shared with other jobs: times are noisy), {args.threads} "
        f"thread(s), torch {torch.__version__}, hvae_fast CPU level {hvae_fast.cpu_level()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {load:.1f} at the start "
        "(the memory columns do not depend on it; the times do).",
        "",
        "Each variant runs in a fresh interpreter. *Allocator peak*: most bytes of torch tensors live at once "
        "during one step beyond the inputs, from `torch.profiler` memory events (exact). *RSS growth*: "
        "`ru_maxrss` after the first step minus the resident set before it. *Largest*: the largest single "
        f"allocation. Time: median of {args.reps} steps (min in brackets). Ratios are unfused / variant.",
        "",
        "| variant | allocator peak (MiB) | largest (MiB) | RSS growth (MiB) | fwd+bwd ms | peak ratio | "
        "RSS ratio | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {VARIANTS[name]} | {mib(r['peak'])} | {mib(r['largest'])} | {mib(r['rss_growth'])} | "
                     f"{r['ms']:.1f} ({r['ms_min']:.1f}) | {ref['peak'] / r['peak']:.2f}x | "
                     f"{ref['rss_growth'] / max(r['rss_growth'], 1):.2f}x | {ref['ms'] / r['ms']:.2f}x |")
    report("\n".join(lines) + "\n", RESULTS if args.out else None)


if __name__ == "__main__":
    main()
