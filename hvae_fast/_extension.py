"""Loads the compiled extension hvae_fast._C, or says clearly why it cannot."""
import importlib
import json
import os
from pathlib import Path

import torch

REINSTALL = "reinstall with `pip install --no-build-isolation -e .` in the source tree"
_INFO_FILE = Path(__file__).with_name("_build_info.json")


def _read_info():
    try:
        return json.loads(_INFO_FILE.read_text()), None
    except FileNotFoundError:
        return None, "hvae_fast was installed without its compiled extension"
    except (OSError, ValueError) as e:
        return None, f"{_INFO_FILE} is unreadable ({e}); {REINSTALL}"


def load():
    """Returns (build_info, None) once hvae_fast._C is loaded, else (info or None, reason)."""
    info, why = _read_info()
    if os.environ.get("HVAE_FAST_DISABLE_EXTENSION") == "1":
        return info, "HVAE_FAST_DISABLE_EXTENSION=1 is set"
    if info is None:
        return None, why
    if "cpu_levels" not in info:  # built from sources before run-time dispatch: another op layout
        return info, f"hvae_fast._C is a build of an older hvae_fast; {REINSTALL}"
    if info.get("torch_version") != torch.__version__:
        return info, (f"hvae_fast._C was built for torch {info.get('torch_version')}, "
                      f"running torch {torch.__version__}: {REINSTALL}")
    try:
        module = importlib.import_module("hvae_fast._C")
    except (ImportError, OSError) as e:
        return info, f"hvae_fast._C failed to load ({e}); {REINSTALL}"
    apply_cpu_level(module)
    return info, None


def apply_cpu_level(module):
    """HVAE_FAST_CPU=auto|generic|avx2|avx512 forces the CPU kernels' instruction-set level.

    A level this CPU cannot run, or an unknown one, is an error: it was asked for."""
    level = os.environ.get("HVAE_FAST_CPU", "auto").strip().lower() or "auto"
    try:
        module.set_cpu_level(level)
    except ValueError as e:
        raise ValueError(f"HVAE_FAST_CPU={level}: {e}") from None
