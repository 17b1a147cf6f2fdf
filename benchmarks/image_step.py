"""One training step (forward + backward + Adamax step) of ConvTopDownVAE on Fashion-MNIST-shaped
data: the fused ops against plain torch, eager and under torch.compile.

    python benchmarks/image_step.py [--batch 64] [--threads N] [--reps 20] [--out]

The model has its default sizes: image (1, 28, 28), K = 256, channels 32, latent_channels 8,
groups (1, 2, 2). x is random uint8 images 0..255 as float32 [B, 784]. The variants:
  fused           the model as is: ops.posterior_sample, ops.pixel_categorical_log_likelihood;
                  hvae_fast.optim.Adamax
  plain           the same weights in plain torch: backend 'torch' (reference.posterior_sample)
                  and the head as F.conv2d to [B, K, H, W] logits + F.cross_entropy; torch.optim.Adamax(foreach)
  compile(fused)  torch.compile(model) of 'fused' (mode default); backward and step eager
  compile(plain)  the same for 'plain'
The same noise under torch.compile takes two settings: torch._inductor.config.fallback_random
= True (the graphs draw with torch's RNG, as eager does), and torch.randn_like replaced by
torch.randn(t.shape), which is what eager's randn_like draws for the model's latents (chunks of
a conv output, not dense: contiguous noise) but which stays contiguous where inductor lays a
latent out channels_last (randn_like would then fill it in NHWC order: other noise). Then every
variant's first step (same seed) gives the same loss, asserted before anything is reported.

Each variant runs in a fresh interpreter, with a fresh inductor cache (the compile time is a
cold one): the first step (the compile, for the compiled ones), 3 warm-up steps, one step for
each memory measure, then --reps timed steps (the median is reported). Memory, both above what
is live before the step (parameters, optimizer state, x; gradients set to None):
  * allocator peak: most bytes of torch tensors live at once during one step, from
    torch.profiler's memory events (helpers from pixel_head_memory.py);
  * RSS growth: ru_maxrss after one step minus VmRSS before it, with malloc's free memory
    handed back (malloc_trim) and the peak RSS reset (/proc/self/clear_refs) just before, so
    that neither the compile nor earlier steps hide it.
--out writes benchmarks/results/image-step-<threads>t.md and .json.
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from pixel_head_memory import allocator_peak, rss_now  # no torch at import: the parent stays small

VARIANTS = {
    "fused": "fused ops, `hvae_fast.optim.Adamax`",
    "plain": "plain torch (`F.conv2d` + `F.cross_entropy`), `torch.optim.Adamax(foreach=True)`",
    "compile(fused)": "`torch.compile` of *fused*'s loss",
    "compile(plain)": "`torch.compile` of *plain*'s loss",
}
LR, WARMUP, LOSS_RTOL, GRAD_RTOL = 1e-3, 3, 1e-4, 1e-3
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plain_log_px(self, features, x):
    """log p(x | z1) per example in plain torch: the full logits, then F.cross_entropy."""
    import torch.nn.functional as F
    C, H, W = self.image_shape
    logits = F.conv2d(features, self.head.weight, self.head.bias)  # [B, C*K, H, W]
    b = logits.shape[0]
    logits = logits.view(b, C, self.k, H, W).transpose(1, 2)  # classes in dim 1 (C = 1: [B, K, H, W])
    return -F.cross_entropy(logits, x.view(b, C, H, W).long(), reduction="none").flatten(1).sum(1)


def reset_peak_rss():
    """Hands malloc's free memory back to the OS and resets the peak RSS (ru_maxrss) to the RSS now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def contiguous_randn_like(torch):
    """torch.randn_like whose noise does not depend on the input's strides (see the docstring)."""
    original = torch.randn_like

    def randn_like(t, *args, **kwargs):
        if args or kwargs:
            return original(t, *args, **kwargs)
        return torch.randn(t.shape, dtype=t.dtype, device=t.device)
    return randn_like


def run_variant(name, batch, threads, reps):
    """One variant in this interpreter; prints one JSON line."""
    import torch
    from hvae_fast import optim
    from hvae_fast.model import ConvTopDownVAE
    if threads:
        torch.set_num_threads(threads)
        torch._inductor.config.compile_threads = threads
    if name.startswith("compile"):  # compiled noise = eager noise (see the docstring)
        torch._inductor.config.fallback_random = True
        torch.randn_like = contiguous_randn_like(torch)
    plain = "plain" in name

    torch.manual_seed(0)  # the same weights in every variant
    if plain:
        model = type("PlainConvTopDownVAE", (ConvTopDownVAE,), {"_log_px": plain_log_px})(backend="torch")
        opt = torch.optim.Adamax(model.parameters(), lr=LR, foreach=True)
    else:
        model = ConvTopDownVAE(backend="fused")
        opt = optim.Adamax(model.parameters(), lr=LR)
    loss_fn = torch.compile(model) if name.startswith("compile") else model
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, 784), dtype=torch.uint8, generator=g).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        return loss.detach()

    torch.manual_seed(2)  # the same noise in every variant's first step
    t = time.perf_counter()
    loss = float(step())
    first_s = time.perf_counter() - t
    grad_norm = float(sum(p.grad.double().pow(2).sum() for p in model.parameters()) ** 0.5)
    for _ in range(WARMUP):
        step()

    opt.zero_grad(set_to_none=True)
    gc.collect()
    reset_peak_rss()
    before = rss_now()
    step()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    opt.zero_grad(set_to_none=True)
    peak, largest = allocator_peak(torch, step)

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    from torch._dynamo.utils import counters
    print(json.dumps(dict(name=name, loss=loss, grad_norm=grad_norm, first_s=first_s, peak=peak, largest=largest,
                          rss_growth=rss_growth, ms=sorted(times)[len(times) // 2] * 1e3, ms_min=min(times) * 1e3,
                          threads=torch.get_num_threads(), graph_breaks=sum(counters["graph_break"].values()),
                          params=sum(p.numel() for p in model.parameters()))))


def machine(load, threads):
    import torch
    import hvae_fast
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    try:
        flags = next(line for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if line.startswith("Flags:"))
        avx = [f for f in flags.split()[1:] if "avx" in f]
    except (OSError, StopIteration):
        avx = []
    return dict(cpu=cpu, vcpus=os.cpu_count(), avx_flags=avx, torch=torch.__version__,
                cpu_level=hvae_fast.cpu_level(), threads=threads, load_average=load,
                date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def mib(n):
    return f"{n / 2**20:.1f}"


def table(args, rows, m):
    plain, cplain = rows["plain"], rows["compile(plain)"]
    cmd = f"python benchmarks/image_step.py --batch {args.batch}{f' --threads {args.threads}' if args.threads else ''}"
    lines = [
        "# One training step of ConvTopDownVAE: fused ops vs plain torch, eager and torch.compile",
        "",
        f"Command: `{cmd} --reps {args.reps}{' --out' if args.out else ''}`",
        "",
        f"ConvTopDownVAE defaults (image (1, 28, 28), K=256, channels 32, latent_channels 8, groups (1, 2, 2); "
        f"{plain['params']:,} parameters), B={args.batch} random uint8 images as float32, one step = zero_grad + "
        f"forward + backward + Adamax(lr={LR}) step. The plain head's logits are "
        f"{mib(args.batch * 256 * 784 * 4)} MiB.",
        "",
        f"Machine: {m['cpu']}, {m['vcpus']} vCPUs, avx flags: {' '.join(m['avx_flags']) or 'none'}; "
        f"{m['threads']} thread(s), torch {m['torch']}, hvae_fast CPU level {m['cpu_level']}, {m['date']}, "
        f"load average {m['load_average']:.1f} at the start (the memory columns do not depend on it; the times do).",
        "",
        f"Time: median of {args.reps} steps after {WARMUP} warm-up steps (min in brackets). *First step*: the first "
        "step's wall time, the (cold) compile included for the compiled variants, excluded from the median. "
        "*Allocator peak*: most bytes of torch tensors live at once during one step beyond those live before it, from "
        "`torch.profiler` memory events; *largest*: the largest single allocation; *RSS growth*: `ru_maxrss` after "
        "one step minus VmRSS before it (malloc trimmed and peak RSS reset before the step). Each variant in a fresh "
        f"interpreter. Check: every variant's first-step loss equals plain's to {LOSS_RTOL:g} relative "
        f"(gradient norm to {GRAD_RTOL:g}); under compile `fallback_random=True` and `torch.randn_like` drawing "
        "contiguous noise, so that the noise is eager's.",
        "",
        "| variant | step ms | images/s | vs plain | vs compile(plain) | first step s | allocator peak MiB | "
        "largest MiB | RSS growth MiB | graph breaks | first loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name}: {VARIANTS[name]} | {r['ms']:.1f} ({r['ms_min']:.1f}) | "
                     f"{args.batch / r['ms'] * 1e3:.0f} | {plain['ms'] / r['ms']:.2f}x | "
                     f"{cplain['ms'] / r['ms']:.2f}x | "
                     f"{r['first_s']:.1f} | {mib(r['peak'])} | {mib(r['largest'])} | {mib(r['rss_growth'])} | "
                     f"{r['graph_breaks'] if name.startswith('compile') else '-'} | {r['loss']:.6g} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", action="store_true", help="write benchmarks/results/image-step-<threads>t.md and .json")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.variant:
        return run_variant(args.variant, args.batch, args.threads, args.reps)

    load = os.getloadavg()[0]
    rows = {}
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as cache:  # a cold inductor cache: the compile time is the full one
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--batch", str(args.batch),
                   "--reps", str(args.reps)] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if out.returncode:
            sys.exit(f"variant {name} failed:\n{out.stderr}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {rows[name]['ms']:.1f} ms/step, first step {rows[name]['first_s']:.1f} s", file=sys.stderr)
    ref = rows["plain"]
    for name, r in rows.items():  # the same loss with the same noise, or the comparison means nothing
        assert abs(r["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), (name, r["loss"], ref["loss"])
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= GRAD_RTOL * ref["grad_norm"], \
            (name, r["grad_norm"], ref["grad_norm"])

    m = machine(load, ref["threads"])
    text = table(args, rows, m)
    print(text)
    if args.out:
        base = os.path.join(RESULTS, f"image-step-{m['threads']}t")
        os.makedirs(RESULTS, exist_ok=True)
        with open(base + ".md", "w") as fh:
            fh.write(text)
        with open(base + ".json", "w") as fh:
            json.dump(dict(args=dict(batch=args.batch, threads=args.threads, reps=args.reps, warmup=WARMUP, lr=LR),
                           machine=m, variants=rows), fh, indent=1)
        print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
