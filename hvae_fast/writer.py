"""What a run writes, and how it reads it back: checkpoints, the metrics log, the summary.

Files in a run's directory:
  last.pt       everything needed to resume (model, optimizer, the run state); after a
                stop on a signal, also the position inside the epoch
  best.pt       the best-validation model and its config (what `hvae-fast eval` reads),
                written only when the model improves
  metrics.jsonl one JSON line per epoch; on resume rewritten from the checkpoint's history
  summary.json  the run and its test numbers, written after training and after each stage
                of the final evaluation (a crash later never loses what was measured)
  tensorboard/  with --tensorboard: TensorBoard event files, fed from the same metrics rows
                (TensorBoardSink)
A folder holding any of RUN_FILES holds a run: a new run there is refused unless asked to
overwrite it (claim()), so that forgetting --resume never destroys one.
Checkpoints hold only tensors, dicts, lists, str, int, float, bool and None, so
torch.load(path, weights_only=True) reads them; every file is written atomically.
"""
import json
import os
import shutil
import tempfile

import torch

from .evaluate import bits_per_dim

CHECKPOINT_FORMAT = 3  # raise when the layout of a checkpoint changes (1: the run state at the top level;
                       # 2: no run.progress, the position inside an epoch: always at an epoch's end)


# what a run writes into its folder (plots.save_run_pictures names the PNGs)
TENSORBOARD = "tensorboard"  # the folder of a run's TensorBoard events
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "samples.png", "reconstructions.png",
             "val_curve.png", "kl_per_level.png", "conditional.png", TENSORBOARD)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names it."""


class RunExistsError(FileExistsError):
    """A run's folder already holds another run; the message says both ways on."""


def run_files(out):
    """The RUN_FILES already in folder `out`."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]


def same_folder(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def claim(out, resume=None, overwrite=False):
    """Checks, before anything is written, that a run may write into `out`: a folder holding
    another run is refused unless `overwrite`. Returns the old run's files that an overwrite
    must delete (clear() them once everything else about the run is checked, so that a run
    refused later destroys nothing). A resume continuing in its checkpoint's own folder keeps
    them."""
    continuing = resume is not None and same_folder(os.path.dirname(os.path.abspath(resume)), out)
    if continuing:
        if overwrite:
            raise RunExistsError(f"{out}: overwrite would delete the run that --resume {resume} continues there; "
                                 f"drop --overwrite (overwrite=True)")
        return []
    found = run_files(out)
    if found and not overwrite:
        raise RunExistsError(f"{out} already holds a run ({', '.join(found)}); nothing was written. Continue it "
                             f"with --resume {os.path.join(out, 'last.pt')} (Python: resume=...), or start again "
                             f"there with --overwrite (Python: overwrite=True), which deletes those files first")
    return found


def clear(out, files):
    """Deletes the old run's files claim() returned, so that none stays beside the new ones."""
    for f in files:
        path = os.path.join(out, f)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def _atomic(path, suffix, write, mode="wb"):
    """write(file) into a temporary file beside path, then os.replace."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    _atomic(path, ".pt", lambda f: torch.save(obj, f))


def atomic_write_json(obj, path):
    _atomic(path, ".json", lambda f: json.dump(obj, f, indent=2), "w")


def write_jsonl(rows, path):
    _atomic(path, ".jsonl", lambda f: f.writelines(json.dumps(r) + "\n" for r in rows), "w")


def load_checkpoint(path):
    """torch.load(path, weights_only=True), with a clear error naming the file; a format-1
    last.pt comes back in the current layout."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable hvae_fast checkpoint (corrupt, truncated or not written "
                              f"by hvae-fast; {type(e).__name__}: {first})") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise CheckpointError(f"{path}: not an hvae_fast checkpoint (no 'model' and 'config' entries)")
    if ck.get("format", 1) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by a newer hvae_fast (checkpoint format {ck['format']}; this "
                              f"version reads format {CHECKPOINT_FORMAT} and older): upgrade hvae_fast")
    if ck.get("format", 1) == 1 and "optimizer" in ck:
        ck["run"] = _run_of_format_1(ck)
    return ck


def _run_of_format_1(ck):
    """A format-1 last.pt's run state, as RunState.state_dict() lays it out."""
    history = ck["history"]
    return {"epoch": ck["epoch"] + 1, "step": ck.get("step"), "history": history,
            "train_time_s": ck.get("train_time_s", history[-1]["time"] if history else 0.0),
            "rng": ck["rng"], "rng_per_rank": ck.get("rng_per_rank"),
            "stopping": {"best_val": ck["best_val"], "best_epoch": ck.get("best_epoch"),
                         "best_state": ck["best_model"], "bad_epochs": ck["patience"],
                         "drops": ck.get("lr_drops_done", 0)}}


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; an ImportError that names the package to install
    where tensorboard is missing."""
    try:
        import tensorboard  # noqa: F401  (torch's module imports without it on some versions)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"the tensorboard package is not installed ({e}); pip install 'hvae_fast[tensorboard]' "
                          f"(or pip install tensorboard)") from None
    return SummaryWriter


# metrics.jsonl's columns under their TensorBoard tags; a column not named here keeps its name
TENSORBOARD_TAGS = {"train_loss": "loss/train", "train_objective": "loss/train_objective", "val_loss": "loss/val",
                    "val_iw": "loss/val_iw", "best_val": "loss/best_val", "val_log_px": "log_px/val",
                    "kl_weight": "kl_weight", "lr": "lr", "grad_norm": "grad_norm",
                    "skipped": "skipped_updates/epoch", "skipped_total": "skipped_updates/total", "time": "time_s"}


def tensorboard_scalars(row, D):
    """{tag: value} of one metrics row, at step row['epoch']: every number in it
    (TENSORBOARD_TAGS), the validation KL per level or group as kl/val_z1 .. (z1 first), and
    the train and validation -ELBO in bits/dim (nats / (D ln 2)). A None (no gradient norm
    in an epoch of skipped updates) is left out."""
    out = {}
    for k, v in row.items():
        if k == "epoch" or v is None:
            continue
        if k == "val_kl":
            out.update({f"kl/val_z{i + 1}": kl for i, kl in enumerate(v)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[TENSORBOARD_TAGS.get(k, k)] = v
    for k, tag in (("train_loss", "bits_per_dim/train"), ("val_loss", "bits_per_dim/val")):
        if row.get(k) is not None:
            out[tag] = bits_per_dim(row[k], D)
    return out


class TensorBoardSink:
    """A run's TensorBoard events in `folder`, step = epoch. A resumed run opens it with
    purge_step = the first epoch it trains, so that events a stopped run wrote after its
    last checkpoint are dropped by TensorBoard: the curves continue with no duplicated
    steps. A folder that holds no events yet (--tensorboard turned on at a resume, or a
    resume into another folder) first gets the scalars of the run's history."""

    def __init__(self, folder, D, history):
        fresh = not (os.path.isdir(folder) and any(f.startswith("events.out.tfevents") for f in os.listdir(folder)))
        self.D = D
        self.writer = summary_writer_class()(folder, purge_step=len(history) + 1 if history else None)
        if fresh:
            for r in history:
                self.row(r)
            self.writer.flush()

    def row(self, row):
        for tag, v in tensorboard_scalars(row, self.D).items():
            self.writer.add_scalar(tag, v, row["epoch"])

    def image(self, tag, img, epoch):
        """img: [H, W] (grey) or [H, W, 3] (RGB) in [0, 1]."""
        self.writer.add_image(tag, img, epoch, dataformats="HW" if img.ndim == 2 else "HWC")

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class RunWriter:
    """Writes one run's files into `out` (None: writes nothing); with `tensorboard_every`,
    also its TensorBoard events (TensorBoardSink, D values per example), from the same rows."""

    def __init__(self, out, tensorboard_every=None, D=None):
        self.out = out
        self.paths = {}
        self.tensorboard_every, self.D, self.tensorboard = tensorboard_every, D, None
        if out is not None:
            os.makedirs(out, exist_ok=True)
            self.paths = {"last": os.path.join(out, "last.pt"), "best": os.path.join(out, "best.pt"),
                          "metrics": os.path.join(out, "metrics.jsonl")}
            if tensorboard_every:
                self.paths["tensorboard"] = os.path.join(out, TENSORBOARD)

    def begin(self, history):
        """The log as the run starts: empty, or a resumed run's history (a row logged after
        its last checkpoint is gone with that checkpoint)."""
        if self.out is not None:
            write_jsonl(history, self.paths["metrics"])
            if self.tensorboard_every:
                self.tensorboard = TensorBoardSink(self.paths["tensorboard"], self.D, history)

    def pictures_due(self, epoch):
        """Whether epoch (1-based) gets TensorBoard pictures: the first, then every tensorboard_every."""
        return self.tensorboard is not None and (epoch == 1 or epoch % self.tensorboard_every == 0)

    def epoch(self, row, last, best=None, pictures=None):
        """One epoch's log row (metrics.jsonl, and TensorBoard's scalars with its `pictures`:
        {tag: image}) and checkpoints: last.pt always, best.pt when given (an improvement, or
        the first epoch). Everything of the epoch is written before last.pt, which marks it done."""
        if self.out is None:
            return
        with open(self.paths["metrics"], "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.row(row)
            for tag, img in (pictures or {}).items():
                self.tensorboard.image(tag, img, row["epoch"])
            self.tensorboard.flush()
        if best is not None:
            atomic_save(best, self.paths["best"])
        atomic_save(last, self.paths["last"])

    def close(self):
        """Closes the TensorBoard events file (the other files are closed as they are written)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def last(self, last):
        """last.pt alone: a run stopped inside an epoch (no log row, no best.pt)."""
        if self.out is not None:
            atomic_save(last, self.paths["last"])

    def has_best(self):
        return self.out is not None and os.path.exists(self.paths["best"])

    def summary(self, summary):
        if self.out is not None:
            atomic_write_json(summary, os.path.join(self.out, "summary.json"))
