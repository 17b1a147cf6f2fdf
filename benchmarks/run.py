"""Benchmark runner: hvae_fast's ops and a whole training step against the seed, eager and compiled.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
                             [--ops categorical posterior posterior_eps bernoulli train]
                             [--alloc both|default|thp] [--out benchmarks/results/cpu.json] [--md ...]

HVAE_FAST_CPU=generic|avx2|avx512 in the environment measures the kernels at that level.

Everything is measured in one process; with --alloc both (the default) the runner then re-runs
itself in a subprocess with THP_MEM_ALLOC_ENABLE=1 (2 MB-aligned, huge-page-advised CPU
allocations), because page faults on fresh allocations dominate some ops.

Per (op, size, variant) and mode (fwd = the forward with autograd recording, as in training;
fwd+bwd = the forward plus torch.autograd.grad of all outputs w.r.t. the differentiable inputs):
  median   median wall time of repeated calls, after warm-up (compiled variants after compiling)
  x seed   seed eager time / this time (speed-up over the seed's eager code)
  x comp   best torch.compile variant's time / this time
  bytes    the minimum bytes the call must move (variants.min_bytes)
  GB/s     bytes / median
  x roof   median / roofline: 1.0 is the roofline, the larger of two floors measured in this run:
             bytes floor  bytes / copy bandwidth, that of dst.copy_(src) on large preallocated
                          buffers (2 x size bytes)
             exp floor    the op's transcendental functions (variants.py) / torch's own exp rate:
                          torch.exp(x, out=y) on an in-cache float32 buffer, at this thread count
           `binds` says which floor is the roofline
  peak     CPU: the high-water mark of bytes held by torch's CPU allocator during one call,
           above what was live before it (outputs and gradients included, inputs not), from
           torch.profiler's memory events. CUDA: torch.cuda.max_memory_allocated, same baseline.
  load     CPU time used by other processes during the measurement, in cores (from /proc/stat
           minus this process's own CPU time); over 0.5 a warning is printed and recorded.
"""
import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants as V  # noqa: E402

COMPILED = ("seed", "torch")
LOAD_WARN = 0.5
_CLK = os.sysconf("SC_CLK_TCK")


# ---- measuring ---------------------------------------------------------------------------------

class LoadMonitor:
    """CPU time other processes use while the block runs, in cores (Linux /proc/stat)."""

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(a) for a in f.readline().split()[1:]]
        except OSError:
            return None
        return (sum(v) - v[3] - v[4]) / _CLK  # everything but idle and iowait, in seconds

    def __enter__(self):
        self.b0, self.own0, self.t0 = self._busy(), sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        b1, own1, t1 = self._busy(), sum(os.times()[:2]), time.perf_counter()
        self.others = None if self.b0 is None else max(0.0, ((b1 - self.b0) - (own1 - self.own0)) / (t1 - self.t0))


class Runner:
    def __init__(self, device, quick):
        self.device = torch.device(device)
        self.min_time, self.min_reps = (0.05, 3) if quick else (1.0, 5)
        self.warnings = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, label):
        """Median seconds of fn() after two warm-up calls, and the others' load meanwhile."""
        for _ in range(2):
            fn()
        self.sync()
        times = []
        with LoadMonitor() as load:
            end = time.perf_counter() + self.min_time
            while len(times) < self.min_reps or (time.perf_counter() < end and len(times) < 10000):
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
        if load.others is not None and load.others > LOAD_WARN:
            msg = f"{label}: other processes used {load.others:.2f} cores during the measurement"
            print("WARNING:", msg, file=sys.stderr)
            self.warnings.append(msg)
        return statistics.median(times), load.others

    def peak_memory(self, fn):
        """Peak bytes allocated during one fn() above the level before it (see the module doc)."""
        self.sync()
        if self.device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            self.sync()
            return torch.cuda.max_memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            events = json.load(open(f.name))["traceEvents"]
        mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                     key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
        cur = peak = 0
        for e in mem:
            cur += e["args"]["Bytes"]
            peak = max(peak, cur)
        return peak

    def exp_rate(self, per_thread=32768):
        """exps per second of torch.exp on a buffer that stays in cache (one grain per thread)."""
        x = torch.rand(per_thread * torch.get_num_threads(), device=self.device) * -8
        y = torch.empty_like(x)
        t, _ = self.time(lambda: torch.exp(x, out=y), "exp rate")
        return x.numel() / t

    def copy_bandwidth(self, nbytes):
        src = torch.empty(nbytes // 4, device=self.device).fill_(1.0)
        dst = torch.empty_like(src).fill_(0.0)
        t, _ = self.time(lambda: dst.copy_(src), "copy bandwidth")
        return 2 * src.nbytes / t


def compiled(fn):
    torch._dynamo.reset()  # a fresh cache per case: honest compile times, no recompile limit
    return torch.compile(fn, dynamic=False)


# ---- ops ---------------------------------------------------------------------------------------

def bench_op(runner, name, op, size_name, dtype, only):
    fns = dict(op.variants)
    fns.update({f"compile({v})": op.variants[v] for v in COMPILED})
    fns.update(op.factories)
    rows = []
    for vname, fn in fns.items():
        if only and vname not in only:
            continue
        is_compiled = vname.startswith("compile(")
        torch.manual_seed(0)  # fresh inputs, the same for every variant: hvae_fast(overwrite) writes into its logits
        leaves, wrt = V.make_case(op, size_name, runner.device, dtype)
        t0 = time.perf_counter()
        if vname in op.factories:
            torch._dynamo.reset()
            fn = fn()
        elif is_compiled:
            fn = compiled(fn)
        fwd, fwd_bwd, outs = V.closures(fn, leaves, wrt)
        fwd_bwd()
        runner.sync()
        compile_s = time.perf_counter() - t0 if is_compiled else None  # first fwd and fwd+bwd calls
        for mode, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            label = f"{name}/{size_name}/{mode}/{vname}"
            t, load = runner.time(f, label)
            rows.append(dict(op=name, size=size_name, mode=mode, variant=vname, median_s=t, load=load,
                             bytes=V.min_bytes(op, leaves, outs, mode == "fwd+bwd"),
                             transcendentals=op.transcendentals(mode == "fwd+bwd", **op.sizes[size_name]),
                             grad_bytes=sum(t.nbytes for t in wrt), peak_bytes=runner.peak_memory(f),
                             compile_s=compile_s))
            print(f"  {label}: {t * 1e3:.3f} ms", flush=True)
    return rows


def add_ratios(rows, bandwidth, exp_rate):
    """x seed, x comp (speed-ups; > 1 is faster) and x roof (>= 1; 1 is the roofline)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["size"], r["mode"]), {})[r["variant"]] = r
    for g in groups.values():
        seed = g.get("seed", {}).get("median_s")
        comp = [g[v]["median_s"] for v in g if v.startswith("compile(")]
        for r in g.values():
            t = r["median_s"]
            r["x_seed"] = seed / t if seed else None
            r["x_compile"] = min(comp) / t if comp else None
            r["gbps"] = r["bytes"] / t / 1e9
            r["bytes_floor_s"] = r["bytes"] / bandwidth
            r["exp_floor_s"] = r["transcendentals"] / exp_rate
            r["binds"] = "bytes" if r["bytes_floor_s"] >= r["exp_floor_s"] else "exp"
            r["x_roofline"] = t / max(r["bytes_floor_s"], r["exp_floor_s"])


# ---- training step -----------------------------------------------------------------------------

def bench_train(runner, model_name, dtype, only, steps_profiled=4, rounds=3):
    """Steps per second of every variant. The variants are timed in turn, `rounds` times
    over, and each reports its median round: slow drifts of a shared machine then hit all
    variants alike instead of whichever ran during them."""
    base = V.make_model(model_name, runner.device, dtype)
    batches = V.make_batches(model_name, 8, runner.device, dtype)
    runs = dict(V.TRAIN_VARIANTS)
    runs.update({f"compile({v})": V.TRAIN_VARIANTS[v] for v in ("seed", "hvae_fast")})
    steps, rows, profiles = {}, [], {}
    for vname, v in runs.items():
        if only and vname not in only:
            continue
        m = copy.deepcopy(base).train()  # every variant starts from the same parameters
        m.backend = v.backend
        m.in_kernel_noise = v.in_kernel_noise
        opt = v.optimizer(m.parameters(), lr=1e-3)
        f = (lambda x, m=m, loss=v.loss: loss(m, x))
        if vname.startswith("compile("):
            f = compiled(f)

        def step(f=f, opt=opt, it=itertools.count()):
            opt.zero_grad(set_to_none=True)
            f(batches[next(it) % len(batches)]).backward()
            opt.step()

        t0 = time.perf_counter()
        step()
        runner.sync()
        steps[vname] = (step, time.perf_counter() - t0 if vname.startswith("compile(") else None)
    times = {vname: [] for vname in steps}
    for _ in range(rounds):
        for vname, (step, _) in steps.items():
            times[vname].append(runner.time(step, f"train/{model_name}/{vname}"))
    for vname, (step, compile_s) in steps.items():
        t, load = sorted(times[vname])[len(times[vname]) // 2]
        rows.append(dict(model=model_name, batch=V.MODELS[model_name].batch, variant=vname, median_s=t,
                         steps_per_s=1 / t, load=load, compile_s=compile_s))
        print(f"  train/{model_name}/{vname}: {1 / t:.1f} steps/s", flush=True)
        if vname in ("seed", "hvae_fast"):
            profiles[vname] = profile_split(step, steps_profiled, runner.device)
    # the seed's step with the faster of torch's Adamax steps (per parameter, foreach)
    seed = min((r["median_s"] for r in rows if r["variant"].startswith("seed")), default=None)
    for r in rows:
        r["x_seed"] = seed / r["median_s"] if seed else None
    return rows, profiles


def profile_split(step, n, device, top=8):
    """Share of n profiled steps' op time spent in hvae_fast ops (inclusive), and the top ops by self time.

    CPU: CPU time of the ops. CUDA: device time of the kernels they launch.
    """
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
    self_t, incl_t = ("self_device_time_total", "device_time_total") if cuda else ("self_cpu_time_total", "cpu_time_total")
    ev = list(prof.key_averages())
    total = sum(getattr(e, self_t) for e in ev)
    fused = sum(getattr(e, incl_t) for e in ev if e.key.startswith("hvae_fast::"))
    ev.sort(key=lambda e: -getattr(e, self_t))
    return dict(op_time_per_step_s=total / n / 1e6, hvae_fast_share=fused / total,
                top=[(e.key, getattr(e, self_t) / total) for e in ev[:top]])


# ---- reporting ---------------------------------------------------------------------------------

def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def op_table(rows):
    head = ("| op | size | mode | variant | median ms | x seed | x comp | MB | GB/s | bytes floor ms | "
            "exp floor ms | x roof | peak MB | compile s | load |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['size']} | {r['mode']} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                     f"{_f(r['x_seed'], '.2f')} | {_f(r['x_compile'], '.2f')} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['gbps']:.1f} | {r['bytes_floor_s'] * 1e3:.2f} | {r['exp_floor_s'] * 1e3:.2f} | "
                     f"{r['x_roofline']:.2f} ({r['binds']}) | {r['peak_bytes'] / 1e6:.2f} | "
                     f"{_f(r['compile_s'], '.1f')} | {_f(r['load'], '.2f')} |")
    return "\n".join(lines)


def train_table(rows):
    lines = ["| model | batch | variant | steps/s | ms/step | x seed | compile s | load |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['steps_per_s']:.1f} | "
                     f"{r['median_s'] * 1e3:.2f} | {_f(r['x_seed'], '.2f')} | {_f(r['compile_s'], '.1f')} | "
                     f"{_f(r['load'], '.2f')} |")
    return "\n".join(lines)


def profile_table(profiles):
    lines = ["| model | variant | op time/step ms | hvae_fast:: share | top ops by self time (share) |",
             "|---" * 5 + "|"]
    for model, p in profiles.items():
        for v, s in p.items():
            top = ", ".join(f"{k} {share:.0%}" for k, share in s["top"])
            lines.append(f"| {model} | {v} | {s['op_time_per_step_s'] * 1e3:.2f} | {s['hvae_fast_share']:.1%} | {top} |")
    return "\n".join(lines)


def _find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def targets(run):
    """The targets, each (name, met, measured), where the rows needed were measured."""
    ops_, tr = run.get("ops", []), run.get("train", [])
    out = []
    for variant, peak_of_grad, how, bound in (("hvae_fast", 1.1, "fresh gradient", "the gradient + 10%"),
                                              ("hvae_fast(overwrite)", 0.1, "in place", "10% of the gradient")):
        cat = _find(ops_, op="categorical", size="mnist", mode="fwd+bwd", variant=variant)
        if not cat:
            continue
        limit = peak_of_grad * cat["grad_bytes"]
        name = f"categorical mnist fwd+bwd, {how}"
        out += [(f"{name}: >= 20x the seed's eager", (cat["x_seed"] or 0) >= 20, f"{_f(cat['x_seed'], '.2f')}x"),
                (f"{name}: >= 2x the best torch.compile", (cat["x_compile"] or 0) >= 2,
                 f"{_f(cat['x_compile'], '.2f')}x"),
                (f"{name}: within 2x the roofline", cat["x_roofline"] <= 2,
                 f"{cat['x_roofline']:.2f}x ({cat['binds']} floor)"),
                (f"{name}: peak memory <= {bound}", cat["peak_bytes"] <= limit,
                 f"{cat['peak_bytes'] / 1e6:.1f} MB vs {limit / 1e6:.1f} MB")]
    p = _find(ops_, op="posterior_eps", size="large", mode="fwd+bwd", variant="hvae_fast")
    if p:
        label = "posterior_sample large fwd+bwd, noise passed in"
        out += [(f"{label}: >= 1.2x the best torch.compile", (p["x_compile"] or 0) >= 1.2,
                 f"{_f(p['x_compile'], '.2f')}x"),
                (f"{label}: within 1.5x the roofline", p["x_roofline"] <= 1.5,
                 f"{p['x_roofline']:.2f}x ({p['binds']} floor)")]
    p = _find(ops_, op="posterior", size="large", mode="fwd+bwd", variant="hvae_fast(eps=None)")
    c = _find(ops_, op="posterior", size="large", mode="fwd+bwd", variant="compile(torch)+randn")
    if p and c:
        ratio = c["median_s"] / p["median_s"]
        out.append(("posterior_sample large fwd+bwd, eps=None: >= 1.5x eager randn_like + compiled arithmetic",
                    ratio >= 1.5, f"{ratio:.2f}x"))
    for r in ops_:
        if r["variant"] == "hvae_fast" and r["mode"] == "fwd+bwd" and r["size"] in ("tiny", "digits"):
            out.append((f"{r['op']} {r['size']} fwd+bwd: >= 3x the seed's eager", (r["x_seed"] or 0) >= 3,
                        f"{_f(r['x_seed'], '.2f')}x"))
    for model, need in (("digits", 1.3), ("mnist", 2.0)):
        r = _find(tr, model=model, variant="hvae_fast")
        if r:
            out.append((f"training step {model}: >= {need}x the seed's eager step", (r["x_seed"] or 0) >= need,
                        f"{_f(r['x_seed'], '.2f')}x"))
    for r in run.get("threads", []):
        out.append((f"{r['op']} {r['size']} fwd+bwd, hvae_fast: {r['threads']} threads no slower than 1",
                    r["speedup"] >= 1, f"{r['speedup']:.2f}x"))
    return out


def bench_threads(runner, dtype, names, n):
    """hvae_fast's fwd+bwd of each op at its large sizes on 1 thread and on n, in one run."""
    rows = []
    for name in names:
        op = V.OPS[name]
        for size in op.sizes:
            if size in ("tiny", "digits"):
                continue
            leaves, wrt = V.make_case(op, size, runner.device, dtype)
            _, fwd_bwd, _ = V.closures(op.variants["hvae_fast"], leaves, wrt)
            times = {}
            for k in (1, n, 1, n):  # twice each, interleaved; the faster of each pair
                torch.set_num_threads(k)
                t, _ = runner.time(fwd_bwd, f"threads/{name}/{size}/{k}")
                times[k] = min(times.get(k, t), t)
            torch.set_num_threads(n)
            rows.append(dict(op=name, size=size, threads=n, one_s=times[1], n_s=times[n], speedup=times[1] / times[n]))
            print(f"  threads/{name}/{size}: 1 thread {times[1] * 1e3:.2f} ms, {n}: {times[n] * 1e3:.2f} ms", flush=True)
    return rows


def threads_table(rows):
    lines = ["| op | size | fwd+bwd, 1 thread ms | n threads | ms | speed-up |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['size']} | {r['one_s'] * 1e3:.2f} | {r['threads']} | {r['n_s'] * 1e3:.2f} | "
                     f"{r['speedup']:.2f} |")
    return "\n".join(lines)


def report(res):
    parts = []
    for alloc, run in res["runs"].items():
        parts.append(f"### allocator: {alloc}  (copy bandwidth {run['copy_gbps']:.1f} GB/s, "
                     f"torch.exp in cache {run['exp_per_s'] / 1e9:.2f} G/s)\n")
        if run.get("ops"):
            parts.append(op_table(run["ops"]) + "\n")
        if run.get("threads"):
            parts.append(threads_table(run["threads"]) + "\n")
        if run.get("train"):
            parts += [train_table(run["train"]) + "\n", profile_table(run["profiles"]) + "\n"]
        t = targets(run)
        if t:
            parts.append("| target | met | measured |\n|---|---|---|\n" +
                         "\n".join(f"| {n} | {'met' if ok else 'MISSED'} | {m} |" for n, ok, m in t) + "\n")
        loads = [r["load"] for r in run.get("ops", []) + run.get("train", []) if r.get("load") is not None]
        busy = [x for x in loads if x > LOAD_WARN]
        if busy:
            parts.append(f"**Loaded machine:** in {len(busy)} of {len(loads)} measurements other processes used "
                         f"more than {LOAD_WARN} cores (median {statistics.median(loads):.2f}, max {max(loads):.2f}).\n")
    return "\n".join(parts)


# ---- main --------------------------------------------------------------------------------------

def measure(args):
    runner = Runner(args.device, args.quick)
    dtype = getattr(torch, args.dtype)
    run = dict(alloc="thp" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "default",
               copy_gbps=runner.copy_bandwidth((64 if args.quick else 512) << 20) / 1e9,
               exp_per_s=runner.exp_rate(), ops=[], train=[], profiles={})
    print(f"[{run['alloc']}] copy bandwidth {run['copy_gbps']:.1f} GB/s, torch.exp {run['exp_per_s'] / 1e9:.2f} G/s",
          flush=True)
    for name in args.ops:
        if name == "train":
            for model in V.MODELS:
                rows, prof = bench_train(runner, model, dtype, args.variants)
                run["train"] += rows
                run["profiles"][model] = prof
            continue
        op = V.OPS[name]
        for size in op.sizes:
            run["ops"] += bench_op(runner, name, op, size, dtype, args.variants)
    add_ratios(run["ops"], run["copy_gbps"] * 1e9, run["exp_per_s"])
    n = torch.get_num_threads()
    if n > 1 and (not args.variants or "hvae_fast" in args.variants):
        run["threads"] = bench_threads(runner, dtype, [o for o in args.ops if o != "train"], n)
    run["warnings"] = runner.warnings
    return run


def lscpu():
    """lscpu's model name and its SIMD flags (avx*, fma, amx*)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return platform.processor(), []
    field = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in lines if ":" in l}
    flags = [f for f in field.get("Flags", "").split() if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return field.get("Model name", platform.processor()), flags


def meta(args):
    import hvae_fast
    cpu, flags = lscpu()
    return dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), date=datetime.datetime.now().isoformat(
        timespec="seconds"), cpu=cpu, cpu_flags=flags, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), hvae_fast_cpu_level=hvae_fast.cpu_level(),
        torch=torch.__version__, device=args.device, dtype=args.dtype, quick=args.quick,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None, hvae_fast=hvae_fast.build_info(),
        loadavg_before=open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short timings (smoke test)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ops", nargs="+", default=list(V.OPS) + ["train"], choices=list(V.OPS) + ["train"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", default=None, help="only these variants, e.g. seed hvae_fast")
    ap.add_argument("--alloc", default="both", choices=["both", "default", "thp"],
                    help="both: this process, then a re-run with THP_MEM_ALLOC_ENABLE=1")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/<device>.json)")
    ap.add_argument("--md", default=None, help="also write the markdown tables here")
    args = ap.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{args.device}.json")
    warnings.filterwarnings("ignore", message=".*running the pure-PyTorch reference.*")

    want_thp = args.alloc == "thp"
    if want_thp != (os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"):  # the allocator reads it at start-up
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if want_thp else "0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)

    if args.threads:
        torch.set_num_threads(args.threads)
    res = dict(meta=meta(args), runs={})
    res["runs"][args.alloc if args.alloc != "both" else "default"] = measure(args)
    if args.alloc == "both":
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            child = [a for a in sys.argv[1:]]
            for flag in ("--out", "--md", "--alloc"):
                if flag in child:
                    i = child.index(flag)
                    del child[i:i + 2]
            subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--alloc", "thp", "--out", f.name],
                           check=True, env=dict(os.environ, THP_MEM_ALLOC_ENABLE="1"))
            res["runs"]["thp"] = json.load(open(f.name))["runs"]["thp"]
    res["meta"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    text = report(res)
    print("\n" + text)
    if args.md:
        m = res["meta"]
        head = (f"Command: `{m['command']}`\n\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
                f"({m['torch_threads']} threads, its CPU capability {m['torch_cpu_capability']}), hvae_fast CPU "
                f"level {m['hvae_fast_cpu_level']} (built: {', '.join(m['hvae_fast'].get('cpu_levels', []))}), "
                f"device {m['device']}{' ' + m['gpu'] if m['gpu'] else ''}, dtype {m['dtype']}, {m['date']}. "
                f"Load average before {m['loadavg_before']}, after {m['loadavg_after']}.\n\n"
                f"lscpu flags (SIMD): {' '.join(m['cpu_flags'])}\n\n")
        with open(args.md, "w") as f:
            f.write(head + text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
