// hvae_fast::categorical_log_likelihood's kernels for float logits (launchers.h).
#include "kernels.cuh"

namespace hvae_fast {
namespace categorical_cuda {
HVAE_FAST_CATEGORICAL_LAUNCH(, float)
}  // namespace categorical_cuda
}  // namespace hvae_fast
