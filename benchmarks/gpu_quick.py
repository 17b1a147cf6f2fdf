"""The quick GPU table of tools/gpu_session.sh: every fused op and two training steps on one GPU,
each against eager PyTorch and torch.compile, with the device's copy bandwidth measured in the
same run and each op's ratio to it.

    python benchmarks/gpu_quick.py --out bench.json --md bench.md [--budget 200] [--no-compile]
                                   [--only categorical posterior ...]

Cases (sizes fill an H100/H200 well past launch overhead; all fwd+bwd as in training unless named):
  categorical      K = 17 [8192, 64, 17] and K = 256 [128, 784, 256], float32 and bfloat16;
                   hvae_fast with a fresh gradient and in place (overwrite_logits=True)
  posterior        two levels [4096, 1024]: noise passed in (eps), and eps=None (drawn in the kernel)
                   against torch.randn_like + the arithmetic
  bernoulli        [4096, 3072]
  linear_head      linear_categorical_log_likelihood, h [128, 256], D = 784, K = 256, against
                   F.linear + cross_entropy
  pixel_head       pixel_categorical_log_likelihood, features [64, 32, 28, 28], K = 256, against
                   F.conv2d (1x1) + cross_entropy
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
compiled torch variant's time over this one: > 1 is faster), compile s (first call), check
(the variant's outputs and gradients against the eager torch variant's, first call).
--budget: seconds for the whole table; once spent, the remaining cases are listed as skipped.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants as V  # noqa: E402
from hvae_fast import ops, optim  # noqa: E402

DEV = torch.device("cuda")
SMOKE = False  # --smoke: the whole script on the CPU at 1/64 of the batch sizes, for CI-style checks
T0 = time.perf_counter()


def s(n):
    """A batch size, scaled down under --smoke."""
    return max(2, n // 64) if SMOKE else n


class Budget:
    def __init__(self, seconds):
        self.seconds = seconds

    def left(self):
        return self.seconds - (time.perf_counter() - T0)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, target_s=0.15, groups=5):
    """Median over `groups` of the mean time of a group of calls, by CUDA events, after warm-up."""
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(200, max(3, target_s / groups / one)))
    means = []
    for _ in range(groups):
        if DEV.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            means.append((time.perf_counter() - t0) / reps)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(means)[len(means) // 2]


def copy_bandwidth(nbytes=1 << 30):
    nbytes = nbytes >> 6 if SMOKE else nbytes
    src = torch.empty(nbytes // 4, device=DEV).uniform_()
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src))
    del src, dst
    empty_cache()
    return 2 * nbytes / t


def empty_cache():
    if DEV.type == "cuda":
        empty_cache()


def nbytes(ts):
    return sum(t.nbytes for t in ts if isinstance(t, torch.Tensor))


def close(a, b, dtype):
    """Relative max-norm distance of a and b (lists of tensors), and whether it is small for dtype."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}.get(dtype, 1e-4)
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        if x.shape != y.shape:
            return math.inf, False
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
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


def new_row(rows, budget, compile_ok, group, case, dtype, variant):
    """The row of one variant, or None when it does not run: once the budget is spent (then
    recorded as skipped), or a compiled variant where torch.compile is unavailable."""
    row = dict(group=group, case=case, dtype=dtype, variant=variant)
    if budget.left() <= 0:
        rows.append({**row, "skipped": "budget"})
        return None
    if variant.startswith("compile(") and not compile_ok:
        return None
    return row


def bench_case(rows, budget, group, case, dtype, variants, make, min_bytes, compile_ok, ref="torch"):
    """variants: name -> fn of the inputs; make() -> (leaves, wrt). Times fwd+bwd of each."""
    results, ref_out = {}, None
    for name, fn in variants.items():
        row = new_row(rows, budget, compile_ok, group, case, str(dtype).replace("torch.", ""), name)
        if row is None:
            continue
        torch.manual_seed(0)
        leaves, wrt = make()
        try:
            t0 = time.perf_counter()
            if name.startswith("compile("):
                torch._dynamo.reset()
                fn = torch.compile(fn, dynamic=False)
            f, outs = fwd_bwd(fn, leaves, wrt)
            first = list(outs) + list(f())
            sync()
            if name.startswith("compile("):
                row["compile_s"] = time.perf_counter() - t0
            if name == ref:
                ref_out = first
            elif ref_out is not None and "in place" not in name:
                row["check_err"], row["check_ok"] = close(first, ref_out, dtype)
            del first
            row["median_s"] = time_call(f)
            row["bytes"] = min_bytes(leaves, outs)
        except Exception as e:  # one failing variant must not end the table
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            traceback.print_exc()
        rows.append(row)
        results[name] = row
        print(f"  {group}/{case}/{row['dtype']}/{name}: "
              f"{row['median_s'] * 1e3:.3f} ms" if "median_s" in row else f"  {group}/{case}/{name}: {row.get('error')}",
              flush=True)
        del leaves, wrt
    empty_cache()


def categorical(rows, budget, compile_ok):
    for (B, D, K) in ((s(8192), 64, 17), (s(128), 784, 256)):
        case = f"K={K} [{B},{D},{K}]"
        for dtype in (torch.float32,) if SMOKE else (torch.float32, torch.bfloat16):  # CPU kernels: no bf16
            def make():
                (logits, x), _ = V._categorical_inputs(B, D, K, DEV, dtype)
                logits.requires_grad_()
                return [logits, x], [logits]

            def traffic(leaves, outs):  # fwd: logits, x, ll; bwd: grad, logits, x, the gradient
                logits, x = leaves
                return 3 * logits.nbytes + 2 * x.nbytes + 2 * outs[0].nbytes

            bench_case(rows, budget, "categorical", case, dtype,
                       {"torch": V.torch_categorical, "compile(torch)": V.torch_categorical,
                        "hvae_fast": ops.categorical_log_likelihood,
                        "hvae_fast (in place)": V.fused_categorical_overwrite},
                       make, traffic, compile_ok)


def posterior(rows, budget, compile_ok):
    B, L = s(4096), 1024
    op_eps, op_none = V.OPS["posterior_eps"], V.OPS["posterior"]

    def make_eps():
        return make_leaves(op_eps.make(device=DEV, dtype=torch.float32, B=B, L=L))

    def make_none():
        return make_leaves(op_none.make(device=DEV, dtype=torch.float32, B=B, L=L))

    bench_case(rows, budget, "posterior", f"eps given [{B},{L}] x2 levels", torch.float32,
               {"torch": V.torch_posterior_eps, "compile(torch)": V.torch_posterior_eps,
                "hvae_fast": V.fused_posterior_eps},
               make_eps, lambda leaves, outs: V.min_bytes(op_eps, leaves, outs, True), compile_ok)
    # eps=None draws other numbers than randn_like: no check against torch
    bench_case(rows, budget, "posterior", f"eps=None [{B},{L}] x2 levels", torch.float32,
               {"torch": V.torch_posterior, "compile(torch)": V.torch_posterior,
                "hvae_fast": V.fused_posterior, "hvae_fast (eps=None)": V.fused_posterior_in_kernel},
               make_none, lambda leaves, outs: V.min_bytes(op_none, leaves, outs, True), compile_ok, ref=None)


def bernoulli(rows, budget, compile_ok):
    B, D = s(4096), 3072

    def make():
        (logits, x), _ = V._bernoulli_inputs(B, D, DEV, torch.float32)
        logits.requires_grad_()
        return [logits, x], [logits]

    bench_case(rows, budget, "bernoulli", f"[{B},{D}]", torch.float32,
               {"torch": V.torch_bernoulli, "compile(torch)": V.torch_bernoulli,
                "hvae_fast": ops.bernoulli_log_likelihood},
               make, lambda leaves, outs: 3 * leaves[0].nbytes + 2 * leaves[1].nbytes + 2 * outs[0].nbytes,
               compile_ok)


def linear_head(rows, budget, compile_ok):
    B, H, D, K = s(128), 256, 784, 256

    def make():
        h = torch.randn(B, H, device=DEV, requires_grad=True)
        w = (torch.randn(D * K, H, device=DEV) / H ** 0.5).requires_grad_()
        b = torch.zeros(D * K, device=DEV, requires_grad=True)
        x = torch.randint(0, K, (B, D), device=DEV)
        return [h, w, b, x], [h, w, b]

    def torch_head(h, w, b, x):
        return V.torch_categorical(F.linear(h, w, b).view(B, D, K), x)

    # the floor: read h, weight, bias, x; write the gradients (the logits need not exist)
    bench_case(rows, budget, "linear_head", f"h [{B},{H}], D={D}, K={K}", torch.float32,
               {"torch": torch_head, "compile(torch)": torch_head, "hvae_fast": ops.linear_categorical_log_likelihood},
               make, lambda leaves, outs: 2 * nbytes(leaves[:3]) + 2 * leaves[3].nbytes, compile_ok)


def pixel_head(rows, budget, compile_ok):
    B, C, H, W, K = s(64), 32, 28, 28, 256

    def make():
        f = torch.randn(B, C, H, W, device=DEV, requires_grad=True)
        w = (torch.randn(K, C, device=DEV) / C ** 0.5).requires_grad_()
        b = torch.zeros(K, device=DEV, requires_grad=True)
        x = torch.randint(0, K, (B, 1, H, W), device=DEV)
        return [f, w, b, x], [f, w, b]

    def torch_head(f, w, b, x):
        logits = F.conv2d(f, w[:, :, None, None], b)  # [B, K, H, W]
        return -F.cross_entropy(logits, x[:, 0].long(), reduction="none").flatten(1).sum(1)

    bench_case(rows, budget, "pixel_head", f"features [{B},{C},{H},{W}], K={K}", torch.float32,
               {"torch": torch_head, "compile(torch)": torch_head, "hvae_fast": ops.pixel_categorical_log_likelihood},
               make, lambda leaves, outs: 2 * nbytes(leaves[:3]) + 2 * leaves[3].nbytes, compile_ok)


def adamax(rows, budget, compile_ok):
    model = V.make_model("mnist", DEV, torch.float32)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    case = f"mnist recipe, {len(params)} tensors, {n / 1e6:.2f}M params"
    kinds = {"hvae_fast.optim.Adamax": lambda ps: optim.Adamax(ps, lr=1e-3),
             "torch foreach": lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=True),
             "torch for-loop": lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=False),
             "torch fused": lambda ps: torch.optim.Adamax(ps, lr=1e-3, fused=True),
             "compile(torch foreach)": lambda ps: torch.optim.Adamax(ps, lr=1e-3, foreach=True)}
    for name, make in kinds.items():
        row = new_row(rows, budget, compile_ok, "adamax", case, "float32", name)
        if row is None:
            continue
        try:
            ps = [p.detach().clone().requires_grad_() for p in params]
            for p in ps:
                p.grad = torch.randn_like(p)
            try:
                opt = make(ps)
            except TypeError as e:  # torch.optim.Adamax(fused=True) is newer than some torch versions
                row["skipped"] = f"not in torch {torch.__version__}: {e}"[:120]
                rows.append(row)
                print(f"  adamax/{name}: {row['skipped']}", flush=True)
                continue
            step = opt.step
            t0 = time.perf_counter()
            if name.startswith("compile("):
                torch._dynamo.reset()
                step = torch.compile(opt.step)
            step()
            sync()
            if name.startswith("compile("):
                row["compile_s"] = time.perf_counter() - t0
            row["median_s"] = time_call(step)
            row["bytes"] = 7 * sum(p.nbytes for p in ps)  # read p, g, m, u; write p, m, u
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        rows.append(row)
        print(f"  adamax/{name}: {row.get('median_s', float('nan')) * 1e3:.3f} ms {row.get('error', '')}", flush=True)


def train(rows, budget, compile_ok):
    from hvae_fast.model import ConvTopDownVAE
    cases = []

    def recipe(backend):
        m = V.make_model("digits", DEV, torch.float32)
        m.backend = backend
        return m

    def image(backend):
        torch.manual_seed(0)
        return ConvTopDownVAE(backend=backend).to(DEV)

    cases.append(("recipe (digits, batch 64)", recipe, lambda: V.make_batches("digits", 4, DEV, torch.float32)))
    cases.append((f"image (ConvTopDownVAE, batch {s(64)})", image,
                  lambda: [torch.randint(0, 256, (s(64), 784), device=DEV).float() for _ in range(4)]))
    for case, make_model, make_batches in cases:
        for name in ("torch", "compile(torch)", "hvae_fast", "compile(hvae_fast)"):
            row = new_row(rows, budget, compile_ok, "train", case, "float32", name)
            if row is None:
                continue
            try:
                fused = "hvae_fast" in name
                m = make_model("fused" if fused else "torch").train()
                opt = optim.Adamax(m.parameters(), lr=1e-3) if fused else \
                    torch.optim.Adamax(m.parameters(), lr=1e-3, foreach=True)
                loss_fn = m
                t0 = time.perf_counter()
                if name.startswith("compile("):
                    torch._dynamo.reset()
                    loss_fn = torch.compile(m)
                batches, it = make_batches(), [0]

                def step():
                    opt.zero_grad(set_to_none=True)
                    loss_fn(batches[it[0] % len(batches)]).backward()
                    opt.step()
                    it[0] += 1

                step()
                sync()
                if name.startswith("compile("):
                    row["compile_s"] = time.perf_counter() - t0
                row["median_s"] = time_call(step, target_s=0.3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                traceback.print_exc()
            rows.append(row)
            print(f"  train/{case}/{name}: {row.get('median_s', float('nan')) * 1e3:.3f} ms {row.get('error', '')}",
                  flush=True)
        empty_cache()


GROUPS = {"categorical": categorical, "posterior": posterior, "bernoulli": bernoulli, "linear_head": linear_head,
          "pixel_head": pixel_head, "adamax": adamax, "train": train}


# ---- report ---------------------------------------------------------------------------------------

def add_ratios(rows, bw):
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
                r["x_copy"] = t / (r["bytes"] / bw)
            r["x_eager"] = eager / t if eager else None
            r["x_compile"] = comp / t if comp else None


def fmt(v, f):
    return "-" if v is None else format(v, f)


def table(rows):
    head = "| group | case | dtype | variant | median ms | GB/s | x copy | x eager | x compile | compile s | check |"
    out = [head, "|---" * 11 + "|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            out.append(f"| {r['group']} | {r['case']} | {r['dtype']} | {r['variant']} | "
                       f"{'skipped (' + r['skipped'] + ')' if 'skipped' in r else 'ERROR ' + r['error']} "
                       "| | | | | | |")
            continue
        check = "-" if "check_ok" not in r else ("ok" if r["check_ok"] else "MISMATCH") + f" {r['check_err']:.1e}"
        out.append(f"| {r['group']} | {r['case']} | {r['dtype']} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                   f"{fmt(r.get('gbps'), '.0f')} | {fmt(r.get('x_copy'), '.2f')} | {fmt(r.get('x_eager'), '.2f')} | "
                   f"{fmt(r.get('x_compile'), '.2f')} | {fmt(r.get('compile_s'), '.1f')} | {check} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--budget", type=float, default=240, help="seconds for the whole table")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    ap.add_argument("--smoke", action="store_true", help="on the CPU at 1/64 of the batch sizes: checks the script")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*running the pure-PyTorch reference.*")
    global SMOKE, DEV
    if args.smoke:
        SMOKE, DEV = True, torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu_quick.py: no GPU")
    import hvae_fast
    info = hvae_fast.build_info()
    if not args.smoke and not info.get("cuda_kernels"):
        sys.exit(f"gpu_quick.py: hvae_fast was built without its CUDA kernels: {info}")
    torch.backends.cuda.matmul.allow_tf32 = False
    budget = Budget(args.budget)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB dst.copy_(src), read + write)", flush=True)
    rows = []
    for name in args.only:
        t = time.perf_counter()
        GROUPS[name](rows, budget, not args.no_compile)
        print(f"[{name}: {time.perf_counter() - t:.1f} s, {budget.left():.0f} s of the budget left]", flush=True)
    add_ratios(rows, bw)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name() if DEV.type == "cuda" else "none (--smoke, CPU)",
                torch=torch.__version__, cuda=torch.version.cuda, hvae_fast=info, copy_gbps=bw / 1e9,
                command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                wall_s=time.perf_counter() - T0, budget_s=args.budget)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    text = (f"# hvae_fast quick GPU table: {meta['gpu']}\n\ntorch {meta['torch']} (CUDA {meta['cuda']}), "
            f"{meta['date']}, `{meta['command']}`, {meta['wall_s']:.0f} s. Copy bandwidth {bw / 1e9:.0f} GB/s.\n\n"
            + table(rows) + "\n")
    with open(args.md, "w") as f:
        f.write(text)
    print(text)
    bad = [r for r in rows if "error" in r or r.get("check_ok") is False]
    print(f"gpu_quick: {len(rows)} rows, {len(bad)} with errors or mismatches, "
          f"{sum('skipped' in r for r in rows)} skipped for the budget, {meta['wall_s']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
