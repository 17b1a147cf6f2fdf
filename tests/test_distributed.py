"""Data-parallel training with torchrun: 2 CPU processes, gloo, loopback only."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path):
    r = torchrun(SCRIPTS / "ddp_step.py", tmp_path / "ddp.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    subprocess.run([sys.executable, SCRIPTS / "ddp_step.py", tmp_path / "single.pt"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)
    # and the step did move the parameters (the check is not vacuous)
    torch.manual_seed(0)
    from hvae_fast import OneLevelVAE
    init = OneLevelVAE.from_config().state_dict()
    assert any(not torch.equal(init[k], single[k]) for k in init)


def test_two_rank_training_writes_one_checkpoint_that_evaluates(tmp_path):
    out = tmp_path / "run"
    r = torchrun("-m", "hvae_fast.cli", "train", "--epochs", "2", "--max-train", "128", "--no-progress",
                 "--threads", "1", "--iw-samples", "0", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one writer
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["config"]["world_size"] == 2
    streams = torch.load(out / "last.pt", weights_only=True)["run"]["rng_per_rank"]  # a resume continues each rank's
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])
    e = subprocess.run([sys.executable, "-m", "hvae_fast.cli", "eval", out / "best.pt", "--iw-samples", "0",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    assert "test -ELBO" in e.stdout


def test_ranks_draw_their_own_noise_and_validate_rank_0s_model(tmp_path):
    r = torchrun(SCRIPTS / "ddp_train.py", tmp_path / "ranks.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert ranks[0]["noise"].shape == ranks[1]["noise"].shape
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])  # independent samples, not one draw twice
    assert ranks[0]["buffers"] and ranks[0]["buffers"].keys() == ranks[1]["buffers"].keys()
    for k, v in ranks[0]["buffers"].items():  # what was validated is what rank 0 saves
        assert torch.equal(v, ranks[1]["buffers"][k]), k


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    r = torchrun(SCRIPTS / "ddp_train.py", tmp_path / "ranks.pt", "nan", tmp_path / "run", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # no hang: both ranks got out of the loop
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    messages = [rank.get("stopped") for rank in ranks]
    assert messages[0] == messages[1] and "epoch 2, batch 2" in messages[0]  # the same words on every rank
    assert f"the last good checkpoint is {tmp_path / 'run' / 'last.pt'}" in messages[0]
