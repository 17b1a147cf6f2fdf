"""The quick GPU table of tools/gpu_session.sh: every fused op and two training steps on one GPU,
each against eager PyTorch and torch.compile, with the device's copy bandwidth measured in the
same run and each op's ratio to it.

    python benchmarks/gpu_quick.py [--out bench.jsonl] [--budget 200]
                                   [--rows all|eager|compile] [--only categorical posterior ...]
                                   [--rehearse]
    python benchmarks/gpu_quick.py --table bench.jsonl > bench.md

Cases (sizes fill an H100/H200 well past launch overhead; all fwd+bwd as in training unless named):
  copy             the copy bandwidth: 1 GiB dst.copy_(src), read + write (the x copy column's unit)
  categorical      K = 17 [8192, 64, 17] and K = 256 [128, 784, 256], float32 and bfloat16;
                   hvae_fast with a fresh gradient and in place (overwrite_logits=True)
  posterior        two levels [4096, 1024]: noise passed in (eps), and eps=None (drawn in the kernel)
                   against torch.randn_like + the arithmetic
  bernoulli        [4096, 3072]
  linear_head      linear_categorical_log_likelihood, h [128, 256], D = 784, K = 256, against
                   F.linear + cross_entropy
  pixel_head       pixel_categorical_log_likelihood, features [64, 32, 28, 28], K = 256, against
                   F.conv2d (1x1) + cross_entropy
  dmol             dmol_log_likelihood (discretized logistic mixture, M = 10) at rgb32 [32, 3, 32, 32]
                   and gray28 [64, 1, 28, 28], against the eager PixelCNN++ formulation of
                   benchmarks/dmol.py; its check tolerance is that script's (2e-3: the eager
                   sigma(plus) - sigma(min) loses digits in float32)
  adamax           one step over the mnist recipe model's parameters: hvae_fast.optim.Adamax
                   against torch.optim.Adamax foreach, for-loop, fused (where torch has it) and
                   torch.compile of torch's step
  train            one training step (zero_grad, loss, backward, optimizer step): the recipe model
                   (digits, batch 64) and the image model (ConvTopDownVAE, batch 64), fused ops +
                   hvae_fast Adamax against backend 'torch' + torch's foreach Adamax, eager and compiled
Columns: median ms (CUDA events around groups of calls after warm-up; median of the groups'
means), GB/s of the minimum traffic (each input read once, each output written once, the
backward's reads and writes added: benchmarks/variants.py's rule), x copy (time over
bytes / copy bandwidth: 1.0 is the copy roofline), x eager / x compile (the eager and the
compiled torch variant's time over this one: > 1 is faster), compile s (first call), peak MiB
(torch.cuda.max_memory_allocated over the timed calls, inputs included), check (the
variant's outputs and gradients against the eager torch variant's, first call).

--out: the rows file, JSON lines, appended to: a {"meta": ...} line when a run starts, each row
as soon as it is measured (or skipped, or failed: its traceback goes to stderr), an {"end": ...}
line when the run ends or is stopped by SIGINT. The table (printed last; --table prints that of
a rows file and runs nothing) is made from that file, so a run cut
short keeps every row it finished, and two runs into one file (--rows eager, then --rows
compile, as tools/gpu_session.sh does) make one table.
--budget: seconds for this run; a row starts only while budget is left (a compiled row only
with Device.compile_min_s left), the others are written as skipped.
--rows: eager (no torch.compile rows), compile (only those), all.
--rehearse: the whole script on the CPU: small sizes, torch.compile with the aot_eager backend,
and torch.cuda's timing, synchronisation and memory calls replaced by the CPU stand-ins of
CpuStandIns (Device, below, is the one place that chooses), so that the code the GPU runs,
runs here.
"""
import argparse
import datetime
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants as V  # noqa: E402
from hvae_fast import ops, optim  # noqa: E402

T0 = time.perf_counter()


# ---- the device: torch.cuda, or CPU stand-ins for its calls -------------------------------------

class CpuStandIns:
    """torch.cuda's timing, synchronisation and memory calls as the benchmark uses them, stood in
    for on the CPU (--rehearse): events read the host clock, synchronisation has nothing to wait
    for (CPU ops return when done), no memory is counted."""

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    def synchronize(self):
        pass

    def empty_cache(self):
        pass

    def reset_peak_memory_stats(self):
        pass

    def max_memory_allocated(self):
        return 0

    def get_device_name(self):
        return "CPU (--rehearse: torch.cuda's calls stood in for)"


class Device:
    """Where the table runs, chosen once: torch.cuda on a GPU, CpuStandIns under --rehearse.
    Every call the benchmark makes to torch.cuda goes through here."""

    def __init__(self, rehearse):
        self.rehearse = rehearse
        self.api = CpuStandIns() if rehearse else torch.cuda
        self.torch = torch.device("cpu" if rehearse else "cuda")
        self.low = () if rehearse else (torch.bfloat16,)  # the CPU kernels have float32 and float64 only
        self.compile_backend = "eager" if rehearse else "inductor"  # rehearsed: dynamo's tracing, no codegen
        self.compile_min_s = 2 if rehearse else 20  # a compiled row starts only with this much budget left
        # timing: warm-up calls, groups of calls, the fewest calls per group, the time scale of a group
        self.warmup, self.groups, self.min_reps, self.time_scale = (1, 2, 1, 0.1) if rehearse else (2, 5, 3, 1.0)

    def size(self, full, small):
        return small if self.rehearse else full

    def synchronize(self):
        self.api.synchronize()

    def timer(self):
        return self.api.Event(enable_timing=True), self.api.Event(enable_timing=True)

    def reset_peak(self):
        self.api.reset_peak_memory_stats()

    def peak_mib(self):
        return self.api.max_memory_allocated() / 2 ** 20

    def empty_cache(self):
        self.api.empty_cache()

    def name(self):
        return self.api.get_device_name()

    def compile(self, fn):
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False, backend=self.compile_backend)


DEV = Device(rehearse=True)  # main() chooses; the CPU until then (importing needs no GPU)


def s(n):
    """A batch size, scaled down under --rehearse."""
    return DEV.size(n, max(2, n // 64))


class Budget:
    def __init__(self, seconds):
        self.seconds = seconds

    def left(self):
        return self.seconds - (time.perf_counter() - T0)


class Rows:
    """The rows file (JSON lines): each record is written and flushed as soon as it exists."""

    def __init__(self, path, meta):
        self.f = open(path, "a")
        self.rows = []
        self.write({"meta": meta})

    def write(self, record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def add(self, row):
        self.rows.append(row)
        self.write(row)


def time_call(fn, target_s=0.15):
    """Median over DEV.groups of the mean time of a group of calls, by (CUDA) events, after warm-up."""
    for _ in range(DEV.warmup):
        fn()
    DEV.synchronize()
    t0 = time.perf_counter()
    fn()
    DEV.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(200, max(DEV.min_reps, target_s * DEV.time_scale / DEV.groups / one)))
    means = []
    for _ in range(DEV.groups):
        start, end = DEV.timer()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(means)[len(means) // 2]


def nbytes(ts):
    return sum(t.nbytes for t in ts if isinstance(t, torch.Tensor))


def close(a, b, dtype, tol=None):
    """Relative max-norm distance of a and b (lists of tensors), and whether it is small for dtype
    (or within tol)."""
    tol = tol or {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}.get(dtype, 1e-4)
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        err = (x - y).abs().max().item() / (y.abs().max().item() or 1.0) if x.shape == y.shape else math.inf
        worst = max(worst, err)
    return worst, worst <= tol


# ---- one row per (case, variant) --------------------------------------------------------------

def make_leaves(made):
    inputs, diff = made
    leaves = [t.requires_grad_() if d else t for t, d in zip(inputs, diff)]
    return leaves, [t for t, d in zip(leaves, diff) if d]


def fwd_bwd(fn, leaves, wrt):
    """fn's fwd+bwd closure (torch.autograd.grad of every output, fixed random incoming grads)."""
    _, f, outs = V.closures(fn, leaves, wrt)
    return f, outs


def new_row(out, budget, kind, group, case, dtype, variant):
    """The row of one variant, or None when it does not run: not of this run's --rows kind (not
    written), or the budget is spent (written as skipped)."""
    compiled = variant.startswith("compile(")
    if kind != "all" and compiled != (kind == "compile"):
        return None
    row = dict(group=group, case=case, dtype=dtype, variant=variant)
    if budget.left() <= (DEV.compile_min_s if compiled else 0):
        out.add({**row, "skipped": "budget"})
        return None
    return row


def run_row(out, row, body):
    """body(row) fills the row; an exception becomes the row's error (traceback to stderr), and
    the row is written either way."""
    t0 = time.perf_counter()
    try:
        body(row)
    except Exception as e:  # one failing row must not end the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        traceback.print_exc()
    row["wall_s"] = time.perf_counter() - t0
    out.add(row)
    what = row.get("error") or row.get("skipped") or f"{row['median_s'] * 1e3:.3f} ms"
    print(f"  {row['group']}/{row['case']}/{row['dtype']}/{row['variant']}: {what}", flush=True)


def timed(row, fn, target_s=0.15):
    """Times fn into the row, with the device's peak memory over the timed calls."""
    DEV.reset_peak()
    row["median_s"] = time_call(fn, target_s)
    row["peak_mib"] = DEV.peak_mib()


def copy_bandwidth(out, budget, nbytes=1 << 30):
    nbytes = DEV.size(nbytes, nbytes >> 6)
    row = new_row(out, budget, "all", "copy", f"{nbytes >> 20} MiB dst.copy_(src)", "float32", "torch")

    def body(row):
        src = torch.empty(nbytes // 4, device=DEV.torch).uniform_()
        dst = torch.empty_like(src)
        timed(row, lambda: dst.copy_(src))
        row["bytes"] = 2 * nbytes

    if row is not None:
        run_row(out, row, body)
    DEV.empty_cache()


def bench_case(out, budget, kind, group, case, dtype, variants, make, min_bytes, ref="torch", tol=None):
    """variants: name -> fn of the inputs; make() -> (leaves, wrt). Times fwd+bwd of each; the
    eager `ref` variant's first outputs and gradients (computed untimed) check the others (to
    close()'s tolerance for dtype, or tol)."""
    dtype_name = str(dtype).replace("torch.", "")
    todo = [(name, row) for name in variants
            if (row := new_row(out, budget, kind, group, case, dtype_name, name)) is not None]
    ref_out = []
    if todo and ref is not None:
        torch.manual_seed(0)
        leaves, wrt = make()
        f, outs = fwd_bwd(variants[ref], leaves, wrt)
        ref_out = [t.detach().clone() for t in list(outs) + list(f())]
    for name, row in todo:
        def body(row, fn=variants[name]):
            torch.manual_seed(0)
            leaves, wrt = make()
            t0 = time.perf_counter()
            if name.startswith("compile("):
                fn = DEV.compile(fn)
            f, outs = fwd_bwd(fn, leaves, wrt)
            first = list(outs) + list(f())
            DEV.synchronize()
            if name.startswith("compile("):
                row["compile_s"] = time.perf_counter() - t0
            if ref_out and name != ref and "in place" not in name:
                row["check_err"], row["check_ok"] = close(first, ref_out, dtype, tol)
            del first
            timed(row, f)
            row["bytes"] = min_bytes(leaves, outs)

        run_row(out, row, body)
    DEV.empty_cache()


def categorical(out, budget, kind):
    for (B, D, K) in ((s(8192), 64, 17), (s(128), DEV.size(784, 64), 256)):
        case = f"K={K} [{B},{D},{K}]"
        for dtype in (torch.float32,) + DEV.low:
            def make(B=B, D=D, K=K, dtype=dtype):
                (logits, x), _ = V._categorical_inputs(B, D, K, DEV.torch, dtype)
                logits.requires_grad_()
                return [logits, x], [logits]

            def traffic(leaves, outs):  # fwd: logits, x, ll; bwd: grad, logits, x, the gradient
                logits, x = leaves
                return 3 * logits.nbytes + 2 * x.nbytes + 2 * outs[0].nbytes

            bench_case(out, budget, kind, "categorical", case, dtype,
                       {"torch": V.torch_categorical, "compile(torch)": V.torch_categorical,
                        "hvae_fast": ops.categorical_log_likelihood,
                        "hvae_fast (in place)": V.fused_categorical_overwrite},
                       make, traffic)


def posterior(out, budget, kind):
    B, L = s(4096), DEV.size(1024, 64)
    op_eps, op_none = V.OPS["posterior_eps"], V.OPS["posterior"]

    def make_eps():
        return make_leaves(op_eps.make(device=DEV.torch, dtype=torch.float32, B=B, L=L))

    def make_none():
        return make_leaves(op_none.make(device=DEV.torch, dtype=torch.float32, B=B, L=L))

    bench_case(out, budget, kind, "posterior", f"eps given [{B},{L}] x2 levels", torch.float32,
               {"torch": V.torch_posterior_eps, "compile(torch)": V.torch_posterior_eps,
                "hvae_fast": V.fused_posterior_eps},
               make_eps, lambda leaves, outs: V.min_bytes(op_eps, leaves, outs, True))
    # eps=None draws other numbers than randn_like: no check against torch
    bench_case(out, budget, kind, "posterior", f"eps=None [{B},{L}] x2 levels", torch.float32,
               {"torch": V.torch_posterior, "compile(torch)": V.torch_posterior,
                "hvae_fast": V.fused_posterior, "hvae_fast (eps=None)": V.fused_posterior_in_kernel},
               make_none, lambda leaves, outs: V.min_bytes(op_none, leaves, outs, True), ref=None)


def bernoulli(out, budget, kind):
    B, D = s(4096), 3072

    def make():
        (logits, x), _ = V._bernoulli_inputs(B, D, DEV.torch, torch.float32)
        logits.requires_grad_()
        return [logits, x], [logits]

    bench_case(out, budget, kind, "bernoulli", f"[{B},{D}]", torch.float32,
               {"torch": V.torch_bernoulli, "compile(torch)": V.torch_bernoulli,
                "hvae_fast": ops.bernoulli_log_likelihood},
               make, lambda leaves, outs: 3 * leaves[0].nbytes + 2 * leaves[1].nbytes + 2 * outs[0].nbytes)


def linear_head(out, budget, kind):
    B, H, D, K = s(128), 256, DEV.size(784, 64), 256

    def make():
        h = torch.randn(B, H, device=DEV.torch, requires_grad=True)
        w = (torch.randn(D * K, H, device=DEV.torch) / H ** 0.5).requires_grad_()
        b = torch.zeros(D * K, device=DEV.torch, requires_grad=True)
        x = torch.randint(0, K, (B, D), device=DEV.torch)
        return [h, w, b, x], [h, w, b]

    def torch_head(h, w, b, x):
        return V.torch_categorical(F.linear(h, w, b).view(B, D, K), x)

    # the floor: read h, weight, bias, x; write the gradients (the logits need not exist)
    bench_case(out, budget, kind, "linear_head", f"h [{B},{H}], D={D}, K={K}", torch.float32,
               {"torch": torch_head, "compile(torch)": torch_head, "hvae_fast": ops.linear_categorical_log_likelihood},
               make, lambda leaves, outs: 2 * nbytes(leaves[:3]) + 2 * leaves[3].nbytes)


def pixel_head(out, budget, kind):
    B, C, H, W, K = s(64), 32, 28, 28, 256

    def make():
        f = torch.randn(B, C, H, W, device=DEV.torch, requires_grad=True)
        w = (torch.randn(K, C, device=DEV.torch) / C ** 0.5).requires_grad_()
        b = torch.zeros(K, device=DEV.torch, requires_grad=True)
        x = torch.randint(0, K, (B, 1, H, W), device=DEV.torch)
        return [f, w, b, x], [f, w, b]

    def torch_head(f, w, b, x):
        logits = F.conv2d(f, w[:, :, None, None], b)  # [B, K, H, W]
        return -F.cross_entropy(logits, x[:, 0].long(), reduction="none").flatten(1).sum(1)

    bench_case(out, budget, kind, "pixel_head", f"features [{B},{C},{H},{W}], K={K}", torch.float32,
               {"torch": torch_head, "compile(torch)": torch_head, "hvae_fast": ops.pixel_categorical_log_likelihood},
               make, lambda leaves, outs: 2 * nbytes(leaves[:3]) + 2 * leaves[3].nbytes)


def dmol(out, budget, kind):
    import dmol as D  # benchmarks/dmol.py: the eager formulation and the inputs of its table

    for size in ("rgb32", "gray28"):
        B, C, H, W, M = D.SIZES[size]
        B, H, W = s(B), DEV.size(H, 8), DEV.size(W, 8)

        def make(B=B, C=C, H=H, W=W, M=M):
            params, x, _ = D.inputs(torch, None, (B, C, H, W, M))
            params = params.detach().to(DEV.torch).requires_grad_()
            return [params, x.to(DEV.torch)], [params]

        def eager(p, x, M=M):
            return D.eager_dmol(p, x, M)

        def fused(p, x, M=M):
            return ops.dmol_log_likelihood(p, x, num_mixtures=M)

        # fwd: params, x, ll; bwd: the incoming grad, params, x, the params' gradient
        bench_case(out, budget, kind, "dmol", f"{size} [{B},{C},{H},{W}] M={M}", torch.float32,
                   {"torch": eager, "compile(torch)": eager, "hvae_fast": fused}, make,
                   lambda leaves, outs: 3 * leaves[0].nbytes + 2 * leaves[1].nbytes + 2 * outs[0].nbytes, tol=2e-3)


def adamax(out, budget, kind):
    model_name = DEV.size("mnist", "digits")
    model = V.make_model(model_name, DEV.torch, torch.float32)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    case = f"{model_name} recipe, {len(params)} tensors, {n / 1e6:.2f}M params"
    kinds = {"hvae_fast.optim.Adamax": lambda ps: optim.Adamax(ps, lr=1e-3),
             "torch foreach": lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=True),
             "torch for-loop": lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=False),
             "torch fused": lambda ps: torch.optim.Adamax(ps, lr=1e-3, fused=True),
             "compile(torch foreach)": lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=True)}
    todo = [(name, make, row) for name, make in kinds.items()
            if (row := new_row(out, budget, kind, "adamax", case, "float32", name)) is not None]
    for name, make, row in todo:
        def body(row, name=name, make=make):
            ps = [p.detach().clone().requires_grad_() for p in params]
            for p in ps:
                p.grad = torch.randn_like(p)
            try:
                opt = make(ps)
            except TypeError as e:  # torch.optim.Adamax(fused=True) is newer than some torch versions
                row["skipped"] = f"not in torch {torch.__version__}: {e}"[:120]
                return
            step = opt.step
            t0 = time.perf_counter()
            if name.startswith("compile("):
                step = DEV.compile(opt.step)
            step()
            DEV.synchronize()
            if name.startswith("compile("):
                row["compile_s"] = time.perf_counter() - t0
            timed(row, step)
            row["bytes"] = 7 * sum(p.nbytes for p in ps)  # read p, g, m, u; write p, m, u

        run_row(out, row, body)
    DEV.empty_cache()


def train(out, budget, kind):
    from hvae_fast.model import ConvTopDownVAE

    def recipe(backend):
        m = V.make_model("digits", DEV.torch, torch.float32)
        m.backend = backend
        return m

    def image(backend):
        torch.manual_seed(0)
        return ConvTopDownVAE(channels=DEV.size(32, 8), groups=DEV.size((1, 2, 2), (1, 1, 1)),
                              backend=backend).to(DEV.torch)

    cases = [("recipe (digits, batch 64)", recipe, lambda: V.make_batches("digits", 4, DEV.torch, torch.float32)),
             (f"image (ConvTopDownVAE{DEV.size('', ', 8 channels')}, batch {s(64)})", image,
              lambda: [torch.randint(0, 256, (s(64), 784), device=DEV.torch).float() for _ in range(4)])]
    for case, make_model, make_batches in cases:
        todo = [(name, row) for name in ("torch", "compile(torch)", "hvae_fast", "compile(hvae_fast)")
                if (row := new_row(out, budget, kind, "train", case, "float32", name)) is not None]
        for name, row in todo:
            def body(row, name=name, make_model=make_model, make_batches=make_batches):
                fused = "hvae_fast" in name
                m = make_model("fused" if fused else "torch").train()
                opt = optim.Adamax(m.parameters(), lr=1e-3) if fused else \
                    torch.optim.Adamax(m.parameters(), lr=1e-3, foreach=True)
                t0 = time.perf_counter()
                loss_fn = DEV.compile(m) if name.startswith("compile(") else m
                batches, it = make_batches(), [0]

                def step():
                    opt.zero_grad(set_to_none=True)
                    loss_fn(batches[it[0] % len(batches)]).backward()
                    opt.step()
                    it[0] += 1

                step()
                DEV.synchronize()
                if name.startswith("compile("):
                    row["compile_s"] = time.perf_counter() - t0
                timed(row, step, target_s=0.3)

            run_row(out, row, body)
        DEV.empty_cache()


GROUPS = {"categorical": categorical, "posterior": posterior, "bernoulli": bernoulli, "linear_head": linear_head,
          "pixel_head": pixel_head, "dmol": dmol, "adamax": adamax, "train": train}


# ---- report ---------------------------------------------------------------------------------------

def load(path):
    """The records of a rows file; a last line without its newline (a run killed mid-write) is left out."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def add_ratios(rows):
    bw = next((r["bytes"] / r["median_s"] for r in rows if r["group"] == "copy" and r.get("median_s")), None)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["group"], r["case"], r["dtype"]), {})[r["variant"]] = r
    for g in by_case.values():
        eager = next((g[v].get("median_s") for v in g if v in ("torch", "torch foreach")), None)
        comp = next((g[v].get("median_s") for v in g if v.startswith("compile(torch")), None)
        for r in g.values():
            t = r.get("median_s")
            if not t:
                continue
            if r.get("bytes"):
                r["gbps"] = r["bytes"] / t / 1e9
                r["x_copy"] = t / (r["bytes"] / bw) if bw else None
            r["x_eager"] = eager / t if eager else None
            r["x_compile"] = comp / t if comp else None
    return bw


def fmt(v, f):
    return "-" if v is None else format(v, f)


def table(rows):
    head = ("| group | case | dtype | variant | median ms | GB/s | x copy | x eager | x compile | compile s "
            "| peak MiB | check |")
    out = [head, "|---" * 12 + "|"]
    for r in rows:
        if "median_s" not in r:
            why = f"skipped ({r['skipped']})" if "skipped" in r else f"ERROR {r.get('error')}"
            out.append(f"| {r['group']} | {r['case']} | {r['dtype']} | {r['variant']} | {why} | | | | | | | |")
            continue
        check = "-" if "check_ok" not in r else ("ok" if r["check_ok"] else "MISMATCH") + f" {r['check_err']:.1e}"
        out.append(f"| {r['group']} | {r['case']} | {r['dtype']} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                   f"{fmt(r.get('gbps'), '.0f')} | {fmt(r.get('x_copy'), '.2f')} | {fmt(r.get('x_eager'), '.2f')} | "
                   f"{fmt(r.get('x_compile'), '.2f')} | {fmt(r.get('compile_s'), '.1f')} | "
                   f"{fmt(r.get('peak_mib'), '.0f')} | {check} |")
    return "\n".join(out)


def report(path):
    """Prints the table of a rows file (every run in it); 1 if a row failed or mismatched."""
    records = load(path)
    metas = [r["meta"] for r in records if "meta" in r]
    ends = [r["end"] for r in records if "end" in r]
    rows = [r for r in records if "group" in r]
    first = {}  # the cases in the order they first appear, each case's rows together (eager, then compiled)
    rows.sort(key=lambda r: first.setdefault((r["group"], r["case"], r["dtype"]), len(first)))
    bw = add_ratios(rows)
    m = metas[0] if metas else {}
    runs = "; ".join(f"`{x['command']}`" for x in metas)
    stops = [e for e in ends if e.get("interrupted")]
    text = (f"# hvae_fast quick GPU table: {m.get('gpu')}\n\ntorch {m.get('torch')} (CUDA {m.get('cuda')}), "
            f"{m.get('date')}, {len(metas)} run(s): {runs}; {len(ends)} ended, {len(stops)} of them stopped by "
            f"SIGINT. Copy bandwidth {fmt(bw and bw / 1e9, '.0f')} GB/s.\n\n" + table(rows) + "\n")
    print(text)
    bad = [r for r in rows if "error" in r or r.get("check_ok") is False]
    print(f"gpu_quick: {len(rows)} rows, {sum('median_s' in r for r in rows)} measured, {len(bad)} with errors or "
          f"mismatches, {sum(r.get('skipped') == 'budget' for r in rows)} skipped for the budget; "
          f"{len(metas)} run(s), {len(metas) - len(ends)} without an end line (killed), {len(stops)} stopped by SIGINT")
    return 1 if bad else 0


def run(args):
    global DEV
    DEV = Device(args.rehearse)
    if args.rehearse:
        torch.set_num_threads(1)  # small sizes on a shared CPU: threads cost more than they give
    if not args.rehearse and not torch.cuda.is_available():
        sys.exit("gpu_quick.py: no GPU (--rehearse runs it on the CPU)")
    import hvae_fast
    info = hvae_fast.build_info()
    if not info.get("loaded" if args.rehearse else "cuda_kernels"):
        sys.exit(f"gpu_quick.py: hvae_fast's kernels for this device are not there: {info}")
    torch.backends.cuda.matmul.allow_tf32 = False
    budget = Budget(args.budget)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), gpu=DEV.name(),
                torch=torch.__version__, cuda=torch.version.cuda, hvae_fast=info,
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), budget_s=args.budget,
                rows=args.rows, compile_backend=DEV.compile_backend)
    out = Rows(args.out, meta)
    group, interrupted = "copy", False
    try:
        if args.rows != "compile":
            copy_bandwidth(out, budget)
        for group in args.only:
            t = time.perf_counter()
            GROUPS[group](out, budget, args.rows)
            print(f"[{group}: {time.perf_counter() - t:.1f} s, {budget.left():.0f} s of the budget left]", flush=True)
    except KeyboardInterrupt:  # tools/gpu_session.sh's cap: every row so far is in the file
        interrupted = True
    out.write({"end": dict(wall_s=time.perf_counter() - T0, interrupted=interrupted, during=group)})
    print(f"gpu_quick: {'stopped by SIGINT' if interrupted else 'ended'} in {group}, {len(out.rows)} rows written to "
          f"{args.out}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench.jsonl", help="the rows file (JSON lines), appended to")
    ap.add_argument("--table", metavar="ROWS", help="run nothing: the table of this rows file")
    ap.add_argument("--budget", type=float, default=240, help="seconds for this run")
    ap.add_argument("--rows", choices=["all", "eager", "compile"], default="all")
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    ap.add_argument("--rehearse", action="store_true",
                    help="on the CPU, small sizes, torch.cuda's calls stood in for: checks the script")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the caller's shell ignores SIGINT
    warnings.filterwarnings("ignore", message=".*running the pure-PyTorch reference.*")
    if not args.table:
        run(args)
    return report(args.table or args.out)


if __name__ == "__main__":
    sys.exit(main())
