"""Training: resume, early stopping, NaN handling, checkpoints, backends, evaluation."""
import json
import math
import os

import pytest
import torch

from hvae_fast import data, evaluate, writer, train as T
from hvae_fast.train import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(hidden=32, max_train=128, epochs=2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_gives_the_uninterrupted_run(tmp_path):
    full = T.train(_cfg(epochs=4), out=str(tmp_path / "full"))
    T.train(_cfg(epochs=2), out=str(tmp_path / "half"))
    resumed = T.train(out=str(tmp_path / "half"), resume=str(tmp_path / "half" / "last.pt"), overrides={"epochs": 4})
    a = [(r["train_loss"], r["val_loss"]) for r in full["history"]]
    b = [(r["train_loss"], r["val_loss"]) for r in resumed["history"]]
    assert len(a) == len(b) == 4
    assert a == b  # bit-identical: model, optimizer, shuffling and noise RNG all restored
    for (k, v), w in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(v, w), k
    lines = (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3, 4]


def test_resume_keeps_the_saved_settings(tmp_path):
    T.train(_cfg(epochs=2, patience=30, lr=3e-3), out=str(tmp_path))
    last = str(tmp_path / "last.pt")
    seen = []
    res = T.train(resume=last, out=str(tmp_path), log=seen.append)  # nothing asked: the run as saved
    assert (res["config"].epochs, res["config"].patience, res["config"].lr) == (2, 30, 3e-3)
    assert res["epochs"] == 2 and seen == []
    res = T.train(resume=last, out=str(tmp_path), overrides={"epochs": 3, "patience": 30}, log=seen.append)
    assert res["config"].epochs == 3 and res["epochs"] == 3
    assert seen == [f"resuming {last} with epochs 2 -> 3"]  # what changed, and only that
    with pytest.raises(ValueError, match=r"cannot change lr \(saved 0.003, asked 0.01\)"):
        T.train(resume=last, overrides={"lr": 1e-2})
    with pytest.raises(ValueError, match="not training settings: colour"):
        T.train(resume=last, overrides={"colour": 1})
    with pytest.raises(ValueError, match="not a config"):
        T.train(_cfg(), resume=last)


def test_resume_refuses_another_world_size(tmp_path):
    T.train(_cfg(epochs=1), out=str(tmp_path))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    ck["config"]["world_size"] = 2
    torch.save(ck, tmp_path / "two.pt")
    with pytest.raises(T.ResumeError, match="saved with 2 rank"):
        T.train(resume=str(tmp_path / "two.pt"))


def test_an_early_stopped_run_resumed_with_an_lr_drop_takes_it(tmp_path, monkeypatch):
    vals = iter([5.0, 6.0, 7.0, 8.0, 9.0, 4.0, 10.0, 11.0])
    monkeypatch.setattr(evaluate, "validate", lambda *a, **k: {"loss": next(vals), "log_px": 0.0, "kl": [0.0, 0.0]})
    first = T.train(_cfg(epochs=10, patience=1), out=str(tmp_path))
    assert first["stopped"] == "early_stopping" and first["epochs"] == 3
    res = T.train(resume=str(tmp_path / "last.pt"), out=str(tmp_path), overrides={"lr_drops": 1})
    assert res["epochs"] > 3  # it trained on from the best model with the smaller step
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["run"]["stopping"]["drops"] == 1
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_resume_rewrites_the_log_from_the_checkpoint_and_continues_its_clock(tmp_path):
    T.train(_cfg(epochs=2), out=str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"
    rows = [json.loads(s) for s in metrics.read_text().splitlines()]
    # a kill between an epoch's log line and its checkpoint leaves a row the checkpoint lacks
    metrics.write_text(metrics.read_text() + json.dumps({**rows[-1], "epoch": 3}) + "\n")
    T.train(resume=str(tmp_path / "last.pt"), out=str(tmp_path), overrides={"epochs": 4})
    after = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in after] == [1, 2, 3, 4]
    assert after[:2] == rows
    assert all(a["time"] < b["time"] for a, b in zip(after, after[1:]))  # continues, does not restart
    assert after[2]["time"] > rows[1]["time"]


def test_best_checkpoint_records_its_epoch_and_changes_only_on_improvement(tmp_path, monkeypatch):
    vals = iter([5.0, 4.0, 6.0, 7.0])  # improves at epochs 1 and 2 only
    monkeypatch.setattr(evaluate, "validate", lambda *a, **k: {"loss": next(vals), "log_px": 0.0, "kl": [0.0, 0.0]})
    writes = []
    real_save = writer.atomic_save
    monkeypatch.setattr(writer, "atomic_save", lambda obj, path: (writes.append((os.path.basename(path), obj["epoch"])),
                                                             real_save(obj, path)))
    res = T.train(_cfg(epochs=4, patience=10), out=str(tmp_path))
    assert res["best_epoch"] == 2
    assert [e for name, e in writes if name == "best.pt"] == [1, 2]  # written when it improved, not after
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["best_epoch"] == last["best_epoch"] == 2 and last["epoch"] == 4


def test_checkpoints_load_with_weights_only(tmp_path):
    res = T.train(_cfg(), out=str(tmp_path))
    for name in ("best.pt", "last.pt"):
        ck = torch.load(tmp_path / name, weights_only=True)
        assert ck["config"]["hidden"] == 32 and ck["num_vals"] == 17 and ck["epoch"] == 2
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"optimizer", "run", "best_val", "best_epoch"} <= set(last)
    assert {"epoch", "step", "history", "train_time_s", "rng", "stopping"} <= set(last["run"])
    model, cfg = T.model_from_checkpoint(str(tmp_path / "best.pt"))
    assert not model.training and cfg.model == "topdown"
    x = data.load_digits().val
    torch.manual_seed(0)
    a = evaluate.validate(model, x)["loss"]
    torch.manual_seed(0)
    b = evaluate.validate(res["model"], x)["loss"]
    assert a == b == pytest.approx(res["best_val"], rel=0.05)
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path))  # atomic writes leave nothing


def test_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(T.CheckpointError, match="broken.pt: not a readable hvae_fast checkpoint"):
        T.load_checkpoint(str(bad))
    T.train(_cfg(epochs=1), out=str(tmp_path / "r"))
    raw = (tmp_path / "r" / "last.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(T.CheckpointError, match="trunc.pt"):
        T.train(resume=str(tmp_path / "trunc.pt"))
    with pytest.raises(T.CheckpointError, match="nope.pt: no such checkpoint"):
        T.load_checkpoint(str(tmp_path / "nope.pt"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    steps = {"n": 0}
    orig = T.Adamax.step

    def step(self, *a, **k):
        out = orig(self, *a, **k)
        steps["n"] += 1
        if steps["n"] == 3:  # first step of epoch 2 (2 batches per epoch)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(T.Adamax, "step", step)
    with pytest.raises(T.TrainingDiverged, match=r"loss became nan at epoch 2.*last good checkpoint is .*last.pt"):
        T.train(_cfg(epochs=5), out=str(tmp_path))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["run"]["history"]) == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_early_stopping_follows_the_recipe(monkeypatch):
    # validation losses 10, 11, 12, ...: the best is epoch 1; with patience 2 training stops once the
    # loss has not improved for more than 2 epochs, i.e. after epoch 4
    calls = {"n": 0}

    def fake_eval(model, x, **settings):
        calls["n"] += 1
        return {"loss": 9.0 + calls["n"], "log_px": 0.0, "kl": [0.0, 0.0]}

    monkeypatch.setattr(evaluate, "validate", fake_eval)
    res = T.train(_cfg(epochs=50, patience=2))
    assert res["epochs"] == 4 and res["stopped"] == "early_stopping" and res["best_val"] == 10.0


def test_best_model_is_kept():
    res = T.train(_cfg(epochs=3))
    best = min(res["history"], key=lambda r: r["val_loss"])
    assert res["best_val"] == best["val_loss"]
    assert all(math.isfinite(r["train_loss"]) for r in res["history"])


@pytest.mark.parametrize("in_kernel_noise", [False, True], ids=["randn_like", "in_kernel_noise"])
def test_backends_train_the_same(in_kernel_noise):
    a = T.train(_cfg(epochs=2, backend="fused", in_kernel_noise=in_kernel_noise))
    assert a["model"].in_kernel_noise is in_kernel_noise
    b = T.train(_cfg(epochs=2, backend="torch", in_kernel_noise=in_kernel_noise))
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4)


@pytest.mark.parametrize("model", ["hierarchical", "bottomup", "onelevel"])
def test_other_models_train(model):
    res = T.train(_cfg(model=model, epochs=1))
    assert len(res["history"]) == 1 and math.isfinite(res["best_val"])


def test_training_improves_the_loss():
    res = T.train(_cfg(epochs=4, max_train=512, hidden=64, lr=1e-2))
    h = res["history"]
    assert h[-1]["val_loss"] < h[0]["val_loss"] - 5


def test_evaluation_numbers():
    res = T.train(_cfg(epochs=1))
    x = data.load_digits().test[:20]
    # a budget of 64 rows: several chunks over the samples
    r = evaluate.evaluate(res["model"], x, iw_samples=16, memory=64 * evaluate.row_bytes(res["model"], x))
    assert r["n"] == 20 and len(r["kl"]) == 2 and len(r["active_units"]) == 2
    assert r["bpd"] == pytest.approx(r["iw_nll"] / (64 * math.log(2)))
    # the IW bound is tighter than the ELBO on average (both estimated; a loose margin)
    assert r["iw_nll"] < r["neg_elbo"] + 1.0
    # K = 1 importance sampling is an ELBO estimate
    torch.manual_seed(0)
    one = -evaluate.iw_log_likelihood(res["model"], x, samples=1).mean().item()
    assert one == pytest.approx(r["neg_elbo"], rel=0.1)
    au = evaluate.active_units(res["model"], x)
    assert all(0 <= a <= d for a, d in zip(au, res["model"].latent_dims))


# ---- options beyond the recipe: IWAE training, IW model selection, weight decay ---------------

def test_new_options_default_to_the_recipe():
    c = TrainConfig()
    assert (c.iw_train, c.val_iw, c.weight_decay, c.kl_warmup) == (1, 0, 0.0, 0)
    res = T.train(_cfg(epochs=1))
    assert "val_iw" not in res["history"][0]


def test_iwae_loss_is_the_importance_weighted_bound():
    torch.manual_seed(0)
    model = T.build_model(_cfg(), 17, 64).eval()
    x = data.load_digits().train[:32]
    # K = 1: -mean log w at the same noise
    torch.manual_seed(5)
    one = T.iwae_loss(model, x, 1)
    torch.manual_seed(5)
    assert one.item() == pytest.approx(-model.log_weight(x).mean().item(), rel=1e-6)
    # ... whose expectation is the -ELBO (analytic KL): many samples per image
    torch.manual_seed(6)
    xs = x.repeat(200, 1)
    est = T.iwae_loss(model, xs, 1).item()
    assert est == pytest.approx(model(xs).item(), rel=0.01)
    # K > 1: -log mean_k w_k at the same K samples, never above the K-sample average of -log w
    for K in (2, 8):
        torch.manual_seed(7)
        lk = T.iwae_loss(model, x, K)
        torch.manual_seed(7)
        lw = model.log_weight(x.repeat(K, 1)).view(K, len(x))
        assert lk.item() == pytest.approx(-(torch.logsumexp(lw, 0) - math.log(K)).mean().item(), rel=1e-6)
        assert lk.item() <= -lw.mean().item()
    # and the bound tightens with K (in expectation; compare averages over repeats)
    torch.manual_seed(8)
    l1 = sum(T.iwae_loss(model, x, 1).item() for _ in range(20)) / 20
    l16 = sum(T.iwae_loss(model, x, 16).item() for _ in range(20)) / 20
    assert l16 < l1
    with pytest.raises(ValueError, match="K must be >= 1"):
        T.iwae_loss(model, x, 0)


def test_train_loss_is_the_elbo_and_the_loss_minimised_has_a_column_of_its_own():
    one_batch = dict(max_train=64, epochs=1)  # the logged batch meets the same weights and noise in each run
    plain = T.train(_cfg(**one_batch))["history"][0]
    assert "train_objective" not in plain
    for aid in (dict(kl_warmup_steps=100), dict(kl_warmup=10), dict(free_bits=3.0)):
        row = T.train(_cfg(**one_batch, **aid))["history"][0]
        assert row["train_loss"] == plain["train_loss"], aid  # the -ELBO, whatever is minimised
        assert row["train_objective"] != row["train_loss"], aid
    warm = T.train(_cfg(**one_batch, kl_warmup_steps=100))["history"][0]
    assert warm["train_objective"] < warm["train_loss"]  # KL weighted by 1/100
    iw = T.train(_cfg(epochs=2, iw_train=4))["history"]
    assert all(r["train_objective"] <= r["train_loss"] for r in iw)  # the IW bound is the tighter one


def test_iw_training_and_iw_selection(tmp_path):
    res = T.train(_cfg(epochs=3, iw_train=4, val_iw=8), out=str(tmp_path / "a"))
    h = res["history"]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_iw"]) for r in h)
    # the best model is chosen on the validation IW bound, which is below the -ELBO
    assert res["best_val"] == min(r["val_iw"] for r in h)
    assert all(r["val_iw"] < r["val_loss"] for r in h)
    ck = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    assert ck["config"]["iw_train"] == 4 and ck["config"]["val_iw"] == 8
    # the IW-trained run differs from the -ELBO run and resumes bit for bit
    elbo_run = T.train(_cfg(epochs=3))
    assert [r["train_loss"] for r in elbo_run["history"]] != [r["train_loss"] for r in h]
    T.train(_cfg(epochs=2, iw_train=4, val_iw=8), out=str(tmp_path / "b"))
    resumed = T.train(out=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"), overrides={"epochs": 3})
    assert [(r["train_loss"], r["val_iw"]) for r in resumed["history"]] == [(r["train_loss"], r["val_iw"]) for r in h]
    with pytest.raises(ValueError, match="cannot be combined"):
        T.train(_cfg(iw_train=2, kl_warmup=3))
    with pytest.raises(ValueError, match="iw_train must be >= 1"):
        T.train(_cfg(iw_train=0))


def test_weight_decay_shrinks_the_weights(tmp_path):
    def norm(m):
        return sum(p.detach().pow(2).sum().item() for p in m.parameters())
    plain = T.train(_cfg(epochs=2, lr=1e-2))
    decayed = T.train(_cfg(epochs=2, lr=1e-2, weight_decay=2.0), out=str(tmp_path))
    assert norm(decayed["model"]) < 0.95 * norm(plain["model"])
    assert all(math.isfinite(r["val_loss"]) for r in decayed["history"])
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 2.0


def test_lr_drops_restart_from_the_best_model_with_a_smaller_step(monkeypatch, tmp_path):
    # validation losses 10, 11, 12, ...: patience 2 runs out after epochs 4, 7 and 10; two drops, then stop
    calls = {"n": 0}

    def fake_eval(model, x, **settings):
        calls["n"] += 1
        return {"loss": 9.0 + calls["n"], "log_px": 0.0, "kl": [0.0, 0.0]}

    monkeypatch.setattr(evaluate, "validate", fake_eval)
    loads = []
    orig = torch.nn.Module.load_state_dict

    def load(self, sd, *a, **k):
        loads.append({n: v.clone() for n, v in sd.items()})
        return orig(self, sd, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", load)
    res = T.train(_cfg(epochs=50, patience=2, lr_drops=2, lr_drop_factor=0.5), out=str(tmp_path))
    assert res["epochs"] == 10 and res["stopped"] == "early_stopping" and res["best_val"] == 10.0
    assert [r["lr"] for r in res["history"]] == pytest.approx([1e-3] * 4 + [5e-4] * 3 + [2.5e-4] * 3)
    # each drop (and the end) reloads the epoch-1 model
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    assert len(loads) == 3 and all(all(torch.equal(sd[k], best[k]) for k in best) for sd in loads)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["run"]["stopping"]["drops"] == 2 and last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)
    assert "lr" not in T.train(_cfg(epochs=1))["history"][0]  # default: no drops, the recipe


def test_dropout_option():
    from hvae_fast import nets
    plain = T.build_model(_cfg(), 17, 64)
    recipe = nets.reference_networks(M=32)
    assert nets.count_parameters(plain) == nets.count_parameters(recipe)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())  # default: the recipe's networks
    model = T.build_model(_cfg(dropout=0.3), 17, 64)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 7 and all(d.p == 0.3 for d in drops)  # 2 encoders, 2 deltas, 1 prior, 2 in the decoder
    assert nets.count_parameters(model) == nets.count_parameters(plain)
    x = data.load_digits().train[:32]
    model.eval()
    torch.manual_seed(0)
    a = model.log_weight(x)
    torch.manual_seed(0)
    assert torch.equal(a, model.log_weight(x))  # eval: dropout off
    model.train()
    torch.manual_seed(0)
    b = model.log_weight(x)
    for d in drops:
        d.p = 0.0
    torch.manual_seed(0)
    c = model.log_weight(x)  # the same weights and noise without dropout
    assert not torch.allclose(b, c)
    res = T.train(_cfg(epochs=2, dropout=0.3))
    assert all(math.isfinite(r["val_loss"]) for r in res["history"])
    with pytest.raises(ValueError, match="dropout applies to the topdown"):
        T.train(_cfg(model="onelevel", dropout=0.3))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cpu(precision):
    """--precision runs the step under CPU autocast; the fused ops run in float32 there."""
    cfg = T.TrainConfig(epochs=2, max_train=128, progress=False, precision=precision)
    res = T.train(cfg)
    assert len(res["history"]) == 2
    assert all(math.isfinite(r["val_loss"]) for r in res["history"])
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]  # it learns
    assert all(p.dtype == torch.float32 for p in res["model"].parameters())


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        T.train(T.TrainConfig(epochs=1, max_train=64, progress=False, precision="fp8"))
