"""Data loading: the digits split and the user's .npy/.npz/IDX files, with clear errors."""
import gzip
import struct

import numpy as np
import pytest
import torch

from hvae_fast import data


def _write_idx(path, arr, gz=False):
    assert arr.dtype == np.uint8
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = head + arr.tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)


def test_digits_reference_split():
    ds = data.load_digits()
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1000, 350, 447)
    assert ds.train.dtype == torch.uint8 and ds.D == 64 and ds.num_vals == 17  # stored as uint8
    assert ds.train.min() == 0 and ds.train.max() == 16
    from sklearn.datasets import load_digits
    raw = load_digits().data
    assert torch.equal(ds.test[0], torch.from_numpy(raw[1350]).float())  # no shuffling before the split
    assert torch.equal(ds.val[-1], torch.from_numpy(raw[1349]).float())


def test_binarize_for_bernoulli():
    ds = data.load(likelihood="bernoulli")
    assert ds.num_vals == 2 and set(ds.train.unique().tolist()) == {0.0, 1.0}
    raw = data.load_digits()
    assert torch.equal(ds.train, (raw.train > 8).float())
    ds4 = data.load(likelihood="bernoulli", threshold=3)
    assert torch.equal(ds4.train, (raw.train > 3).float())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(20, 6, 6), dtype=np.uint8)
    path = tmp_path / ("imgs-idx3-ubyte" + (".gz" if gz else ""))
    _write_idx(path, imgs, gz)
    assert np.array_equal(data.read_idx(path), imgs)
    ds = data.load(str(path))
    assert ds.num_vals == 256 and ds.image_shape == (6, 6) and ds.D == 36
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)
    assert torch.equal(ds.train[0], torch.from_numpy(imgs[0].reshape(-1)).float())


def test_truncated_idx_names_the_file(tmp_path):
    path = tmp_path / "bad.idx"
    imgs = np.zeros((5, 4, 4), np.uint8)
    _write_idx(path, imgs)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(data.DataError, match="bad.idx"):
        data.load(str(path))
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(path)


def test_npy_and_npz(tmp_path):
    x = np.random.default_rng(1).integers(0, 5, size=(30, 16)).astype(np.int64)
    np.save(tmp_path / "a.npy", x)
    ds = data.load(str(tmp_path / "a.npy"))
    assert ds.num_vals == 5 and ds.image_shape == (4, 4)
    assert torch.equal(torch.cat([ds.train, ds.val, ds.test]), torch.from_numpy(x).float())
    np.savez(tmp_path / "s.npz", train=x[:20], val=x[20:25], test=x[25:])
    ds = data.load(str(tmp_path / "s.npz"), num_vals=8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 5, 5) and ds.num_vals == 8
    np.savez(tmp_path / "k.npz", images=x, labels=np.arange(30))
    assert len(data.load(str(tmp_path / "k.npz"), key="images").train) == 18
    with pytest.raises(data.DataError, match="k.npz.*'train', 'val' and 'test'"):
        data.load(str(tmp_path / "k.npz"))
    with pytest.raises(data.DataError, match="no array 'nope'"):
        data.load(str(tmp_path / "k.npz"), key="nope")


def test_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="missing.npy: no such file"):
        data.load(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(data.DataError, match=r"shape.npy: expected shape \[N, D\], \[N, H, W\] or \[N, C, H, W\]"):
        data.load(str(tmp_path / "shape.npy"))
    np.save(tmp_path / "range.npy", np.full((10, 4), 7.0))
    with pytest.raises(data.DataError, match=r"range.npy: value 7.0 .* not an integer in 0..4"):
        data.load(str(tmp_path / "range.npy"), num_vals=5)
    np.save(tmp_path / "frac.npy", np.full((10, 4), 0.5))
    with pytest.raises(data.DataError, match="frac.npy: value 0.5"):
        data.load(str(tmp_path / "frac.npy"), num_vals=5)
    np.save(tmp_path / "neg.npy", -np.ones((10, 4)))
    with pytest.raises(data.DataError, match="neg.npy: value -1.0"):
        data.load(str(tmp_path / "neg.npy"))
    np.savez(tmp_path / "bad.npz", train=np.zeros((4, 4)), val=np.zeros((2, 4)), test=np.full((2, 4), 300.0))
    with pytest.raises(data.DataError, match=r"bad.npz\['test'\]"):
        data.load(str(tmp_path / "bad.npz"), num_vals=256)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(data.DataError, match="x.csv: unknown file type"):
        data.load(str(tmp_path / "x.csv"))


def _idx_folder(path, n_train=30, n_test=7, side=6, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8)
    path.mkdir(exist_ok=True)
    ext = ".gz" if gz else ""
    _write_idx(path / f"train-images-idx3-ubyte{ext}", train, gz)
    _write_idx(path / f"t10k-images-idx3-ubyte{ext}", test, gz)
    return train, test


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_official_test_split_and_last_n_validation(tmp_path, gz):
    train, test = _idx_folder(tmp_path / "mnistlike", gz=gz)
    ds = data.load(str(tmp_path / "mnistlike"), val_size=8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (22, 8, 7)
    assert ds.train.dtype == torch.uint8 and ds.num_vals == 256 and ds.image_shape == (6, 6) and ds.channels == 1
    assert torch.equal(ds.test, torch.from_numpy(test.reshape(7, -1)))  # the official test file, whole
    assert torch.equal(ds.val, torch.from_numpy(train[-8:].reshape(8, -1)))  # the last N training images
    assert torch.equal(ds.train, torch.from_numpy(train[:22].reshape(22, -1)))
    assert ds.batch(ds.train[:3]).dtype == torch.float32


def test_idx_folder_errors_name_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"has no train-images-idx3-ubyte\[.gz\] or t10k-images"):
        data.load(str(tmp_path / "empty"))
    _idx_folder(tmp_path / "small", n_train=5)
    with pytest.raises(data.DataError, match="holds 5 images; the validation split"):
        data.load(str(tmp_path / "small"), val_size=5)
    (tmp_path / "small" / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        data.load(str(tmp_path / "small"), val_size=2)


def test_fashion_mnist_by_name(tmp_path, monkeypatch):
    monkeypatch.setitem(data.NAMED, "fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist")
    _idx_folder(tmp_path / "fm")
    monkeypatch.setitem(data.NAMED, "fashion-mnist", str(tmp_path / "fm"))
    ds = data.load("fashion-mnist", val_size=10)
    assert ds.name == "fashion-mnist" and (len(ds.train), len(ds.val), len(ds.test)) == (20, 10, 7)


@pytest.mark.skipif(not __import__("os").path.isdir(data.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = data.load("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50000, 10000, 10000)
    assert ds.D == 784 and ds.num_vals == 256 and ds.train.dtype == torch.uint8


def test_channels_kept_for_nchw_arrays(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(20, 3, 4, 5), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    ds = data.load(str(tmp_path / "rgb.npy"))
    assert ds.channels == 3 and ds.image_shape == (4, 5) and ds.D == 60 and ds.train.dtype == torch.uint8
    assert torch.equal(ds.train[0], torch.from_numpy(rgb[0].reshape(-1)))  # channel-major rows


def test_seeded_shuffle_before_split(tmp_path):
    x = np.arange(50, dtype=np.uint8)[:, None].repeat(4, 1)
    np.save(tmp_path / "x.npy", x)
    plain = data.load(str(tmp_path / "x.npy"))
    assert plain.train[:, 0].tolist() == list(range(30))
    a = data.load(str(tmp_path / "x.npy"), shuffle_seed=3)
    b = data.load(str(tmp_path / "x.npy"), shuffle_seed=3)
    c = data.load(str(tmp_path / "x.npy"), shuffle_seed=4)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    got = torch.cat([a.train, a.val, a.test])[:, 0].sort().values
    assert got.tolist() == list(range(50))  # a permutation: nothing lost or repeated


def test_dynamic_binarization_redraws_train_batches_and_fixes_val_test(tmp_path):
    _idx_folder(tmp_path / "g", n_train=40, n_test=10)
    ds = data.load(str(tmp_path / "g"), likelihood="bernoulli", binarize_mode="dynamic", val_size=10)
    assert ds.num_vals == 2 and ds.grey_max == 255
    assert ds.train.max() > 1  # grey levels kept until a batch is formed
    assert set(ds.val.unique().tolist()) <= {0, 1} and set(ds.test.unique().tolist()) <= {0, 1}
    again = data.load(str(tmp_path / "g"), likelihood="bernoulli", binarize_mode="dynamic", val_size=10)
    assert torch.equal(ds.val, again.val) and torch.equal(ds.test, again.test)  # drawn once, seeded
    torch.manual_seed(0)
    b1, b2 = ds.batch(ds.train), ds.batch(ds.train)
    assert set(b1.unique().tolist()) <= {0.0, 1.0} and not torch.equal(b1, b2)
    # E[batch] = grey / 255: the mean over many draws approaches it
    mean = torch.stack([ds.batch(ds.train) for _ in range(400)]).mean(0)
    assert (mean - ds.train.float() / 255).abs().max() < 0.12
    with pytest.raises(ValueError, match="threshold applies to binarize_mode 'threshold'"):
        data.load(str(tmp_path / "g"), likelihood="bernoulli", binarize_mode="dynamic", threshold=3, val_size=10)


def test_batches_of_val_and_test_are_not_redrawn(tmp_path):
    _idx_folder(tmp_path / "g", n_train=20, n_test=10)
    ds = data.load(str(tmp_path / "g"), likelihood="bernoulli", binarize_mode="dynamic", val_size=5)
    assert torch.equal(ds.batch(ds.test, split="test"), ds.test.float())
