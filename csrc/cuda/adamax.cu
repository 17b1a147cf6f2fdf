// CUDA kernel of hvae_fast::adamax_: one element-wise launch per tensor, the update of
// csrc/formulas.h in float32 (float64 for double).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../inputs.h"
#include "../formulas.h"
#include "launch.cuh"

namespace hvae_fast {
namespace {

void adamax_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_infs,
                 c10::ArrayRef<double> neg_clrs, double beta1, double beta2, double eps, double weight_decay) {
  check_adamax(params, grads, exp_avgs, exp_infs, neg_clrs);
  for (size_t j = 0; j < params.size(); ++j) {
    const c10::cuda::CUDAGuard guard(params[j].device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[j].scalar_type(), "adamax_", [&] {
      using S = scalar_t;
      using A = at::opmath_type<S>;
      S* p = params[j].data_ptr<S>();
      const S* g = grads[j].const_data_ptr<S>();
      S* m = exp_avgs[j].data_ptr<S>();
      S* u = exp_infs[j].data_ptr<S>();
      const A w(1 - beta1), b2(beta2), e(eps), wd(weight_decay), v(neg_clrs[j]);
      cuda::elementwise(params[j].numel(), [=] __device__(int64_t i) {
        A pi = static_cast<A>(p[i]), mi = static_cast<A>(m[i]), ui = static_cast<A>(u[i]);
        math::adamax_update(pi, static_cast<A>(g[i]), mi, ui, w, b2, e, wd, v);
        p[i] = static_cast<S>(pi);
        m[i] = static_cast<S>(mi);
        u[i] = static_cast<S>(ui);
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("adamax_", &adamax_cuda);
}

}  // namespace hvae_fast
