"""The categorical backward kernel at the MNIST-like size: a fresh gradient tensor vs the
gradient written into the logits (overwrite_logits), against a plain copy for scale.

    python benchmarks/categorical_backward.py [--threads N]
"""
import argparse
import time

import torch

import hvae_fast  # noqa: F401  (registers torch.ops.hvae_fast)


def median_ms(f, n=9):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, D, K = 128, 784, 256
    logits = torch.randn(B, D, K)
    x = torch.randint(0, K, (B, D))
    g = torch.ones(B)
    ops = torch.ops.hvae_fast
    _, lse = ops.categorical_log_likelihood(logits, x)
    buf = torch.empty_like(logits)
    rows = {
        "forward (saves lse)": lambda: ops.categorical_log_likelihood(logits, x),
        "backward, fresh gradient": lambda: ops.categorical_log_likelihood_backward(g, logits, x, lse),
        "backward, into the logits": lambda: ops.categorical_log_likelihood_backward_(g, logits, x, lse),
        "copy of the logits into an existing buffer": lambda: buf.copy_(logits),
        "fresh logits-sized tensor, filled": lambda: torch.empty_like(logits).fill_(1.0),
    }
    print(f"B={B} D={D} K={K} float32, {args.threads} thread(s), torch {torch.__version__}")
    for name, f in rows.items():
        print(f"{name:45s} {median_ms(f):8.1f} ms")


if __name__ == "__main__":
    main()
