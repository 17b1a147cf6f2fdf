"""The settings (hvae_fast.config), the run state, and the Python API that does what the CLI does."""
import dataclasses
import json
import typing

import pytest
import torch

from hvae_fast import cli, config, evaluate, writer, train as T
from hvae_fast.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return TrainConfig(**{**dict(hidden=16, max_train=64, epochs=2, progress=False, seed=3, iw_samples=4), **kw})


def _other_value(f):
    """A valid value of field f that is not its default, as (command-line words, value)."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    m, hint = f.metadata, typing.get_type_hints(TrainConfig)[f.name]
    if hint is bool:
        return [], not default
    if m["choices"]:
        v = next(c for c in m["choices"] if c != default)
        return [v], v
    if isinstance(default, list) or typing.get_origin(hint) is typing.Union and "List" in str(hint):
        return ["3", "1"], [3, 1]
    base = hint if typing.get_origin(hint) is not typing.Union else typing.get_args(hint)[0]
    if base is str:
        return ["somewhere"], "somewhere"
    if base is int:
        v = 3 if default != 3 else 4
        return [str(v)], v
    v = 0.5 if default != 0.5 else 0.25
    return [str(v)], v


CLI_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]


@pytest.mark.parametrize("f", CLI_FIELDS, ids=lambda f: f.name)
def test_every_setting_is_an_option_that_reaches_the_config(f):
    words, value = _other_value(f)
    args = cli.build_parser().parse_args(["train", config.flag(f.name), *words])
    typed = config.typed_settings(args)
    assert typed == {f.name: value}  # only what was typed: the defaults are not settings the user gave
    built, _ = cli.settings(typed)
    assert getattr(built, f.name) == value
    assert all(getattr(built, g.name) == getattr(TrainConfig(), g.name) for g in CLI_FIELDS if g is not f)


def test_the_help_is_each_fields_own(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in CLI_FIELDS:
        assert config.flag(f.name) in out
        assert " ".join(f.metadata["help"].split())[:40] in out, f.name
    assert "(default: 1 2 2)" in out and "--groups N [N ...]" in out


@pytest.mark.parametrize("bad, python, command_line", [
    (dict(model="bottomup", levels=1), "model bottomup needs levels >= 2", "--model bottomup needs --levels >= 2"),
    (dict(lr=-1.0), "lr must be > 0, got -1.0", "--lr must be > 0, got -1.0"),
    (dict(groups=[0, 0]), "groups needs at least one latent group", "--groups needs at least one latent group"),
    (dict(precision="fp8"), "precision must be one of", "--precision must be one of"),
    (dict(iw_train=2, kl_warmup=3), "iw_train > 1 and kl_warmup cannot", "--iw-train > 1 and --kl-warmup cannot"),
])
def test_one_check_names_fields_for_python_and_options_for_the_cli(bad, python, command_line):
    c = TrainConfig(**bad)
    with pytest.raises(config.SettingError, match=python.replace("(", r"\(")):
        c.check()
    with pytest.raises(config.SettingError) as e:
        c.check(name=config.flag)
    assert command_line in str(e.value)
    with pytest.raises(config.SettingError, match=python):
        T.train(c)  # the Python API checks with the same rules


def test_early_stopping_counts_patience_and_drops():
    s = T.EarlyStopping(patience=1, lr_drops=1)
    model = torch.nn.Linear(2, 1)
    assert s.update(5.0, 1, model) and s.best_epoch == 1
    assert not s.update(6.0, 2, model) and not s.drop_due and not s.should_stop
    assert not s.update(6.0, 3, model) and s.drop_due and not s.should_stop  # patience out, a drop remains
    s.take_drop()
    assert s.bad_epochs == 0 and s.drops == 1
    restored = T.EarlyStopping(patience=1, lr_drops=1)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()
    s.update(7.0, 4, model), s.update(7.0, 5, model)
    assert s.should_stop and not s.drop_due


def test_a_format_1_checkpoint_resumes_as_the_run_it_was(tmp_path):
    whole = T.train(_cfg(epochs=3))
    T.train(_cfg(epochs=2), out=str(tmp_path))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    run = ck.pop("run")
    stop = run["stopping"]
    old = {**ck, "format": 1, "epoch": run["epoch"] - 1, "history": run["history"], "step": run["step"],
           "train_time_s": run["train_time_s"], "rng": run["rng"], "rng_per_rank": None,
           "best_model": stop["best_state"], "patience": stop["bad_epochs"], "lr_drops_done": stop["drops"]}
    torch.save(old, tmp_path / "old.pt")
    resumed = T.train(resume=str(tmp_path / "old.pt"), overrides={"epochs": 3})
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in whole["history"]]


def test_run_does_what_the_command_line_does(tmp_path):
    c = _cfg()
    summary = T.run(c, out=str(tmp_path / "py"))
    assert cli.main(["train", "--hidden", "16", "--max-train", "64", "--epochs", "2", "--no-progress", "--seed", "3",
                     "--iw-samples", "4", "--threads", "1", "--out", str(tmp_path / "cli")]) == 0
    from_cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    on_disk = json.loads((tmp_path / "py" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary)) and summary["complete"]
    assert set(summary["files"]) == set(from_cli["files"]) >= {"best", "last", "metrics", "samples", "conditional"}
    assert summary["test"] == from_cli["test"]  # the same numbers: the same run and evaluation
    assert summary["config"] == from_cli["config"] and summary["epochs"] == from_cli["epochs"] == 2
    no_files = T.run(c, out=None)
    assert no_files["test"] == summary["test"] and no_files["files"] == {}


def test_the_pictures_and_the_evaluation_draw_none_of_the_runs_noise(tmp_path):
    T.train(_cfg(epochs=1))
    after_training = torch.get_rng_state()
    T.run(_cfg(epochs=1), out=str(tmp_path))  # + pictures and the test evaluation, each on a forked RNG
    assert torch.equal(torch.get_rng_state(), after_training)


def test_validation_is_the_evaluations_elbo_and_iw(tmp_path):
    res = T.train(_cfg(epochs=1))
    x = res["dataset"].val
    torch.manual_seed(0)
    v = evaluate.validate(res["model"], x, iw_samples=3)
    torch.manual_seed(0)
    e = evaluate.elbo(res["model"], x)
    iw = -evaluate.iw_log_likelihood(res["model"], x, 3).double().mean().item()
    assert (v["loss"], v["log_px"], v["kl"]) == (e["neg_elbo"], e["log_px"], e["kl"])
    assert v["iw"] == pytest.approx(iw, rel=1e-6)


def test_the_run_state_is_saved_whole(tmp_path):
    T.train(_cfg(epochs=2, lr_drops=1, patience=0), out=str(tmp_path))
    ck = writer.load_checkpoint(tmp_path / "last.pt")
    fields = {f.name for f in dataclasses.fields(T.RunState)}
    assert set(ck["run"]) == fields | {"stopping"}
    state = T.RunState.from_state_dict(ck["run"], T.EarlyStopping(0, 1))
    assert state.epoch == 2 and len(state.history) == 2 and state.step == 2 * 1  # 64 rows: one batch an epoch


def test_list_settings_take_tuples():
    c, d = TrainConfig(arch="resnet", groups=(1, 2)).check(), TrainConfig(latent_dims=(8, 4)).check()
    assert c.groups == [1, 2] and d.latent_dims == [8, 4]
    with pytest.raises(config.SettingError, match=r"latent_dims must be >= 1, got \[8, 0\]"):
        TrainConfig(latent_dims=(8, 0)).check()


def test_a_resume_checks_what_it_changes_not_the_saved_run(tmp_path):
    T.train(_cfg(model="onelevel", epochs=1), out=str(tmp_path))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    ck["config"]["levels"] = 3  # a run an older version accepted and today's rules refuse (onelevel has 1)
    torch.save(ck, tmp_path / "older.pt")
    res = T.train(resume=str(tmp_path / "older.pt"), overrides={"epochs": 2})
    assert res["epochs"] == 2
    with pytest.raises(config.SettingError, match="patience must be >= 0, got -1"):
        T.train(resume=str(tmp_path / "older.pt"), overrides={"patience": -1})


def test_compare_checks_every_row_before_training_one(capsys, monkeypatch):
    monkeypatch.setattr(T, "run", lambda *a, **k: pytest.fail("a row trained before the check"))
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--seeds", "0", "--epochs", "1", "--dropout", "0.1"])  # topdown takes it, bottomup not
    assert e.value.code == 2 and "--dropout applies to the topdown model" in capsys.readouterr().err


def test_a_bad_device_is_a_setting_error():
    with pytest.raises(config.SettingError, match="device 'gpu0': not a device"):
        TrainConfig(device="gpu0").check()


# ---- every setting acts, or is refused ---------------------------------------------------------

# (settings, command-line words, what the Python message says, what the CLI message says): a setting
# given where nothing reads it is an error that names it
INERT = [
    (dict(kl_balance=True), ["--kl-balance"], "kl_balance acts only while the KL weight is below 1",
     "--kl-balance acts only while the KL weight is below 1: set --kl-warmup or --kl-warmup-steps"),
    (dict(conv_channels=64), ["--conv-channels", "64"], "conv_channels applies to arch resnet only",
     "--conv-channels applies to --arch resnet only"),
    (dict(latent_channels=4), ["--latent-channels", "4"], "latent_channels applies to arch resnet only",
     "--latent-channels applies to --arch resnet only"),
    (dict(groups=[2, 2]), ["--groups", "2", "2"], "groups applies to arch resnet only",
     "--groups applies to --arch resnet only"),
    (dict(arch="resnet", hidden=64), ["--arch", "resnet", "--hidden", "64"], "hidden applies to the MLP networks",
     "--hidden applies to the MLP networks; --arch resnet's width is --conv-channels"),
    (dict(arch="resnet", L=4), ["--arch", "resnet", "--L", "4"], "L applies to the MLP models",
     "--L applies to the MLP models; --arch resnet's latent sizes are --latent-channels and --groups"),
    (dict(arch="resnet", levels=3), ["--arch", "resnet", "--levels", "3"], "levels applies to the MLP models",
     "--levels applies to the MLP models; --arch resnet's levels are --groups"),
    (dict(arch="resnet", latent_dims=[4, 2]), ["--arch", "resnet", "--latent-dims", "4", "2"],
     "latent_dims applies to the MLP models", "--latent-dims applies to the MLP models; --arch resnet's levels"),
    (dict(arch="resnet", conv=True), ["--arch", "resnet", "--conv"], "conv applies to arch mlp only",
     "--conv applies to --arch mlp only (resnet is convolutional)"),
    (dict(arch="resnet", dropout=0.1), ["--arch", "resnet", "--dropout", "0.1"],
     "dropout applies to the topdown model's MLP networks only", "--dropout applies to the topdown model's MLP"),
    (dict(model="bottomup", arch="resnet"), ["--model", "bottomup", "--arch", "resnet"],
     "arch applies to model topdown only", "--arch applies to --model topdown only"),
    (dict(threshold=3.0), ["--threshold", "3"], "threshold applies to likelihood bernoulli only",
     "--threshold applies to --likelihood bernoulli only"),
    (dict(likelihood="bernoulli", binarize="dynamic", threshold=3.0),
     ["--likelihood", "bernoulli", "--binarize", "dynamic", "--threshold", "3"],
     "threshold applies to binarize threshold, not dynamic", "--threshold applies to --binarize threshold, not"),
    (dict(binarize="dynamic"), ["--binarize", "dynamic"], "binarize applies to likelihood bernoulli only",
     "--binarize applies to --likelihood bernoulli only"),
    (dict(lr_min_factor=0.1), ["--lr-min-factor", "0.1"], "lr_min_factor applies to lr_schedule cosine only",
     "--lr-min-factor applies to --lr-schedule cosine only"),
    (dict(max_consecutive_skips=5), ["--max-consecutive-skips", "5"],
     "max_consecutive_skips applies with skip_threshold only", "--max-consecutive-skips applies with --skip-threshold"),
    (dict(lr_drop_factor=0.5), ["--lr-drop-factor", "0.5"], "lr_drop_factor applies with lr_drops >= 1 only",
     "--lr-drop-factor applies with --lr-drops >= 1 only"),
    (dict(iw_samples=0, iw_subset=100), ["--iw-samples", "0", "--iw-subset", "100"],
     "iw_subset applies with iw_samples >= 1 only", "--iw-subset applies with --iw-samples >= 1 only"),
    (dict(latent_dims=[16, 8], L=4), ["--latent-dims", "16", "8", "--L", "4"],
     "L sets the default level sizes; latent_dims gives", "--L sets the default level sizes; --latent-dims gives"),
    (dict(model="onelevel", levels=3), ["--model", "onelevel", "--levels", "3"],
     "levels and latent_dims apply to model topdown and bottomup", "--levels and --latent-dims apply to --model"),
    (dict(model="hierarchical", latent_dims=[16, 8]), ["--model", "hierarchical", "--latent-dims", "16", "8"],
     "levels and latent_dims apply to model topdown and bottomup", "--levels and --latent-dims apply to --model"),
    (dict(num_vals=20), ["--num-vals", "20"], "num_vals applies to a source given as data",
     "--num-vals applies to a source given as --data; sklearn's digits (the default) have 17 values"),
    (dict(val_size=100), ["--val-size", "100"], "val_size applies to IDX folders and fashion-mnist only",
     "--val-size applies to IDX folders and fashion-mnist only"),
    (dict(shuffle_seed=1), ["--shuffle-seed", "1"], "shuffle_seed applies to a single-array file only",
     "--shuffle-seed applies to a single-array file only"),
    (dict(kl_warmup=1), ["--kl-warmup", "1"], "kl_warmup 1 is no warm-up", "--kl-warmup 1 is no warm-up"),
    (dict(kl_warmup_steps=1), ["--kl-warmup-steps", "1"], "kl_warmup_steps 1 is no warm-up",
     "--kl-warmup-steps 1 is no warm-up"),
    (dict(lr_warmup_steps=1), ["--lr-warmup-steps", "1"], "lr_warmup_steps 1 is no warm-up",
     "--lr-warmup-steps 1 is no warm-up"),
]


@pytest.mark.parametrize("settings, words, python, command_line", INERT, ids=lambda v: str(v)[:40])
def test_a_setting_that_does_nothing_is_refused(settings, words, python, command_line, capsys, tmp_path,
                                                 monkeypatch):
    with pytest.raises(config.SettingError) as e:
        TrainConfig(**settings).check()
    assert python in str(e.value)
    monkeypatch.setattr(T, "run", lambda *a, **k: pytest.fail("trained with a setting that does nothing"))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *words, "--out", str(tmp_path)])
    assert e.value.code == 2 and command_line in capsys.readouterr().err


@pytest.mark.parametrize("words, command_line", [
    # typed at their default values: still settings the user gave, and still inert
    (["--conv-channels", "32"], "--conv-channels applies to --arch resnet only"),
    (["--arch", "resnet", "--levels", "2"], "--levels applies to the MLP models"),
    (["--arch", "resnet", "--dropout", "0"], "--dropout applies to the topdown model's MLP networks only"),
    (["--max-consecutive-skips", "100"], "--max-consecutive-skips applies with --skip-threshold only"),
    (["--lr-drop-factor", "0.1"], "--lr-drop-factor applies with --lr-drops >= 1 only"),
    (["--model", "onelevel", "--levels", "2"], "--levels and --latent-dims apply to --model topdown and bottomup"),
    (["--val-size", "10000"], "--val-size applies to IDX folders and fashion-mnist only"),
    (["--arch", "mlp", "--model", "bottomup"], "--arch applies to --model topdown only"),
])
def test_an_option_typed_at_its_default_counts_as_given(words, command_line, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "run", lambda *a, **k: pytest.fail("trained with a setting that does nothing"))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *words, "--out", str(tmp_path)])
    assert e.value.code == 2 and command_line in capsys.readouterr().err


def test_defaults_and_recipes_never_trip_the_check():
    TrainConfig().check()
    TrainConfig(model="onelevel", levels=1).check()  # the model's own level count, as compare sets it
    TrainConfig(model="hierarchical").check()
    for name in config.RECIPES:
        TrainConfig.recipe(name).check()
        c, taken = cli.settings({"data": name})
        assert taken == {k: v for k, v in config.RECIPES[name].items() if k != "data"
                         and (k != "precision" or config.bf16_is_fast())}
        c.check(name=config.flag, given={"data"})


def test_a_recipe_fills_only_settings_that_act():
    # --iw-samples 0: the recipe's --iw-subset would do nothing, so it is not taken (and not refused)
    c, taken = cli.settings({"data": "fashion-mnist", "iw_samples": 0})
    assert c.iw_subset is None and "iw_subset" not in taken and c.ema == 0.999
    c.check(name=config.flag, given={"data", "iw_samples"})
    T._settings(c, None, None, None, None)  # the run's own check (fields given by value) passes too
    # --model bottomup: the recipe's --arch resnet applies to topdown only
    c, taken = cli.settings({"data": "fashion-mnist", "model": "bottomup"})
    assert c.arch == "mlp" and "arch" not in taken and taken["lr"] == 3e-3
    assert c.likelihood == "categorical" and "likelihood" not in taken  # dmol needs the resnet's head
    c.check()
    assert TrainConfig.recipe("fashion-mnist", iw_samples=0).iw_subset is None


def test_a_setting_that_acts_is_accepted():
    for ok in (dict(kl_balance=True, kl_warmup=5), dict(kl_balance=True, kl_warmup_steps=100),
               dict(arch="resnet", conv_channels=16, latent_channels=4, groups=[1, 1]),
               dict(likelihood="bernoulli", threshold=3.0), dict(likelihood="bernoulli", binarize="dynamic"),
               dict(lr_schedule="cosine", lr_min_factor=0.1), dict(skip_threshold=10.0, max_consecutive_skips=5),
               dict(lr_drops=1, lr_drop_factor=0.5), dict(iw_subset=100), dict(latent_dims=[16, 8]),
               dict(data="fashion-mnist", val_size=100), dict(data="fashion-mnist", num_vals=300),
               dict(kl_warmup=2), dict(lr_warmup_steps=2), dict(model="hierarchical", L=4, hidden=32)):
        TrainConfig(**ok).check()


def test_a_resume_refuses_a_change_that_does_nothing_and_names_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--max-train", "64", "--hidden", "16", "--iw-samples", "0",
                     "--no-progress", "--out", str(out)]) == 0
    last = str(out / "last.pt")
    with pytest.raises(config.SettingError, match="lr_drop_factor applies with lr_drops >= 1 only"):
        T.train(resume=last, overrides={"lr_drop_factor": 0.5})  # the saved run takes no lr drops
    with pytest.raises(config.SettingError, match="iw_subset applies with iw_samples >= 1 only"):
        T.train(resume=last, overrides={"iw_subset": 10})
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", last, "--out", str(out), "--max-consecutive-skips", "5"])
    assert e.value.code == 2
    assert "--max-consecutive-skips applies with --skip-threshold only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", last, "--out", str(out), "--lr", "0.01", "--eval-memory", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot change --lr (saved 0.001, asked 0.01)" in err
    assert "--eval-memory" in err and "eval_memory_mb" not in err and "--lr-drop-factor" in err
    with pytest.raises(config.ResumeError, match="cannot change lr .*eval_memory_mb"):  # Python: fields
        T.train(resume=last, overrides={"lr": 0.01})


def test_a_refusal_beside_a_recipe_says_what_the_recipe_set(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "run", lambda *a, **k: pytest.fail("trained with a setting that does nothing"))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "fashion-mnist", "--levels", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--levels applies to the MLP models; --arch resnet's levels are --groups" in err
    assert "(the fashion-mnist recipe: --arch resnet," in err  # the user did not type --arch resnet


def test_the_recipes_bf16_is_taken_only_where_bf16_is_fast(monkeypatch):
    for fast in (True, False):
        monkeypatch.setattr(config, "bf16_is_fast", lambda device="cpu", fast=fast: fast)
        c, taken = cli.settings({"data": "fashion-mnist"})
        assert c.precision == ("bf16" if fast else "fp32") and ("precision" in taken) == fast
        c, taken = cli.settings({"data": "fashion-mnist", "precision": "bf16"})  # typed: kept either way
        assert c.precision == "bf16" and "precision" not in taken


def test_bf16_is_fast_answers_on_any_machine(monkeypatch):
    assert isinstance(config.bf16_is_fast("cpu"), bool)
    if not torch.cuda.is_available():  # a CPU-only torch, even one that claims a GPU: no, not an error
        assert config.bf16_is_fast("cuda") is False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert config.bf16_is_fast("cuda:0") is False


def test_a_switch_the_recipe_turns_on_can_be_turned_off():
    parser = cli.build_parser()
    for argv, want in ((["--no-channels-last"], False), (["--channels-last"], True), ([], True)):
        c, taken = cli.settings(config.typed_settings(parser.parse_args(["train", "--data", "fashion-mnist",
                                                                        *argv])))
        assert c.channels_last is want and ("channels_last" in taken) == (not argv)
