"""hvae_fast: fused C++/CUDA kernels and a fast top-down hierarchical VAE for PyTorch."""
from . import ops, reference


def extension_available() -> bool:
    """True when the compiled kernels (hvae_fast._C) are loaded."""
    return ops.EXTENSION_LOADED


def build_info() -> dict:
    """What hvae_fast._C was built against, and whether it is loaded (and if not, why)."""
    info = dict(ops.BUILD_INFO or {})
    info["loaded"] = ops.EXTENSION_LOADED
    info["why_not_loaded"] = ops.WHY_NO_EXTENSION
    info["cpu_level"] = cpu_level()
    info["cpu_levels_supported"] = _C.cpu_levels_supported() if ops.EXTENSION_LOADED else []
    return info


def cpu_level():
    """The instruction-set level the CPU kernels run: "generic", "avx2" or "avx512" (None
    without the compiled extension). The best this CPU supports unless HVAE_FAST_CPU says."""
    return _C.cpu_level() if ops.EXTENSION_LOADED else None


def set_cpu_level(level: str) -> str:
    """Makes the CPU kernels run `level` ("auto": the best this CPU supports) and returns the
    previous level. ValueError for a level this build lacks or this CPU cannot run."""
    if not ops.EXTENSION_LOADED:
        raise RuntimeError(f"set_cpu_level: the compiled kernels are not loaded ({ops.WHY_NO_EXTENSION})")
    previous = _C.cpu_level()
    _C.set_cpu_level(level)
    return previous


if ops.EXTENSION_LOADED:
    from . import _C

__all__ = ["ops", "reference", "extension_available", "build_info", "cpu_level", "set_cpu_level"]
from .model import BottomUpVAE, ConvTopDownVAE, ELBOTerms, HierarchicalVAE, OneLevelVAE, TopDownVAE  # noqa: E402
from .nets import reference_networks  # noqa: E402
from . import optim  # noqa: E402
from .config import TrainConfig  # noqa: E402  (training: hvae_fast.train.run / train)
from ._pretrained import pretrained, pretrained_card, pretrained_names  # noqa: E402
__all__ += ["pretrained", "pretrained_card", "pretrained_names", "optim", "TrainConfig", "HierarchicalVAE", "TopDownVAE", "ConvTopDownVAE", "BottomUpVAE", "OneLevelVAE", "ELBOTerms",
            "reference_networks"]
