"""The hvae-fast command through main([...]): help, bad arguments, a tiny end-to-end run."""
import json
import math
import os

import numpy as np
import pytest
import torch

from hvae_fast.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["sample"], ["interpolate"], ["compare"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hvae-fast" in out
    if cmd == ["train"]:
        for opt in ("--model", "--levels", "--likelihood", "--data", "--epochs", "--patience", "--lr",
                    "--batch-size", "--seed", "--backend", "--out", "--resume", "--no-progress"):
            assert opt in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "ladder"], "invalid choice: 'ladder'"),
    (["train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train", "--lr", "-1"], "argument --lr: must be > 0, got -1.0"),
    (["train", "--backend", "cuda"], "invalid choice: 'cuda'"),
    (["train", "--model", "onelevel", "--levels", "3"], "--levels and --latent-dims apply to --model topdown and bottomup"),
    (["train", "--model", "bottomup", "--conv"], "--conv applies to --model topdown only"),
    (["train", "--model", "bottomup", "--levels", "1"], "--model bottomup needs --levels >= 2"),
    (["train", "--levels", "3", "--latent-dims", "4", "4"], "--latent-dims needs 3 sizes"),
    (["train", "--data", "/no/such/file.npy"], "--data /no/such/file.npy: no such file"),
    (["train", "--resume", "/no/such/last.pt"], "--resume /no/such/last.pt: no such file"),
    (["eval", "/no/such/best.pt"], "checkpoint /no/such/best.pt: no such file"),
    (["frobnicate"], "invalid choice"),
    (["train", "--iw-train", "0"], "argument --iw-train: must be >= 1, got 0"),
    (["train", "--val-iw", "-1"], "argument --val-iw: must be >= 0, got -1"),
    (["train", "--weight-decay", "-0.1"], "argument --weight-decay: must be >= 0, got -0.1"),
    (["train", "--lr-drop-factor", "0"], "argument --lr-drop-factor: must be > 0, got 0.0"),
    (["train", "--model", "bottomup", "--dropout", "0.2"], "--dropout applies to the topdown model's MLP networks"),
    (["train", "--dropout", "1"], "argument --dropout: must be in [0, 1), got 1.0"),
    (["train", "--iw-train", "2", "--kl-warmup", "5"], "--iw-train > 1 and --kl-warmup cannot be combined"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(blocker / "sub"), "--epochs", "1"])
    assert e.value.code == 2
    assert f"--out {blocker / 'sub'}: cannot write there" in capsys.readouterr().err


def test_bad_data_file_is_a_clean_error(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.full((20, 16), 99.0))
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "bad.npy"), "--num-vals", "17", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "bad.npy: value 99.0" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "c.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "c.pt")])
    assert e.value.code == 2
    assert "c.pt: not a readable hvae_fast checkpoint" in capsys.readouterr().err


def test_train_eval_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--epochs", "2", "--hidden", "32", "--max-train", "128", "--iw-samples", "8",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test -ELBO" in text and "test IW-NLL" in text and "active units" in text
    for f in ("best.pt", "last.pt", "metrics.jsonl", "summary.json", "samples.png", "reconstructions.png",
              "val_curve.png", "kl_per_level.png"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test"]["n"] == 447 and len(summary["test"]["kl"]) == 2
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rc = main(["eval", str(out / "best.pt"), "--iw-samples", "4", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["neg_elbo"] == pytest.approx(summary["test"]["neg_elbo"], rel=1e-6)  # same seed, same pass

    rc = main(["sample", str(out / "best.pt"), "-n", "9", "--out", str(tmp_path / "s.png")])
    assert rc == 0 and (tmp_path / "s.png").stat().st_size > 0

    # resume to 3 epochs continues the same run
    rc = main(["train", "--epochs", "3", "--resume", str(out / "last.pt"), "--iw-samples", "0",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_user_data_and_bernoulli(tmp_path, capsys):
    x = (np.random.default_rng(0).random((60, 16)) > 0.5).astype(np.uint8)
    np.save(tmp_path / "bin.npy", x)
    rc = main(["train", "--data", str(tmp_path / "bin.npy"), "--likelihood", "bernoulli", "--epochs", "1",
               "--hidden", "16", "--iw-samples", "4", "--no-progress", "--out", str(tmp_path / "o"),
               "--model", "onelevel"])
    assert rc == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["test"]["n"] == 12 and s["config"]["D"] == 16


def test_compare_prints_a_table(capsys):
    rc = main(["compare", "--seeds", "0", "--epochs", "1", "--hidden", "16", "--max-train", "64",
               "--iw-samples", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| model | levels | parameters | test -ELBO | test IW-NLL |" in out
    for m, n in (("topdown", 2), ("bottomup", 2), ("onelevel", 1)):
        assert f"| {m} | {n} |" in out


def test_compare_at_several_depths(tmp_path, capsys):
    rc = main(["compare", "--seeds", "0", "--epochs", "1", "--hidden", "16", "--max-train", "50", "--iw-samples",
               "2", "--iw-subset", "5", "--levels", "2", "3", "--no-progress", "--threads", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r][1:]
    got = {(c[0], int(c[1])): c for c in ([x.strip() for x in r.strip("|").split("|")] for r in rows)}
    assert sorted(got) == [("bottomup", 2), ("bottomup", 3), ("onelevel", 1), ("topdown", 2), ("topdown", 3)]
    for (m, n), c in got.items():  # one KL and one active-unit count per level, z1 first
        assert len(c[5].split(", ")) == n and len(c[6].split(", ")) == n
    assert [a.split("/")[1] for a in got["bottomup", 3][6].split(", ")] == ["16", "16", "8"]
    runs = json.loads((tmp_path / "compare.json").read_text())
    assert sorted((m, r["config"]["levels"]) for m, rs in runs.items() for r in rs) == sorted(got)
    assert [r["test"]["latent_dims"] for r in runs["bottomup"]] == [[16, 8], [16, 16, 8]]
    assert [r["test"]["latent_dims"] for r in runs["topdown"]] == [[16, 8], [16, 16, 8]]
    assert runs["bottomup"][1]["test"]["iw_n"] == 5
    from hvae_fast import train
    model, _ = train.model_from_checkpoint(str(tmp_path / "bottomup3-seed0" / "best.pt"))  # rebuilt at 3 levels
    assert model.latent_dims == [16, 16, 8] and len(model.p_above) == 1


def test_train_with_iw_objective_end_to_end(tmp_path, capsys):
    out = tmp_path / "iw"
    rc = main(["train", "--epochs", "2", "--hidden", "32", "--max-train", "128", "--iw-samples", "8",
               "--iw-train", "3", "--val-iw", "6", "--weight-decay", "1e-4", "--lr-drops", "1", "--in-kernel-noise",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    assert "best validation IW bound (K = 6)" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    c = s["config"]
    assert (c["iw_train"], c["val_iw"], c["weight_decay"], c["lr_drops"]) == (3, 6, 1e-4, 1)
    assert c["in_kernel_noise"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert s["best_val"] == min(r["val_iw"] for r in rows)


@pytest.mark.parametrize("device, match", [("tpu9", "not a device")] +
                         ([] if torch.cuda.is_available() else [("cuda", "sees no CUDA device")]))
def test_bad_device_is_refused(device, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--device", device, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("D, shape", [(14, (2, 7)), (7, (1, 7)), (64, (8, 8)), (60, (6, 10))])
def test_pictures_of_data_that_are_not_square(D, shape, tmp_path):
    from hvae_fast import plots
    assert plots.picture_shape(D) == shape
    x = torch.randint(0, 4, (5, D))
    path = plots.save_samples(x, tmp_path / "s.png", None, 4)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    plots.save_reconstructions(x, x.float(), tmp_path / "r.png", None, 4)
    assert path == tmp_path / "s.png"


def test_train_and_sample_on_non_square_data(tmp_path):
    np.save(tmp_path / "d.npy", np.random.default_rng(0).integers(0, 4, (80, 14)).astype(np.uint8))
    out = tmp_path / "o"
    assert main(["train", "--data", str(tmp_path / "d.npy"), "--num-vals", "4", "--epochs", "1", "--hidden", "16",
                 "--iw-samples", "0", "--no-progress", "--out", str(out)]) == 0
    assert (out / "samples.png").exists() and (out / "reconstructions.png").exists()
    assert main(["sample", str(out / "best.pt"), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0


def test_resume_refuses_a_changed_setting_and_reports_an_allowed_one(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--iw-samples", "0", "--no-progress", "--max-train", "64", "--hidden", "16", "--threads", "1"]
    assert main(["train", "--epochs", "1", "--out", str(out), *base]) == 0
    last = str(out / "last.pt")
    with pytest.raises(SystemExit):
        main(["train", "--resume", last, "--out", str(out), "--lr", "0.01"])
    assert "cannot change --lr (saved 0.001, asked 0.01)" in capsys.readouterr().err  # options, as typed
    assert main(["train", "--resume", last, "--out", str(out), "--epochs", "2", "--eval-memory", "64"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "epochs 1 -> 2" in err and "eval_memory_mb 512 -> 64" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["config"]["hidden"] == 16  # the saved run, not the defaults


def test_a_crash_after_training_keeps_the_summary(tmp_path, monkeypatch):
    from hvae_fast import evaluate

    def out_of_memory(*a, **k):
        raise MemoryError("the IW evaluation could not allocate")

    monkeypatch.setattr(evaluate, "iw_log_likelihood", out_of_memory)
    out = tmp_path / "run"
    with pytest.raises(MemoryError):
        main(["train", "--epochs", "1", "--max-train", "64", "--hidden", "16", "--iw-samples", "4",
              "--no-progress", "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs"] == 1 and not s["complete"]
    assert "neg_elbo" in s["test"] and "iw_nll" not in s["test"]  # what was measured before the crash
    assert os.path.exists(s["files"]["best"])


def test_named_data_takes_its_recipe_where_no_option_says_otherwise():
    from hvae_fast import cli, train
    parser = cli.build_parser()
    argv = ["train", "--data", "fashion-mnist", "--epochs", "3", "--ema=0"]
    config, taken = cli.settings(cli.config.typed_settings(parser.parse_args(argv)))
    recipe = train.RECIPES["fashion-mnist"]
    assert config.arch == "resnet" and config.lr == recipe["lr"] and config.lr_schedule == "cosine"
    assert config.epochs == 3 and config.ema == 0  # typed on the command line: kept
    assert "epochs" not in taken and "ema" not in taken and taken["arch"] == "resnet"
    assert train.TrainConfig.recipe("fashion-mnist", epochs=2) == config.__class__(
        **{**recipe, "epochs": 2, "precision": config.precision})  # bf16 where it is fast (test_config)
    with pytest.raises(ValueError, match="no recipe for 'digits'"):
        train.TrainConfig.recipe("digits")


TINY = ["--epochs", "1", "--max-train", "64", "--hidden", "16", "--iw-samples", "0", "--no-progress"]


def _files(out):
    return {f: (out / f).read_bytes() for f in os.listdir(out)}


def test_a_folder_that_holds_a_run_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from hvae_fast import train, writer
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY]) == 0  # the default --out
    out = tmp_path / "hvae-run"
    before = _files(out)
    assert "conditional.png" in before
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", *TINY, "--epochs", "2"])  # --resume forgotten
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "hvae-run already holds a run (last.pt, best.pt, metrics.jsonl, summary.json" in err
    assert f"--resume {os.path.join('hvae-run', 'last.pt')}" in err and "--overwrite" in err
    with pytest.raises(train.RunExistsError, match="already holds a run"):
        train.run(train.TrainConfig(epochs=1, hidden=16, max_train=64, iw_samples=0, progress=False), out=str(out))
    assert _files(out) == before  # nothing truncated, nothing replaced
    with pytest.raises(SystemExit) as e:  # --overwrite, but the data refuse the run: the old one stays
        main(["train", *TINY, "--max-train", "100000", "--overwrite"])
    assert e.value.code == 2 and "--max-train 100000" in capsys.readouterr().err
    assert _files(out) == before
    # --overwrite: the old run's files go, so none of them stays beside the new run's
    assert main(["train", *TINY, "--model", "onelevel", "--overwrite"]) == 0
    assert not (out / "conditional.png").exists()  # a one-level model draws none
    assert json.loads((out / "summary.json").read_text())["config"]["model"] == "onelevel"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert set(before) <= set(writer.RUN_FILES)  # every file a run writes is one that --overwrite removes


def test_resume_continues_in_the_checkpoints_folder_unless_out_says_otherwise(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--out", "run"]) == 0
    assert main(["train", "--resume", os.path.join("run", "last.pt"), "--epochs", "2"]) == 0
    assert not (tmp_path / "hvae-run").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "wrote run/" in capsys.readouterr().out
    # into another folder: it says so, and the checkpoint's folder is left as it was
    before = _files(tmp_path / "run")
    assert main(["train", "--resume", os.path.join("run", "last.pt"), "--epochs", "3", "--out", "other"]) == 0
    assert "into other: the run continues there; run is left as it is" in capsys.readouterr().err
    assert len((tmp_path / "other" / "metrics.jsonl").read_text().splitlines()) == 3
    assert _files(tmp_path / "run") == before
    with pytest.raises(SystemExit) as e:  # the folder it continues in holds the very run
        main(["train", "--resume", os.path.join("run", "last.pt"), "--epochs", "3", "--overwrite"])
    assert e.value.code == 2 and "overwrite would delete the run that --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # another folder that holds a run is refused as for a new run
        main(["train", "--resume", os.path.join("other", "last.pt"), "--epochs", "4", "--out", "run"])
    assert "run already holds a run" in capsys.readouterr().err and _files(tmp_path / "run") == before


def test_compare_refuses_a_folder_that_holds_a_comparison(tmp_path, capsys):
    argv = ["compare", "--models", "onelevel", "--seeds", "0", "--epochs", "1", "--hidden", "16", "--max-train",
            "64", "--iw-samples", "0", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    before = _files(tmp_path / "onelevel-seed0")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a comparison" in err and "onelevel-seed0" in err and "--overwrite" in err
    assert _files(tmp_path / "onelevel-seed0") == before
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "compare.json").exists()


def test_compare_stopped_by_a_signal_says_so_and_exits_75(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HVAE_FAST_TEST_SIGNAL", "SIGTERM:1")  # the loop signals itself at its first step
    argv = ["compare", "--models", "onelevel", "--seeds", "0", "--epochs", "1", "--hidden", "16", "--max-train",
            "64", "--iw-samples", "0", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 75
    err = capsys.readouterr().err
    assert "onelevel 1 levels seed 0: training stopped by SIGTERM" in err
    assert "compare stopped: compare.json was not written" in err and not (tmp_path / "compare.json").exists()
    run = json.loads((tmp_path / "onelevel-seed0" / "summary.json").read_text())
    assert run["stopped"] == "interrupted"


def test_eval_scores_the_validated_model_says_which_and_labels_the_split(tmp_path, capsys):
    from hvae_fast import evaluate, train
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--ema", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    ck = torch.load(out / "last.pt", weights_only=True)
    scores = {}
    for weights, state in (("validated", ck["ema"]), ("raw", ck["model"])):
        js = tmp_path / f"{weights}.json"
        chosen = [] if weights == "validated" else ["--weights", weights]  # the default: what training validated
        assert main(["eval", str(out / "last.pt"), "--iw-samples", "0", "--split", "val", "--json", str(js),
                     *chosen]) == 0
        text = capsys.readouterr().out
        r = json.loads(js.read_text())
        model, cfg = train.model_from_checkpoint(str(out / "last.pt"))
        model.load_state_dict(state)
        ds = train.load_data(cfg)
        assert r["neg_elbo"] == evaluate.evaluate(model, ds.val, iw_samples=0)["neg_elbo"]
        assert "val -ELBO" in text and "test" not in text  # the split scored, named
        scores[weights] = r["neg_elbo"]
        assert ("the EMA weights of last.pt, epoch 2" if weights == "validated" else
                "the raw weights of last.pt, epoch 2") in text and r["weights"] in text
    assert scores["validated"] != scores["raw"]
    with pytest.raises(SystemExit):  # best.pt of an --ema run has no raw weights
        main(["eval", str(out / "best.pt"), "--iw-samples", "0", "--weights", "raw"])
    assert "holds only the validated (EMA) weights" in capsys.readouterr().err


def test_eval_on_the_training_split_of_a_dynamically_binarized_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--likelihood", "bernoulli", "--binarize", "dynamic", "--out", str(out)]) == 0
    runs = []
    for i in range(2):
        assert main(["eval", str(out / "last.pt"), "--split", "train", "--iw-samples", "0", "--json",
                     str(tmp_path / f"{i}.json")]) == 0
        runs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    assert "train -ELBO" in capsys.readouterr().out
    assert runs[0]["neg_elbo"] == runs[1]["neg_elbo"] and math.isfinite(runs[0]["neg_elbo"])  # drawn once, seeded


# ---- what depends on the data: usage errors that name the option, never a traceback -----------

def _data_files(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "rgb.npy", rng.integers(0, 4, (40, 3, 6, 6)).astype(np.uint8))
    np.save(tmp_path / "flat.npy", rng.integers(0, 4, (40, 14)).astype(np.uint8))
    np.save(tmp_path / "binary.npy", rng.integers(0, 2, (40, 16)).astype(np.uint8))
    np.savez(tmp_path / "splits.npz", train=np.zeros((10, 16), np.uint8), val=np.zeros((5, 16), np.uint8),
             test=np.zeros((5, 16), np.uint8))


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "rgb.npy", "--conv"], "--conv takes one-channel images; rgb.npy has 3 channels"),
    (["train", "--data", "flat.npy", "--conv"], "--conv needs image-shaped data ([N, H, W] arrays, or square D); "
                                                "flat.npy has rows of 14 values"),
    (["train", "--data", "flat.npy", "--arch", "resnet"], "--arch resnet needs image-shaped data"),
    (["train", "--data", "splits.npz", "--shuffle-seed", "3"],
     "--shuffle-seed applies to a single array; splits.npz holds its own train, val and test arrays"),
    (["train", "--data", "binary.npy", "--likelihood", "bernoulli", "--binarize", "dynamic"],
     "--binarize dynamic: binary.npy is already 0/1"),
    (["train", "--likelihood", "dmol"], "--likelihood dmol needs a per-pixel head: --model topdown with --arch resnet"),
    (["train", "--mixtures", "3"], "--mixtures applies to --likelihood dmol only"),
    (["train", "--max-train", "5000"], "--max-train 5000: digits' training split has only 1000 examples"),
    (["train", "--iw-subset", "1000"], "--iw-subset 1000: digits' test split has only 447 examples"),
    (["train", "--likelihood", "bernoulli", "--binarize", "dynamic", "--threshold", "3"],
     "--threshold applies to --binarize threshold, not dynamic"),
    # compare goes through the same checks
    (["compare", "--seeds", "0", "--max-train", "5000"], "--max-train 5000: digits' training split has only 1000"),
    (["compare", "--seeds", "0", "--kl-balance"], "--kl-balance acts only while the KL weight is below 1"),
    (["compare", "--seeds", "0", "--lr-min-factor", "0.5"], "--lr-min-factor applies to --lr-schedule cosine only"),
    (["compare", "--models", "onelevel", "--levels", "3"], "--levels applies to the topdown and bottomup rows"),
])
def test_data_dependent_settings_are_usage_errors(argv, message, tmp_path, capsys, monkeypatch):
    from hvae_fast import train
    monkeypatch.setattr(train.Trainer, "fit", lambda self: pytest.fail("trained with a setting that cannot act"))
    _data_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


def test_the_readme_commands_pass_the_check(tmp_path, monkeypatch):
    """Every `hvae-fast train` and `compare` command in README.md gets through the settings check
    (run stopped right after it), the recipe's and the defaults' values included."""
    import re
    import shlex
    from pathlib import Path
    from hvae_fast import cli, train

    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    commands = []
    for m in re.finditer(r"(?:hvae-fast|hvae_fast\.cli) (train|compare)\b([^`#\n]*(?:\n(?!\s*\n)[^`#\n]*)*)", text):
        words = shlex.split(re.sub(r"\s+", " ", m.group(2)).split("&&")[0])
        if "--resume" in words:
            continue  # a resume takes the saved run's settings
        words = ["0" if w == "S" else w for w in words]
        if "[--lr-drops" in words:  # `[--lr-drops 2]`: with and without
            i = words.index("[--lr-drops")
            commands.append([m.group(1), *words[:i], *words[i + 2:]])
            words = [*words[:i], "--lr-drops", "2", *words[i + 2:]]
        commands.append([m.group(1), *words])
    # the option lists the README gives for fashion-mnist without the command's name
    for m in re.finditer(r"`(--arch (?:mlp|resnet) --[^`]*)`", text):
        commands.append(["train", "--data", "fashion-mnist", *shlex.split(m.group(1))])
    assert len(commands) >= 10, commands

    class Checked(Exception):
        pass

    def stop(cfg=None, **k):
        raise Checked(cfg)

    monkeypatch.setattr(train, "run", stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda lines
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        with pytest.raises(Checked):
            main([*argv, "--out", str(tmp_path / "o")])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-level run trained for one epoch on 64 digits (no test IW-NLL)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--epochs", "1", "--hidden", "16", "--max-train", "64", "--iw-samples", "0",
                     "--no-progress", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("extra, rows, cols", [([], 4, 10), (["--depth", "1", "--pairs", "3", "--steps", "4"], 3, 6),
                                               (["--depth", "1", "--rest", "prior", "--pairs", "2", "--steps", "2"],
                                                2, 4)])
def test_interpolate_writes_one_row_per_pair(tiny_run, tmp_path, capsys, extra, rows, cols):
    import matplotlib.image
    png = tmp_path / "i.png"
    assert main(["interpolate", str(tiny_run / "best.pt"), "--out", str(png), *extra]) == 0
    assert "wrote" in capsys.readouterr().out
    # every image 80 x 80 pixels: (steps + 2) columns, one row of 85 pixels per pair and 50 for the title
    assert matplotlib.image.imread(str(png)).shape[:2] == (rows * 85 + 50, cols * 80)


def test_interpolate_pairs_are_seeded(tiny_run, tmp_path):
    a, b, c = (tmp_path / f"{n}.png" for n in "abc")
    for path, seed in ((a, 0), (b, 0), (c, 1)):
        assert main(["interpolate", str(tiny_run / "best.pt"), "--pairs", "2", "--steps", "3", "--rest", "prior",
                     "--depth", "1", "--seed", str(seed), "--out", str(path)]) == 0
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--depth", "3"], "--depth 3: the model has 2 latent level(s); give 1 .. 2"),
    (["--depth", "0"], "argument --depth: must be >= 1, got 0"),
    (["--steps", "1"], "argument --steps: must be >= 2, got 1"),
    (["--pairs", "224"], "--pairs 224: the test split has 447 images, enough for 223 pairs"),
    (["--rest", "data"], "--rest 'data': must be one of posterior, prior"),
    (["--data", "/no/such/dir"], "--data /no/such/dir: no such file or folder"),
])
def test_interpolate_bad_arguments(tiny_run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["interpolate", str(tiny_run / "best.pt"), "--out", str(tmp_path / "i.png"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "i.png").exists()


def test_interpolate_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["interpolate", str(tmp_path / "none.pt")])
    assert e.value.code == 2
    assert f"checkpoint {tmp_path / 'none.pt'}: no such file" in capsys.readouterr().err


def test_dmol_on_rgb_trains_samples_in_colour_and_evaluates(tmp_path, capsys):
    _data_files(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "rgb.npy"), "--arch", "resnet", "--likelihood", "dmol",
                 "--mixtures", "2", "--conv-channels", "8", "--latent-channels", "2", "--groups", "1", "1",
                 "--epochs", "1", "--batch-size", "8", "--iw-samples", "2", "--no-progress", "--threads", "1",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["likelihood"] == "dmol" and summary["config"]["mixtures"] == 2
    assert math.isfinite(summary["test"]["bpd"])
    import matplotlib.image as mpimg
    pic = mpimg.imread(out / "samples.png")
    assert pic.ndim == 3 and pic.shape[2] in (3, 4)
    rgb = pic[..., :3]
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 0.02).any()  # colour, not grey
    assert main(["sample", str(out / "best.pt"), "--out", str(tmp_path / "s.png"), "-n", "4"]) == 0
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(out / "best.pt"), "--iw-samples", "2", "--threads", "1"]) == 0
    assert "test -ELBO" in capsys.readouterr().out


def test_eval_against_another_report_prints_the_paired_difference(tmp_path, capsys):
    runs = {}
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        assert main(["train", *TINY, "--epochs", "1", "--seed", str(seed), "--iw-samples", "0",
                     "--out", str(out)]) == 0
        runs[seed] = out
    first = tmp_path / "first.json"
    assert main(["eval", str(runs[0] / "best.pt"), "--iw-samples", "3", "--json", str(first)]) == 0
    capsys.readouterr()
    second = tmp_path / "second.json"
    assert main(["eval", str(runs[1] / "best.pt"), "--iw-samples", "3", "--json", str(second),
                 "--against", str(first)]) == 0
    text = capsys.readouterr().out
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    diff = b["iw_nll"] - a["iw_nll"]
    assert b["against"]["diff"] == pytest.approx(diff, abs=1e-9) and b["against"]["n"] == a["iw_n"]
    assert f"minus {first}: {diff:+.2f} +- {b['against']['se']:.2f} nats" in text
    with pytest.raises(SystemExit):  # other images: refused, naming why
        main(["eval", str(runs[1] / "best.pt"), "--iw-samples", "3", "--iw-subset", "5", "--against", str(first)])
    assert "--against" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):  # refused before the evaluation
        main(["eval", str(runs[1] / "best.pt"), "--against", str(bad)])
    assert f"--against {bad}: not a JSON report" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in a.items() if k != "iw_log_px"}))
    with pytest.raises(SystemExit):
        main(["eval", str(runs[1] / "best.pt"), "--against", str(tmp_path / "old.json")])
    assert "holds no per-example IW log-likelihoods" in capsys.readouterr().err
