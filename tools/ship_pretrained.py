"""Ship a finished run as a pretrained model: hvae_fast/checkpoints/NAME.pt and NAME.json.

    python tools/ship_pretrained.py RUN_DIR NAME --command "hvae-fast train ..." [--commit SHA]

The .pt is the run's best.pt with the validated weights only (what hvae_fast.pretrained loads);
the card holds the command, the commit, the machine and the run's test numbers from summary.json.
"""
import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch

from hvae_fast import _pretrained
from hvae_fast.train import checkpoint_weights, load_checkpoint


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished run folder (best.pt, summary.json)")
    p.add_argument("name", help="the name hvae_fast.pretrained() will take")
    p.add_argument("--command", required=True, help="the command that trained the run")
    p.add_argument("--commit", default=None, help="the commit that trained it (default: HEAD)")
    p.add_argument("--note", default="", help="anything else a user should know")
    p.add_argument("--eval", type=Path, default=None, metavar="JSON",
                   help="the test numbers from `hvae-fast eval RUN/best.pt --json JSON` instead of summary.json's")
    a = p.parse_args(argv)
    summary = json.loads((a.run / "summary.json").read_text())
    test = json.loads(a.eval.read_text()) if a.eval else summary.get("test")
    if not test or "neg_elbo" not in test:
        p.error(f"{a.run}: no test evaluation in summary.json; give --eval")
    ck = load_checkpoint(str(a.run / "best.pt"))
    weights, which = checkpoint_weights(ck, "validated")
    lean = {k: ck[k] for k in ("format", "config", "num_vals", "model_class", "epoch", "best_epoch", "best_val")}
    lean["model"] = {k: v.detach().clone().contiguous() for k, v in weights.items()}
    commit = a.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    card = {
        "name": a.name,
        "model": ck["model_class"],
        "parameters": summary["parameters"],
        "command": a.command,
        "commit": commit,
        "machine": f"{cpu_model()}, torch {torch.__version__}",
        "weights": which,
        "epochs": summary["epochs"],
        "train_time_s": round(summary["train_time_s"], 1),
        "test": {k: v for k, v in test.items() if k not in ("checkpoint",)},
        "note": a.note,
    }
    _pretrained.FOLDER.mkdir(exist_ok=True)
    torch.save(lean, _pretrained.FOLDER / f"{a.name}.pt")
    (_pretrained.FOLDER / f"{a.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    size = (_pretrained.FOLDER / f"{a.name}.pt").stat().st_size
    print(f"wrote {_pretrained.FOLDER}/{a.name}.pt ({size / 2**20:.2f} MiB) and {a.name}.json")


if __name__ == "__main__":
    main()
