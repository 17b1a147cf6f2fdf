"""Data: the recipe's digits split (the default), and the user's own arrays.

Every dataset is a `Dataset` of float32 tensors [N, D] holding integer values 0..num_vals-1
(0/1 for the Bernoulli likelihood), split into train/val/test without shuffling.

Files: .npy (one array), .npz (arrays 'train', 'val', 'test' used as given; or a single array,
or one named by `key`), and MNIST-format IDX files (gzipped or not). Arrays of shape [N, D] or
[N, H, W] (images; kept as image_shape for the conv networks and the pictures).
"""
import gzip
import os
import struct
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch

DIGITS_SPLIT = (1000, 1350)  # train [:1000], val [1000:1350], test [1350:]
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)  # train/val/test, in order, for a single user array


class DataError(ValueError):
    """A data file or array that cannot be used; the message names it."""


@dataclass
class Dataset:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    num_vals: int
    image_shape: Optional[Tuple[int, int]] = None
    name: str = "digits"
    info: dict = field(default_factory=dict)

    @property
    def D(self):
        return self.train.shape[1]


def load_digits():
    """The recipe's data: sklearn's 8x8 digits, raw 0..16 as float32, split by index."""
    from sklearn.datasets import load_digits as _load
    x = torch.from_numpy(_load().data.astype(np.float32))
    a, b = DIGITS_SPLIT
    return Dataset(x[:a], x[a:b], x[b:], num_vals=17, image_shape=(8, 8), name="digits")


# ---- files ------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An MNIST-format IDX file (optionally gzipped) as a numpy array."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is truncated or has {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    n = int(np.prod(shape))
    body = raw[4 + 4 * ndim:]
    if len(body) != n * dtype.itemsize:
        raise DataError(f"{path}: IDX header says shape {shape} ({n * dtype.itemsize} bytes), "
                        f"the file holds {len(body)} bytes of data")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def _is_idx(path):
    name = os.path.basename(path).lower()
    return name.endswith((".idx", ".idx.gz")) or "-idx" in name or "ubyte" in name


def read_arrays(path, key=None):
    """{'train': a, 'val': b, 'test': c} or {'all': a} from a .npy, .npz or IDX file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .npy, .npz or IDX file")
    try:
        if path.endswith(".npy"):
            return {"all": np.load(path, allow_pickle=False)}
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key is not None:
                    if key not in names:
                        raise DataError(f"{path}: has no array {key!r} (it holds {names})")
                    return {"all": z[key]}
                if {"train", "val", "test"} <= set(names):
                    return {k: z[k] for k in ("train", "val", "test")}
                if len(names) == 1:
                    return {"all": z[names[0]]}
                raise DataError(f"{path}: holds arrays {names}; give arrays named 'train', 'val' and "
                                f"'test', a single array, or choose one with key=")
        if _is_idx(path):
            return {"all": read_idx(path)}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    raise DataError(f"{path}: unknown file type; use .npy, .npz or an IDX file (name ending in .idx, "
                    f".idx.gz, or containing 'ubyte')")


def _as_rows(a, where):
    """[N, D] float32 from [N, D] or [N, H, W]; returns (rows, image_shape or None)."""
    if a.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected a numeric array, got dtype {a.dtype}")
    if a.ndim == 2:
        shape = None
        side = int(round(a.shape[1] ** 0.5))
        if side * side == a.shape[1]:
            shape = (side, side)
    elif a.ndim == 3:
        shape = (a.shape[1], a.shape[2])
        a = a.reshape(a.shape[0], -1)
    else:
        raise DataError(f"{where}: expected shape [N, D] or [N, H, W], got {list(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{where}: is empty (shape {list(a.shape)})")
    return a.astype(np.float32), shape


def check_values(x, num_vals, where):
    """Raises DataError unless every value of x is an integer in 0..num_vals-1."""
    x = np.asarray(x)
    bad = ~np.isfinite(x) | (x < 0) | (x > num_vals - 1) | (x != np.floor(x))
    if bad.any():
        i = np.argwhere(bad)[0]
        raise DataError(f"{where}: value {x[tuple(i)].item()!r} at index {tuple(int(j) for j in i)} is not an integer "
                        f"in 0..{num_vals - 1} (num_vals = {num_vals})")


def binarize(x, threshold):
    """1 where x > threshold, else 0 (float32): data for the Bernoulli likelihood."""
    return (x > threshold).to(torch.float32) if isinstance(x, torch.Tensor) else (x > threshold).astype(np.float32)


def split_in_order(n, fractions=DEFAULT_FRACTIONS):
    """Index boundaries (a, b) for train [:a], val [a:b], test [b:], no shuffling."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers adding to 1, got {fractions}")
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    if a < 1 or b <= a or b >= n:
        raise DataError(f"{n} examples are too few to split into train/val/test by {fractions}")
    return a, b


def load_file(path, num_vals=None, key=None, fractions=DEFAULT_FRACTIONS, D=None):
    """A Dataset from the user's file.

    num_vals: the number of values per pixel; None infers max + 1 (256 for uint8 data).
    D: when given, the number of values each example must have.
    """
    path = os.fspath(path)
    arrays = read_arrays(path, key)
    rows, shape = {}, None
    for name, a in arrays.items():
        where = path if name == "all" else f"{path}[{name!r}]"
        rows[name], s = _as_rows(a, where)
        shape = shape or s
        if D is not None and rows[name].shape[1] != D:
            raise DataError(f"{where}: examples have {rows[name].shape[1]} values, expected D = {D}")
    widths = {r.shape[1] for r in rows.values()}
    if len(widths) > 1:
        raise DataError(f"{path}: train/val/test have different widths {sorted(widths)}")
    if num_vals is None:
        if any(a.dtype == np.uint8 for a in arrays.values()):
            num_vals = 256
        else:
            finite_max = max(float(np.max(r, initial=0, where=np.isfinite(r))) for r in rows.values())
            num_vals = max(2, int(finite_max) + 1)
    for name, r in rows.items():
        check_values(r, num_vals, path if name == "all" else f"{path}[{name!r}]")
    if "all" in rows:
        x = rows["all"]
        a, b = split_in_order(len(x), fractions)
        parts = x[:a], x[a:b], x[b:]
    else:
        parts = rows["train"], rows["val"], rows["test"]
    t = [torch.from_numpy(np.ascontiguousarray(p)) for p in parts]
    return Dataset(*t, num_vals=num_vals, image_shape=shape, name=os.path.basename(path),
                   info={"path": os.path.abspath(path)})


def load(path=None, likelihood="categorical", threshold=None, num_vals=None, key=None,
         fractions=DEFAULT_FRACTIONS, max_train=None):
    """The dataset for training: digits when path is None, else the user's file.

    For the Bernoulli likelihood the data are binarized, x > threshold (default: the middle of
    the value range, (num_vals - 1) / 2, i.e. 8 for digits), unless they are already 0/1.
    max_train keeps only the first max_train training examples (quick runs, tests).
    """
    ds = load_digits() if path is None else load_file(path, num_vals=num_vals, key=key, fractions=fractions)
    if likelihood == "bernoulli":
        already = all(bool(((t == 0) | (t == 1)).all()) for t in (ds.train, ds.val, ds.test))
        if threshold is not None or not already:
            thr = (ds.num_vals - 1) / 2 if threshold is None else threshold
            ds.train, ds.val, ds.test = (binarize(t, thr) for t in (ds.train, ds.val, ds.test))
            ds.info["threshold"] = thr
        ds.num_vals = 2
    elif likelihood != "categorical":
        raise ValueError(f"likelihood must be 'categorical' or 'bernoulli', got {likelihood!r}")
    if max_train is not None:
        ds.train = ds.train[:max_train]
    return ds
