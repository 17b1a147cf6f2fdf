"""Training aids (hvae_fast.aids) on their own and in train(): each acts, and off is the recipe."""
import copy
import json
import math

import pytest
import torch

from hvae_fast import aids, cli, config, data, evaluate, writer, train as T
from hvae_fast.cli import build_parser, main
from hvae_fast.train import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")

OFF = torch.amp.GradScaler("cuda", enabled=False)  # train()'s scaler outside fp16 on CUDA: a pass-through


def _cfg(**kw):
    base = dict(hidden=32, max_train=128, epochs=2, progress=False, seed=3)  # 2 steps per epoch
    base.update(kw)
    return TrainConfig(**base)


def _rows(res):
    return [{k: v for k, v in r.items() if k != "time"} for r in res["history"]]


def _net_with_state():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = T.Adamax(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()  # the optimizer now has state to keep
    return net, opt


def _set_grads(net, value):
    for p in net.parameters():
        p.grad = torch.full_like(p, value)


# ---- update skipping and clipping -------------------------------------------------------------

def test_a_skipped_update_leaves_weights_and_optimizer_state_and_is_counted():
    net, opt = _net_with_state()
    guard = aids.UpdateGuard(threshold=1.0, max_consecutive=3)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    for value in (10.0, float("nan"), float("inf")):  # above the threshold, then non-finite
        _set_grads(net, value)
        assert guard.step(opt, OFF, net.parameters()) is False
    _set_grads(net, 0.01)
    assert guard.step(opt, OFF, net.parameters(), loss_finite=False) is False  # a non-finite loss
    after = (net.state_dict(), opt.state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    old, new = before[1]["state"], after[1]["state"]  # step counters and moments untouched
    assert old.keys() == new.keys() and all(torch.equal(old[i][k], new[i][k]) for i in old for k in old[i])
    assert (guard.total, guard.consecutive, guard.should_stop) == (4, 4, True)
    assert "4 updates in a row were skipped (the last: the loss was non-finite)" in guard.why()
    _set_grads(net, 0.01)
    assert guard.step(opt, OFF, net.parameters()) is True  # below the threshold: a real step
    assert guard.consecutive == 0 and not guard.should_stop
    assert not torch.equal(net.weight, before[0]["weight"])
    row = guard.epoch_row()  # the mean of the finite norms measured (the NaN and inf ones are not)
    assert row == {"skipped": 4, "skipped_total": 4, "grad_norm": pytest.approx((10 + 0.01 + 0.01) * 8**.5 / 3)}
    assert guard.epoch_row()["skipped"] == 0  # per epoch; the total stays
    assert guard.state_dict() == {"total": 4, "consecutive": 0}


def _same(a, b):
    """Nested dicts, lists and tensors, equal exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_skip_puts_back_the_buffers_the_forward_moved():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = T.Adamax(net.parameters(), lr=0.1)
    guard = aids.UpdateGuard(threshold=1.0)
    before = copy.deepcopy(net.state_dict())
    guard.watch(net)
    net(torch.full((8, 3), float("nan"))).sum().backward()  # NaN into the running statistics
    assert guard.step(opt, OFF, net.parameters()) is False
    assert _same(before, net.state_dict())  # running mean, variance and the batch count included


def test_a_skipped_update_leaves_parameters_buffers_optimizer_and_ema_as_they_were(monkeypatch):
    t = T.trainer(_cfg(epochs=2, skip_threshold=1e6, ema=0.9), log=None)  # 2 steps per epoch
    states, orig = [], T._Objective._loss

    def loss(self, xb, beta):  # the state before every step
        states.append(copy.deepcopy((t.model.state_dict(), t.optimizer.state_dict(), t.ema.state_dict())))
        return orig(self, xb, beta)

    monkeypatch.setattr(T._Objective, "_loss", loss)
    bn = next(m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm1d))  # NaN into it at step 2
    bn.register_forward_pre_hook(lambda m, i: (i[0] * float("nan"),) if len(states) == 2 and m.training else None)
    assert t.fit() == "max_epochs"
    assert [r["skipped"] for r in t.state.history] == [1, 0]
    assert _same(states[1], states[2])  # before the skipped step and after it (validation between)
    assert not _same(states[2], states[3])  # the next step is a real one
    assert all(math.isfinite(r["val_loss"]) for r in t.state.history)


def test_clipping_bounds_the_gradient_norm():
    net, opt = _net_with_state()
    guard = aids.UpdateGuard(clip=1.0)
    assert guard.active and not guard.skipping
    _set_grads(net, 5.0)
    assert guard.step(opt, OFF, net.parameters()) is True
    assert guard.last_norm == pytest.approx(5.0 * 8**.5)  # the norm before clipping
    assert aids.grad_norm(net.parameters()).item() == pytest.approx(1.0, rel=1e-5)
    _set_grads(net, 0.1)  # below the bound: left alone
    guard.step(opt, OFF, net.parameters())
    assert aids.grad_norm(net.parameters()).item() == pytest.approx(0.1 * 8**.5, rel=1e-6)
    assert guard.epoch_row() == {"grad_norm": pytest.approx((5.0 + 0.1) * 8**.5 / 2)}  # no skipping: no counts


def test_the_norm_is_measured_on_unscaled_gradients_and_a_skip_keeps_the_scaler_going():
    net, opt = _net_with_state()
    x = torch.randn(4, 3)
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    true = aids.grad_norm(net.parameters()).item()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = aids.UpdateGuard(threshold=true / 2)
    before = copy.deepcopy(net.state_dict())
    opt.zero_grad()
    scaler.scale(net(x).pow(2).sum()).backward()
    assert guard.step(opt, scaler, net.parameters()) is False
    assert guard.last_norm == pytest.approx(true, rel=1e-5)  # not 1024 times it
    scaler.update()  # as train() does after a skip
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    guard.threshold = true * 2
    opt.zero_grad()
    scaler.scale(net(x).pow(2).sum()).backward()
    assert guard.step(opt, scaler, net.parameters()) is True
    scaler.update()
    assert not torch.equal(before["weight"], net.weight)


def _nan_loss_at(monkeypatch, betas):
    """The training loss becomes NaN at the steps where the KL weight is one of `betas`
    (with kl_warmup_steps the weight names the step, also across a resume)."""
    orig = T._Objective._loss

    def loss(self, xb, beta):
        out = orig(self, xb, beta)
        if any(abs(beta - b) < 1e-12 for b in betas):
            return tuple(o * float("nan") for o in out) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(T._Objective, "_loss", loss)


def test_training_skips_non_finite_losses_and_counts_them(monkeypatch):
    _nan_loss_at(monkeypatch, [3 / 100])  # step 2, the first of epoch 2
    res = T.train(_cfg(epochs=3, skip_threshold=1e6, kl_warmup_steps=100))
    h = res["history"]
    assert [r["skipped"] for r in h] == [0, 1, 0] and [r["skipped_total"] for r in h] == [0, 1, 1]
    assert all(math.isfinite(r["train_loss"]) and r["grad_norm"] > 0 for r in h)
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())
    with pytest.raises(T.TrainingDiverged, match="loss became nan at epoch 2, batch 1"):
        T.train(_cfg(epochs=3, kl_warmup_steps=100))  # skipping off: today's stop


def test_consecutive_skips_stop_the_run_with_what_to_change(tmp_path):
    with pytest.raises(T.TrainingDiverged, match=r"3 updates in a row were skipped \(the last: gradient norm .* > "
                                                 r"--skip-threshold 1e-09\) at epoch 2, batch 1; the last good "
                                                 r"checkpoint is .*last.pt\. Raise --skip-threshold, lower --lr, "
                                                 r"or enable --grad-clip"):
        T.train(_cfg(epochs=5, skip_threshold=1e-9, max_consecutive_skips=3), out=str(tmp_path))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["run"]["history"][0]["skipped"] == 2 and last["update_guard"] == {"total": 2, "consecutive": 2}
    # every update was skipped: the weights are still the initial ones
    torch.manual_seed(3)
    init = T.build_model(_cfg(), 17, 64).state_dict()
    assert all(torch.equal(init[k], v) for k, v in last["model"].items() if "running" not in k and "batches" not in k)


# ---- EMA ----------------------------------------------------------------------------------------

def test_ema_follows_the_recurrence_and_copies_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    d = 0.9
    ema = aids.EMA(net, d)
    expect = [p.detach().clone() for p in net.parameters()]
    for _ in range(4):
        opt.zero_grad()
        net(torch.randn(8, 3)).pow(2).sum().backward()
        opt.step()
        ema.update(net)
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, net.parameters())]
    for e, got, raw in zip(expect, ema.model.parameters(), net.parameters()):
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, raw)
        assert not got.requires_grad
    for b, eb in zip(net.buffers(), ema.model.buffers()):
        assert torch.equal(b, eb)  # running statistics: the latest, not averaged
    with pytest.raises(ValueError, match="decay must be in"):
        aids.EMA(net, 1.0)


def test_training_validates_saves_and_returns_the_ema(tmp_path, monkeypatch):
    seen, vals = [], iter([5.0, 4.0])  # the second epoch is the best
    real = evaluate.validate

    def validate(model, *a, **k):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {**real(model, *a, **k), "loss": next(vals)}

    monkeypatch.setattr(evaluate, "validate", validate)
    res = T.train(_cfg(epochs=2, ema=0.5), out=str(tmp_path))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for k, v in last["ema"].items():
        assert torch.equal(seen[-1][k], v) and torch.equal(best["model"][k], v)
        assert torch.equal(res["model"].state_dict()[k], v)
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])  # not the raw weights


# ---- the KL: warm-up in steps, free bits, balancing ---------------------------------------------

def test_free_bits_hold_a_group_at_its_floor():
    kl = [torch.tensor([0.1, 0.3], requires_grad=True), torch.tensor([2.0, 4.0], requires_grad=True)]
    loss = aids.kl_objective(kl, 1.0, floor=1.0)
    assert loss.item() == pytest.approx(1.0 + 3.0)  # group 1 at its floor, group 2 its own mean
    loss.backward()
    assert torch.equal(kl[0].grad, torch.zeros(2))  # no push below the floor
    assert torch.equal(kl[1].grad, torch.full((2,), 0.5))


def test_free_bits_in_the_objective_leave_only_the_reconstruction_gradient():
    model = T.build_model(_cfg(), 17, 64)
    x = data.load_digits().train[:32]
    obj = T._Objective(model, _cfg(free_bits=1e4))  # far above every level's KL: all at the floor
    torch.manual_seed(1)
    loss, neg_elbo = obj(x, 1.0)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.manual_seed(1)
    t = model.elbo_terms(x)
    assert loss.item() == pytest.approx(-t.log_px.mean().item() + 2e4)
    assert neg_elbo.item() == pytest.approx(-t.elbo.mean().item())  # the reported value is the true -ELBO
    assert not neg_elbo.requires_grad
    recon = torch.autograd.grad(-t.log_px.mean(), list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, recon):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_kl_balancing_coefficients_average_to_one_and_follow_the_kls():
    kls = [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(0.0)]
    c = aids.kl_balance_coefficients(kls)
    assert c.mean().item() == pytest.approx(1.0)
    expect = torch.tensor([1.01, 3.01, 0.01])
    torch.testing.assert_close(c, expect / expect.mean())
    kl = [torch.full((4,), v, requires_grad=True) for v in (1.0, 3.0)]
    aids.kl_objective(kl, 0.5, balance=True).backward()
    w = torch.tensor([1.01, 3.01]) / torch.tensor([1.01, 3.01]).mean()
    for k, wi in zip(kl, w):  # beta * coefficient / B, the coefficients detached
        torch.testing.assert_close(k.grad, torch.full((4,), 0.5 * wi.item() / 4))
    plain = aids.kl_objective([k.detach() for k in kl], 1.0, balance=True)
    assert plain.item() == pytest.approx(4.0)  # at full weight: no balancing


def test_kl_warmup_in_steps(monkeypatch):
    betas = []
    orig = T._Objective._loss
    monkeypatch.setattr(T._Objective, "_loss", lambda self, xb, beta: (betas.append(beta), orig(self, xb, beta))[1])
    res = T.train(_cfg(epochs=3, kl_warmup_steps=4))
    assert betas == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [r["kl_weight"] for r in res["history"]] == [0.5, 1.0, 1.0]  # the epoch's last step
    assert aids.linear_warmup(0, 0) == 1.0


def test_free_bits_and_balancing_train_and_report_the_elbo():
    res = T.train(_cfg(epochs=2, free_bits=0.5, kl_balance=True, kl_warmup_steps=3))
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in res["history"])


# ---- the learning rate -------------------------------------------------------------------------

def test_lr_warmup_and_cosine_values():
    s = aids.LRSchedule("cosine", warmup=4, total=13, min_factor=0.1)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == 1.0 and s.factor(8) == pytest.approx(0.55) and s.factor(12) == pytest.approx(0.1)
    assert s.factor(100) == pytest.approx(0.1)
    c = aids.LRSchedule("constant", warmup=2)
    assert [c.factor(i) for i in range(4)] == [0.5, 1.0, 1.0, 1.0] and c.active
    assert not aids.LRSchedule().active
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        aids.LRSchedule("linear")


def test_the_lr_schedule_in_training_composes_with_lr_drops(monkeypatch):
    lrs = []
    orig = T.Adamax.step
    monkeypatch.setattr(T.Adamax, "step", lambda self, *a: (lrs.append(self.param_groups[0]["lr"]), orig(self, *a))[1])
    vals = iter([5.0, 6.0, 7.0])  # patience 0 runs out after epoch 2: one drop
    monkeypatch.setattr(evaluate, "validate", lambda *a, **k: {"loss": next(vals), "log_px": 0.0, "kl": [0.0, 0.0]})
    res = T.train(_cfg(epochs=3, patience=0, lr_drops=1, lr=1e-2, lr_schedule="cosine", lr_warmup_steps=2,
                       lr_min_factor=0.2))
    s = aids.LRSchedule("cosine", 2, 6, 0.2)
    expect = [1e-2 * s.factor(i) for i in range(4)] + [1e-3 * s.factor(i) for i in (4, 5)]
    assert lrs == pytest.approx(expect, rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-3 * 0.2)  # the end of the run: lr * lr_min_factor (after the drop)
    assert [r["lr"] for r in res["history"]] == pytest.approx([expect[1], expect[3], expect[5]])


# ---- resume and defaults -----------------------------------------------------------------------

def test_resume_under_a_cosine_schedule_keeps_its_length(tmp_path, monkeypatch):
    T.train(_cfg(epochs=2, lr=1e-2, lr_schedule="cosine"), out=str(tmp_path))  # ends at lr 0
    last = str(tmp_path / "last.pt")
    lrs, orig = [], T.Adamax.step
    monkeypatch.setattr(T.Adamax, "step", lambda self, *a: (lrs.append(self.param_groups[0]["lr"]), orig(self, *a))[1])
    with pytest.raises(T.ResumeError, match=r"cannot change epochs \(2 -> 4\) under lr_schedule 'cosine'"):
        T.train(resume=last, out=str(tmp_path), overrides={"epochs": 4})
    assert lrs == []  # refused before a step
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", last, "--epochs", "3"])
    assert e.value.code == 2
    T.train(resume=last, out=str(tmp_path), overrides={"patience": 5})  # the same length: nothing left to do
    assert lrs == []


AIDS = dict(grad_clip=50.0, skip_threshold=1e6, ema=0.9, kl_warmup_steps=100, free_bits=0.2, kl_balance=True,
            lr_warmup_steps=3, lr_schedule="cosine", lr_min_factor=0.1)


def test_resume_with_aids_on_continues_identically(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, [3 / 100, 6 / 100])  # skips at steps 2 and 5 (epochs 2 and 3)
    full = T.train(_cfg(epochs=4, **AIDS), out=str(tmp_path / "full"))
    real_save = writer.atomic_save

    def killed_after_epoch_2(obj, path):
        real_save(obj, path)
        if path.endswith("last.pt") and obj["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer, "atomic_save", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(epochs=4, **AIDS), out=str(tmp_path / "half"))
    monkeypatch.setattr(writer, "atomic_save", real_save)
    half = torch.load(tmp_path / "half" / "last.pt", weights_only=True)
    assert half["run"]["step"] == 4 and half["update_guard"]["total"] == 1
    resumed = T.train(resume=str(tmp_path / "half" / "last.pt"), out=str(tmp_path / "half"))
    assert _rows(resumed) == _rows(full)
    assert [r["skipped_total"] for r in full["history"]] == [0, 1, 2, 2]
    for (k, v), w in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(v, w), k
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "half"))
    assert a["run"]["step"] == b["run"]["step"] == 8 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    with pytest.raises(T.ResumeError, match="cannot change ema"):
        T.train(resume=str(tmp_path / "half" / "last.pt"), overrides={"ema": 0.5})


def test_defaults_are_the_recipe(monkeypatch):
    c = TrainConfig()
    assert (c.grad_clip, c.skip_threshold, c.ema, c.kl_warmup_steps, c.free_bits, c.kl_balance,
            c.lr_warmup_steps, c.lr_schedule) == (None, None, 0.0, 0, 0.0, False, 0, "constant")
    plain = T.train(_cfg())
    # nothing of the aids runs by default: the loop is today's
    for cls, name in ((aids.UpdateGuard, "step"), (aids.EMA, "update"), (aids.LRSchedule, "factor")):
        monkeypatch.setattr(cls, name, lambda *a, **k: pytest.fail("an aid ran by default"))
    monkeypatch.setattr(aids, "kl_objective", lambda *a, **k: pytest.fail("an aid ran by default"))
    off = T.train(_cfg(grad_clip=0, skip_threshold=0, ema=0, free_bits=0))  # (lr_min_factor alone: refused)
    assert _rows(off) == _rows(plain)
    assert set(plain["history"][0]) == {"epoch", "train_loss", "val_loss", "val_log_px", "val_kl", "best_val",
                                        "kl_weight", "time"}
    monkeypatch.undo()
    # the guard's path with bounds never reached: the same updates, only the norm logged
    guarded = T.train(_cfg(grad_clip=1e9, skip_threshold=1e9))
    assert [{k: v for k, v in r.items() if k not in ("skipped", "skipped_total", "grad_norm")}
            for r in _rows(guarded)] == _rows(plain)
    assert all(r["skipped"] == 0 for r in guarded["history"])


@pytest.mark.parametrize("bad, message", [
    (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
    (dict(skip_threshold=-1.0), "skip_threshold must be >= 0"),
    (dict(max_consecutive_skips=0), "max_consecutive_skips must be >= 1"),
    (dict(ema=1.0), r"ema must be in \[0, 1\), got 1.0"),
    (dict(kl_warmup=2, kl_warmup_steps=5), "set one"),
    (dict(free_bits=-0.1), "free_bits must be >= 0"),
    (dict(lr_schedule="step"), "lr_schedule must be one of"),
    (dict(lr_min_factor=1.5), "lr_min_factor must be in"),
    (dict(iw_train=2, free_bits=0.5), "iw_train > 1 cannot be combined"),
])
def test_bad_aid_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        T.train(_cfg(epochs=1, **bad))


# ---- the command line --------------------------------------------------------------------------

def test_cli_options_reach_the_config():
    argv = ["train", "--grad-clip", "200", "--skip-threshold", "400", "--max-consecutive-skips", "7", "--ema",
            "0.999", "--kl-warmup-steps", "1000", "--free-bits", "0.5", "--kl-balance", "--lr-warmup-steps", "50",
            "--lr-schedule", "cosine", "--lr-min-factor", "0.01"]
    parser = build_parser()
    c, _ = cli.settings(config.typed_settings(parser.parse_args(argv)))
    assert (c.grad_clip, c.skip_threshold, c.max_consecutive_skips, c.ema, c.kl_warmup_steps, c.free_bits,
            c.kl_balance, c.lr_warmup_steps, c.lr_schedule, c.lr_min_factor) == \
        (200.0, 400.0, 7, 0.999, 1000, 0.5, True, 50, "cosine", 0.01)
    d, _ = cli.settings(config.typed_settings(parser.parse_args(["train"])))
    assert {k: getattr(d, k) for k in AIDS} == {k: getattr(TrainConfig(), k) for k in AIDS}
    args = parser.parse_args(["train", "--resume", "x", "--max-consecutive-skips", "9", "--ema", "0.5"])
    over = config.typed_settings(args)
    assert over == {"max_consecutive_skips": 9, "ema": 0.5}  # ema is then refused by train()
    assert "max_consecutive_skips" in T.RESUME_OVERRIDES and "ema" not in T.RESUME_OVERRIDES


@pytest.mark.parametrize("argv, message", [
    (["--grad-clip", "-1"], "argument --grad-clip: must be >= 0, got -1.0"),
    (["--skip-threshold", "-5"], "must be >= 0, got -5.0"),
    (["--max-consecutive-skips", "0"], "must be >= 1, got 0"),
    (["--ema", "1"], "argument --ema: must be in [0, 1), got 1.0"),
    (["--ema", "-0.1"], "must be in [0, 1), got -0.1"),
    (["--kl-warmup-steps", "-1"], "must be >= 0, got -1"),
    (["--free-bits", "-0.5"], "must be >= 0, got -0.5"),
    (["--lr-warmup-steps", "x"], "argument --lr-warmup-steps: expected int, got 'x'"),
    (["--lr-schedule", "linear"], "invalid choice: 'linear'"),
    (["--lr-min-factor", "2"], "must be in [0, 1], got 2.0"),
    (["--iw-train", "2", "--free-bits", "1"], "--iw-train > 1 cannot be combined with --kl-warmup-steps"),
    (["--kl-warmup", "2", "--kl-warmup-steps", "5"], "--kl-warmup (epochs) and --kl-warmup-steps: set one"),
])
def test_cli_bad_aid_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_train_with_aids_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--max-train", "64", "--hidden", "16", "--iw-samples", "0",
                 "--no-progress", "--threads", "1", "--out", str(out), "--ema", "0.9", "--grad-clip", "100",
                 "--skip-threshold", "1e6", "--lr-schedule", "cosine", "--lr-warmup-steps", "2",
                 "--kl-warmup-steps", "2", "--free-bits", "0.1", "--kl-balance"]) == 0
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0] and all("lr" in r and "grad_norm" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ema"] == 0.9 and summary["complete"]


def test_ranks_skip_the_same_updates_and_keep_the_same_ema(tmp_path):
    from test_distributed import SCRIPTS, torchrun
    r = torchrun(SCRIPTS / "ddp_aids.py", tmp_path / "ranks.pt", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert [row["skipped"] for row in a["history"]] == [row["skipped"] for row in b["history"]] == [1, 0]
    assert all(math.isfinite(row["train_loss"]) for row in a["history"])
    for k, v in a["model"].items():  # the returned (EMA) model, buffers included
        assert torch.equal(v, b["model"][k]), k
