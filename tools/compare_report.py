"""The README's table of `hvae-fast compare` runs: one row per setting, model and depth (mean
over seeds, the IW-NLL's +- its standard error over the test images averaged over seeds),
then top-down minus bottom-up on the same images of each seed (paired standard error), and
each setting after the first minus the first, model by model (a seed scores the same test
images under every setting).

    python tools/compare_report.py NAME=DIR [NAME=DIR ...]

DIR: a compare --out folder (compare.json); NAME labels its setting in the table. Where a
run's folder holds iw.json (`hvae-fast eval RUN/best.pt --seed SEED --json RUN/iw.json` with
the comparison's --iw-samples and --iw-subset), its test report replaces the one in
compare.json: compare.json from before hvae_fast kept per-image values has none to pair."""
import json
import math
import os
import sys
from collections import defaultdict

from hvae_fast.cli import _mean_range as spread  # mean (min-max), as compare's own table
from hvae_fast.evaluate import paired_difference


def mean(v):
    return sum(v) / len(v)


def main(args):
    if not args or any("=" not in a for a in args):
        sys.exit(__doc__)
    rows, pairs, settings = [], [], []
    head = ("| setting | model | levels | seeds | test -ELBO | test IW-NLL +- SE | KL per level (z1 first) | "
            "KL-active units per level | train s |")
    for arg in args:
        name, folder = arg.split("=", 1)
        with open(os.path.join(folder, "compare.json")) as f:
            runs = json.load(f)
        by = defaultdict(dict)  # (model, levels) -> {seed: test report}
        for model, ss in runs.items():
            for s in ss:
                c = s["config"]
                iw = os.path.join(folder, f"{model}{c['levels']}-seed{c['seed']}", "iw.json")
                if os.path.exists(iw):
                    with open(iw) as f:
                        again = json.load(f)
                    if abs(again["iw_nll"] - s["test"]["iw_nll"]) > 1e-6 * abs(again["iw_nll"]):
                        sys.exit(f"{iw}: IW-NLL {again['iw_nll']} is not the run's {s['test']['iw_nll']}")
                    s = {**s, "test": {**s["test"], **again}}
                by[model, c["levels"]][c["seed"]] = s
        for (model, levels), seeds in sorted(by.items()):
            ts = [s["test"] for s in seeds.values()]
            kl = ", ".join(f"{mean([t['kl'][i] for t in ts]):.2f}" for i in range(levels))
            au = ", ".join(spread([t["active_units"][i] for t in ts], "{:.0f}") + f"/{ts[0]['latent_dims'][i]}"
                           for i in range(levels))
            rows.append(f"| {name} | {model} | {levels} | {len(ts)} | {spread([t['neg_elbo'] for t in ts])} | "
                        f"{mean([t['iw_nll'] for t in ts]):.2f} +- {mean([t['iw_nll_se'] for t in ts]):.2f} | "
                        f"{kl} | {au} | {mean([s['train_time_s'] for s in seeds.values()]):.0f} |")
        settings.append((name, by))
        for levels in sorted({n for _, n in by}):
            td, bu = by.get(("topdown", levels), {}), by.get(("bottomup", levels), {})
            ds = [paired_difference(td[k]["test"], bu[k]["test"]) for k in sorted(set(td) & set(bu))]
            if ds:
                per_seed = ", ".join(f"{d['diff']:+.2f} +- {d['se']:.2f}" for d in ds)
                se = math.sqrt(sum(d["se"] ** 2 for d in ds)) / len(ds)
                pairs.append(f"| {name} | {levels} | {mean([d['diff'] for d in ds]):+.2f} +- {se:.2f} | {per_seed} |")
    print(head + "\n|" + "---|" * 9)
    print("\n".join(rows))
    print("\n| setting | levels | top-down minus bottom-up IW-NLL, mean over seeds +- SE | per seed (paired SE) |"
          "\n|---|---|---|---|")
    print("\n".join(pairs))
    if len(settings) > 1:
        first, base = settings[0]
        print(f"\n| setting minus {first} | model | levels | IW-NLL difference, mean over seeds +- SE | per seed |"
              "\n|---|---|---|---|---|")
        for name, by in settings[1:]:
            for key in sorted(set(by) & set(base)):
                ds = [paired_difference(by[key][k]["test"], base[key][k]["test"])
                      for k in sorted(set(by[key]) & set(base[key]))]
                se = math.sqrt(sum(d["se"] ** 2 for d in ds)) / len(ds)
                print(f"| {name} | {key[0]} | {key[1]} | {mean([d['diff'] for d in ds]):+.2f} +- {se:.2f} | "
                      + ", ".join(f"{d['diff']:+.2f} +- {d['se']:.2f}" for d in ds) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
