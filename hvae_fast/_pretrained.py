"""Models trained by this project, shipped inside the package: nothing is downloaded.

Each one is hvae_fast/checkpoints/<name>.pt (a best.pt as `hvae-fast train` writes it) beside
<name>.json, its card: the command that trained it, the commit, the machine, its test numbers.
"""
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "checkpoints"


def pretrained_names():
    """The names pretrained() takes."""
    return sorted(p.stem for p in FOLDER.glob("*.pt"))


def pretrained_path(name):
    """The checkpoint file of a shipped model (for `hvae-fast eval` and friends)."""
    names = pretrained_names()
    if name not in names:
        raise ValueError(f"no pretrained model {name!r}; this package ships: {', '.join(names) or 'none'}")
    return FOLDER / f"{name}.pt"


def pretrained_card(name):
    """What is known of a shipped model: how it was trained and what it scored (a dict)."""
    pretrained_path(name)
    return json.loads((FOLDER / f"{name}.json").read_text())


def pretrained(name, backend=None):
    """The shipped model `name` in eval mode, with the weights its training validated (the EMA
    where the run kept one); its card: pretrained_card(name)."""
    from .train import model_from_checkpoint
    return model_from_checkpoint(str(pretrained_path(name)), backend=backend)[0]
