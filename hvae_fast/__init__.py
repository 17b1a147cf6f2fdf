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
    return info


__all__ = ["ops", "reference", "extension_available", "build_info"]
from .model import BottomUpVAE, ELBOTerms, HierarchicalVAE, OneLevelVAE, TopDownVAE  # noqa: E402
from .nets import reference_networks  # noqa: E402
from . import optim  # noqa: E402
__all__ += ["optim", "HierarchicalVAE", "TopDownVAE", "BottomUpVAE", "OneLevelVAE", "ELBOTerms", "reference_networks"]
