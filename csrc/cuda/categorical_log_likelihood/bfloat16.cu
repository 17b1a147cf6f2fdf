// hvae_fast::categorical_log_likelihood's kernels for at::BFloat16 logits (launchers.h).
#include "kernels.cuh"

namespace hvae_fast {
namespace categorical_cuda {
HVAE_FAST_CATEGORICAL_LAUNCH(, at::BFloat16)
}  // namespace categorical_cuda
}  // namespace hvae_fast
