"""The fused operators: hvae_fast.ops.<op> are the functions to call.

One module per op, named as the op is everywhere else (its schema, csrc/cpu/<op>.cpp,
csrc/cuda/<op>.cu, hvae_fast.reference.<op>): hvae_fast/ops/<op>.py holds that op's public
function, its fake kernels, its autograd (Python's, used without the compiled module) and
its fallback to hvae_fast.reference. _registry.py holds what they share: the compiled
extension, the schemas, and the registration helpers. The fake kernels check what the
wrappers check: a raw op given a meta tensor beside a real one dispatches to them, and must
refuse it rather than return empty memory.

The names below are functions, not the modules of the same name: the package binds them
after importing the modules. `from hvae_fast.ops import dmol_log_likelihood` and
`hvae_fast.ops.dmol_log_likelihood` are the function, and so is
`import hvae_fast.ops.dmol_log_likelihood as m`; a module itself is
`importlib.import_module("hvae_fast.ops.dmol_log_likelihood")`.
"""

# Logits per chunk of the fused heads (linear_ and pixel_categorical_log_likelihood); about
# an L2 cache's worth. Read here at each call: setting hvae_fast.ops.LINEAR_CHUNK_BYTES applies.
LINEAR_CHUNK_BYTES = 8 * 2**20

# _registry first: without the compiled module it defines the schemas that the op modules
# register kernels, fake kernels and autograd for.
from ._registry import BUILD_INFO, EXTENSION_LOADED, HOST_SEED_OPS, SCHEMAS, WHY_NO_EXTENSION  # noqa: E402
# Each import below runs one op module (registering that op), and then binds the function in
# place of the module that the import set as this package's attribute of the same name.
from .posterior_sample import posterior_sample  # noqa: E402
from .categorical_log_likelihood import categorical_log_likelihood  # noqa: E402
from .bernoulli_log_likelihood import bernoulli_log_likelihood  # noqa: E402
from .dmol_log_likelihood import dmol_log_likelihood, dmol_mean, dmol_sample  # noqa: E402
from .adamax import adamax_  # noqa: E402
from .linear_categorical_log_likelihood import linear_categorical_log_likelihood  # noqa: E402
from .pixel_categorical_log_likelihood import pixel_categorical_log_likelihood  # noqa: E402

__all__ = ["posterior_sample", "categorical_log_likelihood", "bernoulli_log_likelihood", "dmol_log_likelihood",
           "dmol_sample", "dmol_mean", "adamax_", "linear_categorical_log_likelihood",
           "pixel_categorical_log_likelihood", "LINEAR_CHUNK_BYTES", "SCHEMAS", "HOST_SEED_OPS", "BUILD_INFO",
           "EXTENSION_LOADED", "WHY_NO_EXTENSION"]
