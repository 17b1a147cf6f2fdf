"""The models shipped inside the package (hvae_fast.pretrained): load, card, sample, CLI."""
import json
import math

import pytest
import torch

import hvae_fast
from hvae_fast import data, evaluate
from hvae_fast.cli import main

NAMES = hvae_fast.pretrained_names()


def test_fashion_mnist_is_shipped():
    assert "fashion-mnist" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_loads_in_eval_mode_and_matches_its_card(name):
    model = hvae_fast.pretrained(name)
    card = hvae_fast.pretrained_card(name)
    assert not model.training and type(model).__name__ == card["model"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    for key in ("command", "commit", "machine", "weights"):
        assert card[key], key
    test = card["test"]
    assert test["latent_dims"] == model.latent_dims
    assert math.isfinite(test["bpd_elbo"]) and 0 < test["bpd_elbo"] < 8  # 8 bits: uniform over 256 values
    if "bpd" in test:  # the IW bound, where the card has it
        assert test["bpd"] <= test["bpd_elbo"] + 3 * test["bpd_se"]
    torch.manual_seed(0)
    x = model.sample(3)
    assert x.shape == (3, model.D) and 0 <= x.min() and x.max() <= model.num_vals - 1


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_weights_are_the_ones_the_card_scored(name):
    """Its test -ELBO on the first 1,000 test images within 3% of the card's (all 10,000)."""
    card = hvae_fast.pretrained_card(name)
    model = hvae_fast.pretrained(name)
    try:
        ds = data.load(card["name"] if card["name"] in data.NAMED else None)
    except data.DataError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    neg_elbo = evaluate.elbo(model, ds.test[:1000])["neg_elbo"]
    assert abs(neg_elbo - card["test"]["neg_elbo"]) < 0.03 * card["test"]["neg_elbo"]


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="no pretrained model 'cifar10'; this package ships: fashion-mnist"):
        hvae_fast.pretrained("cifar10")


def test_sample_and_interpolate_take_pretrained(tmp_path, capsys):
    assert main(["sample", "--pretrained", "fashion-mnist", "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["sample"], "give a checkpoint file or --pretrained NAME (one of the two)"),
    (["sample", "x.pt", "--pretrained", "fashion-mnist"], "give a checkpoint file or --pretrained NAME"),
    (["eval", "--pretrained", "mnist"], "--pretrained: no pretrained model 'mnist'; this package ships: "),
    (["interpolate", "--pretrained", "mnist"], "--pretrained: no pretrained model 'mnist'"),
])
def test_pretrained_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_pretrained_without_the_data_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(data.NAMED, "fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--pretrained", "fashion-mnist", "--iw-samples", "0"])
    assert e.value.code == 2 and "dataset-fashion-mnist" in capsys.readouterr().err


def test_eval_pretrained_scores_the_test_split(tmp_path, capsys):
    try:
        data.load("fashion-mnist")
    except data.DataError as e:
        pytest.skip(str(e))
    assert main(["eval", "--pretrained", "fashion-mnist", "--iw-samples", "0", "--json",
                 str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    card = hvae_fast.pretrained_card("fashion-mnist")
    assert r["n"] == 10000 and abs(r["neg_elbo"] - card["test"]["neg_elbo"]) < 0.01 * card["test"]["neg_elbo"]
