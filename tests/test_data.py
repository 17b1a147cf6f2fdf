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
    assert ds.train.dtype == torch.float32 and ds.D == 64 and ds.num_vals == 17
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
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(data.DataError, match=r"shape.npy: expected shape \[N, D\] or \[N, H, W\]"):
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
