"""Stops that survive preemption: SIGTERM, SIGINT and SIGUSR1 finish the current step, write
last.pt with the position inside the epoch, mark summary.json interrupted and exit with
status 75; --resume then ends bit for bit where the uninterrupted run ends.

The in-process tests use the documented hook HVAE_FAST_TEST_SIGNAL=NAME:STEP (the loop sends
itself the signal with os.kill at that step; the real handlers take it); the command-line
test sends SIGTERM from outside with os.kill while an epoch runs. torchrun: test_distributed.py."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from hvae_fast import preempt, writer, train as T
from hvae_fast.train import TrainConfig
from test_aids import _nan_loss_at

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")]


def _cfg(**kw):
    base = dict(hidden=16, max_train=256, batch_size=16, epochs=3, progress=False, seed=3, iw_samples=0)
    base.update(kw)  # 16 steps an epoch
    return TrainConfig(**base)


def _rows(history):
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


AIDS = dict(grad_clip=50.0, skip_threshold=1e6, ema=0.9, kl_warmup_steps=100, free_bits=0.2, kl_balance=True,
            lr_warmup_steps=5, lr_schedule="cosine", lr_min_factor=0.1)


@pytest.mark.parametrize("name, settings", [
    ("SIGTERM", {}),
    ("SIGUSR1", AIDS),  # warm-ups and the schedule run on the step counter; skips before and after the stop
    ("SIGINT", dict(likelihood="bernoulli", binarize="dynamic", dropout=0.2)),  # noise in the data too
], ids=["recipe-SIGTERM", "aids-SIGUSR1", "dynamic-binarization-SIGINT"])
def test_a_signal_mid_epoch_stops_after_the_step_and_resume_ends_bit_for_bit(tmp_path, monkeypatch, name,
                                                                            settings):
    if settings is AIDS:
        _nan_loss_at(monkeypatch, [19 / 100, 25 / 100])  # steps 19 and 25: epoch 2, batches 3 and 9
    full = T.train(_cfg(**settings), out=str(tmp_path / "full"))
    before = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    monkeypatch.setenv(preempt.TEST_HOOK, f"{name}:21")  # epoch 2, batch 5 of 16
    with pytest.raises(T.TrainingInterrupted) as e:
        T.run(_cfg(**settings), out=str(tmp_path / "half"))
    monkeypatch.delenv(preempt.TEST_HOOK)
    assert {s: signal.getsignal(s) for s in preempt.SIGNALS} == before  # the handlers are given back
    last = tmp_path / "half" / "last.pt"
    assert str(e.value) == (f"training stopped by {name} at epoch 2, batch 5 of 16 (step 21); {last} holds the run "
                            f"up to there; resume with `hvae-fast train --resume {last}`")
    ck = T.load_checkpoint(last)
    assert ck["format"] == writer.CHECKPOINT_FORMAT == 3
    run = ck["run"]
    assert (run["epoch"], run["step"], run["progress"]["batch"], len(run["history"])) == (1, 21, 5, 1)
    assert len(run["progress"]["perm"]) == 256 and len(run["progress"]["sums"]) == 1
    if settings is AIDS:
        assert run["progress"]["skips"] == 1 and len(run["progress"]["norms"]) == 4  # the NaN step has no norm
    assert len((tmp_path / "half" / "metrics.jsonl").read_text().splitlines()) == 1  # no row for half an epoch
    summary = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["complete"] is False and summary["epochs"] == 1
    assert summary["interrupted"] == {"signal": name, "during": "training", "epoch": 2, "batch": 5, "batches": 16,
                                      "step": 21, "last": str(last), "resume": f"hvae-fast train --resume {last}"}
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path / "half"))

    resumed = T.train(resume=str(last), out=str(tmp_path / "half"))
    assert _rows(resumed["history"]) == _rows(full["history"])
    if settings is AIDS:
        assert [r["skipped"] for r in full["history"]] == [0, 2, 0]
    _same_weights(resumed["model"].state_dict(), full["model"].state_dict())
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "half"))
    _same_weights(a["model"], b["model"])
    assert b["run"]["progress"] is None and a["run"]["step"] == b["run"]["step"] == 48
    if settings is AIDS:
        _same_weights(a["ema"], b["ema"])
    assert [json.loads(s) for s in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()] == \
        resumed["history"]


def test_a_signal_during_validation_stops_at_the_end_of_the_epoch(tmp_path, monkeypatch):
    full = T.train(_cfg(), out=str(tmp_path / "full"))
    real = T.Trainer.validate

    def validate(self, epoch):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, epoch)

    monkeypatch.setattr(T.Trainer, "validate", validate)
    with pytest.raises(T.TrainingInterrupted, match="stopped by SIGTERM after epoch 2 \\(step 32\\)"):
        T.train(_cfg(), out=str(tmp_path / "half"))
    monkeypatch.undo()
    ck = T.load_checkpoint(tmp_path / "half" / "last.pt")
    assert ck["run"]["epoch"] == 2 and ck["run"]["progress"] is None
    resumed = T.train(resume=str(tmp_path / "half" / "last.pt"), out=str(tmp_path / "half"))
    assert _rows(resumed["history"]) == _rows(full["history"])
    _same_weights(resumed["model"].state_dict(), full["model"].state_dict())


def test_a_signal_after_training_stops_the_evaluation_and_a_resume_runs_it(tmp_path, monkeypatch):
    from hvae_fast import evaluate
    real = evaluate.evaluate_steps

    def steps(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # raises here: nothing is left to save
        yield from real(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate_steps", steps)
    with pytest.raises(T.TrainingInterrupted, match="the test evaluation stopped by SIGTERM"):
        T.run(_cfg(epochs=1), out=str(tmp_path), pictures=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "max_epochs" and not summary["complete"] and "test" not in summary
    assert summary["interrupted"] == {"signal": "SIGTERM", "during": "the test evaluation"}
    monkeypatch.undo()
    done = T.run(resume=str(tmp_path / "last.pt"), out=str(tmp_path), pictures=False)
    assert done["complete"] and "interrupted" not in json.loads((tmp_path / "summary.json").read_text())


def test_a_second_sigint_stops_at_once(monkeypatch):
    calls = []
    real = T.Trainer._interrupted

    def interrupted(self):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # impatient: Ctrl-C again while the stop is under way
        return real(self)

    monkeypatch.setattr(T.Trainer, "_interrupted", interrupted)
    monkeypatch.setenv(preempt.TEST_HOOK, "SIGINT:3")
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg())
    assert calls == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_no_handler_is_installed():
    seen = {}

    def work():
        seen["res"] = T.train(_cfg(epochs=1))  # signal.signal would raise ValueError here

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["res"]["epochs"] == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_format_2_checkpoint_resumes_as_the_run_it_was(tmp_path):
    whole = T.train(_cfg(epochs=2))
    T.train(_cfg(epochs=1), out=str(tmp_path))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    del ck["run"]["progress"]  # format 2: always at an epoch's end
    torch.save({**ck, "format": 2}, tmp_path / "old.pt")
    resumed = T.train(resume=str(tmp_path / "old.pt"), overrides={"epochs": 2})
    assert _rows(resumed["history"]) == _rows(whole["history"])
    _same_weights(resumed["model"].state_dict(), whole["model"].state_dict())


# ---- the command line: SIGTERM from outside -----------------------------------------------------

ARGS = ["train", "--epochs", "3", "--max-train", "1000", "--batch-size", "8", "--hidden", "16", "--patience", "100",
        "--no-progress", "--threads", "1", "--seed", "5", "--iw-samples", "0"]  # 125 steps an epoch


def _cli(out, *extra):
    return [sys.executable, "-m", "hvae_fast.cli", *ARGS, "--out", str(out), *extra]


def _lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def test_cli_sigterm_from_outside_exits_75_and_resume_ends_bit_for_bit(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(preempt.TEST_HOOK, None)
    subprocess.run(_cli(whole), check=True, capture_output=True, timeout=600, env=env)
    proc = subprocess.Popen(_cli(stopped), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not _lines(stopped / "metrics.jsonl") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # epoch 2 has started once epoch 1's row is there
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == preempt.EXIT_INTERRUPTED == 75, err
    last = stopped / "last.pt"
    assert "hvae-fast: training stopped by SIGTERM" in err and f"resume with `hvae-fast train --resume {last}`" in err
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["interrupted"]["signal"] == "SIGTERM"
    run = T.load_checkpoint(last)["run"]
    assert run["epoch"] == 1 and 0 < run["progress"]["batch"] < 125  # inside epoch 2 (it runs for most of a second)
    assert run["step"] == 125 + run["progress"]["batch"]

    r = subprocess.run([sys.executable, "-m", "hvae_fast.cli", "train", "--resume", str(last), "--out", str(stopped),
                        "--threads", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    rows = [[{k: v for k, v in json.loads(s).items() if k != "time"} for s in _lines(d / "metrics.jsonl")]
            for d in (whole, stopped)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    for name in ("last.pt", "best.pt"):
        _same_weights(torch.load(whole / name, weights_only=True)["model"],
                      torch.load(stopped / name, weights_only=True)["model"])
    assert json.loads((stopped / "summary.json").read_text())["complete"]


def test_cli_help_documents_the_exit_status(capsys):
    from hvae_fast.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SIGTERM, SIGINT or SIGUSR1 stop training after the current step" in text
    assert "exit with status 75" in text
