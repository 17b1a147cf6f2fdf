"""Data-parallel training with torchrun: 2 CPU processes, gloo, loopback only."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(*args, timeout=600, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **(env or {})}
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


# ---- stops on signals, and two nodes ------------------------------------------------------------

TRAIN = ["-m", "hvae_fast.cli", "train", "--epochs", "2", "--max-train", "1000", "--batch-size", "8", "--hidden", "16",
         "--no-progress", "--threads", "1", "--iw-samples", "0", "--seed", "3", "--ema", "0.9",
         "--kl-warmup-steps", "100"]  # 63 steps an epoch of 2 x 8 rows (the last: 2 x 4)


def _rows(out):
    return [{k: v for k, v in json.loads(s).items() if k != "time"} for s in (out / "metrics.jsonl").read_text()
            .splitlines()]


def _same_run(a, b):
    """Two run folders hold the same log (but its clock) and the same weights, bit for bit."""
    assert _rows(a) == _rows(b) and len(_rows(a)) == 2
    for name, key in (("last.pt", "model"), ("last.pt", "ema"), ("best.pt", "model")):
        x, y = (torch.load(d / name, weights_only=True)[key] for d in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (name, key)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-process single-node run (torchrun --standalone --nproc_per_node 2)."""
    out = tmp_path_factory.mktemp("ddp") / "whole"
    r = torchrun(*TRAIN, "--out", out, env={"HVAE_FAST_TEST_SIGNAL": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_bit_for_bit(tmp_path, two_ranks):
    out = tmp_path / "stopped"
    # rank 1 alone sends itself SIGTERM at step 75 (epoch 2, batch 12 of 63); rank 0 is not signalled
    r = torchrun(*TRAIN, "--out", out, env={"HVAE_FAST_TEST_SIGNAL": "SIGTERM:75:1"})
    assert r.returncode != 0  # torchrun reports its ranks' status 75 as a failure of the group
    # the documented status; once one rank has exited, torchrun sends SIGTERM to the other, which is exiting
    # with 75 too and must not die of it (torchrun would list it with exitcode -15)
    assert "exitcode  : 75" in r.stderr and "exitcode  : -" not in r.stderr, r.stderr[-3000:]
    last = out / "last.pt"
    assert (f"training stopped by SIGTERM at epoch 2, batch 12 of 63 (step 75); {last} holds the run up to there; "
            f"resume with `hvae-fast train --resume {last}` under torchrun with 2 ranks") in r.stderr
    run = torch.load(last, weights_only=True)["run"]
    assert (run["epoch"], run["step"], run["progress"]["batch"]) == (1, 75, 12)
    assert len(run["progress"]["sums"]) == 2 and len(run["rng_per_rank"]) == 2  # every rank's share
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["interrupted"]["step"] == 75
    r = torchrun("-m", "hvae_fast.cli", "train", "--resume", last, "--out", out, "--threads", "1",
                 env={"HVAE_FAST_TEST_SIGNAL": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(two_ranks, out)


def test_sigterm_to_torchrun_stops_its_ranks_resumably(tmp_path, two_ranks):
    """SIGTERM from outside to the torchrun agent (what a scheduler stopping the launcher does):
    the agent passes it to its ranks, which stop after the same step; the resume ends bit for bit."""
    out = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "HVAE_FAST_TEST_SIGNAL": ""}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              *TRAIN, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert agent.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)  # epoch 2 has started once epoch 1's row is there
    time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=300)
    assert agent.returncode != 0
    assert "hvae-fast: training stopped by SIGTERM at epoch 2, batch " in err, err[-3000:]
    run = torch.load(out / "last.pt", weights_only=True)["run"]
    assert run["epoch"] == 1 and 0 < run["progress"]["batch"] < 63 and run["step"] == 63 + run["progress"]["batch"]
    r = torchrun("-m", "hvae_fast.cli", "train", "--resume", out / "last.pt", "--out", out, "--threads", "1",
                 env={"HVAE_FAST_TEST_SIGNAL": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(two_ranks, out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_as_two_processes_on_one_node(tmp_path, two_ranks):
    """torchrun --nnodes 2 --nproc_per_node 1 twice on this machine, c10d rendezvous on
    127.0.0.1: the multi-node path (two agents, a rendezvous, one rank per node) gives the
    2-process single-node run bit for bit."""
    out, port = tmp_path / "nodes", _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HVAE_FAST_TEST_SIGNAL": ""}
    env.pop("MASTER_ADDR", None)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_id", "hvae-two-nodes",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", "--local_addr", "127.0.0.1",
                               *TRAIN, "--out", str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        results = [(p.communicate(timeout=600), p.returncode) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for (_, err), rc in results:
        assert rc == 0, err[-3000:]
    assert torch.load(out / "best.pt", weights_only=True)["config"]["world_size"] == 2
    _same_run(two_ranks, out)
