"""--tensorboard: event files in OUT/tensorboard, read back with TensorBoard's own reader."""
import json
import math
import shutil
import sys

import pytest
import torch

from hvae_fast import config, writer
from hvae_fast.cli import main
from hvae_fast.train import TrainConfig, run, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden=16, max_train=64, iw_samples=0, progress=False)


def require_tensorboard():
    """Skips the test where the tensorboard package is not installed (CI's test extra has it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pytest.skip("the tensorboard package is not installed")


@pytest.fixture
def events():
    """read(folder) -> EventAccumulator of a run's tensorboard folder (skips without tensorboard)."""
    require_tensorboard()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(folder):
        ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        ea.Reload()
        return ea
    return read


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(ea, tag):
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def assert_scalars_are_the_rows(ea, rs, D):
    """Every tag's (step, value) pairs are the metrics rows' numbers, once per epoch."""
    steps = [r["epoch"] for r in rs]
    want = {"loss/train": [r["train_loss"] for r in rs], "loss/val": [r["val_loss"] for r in rs],
            "loss/best_val": [r["best_val"] for r in rs], "log_px/val": [r["val_log_px"] for r in rs],
            "time_s": [r["time"] for r in rs], "kl_weight": [r["kl_weight"] for r in rs],
            "bits_per_dim/train": [r["train_loss"] / (D * math.log(2)) for r in rs],
            "bits_per_dim/val": [r["val_loss"] / (D * math.log(2)) for r in rs]}
    for i in range(len(rs[0]["val_kl"])):
        want[f"kl/val_z{i + 1}"] = [r["val_kl"][i] for r in rs]
    for key, tag in writer.TENSORBOARD_TAGS.items():  # lr, grad_norm, skipped updates: where the rows have them
        if key in rs[0] and tag not in want:
            want[tag] = [r[key] for r in rs]
    assert set(want) == set(ea.Tags()["scalars"])
    for tag, values in want.items():
        got = scalars(ea, tag)
        assert [s for s, _ in got] == steps, tag  # one point per epoch, none twice
        assert [v for _, v in got] == pytest.approx(values, rel=1e-6, abs=1e-9), tag  # stored as float32


def test_scalars_are_the_metrics_rows_and_pictures_are_there(tmp_path, events):
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=4, tensorboard=True, tensorboard_every=3, lr_schedule="cosine", grad_clip=100.0,
                      skip_threshold=1e6, **TINY)
    run(cfg, out=str(out), log=None)
    rs = rows(out)
    assert {"lr", "grad_norm", "skipped", "skipped_total"} <= set(rs[0])
    ea = events(out / "tensorboard")
    assert_scalars_are_the_rows(ea, rs, 64)
    assert {"lr", "grad_norm", "skipped_updates/epoch", "skipped_updates/total"} <= set(ea.Tags()["scalars"])
    for tag in ("samples", "reconstructions"):
        imgs = ea.Images(tag)
        assert [i.step for i in imgs] == [1, 3]  # the first epoch, then every 3
        # 8x8 digits, 8 a row with 1 pixel between them: 16 samples; 8 images above their reconstructions
        assert (imgs[0].width, imgs[0].height) == (8 * 8 + 7, 2 * 8 + 1)


def test_pictures_do_not_change_the_run(tmp_path, events):
    on = TrainConfig(epochs=2, tensorboard=True, tensorboard_every=1, **TINY)
    run(on, out=str(tmp_path / "on"), log=None)
    run(TrainConfig(epochs=2, **TINY), out=str(tmp_path / "off"), log=None)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in rows(tmp_path / "on")]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in rows(tmp_path / "off")]


def test_a_resume_continues_the_curves_without_duplicates(tmp_path, events):
    out = tmp_path / "run"
    train(TrainConfig(epochs=2, tensorboard=True, tensorboard_every=1, **TINY), out=str(out), log=None)
    shutil.copy(out / "last.pt", tmp_path / "last2.pt")
    train(resume=str(out / "last.pt"), overrides={"epochs": 3}, out=str(out), log=None)
    assert [s for s, _ in scalars(events(out / "tensorboard"), "loss/val")] == [1, 2, 3]
    # a run stopped after it wrote epoch 3's events but before its last.pt: the resume trains
    # epoch 3 again, and TensorBoard keeps the new epoch 3 only (purge_step)
    shutil.copy(tmp_path / "last2.pt", out / "last.pt")
    train(resume=str(out / "last.pt"), overrides={"epochs": 4}, out=str(out), log=None)
    ea = events(out / "tensorboard")
    rs = rows(out)
    assert [r["epoch"] for r in rs] == [1, 2, 3, 4]
    assert_scalars_are_the_rows(ea, rs, 64)
    assert [i.step for i in ea.Images("samples")] == [1, 2, 3, 4]
    # and the curve is the uninterrupted run's
    train(TrainConfig(epochs=4, tensorboard=True, tensorboard_every=1, **TINY), out=str(tmp_path / "whole"),
          log=None)
    assert [v for _, v in scalars(events(tmp_path / "whole" / "tensorboard"), "loss/val")] == \
        [v for _, v in scalars(ea, "loss/val")]


def test_turned_on_at_a_resume_it_gets_the_earlier_epochs_from_the_log(tmp_path, events, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--hidden", "16", "--max-train", "64", "--iw-samples", "0",
                 "--no-progress", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists()
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "4", "--tensorboard",
                 "--tensorboard-every", "2"]) == 0
    captured = capsys.readouterr()
    assert "tensorboard False -> True" in captured.err and f"wrote {out}/" in captured.out
    assert captured.out.rstrip().endswith("tensorboard/")
    ea = events(out / "tensorboard")
    rs = rows(out)
    assert [r["epoch"] for r in rs] == [1, 2, 3, 4]
    assert_scalars_are_the_rows(ea, rs, 64)
    assert [i.step for i in ea.Images("samples")] == [4]  # pictures from the resume on


def test_without_tensorboard_the_option_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    with pytest.raises(config.SettingError, match=r"tensorboard: the tensorboard package is not installed .*"
                                                  r"pip install 'hvae_fast\[tensorboard\]'"):
        TrainConfig(tensorboard=True).check()
    with pytest.raises(SystemExit) as e:
        main(["train", "--tensorboard", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "--tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "r" / "last.pt").exists()
    TrainConfig().check()  # off, nothing is imported


def test_settings_of_the_option(tmp_path):
    with pytest.raises(config.SettingError, match="tensorboard_every applies with tensorboard only"):
        TrainConfig(tensorboard_every=2).check()
    with pytest.raises(config.SettingError, match="tensorboard_every must be >= 1, got 0"):
        TrainConfig(tensorboard=True, tensorboard_every=0).check()
    assert {"tensorboard", "tensorboard_every"} <= set(config.RESUME_OVERRIDES)
    require_tensorboard()
    with pytest.raises(config.SettingError, match="tensorboard writes into the run's folder, and this run has none"):
        train(TrainConfig(epochs=1, tensorboard=True, **TINY), log=None)


def test_a_folder_holding_only_tensorboard_events_holds_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    argv = ["train", "--epochs", "1", "--hidden", "16", "--max-train", "64", "--iw-samples", "0", "--no-progress",
            "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "already holds a run (tensorboard)" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # deletes the old events with the folder
    assert not (out / "tensorboard").exists() and (out / "last.pt").exists()
