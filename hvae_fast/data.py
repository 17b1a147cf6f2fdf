"""Data: the recipe's digits split (the default), Fashion-MNIST and MNIST-format folders, and
the user's own arrays.

Every dataset is a `Dataset` of tensors [N, D] holding integer values 0..num_vals-1 (0/1 for
the Bernoulli likelihood), stored as uint8 where they fit: a batch becomes float32 only when
it is formed (`Dataset.batch`, and the evaluation passes). Rows of images are laid out
channel-major ([C, H, W] flattened); `image_shape` is (H, W) and `channels` is C.

Sources:
- None: sklearn's 8x8 digits with the recipe's split.
- 'fashion-mnist': the four IDX files of Debian's dataset-fashion-mnist package
  (/usr/share/datasets/fashion-mnist/), as a folder below.
- a folder with MNIST-format IDX files (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]:
  MNIST, Fashion-MNIST, KMNIST, EMNIST): the official test set is the test split, validation
  is the last `val_size` images of the training file, training is the rest.
- a file: .npy (one array), .npz (arrays 'train', 'val', 'test' used as given; or a single
  array, or one named by `key`), or one IDX file. Arrays of shape [N, D], [N, H, W] or
  [N, C, H, W]. A single array is split train/val/test by `fractions`, in order, or after a
  seeded shuffle (`shuffle_seed`).
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
DEFAULT_VAL_SIZE = 10000  # the last images of an IDX folder's training file
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HELP = ("install Debian's package: `sudo apt-get install dataset-fashion-mnist` (it puts the "
                      f"four IDX files under {FASHION_MNIST_DIR}/), or put train-images-idx3-ubyte.gz and "
                      "t10k-images-idx3-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist in a "
                      "folder and pass that folder as --data")
BINARIZE = ("threshold", "dynamic")


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
    channels: int = 1
    # dynamic binarization: train holds grey levels 0..grey_max, and every batch is drawn
    # again as x ~ Bernoulli(grey / grey_max); val and test were drawn once, seeded
    grey_max: Optional[int] = None

    @property
    def D(self):
        return self.train.shape[1]

    def batch(self, x, device=None, split="train"):
        """Rows of a split as the float32 batch the model takes, on `device` (training rows
        drawn again under dynamic binarization; val and test rows are already 0/1)."""
        x = x.to(device).float()
        if self.grey_max is not None and split == "train":
            x = torch.bernoulli(x / self.grey_max)
        return x


def as_stored(x):
    """x as uint8 when it holds integers 0..255 (a quarter of float32's memory), else float32."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x
    if x.numel() and x.min() >= 0 and x.max() <= 255 and bool((x == x.floor()).all()):
        return x.to(torch.uint8)
    return x.to(torch.float32)


def load_digits():
    """The recipe's data: sklearn's 8x8 digits, raw 0..16 as float32, split by index."""
    from sklearn.datasets import load_digits as _load
    x = torch.from_numpy(_load().data.astype(np.uint8))
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
    """[N, D] rows from [N, D], [N, H, W] or [N, C, H, W]; returns (rows, (H, W) or None, C).
    uint8 arrays stay uint8; others become float32."""
    if a.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected a numeric array, got dtype {a.dtype}")
    channels = 1
    if a.ndim == 2:
        shape = None
        side = int(round(a.shape[1] ** 0.5))
        if side * side == a.shape[1]:
            shape = (side, side)
    elif a.ndim in (3, 4):
        shape = tuple(a.shape[-2:])
        channels = a.shape[1] if a.ndim == 4 else 1
        a = a.reshape(a.shape[0], -1)
    else:
        raise DataError(f"{where}: expected shape [N, D], [N, H, W] or [N, C, H, W], got {list(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{where}: is empty (shape {list(a.shape)})")
    return (a if a.dtype == np.uint8 else a.astype(np.float32)), shape, channels


def check_values(x, num_vals, where):
    """Raises DataError unless every value of x is an integer in 0..num_vals-1."""
    x = np.asarray(x)
    bad = ~np.isfinite(x) | (x < 0) | (x > num_vals - 1) | (x != np.floor(x))
    if bad.any():
        i = np.argwhere(bad)[0]
        raise DataError(f"{where}: value {x[tuple(i)].item()!r} at index {tuple(int(j) for j in i)} is not an integer "
                        f"in 0..{num_vals - 1} (num_vals = {num_vals})")


def binarize(x, threshold):
    """1 where x > threshold, else 0 (uint8): data for the Bernoulli likelihood."""
    return (x > threshold).to(torch.uint8) if isinstance(x, torch.Tensor) else (x > threshold).astype(np.uint8)


def binarize_once(x, grey_max, seed):
    """x ~ Bernoulli(x / grey_max), drawn once from `seed` (uint8): a fixed binarized split."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x.float() / grey_max, generator=g).to(torch.uint8)


def split_in_order(n, fractions=DEFAULT_FRACTIONS):
    """Index boundaries (a, b) for train [:a], val [a:b], test [b:], no shuffling."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers adding to 1, got {fractions}")
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    if a < 1 or b <= a or b >= n:
        raise DataError(f"{n} examples are too few to split into train/val/test by {fractions}")
    return a, b


def _num_vals(arrays, rows):
    """max + 1 of the data (at least 2); 256 for uint8 data."""
    if any(a.dtype == np.uint8 for a in arrays.values()):
        return 256
    finite_max = max(float(np.max(r, initial=0, where=np.isfinite(r))) for r in rows.values())
    return max(2, int(finite_max) + 1)


def _dataset(parts, num_vals, shape, channels, name, info):
    t = [as_stored(torch.from_numpy(np.ascontiguousarray(p))) for p in parts]
    return Dataset(*t, num_vals=num_vals, image_shape=shape, name=name, info=info, channels=channels)


def load_file(path, num_vals=None, key=None, fractions=DEFAULT_FRACTIONS, D=None, shuffle_seed=None):
    """A Dataset from the user's file.

    num_vals: the number of values per pixel; None infers max + 1 (256 for uint8 data).
    D: when given, the number of values each example must have.
    shuffle_seed: a single array is shuffled with this seed before it is split (None: in order).
    """
    path = os.fspath(path)
    arrays = read_arrays(path, key)
    rows, shape, channels = {}, None, 1
    for name, a in arrays.items():
        where = path if name == "all" else f"{path}[{name!r}]"
        rows[name], s, c = _as_rows(a, where)
        shape, channels = shape or s, max(channels, c)
        if D is not None and rows[name].shape[1] != D:
            raise DataError(f"{where}: examples have {rows[name].shape[1]} values, expected D = {D}")
    widths = {r.shape[1] for r in rows.values()}
    if len(widths) > 1:
        raise DataError(f"{path}: train/val/test have different widths {sorted(widths)}")
    num_vals = _num_vals(arrays, rows) if num_vals is None else num_vals
    for name, r in rows.items():
        check_values(r, num_vals, path if name == "all" else f"{path}[{name!r}]")
    info = {"path": os.path.abspath(path)}
    if "all" in rows:
        x = rows["all"]
        if shuffle_seed is not None:
            x = x[np.random.default_rng(shuffle_seed).permutation(len(x))]
            info["shuffle_seed"] = shuffle_seed
        a, b = split_in_order(len(x), fractions)
        parts = x[:a], x[a:b], x[b:]
    else:
        parts = rows["train"], rows["val"], rows["test"]
    return _dataset(parts, num_vals, shape, channels, os.path.basename(path), info)


def _idx_file(folder, stem):
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_idx_dir(folder, num_vals=None, val_size=DEFAULT_VAL_SIZE, name=None):
    """A Dataset from a folder of MNIST-format IDX files: test = t10k-images, validation = the
    last val_size images of train-images, training = the rest."""
    folder = os.fspath(folder)
    files = {split: _idx_file(folder, f"{stem}-images-idx3-ubyte") for split, stem in (("train", "train"),
                                                                                       ("test", "t10k"))}
    missing = [f"{stem}-images-idx3-ubyte[.gz]" for stem, f in zip(("train", "t10k"), files.values()) if f is None]
    if missing:
        raise DataError(f"{folder}: has no {' or '.join(missing)} (an MNIST-format folder holds "
                        f"train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz])")
    arrays = {split: read_idx(f) for split, f in files.items()}
    rows, shape = {}, None
    for split, a in arrays.items():
        rows[split], s, _ = _as_rows(a, files[split])
        shape = shape or s
    if rows["train"].shape[1] != rows["test"].shape[1]:
        raise DataError(f"{folder}: training images have {rows['train'].shape[1]} values, test images "
                        f"{rows['test'].shape[1]}")
    num_vals = _num_vals(arrays, rows) if num_vals is None else num_vals
    for split, r in rows.items():
        check_values(r, num_vals, files[split])
    n = len(rows["train"])
    if not 0 < val_size < n:
        raise DataError(f"{files['train']}: holds {n} images; the validation split (the last val_size = "
                        f"{val_size}) must leave at least one for training")
    parts = rows["train"][:n - val_size], rows["train"][n - val_size:], rows["test"]
    return _dataset(parts, num_vals, shape, 1, name or os.path.basename(os.path.normpath(folder)),
                    {"path": os.path.abspath(folder), "val_size": val_size})


NAMED = {"fashion-mnist": FASHION_MNIST_DIR}


def load_named(name, num_vals=None, val_size=DEFAULT_VAL_SIZE):
    """A dataset known by name ('fashion-mnist'), from where its package puts it."""
    folder = NAMED[name]
    if not all(_idx_file(folder, f"{s}-images-idx3-ubyte") for s in ("train", "t10k")):
        raise DataError(f"{name}: its files are not under {folder}/; {FASHION_MNIST_HELP}")
    return load_idx_dir(folder, num_vals, val_size, name=name)


def _source(path, num_vals, key, fractions, val_size, shuffle_seed):
    if path is None:
        return load_digits()
    if path in NAMED:
        return load_named(path, num_vals, val_size)
    if os.path.isdir(path):
        return load_idx_dir(path, num_vals, val_size)
    return load_file(path, num_vals=num_vals, key=key, fractions=fractions, shuffle_seed=shuffle_seed)


def load(path=None, likelihood="categorical", threshold=None, num_vals=None, key=None,
         fractions=DEFAULT_FRACTIONS, max_train=None, val_size=DEFAULT_VAL_SIZE, shuffle_seed=None,
         binarize_mode="threshold", seed=0):
    """The dataset for training: digits when path is None, 'fashion-mnist', an IDX folder, or a file.

    For the Bernoulli likelihood the data are binarized unless they are already 0/1:
    binarize_mode 'threshold': x > threshold (default: the middle of the value range,
    (num_vals - 1) / 2, i.e. 8 for digits); 'dynamic': every training batch is drawn again as
    x ~ Bernoulli(x / (num_vals - 1)), and val and test are drawn once from `seed`.
    max_train keeps only the first max_train training examples (quick runs, tests).
    """
    if binarize_mode not in BINARIZE:
        raise ValueError(f"binarize_mode must be one of {BINARIZE}, got {binarize_mode!r}")
    ds = _source(path, num_vals, key, fractions, val_size, shuffle_seed)
    if likelihood == "bernoulli":
        already = all(bool(((t == 0) | (t == 1)).all()) for t in (ds.train, ds.val, ds.test))
        if binarize_mode == "dynamic" and not already:
            if threshold is not None:
                raise ValueError("a threshold applies to binarize_mode 'threshold', not 'dynamic'")
            grey = ds.num_vals - 1
            ds.val, ds.test = binarize_once(ds.val, grey, seed), binarize_once(ds.test, grey, seed + 1)
            ds.grey_max = grey
            ds.info["binarize"] = "dynamic"
        elif threshold is not None or not already:
            thr = (ds.num_vals - 1) / 2 if threshold is None else threshold
            ds.train, ds.val, ds.test = (binarize(t, thr) for t in (ds.train, ds.val, ds.test))
            ds.info["threshold"] = thr
        ds.num_vals = 2
    elif likelihood not in ("categorical", "dmol"):  # both score the pixel values as they are
        raise ValueError(f"likelihood must be 'categorical', 'bernoulli' or 'dmol', got {likelihood!r}")
    if max_train is not None:
        ds.train = ds.train[:max_train]
    return ds
