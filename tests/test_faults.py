"""Surviving faults: a training process killed with SIGKILL at a random moment resumes
from its last checkpoint and ends where an uninterrupted run ends; checkpoints of a
newer format are refused by name."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from hvae_fast import train as T

ARGS = ["train", "--epochs", "8", "--max-train", "192", "--patience", "100", "--no-progress", "--threads", "1",
        "--seed", "5", "--iw-samples", "0"]


def cli(out, *extra):
    return [sys.executable, "-m", "hvae_fast.cli", *ARGS, "--out", str(out), *extra]


def epochs_done(out):
    try:
        with open(out / "metrics.jsonl") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cli(whole), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.Random(0).randint(2, 5)  # kill somewhere inside epoch `target + 1`
    deadline = time.monotonic() + 300
    while epochs_done(killed) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(1).uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    # the checkpoint on disk is whole (written atomically) and at most one epoch behind the
    # log (the kill may fall between an epoch's metrics line and its checkpoint)
    state = T.load_checkpoint(killed / "last.pt")
    assert state["epoch"] >= target - 1

    # only --resume: every setting comes from the checkpoint, and it continues in the checkpoint's folder
    subprocess.run([sys.executable, "-m", "hvae_fast.cli", "train", "--resume", str(killed / "last.pt"),
                    "--threads", "1"], check=True, capture_output=True, timeout=600, cwd=tmp_path)
    assert not (tmp_path / "hvae-run").exists()
    a = torch.load(whole / "best.pt", weights_only=True)
    b = torch.load(killed / "best.pt", weights_only=True)
    assert a["best_epoch"] == b["best_epoch"]
    assert a["best_val"] == b["best_val"]
    # the same log, one row per epoch; only the clock differs
    rows = [[{k: v for k, v in json.loads(s).items() if k != "time"} for s in (d / "metrics.jsonl").read_text()
             .splitlines()] for d in (whole, killed)]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == list(range(1, 9))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa = json.loads((whole / "summary.json").read_text())["test"]
    sb = json.loads((killed / "summary.json").read_text())["test"]
    assert sa["neg_elbo"] == sb["neg_elbo"]


def test_newer_checkpoint_format_is_refused_by_name(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": T.CHECKPOINT_FORMAT + 1, "model": {}, "config": {}}, path)
    with pytest.raises(T.CheckpointError, match=f"{path}.*newer hvae_fast"):
        T.load_checkpoint(path)
