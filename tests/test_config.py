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
    c = TrainConfig(groups=(1, 2), latent_dims=(8, 4)).check()
    assert c.groups == [1, 2] and c.latent_dims == [8, 4]
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
