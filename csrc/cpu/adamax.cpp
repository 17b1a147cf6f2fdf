// CPU kernel of hvae_fast::adamax_: torch.optim.Adamax's step over many tensors in one
// call and one pass over each (torch's runs several ops, one of them allocating |grad|).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "../inputs.h"
#include "../formulas.h"
#include "kernels.h"
#include "vec.h"

namespace hvae_fast {
namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {
namespace {

void adamax_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_infs,
                c10::ArrayRef<double> neg_clrs, double beta1, double beta2, double eps, double weight_decay) {
  check_adamax(params, grads, exp_avgs, exp_infs, neg_clrs);
  for (size_t j = 0; j < params.size(); ++j) {
    AT_DISPATCH_FLOATING_TYPES(params[j].scalar_type(), "adamax_", [&] {
      using S = scalar_t;
      S* p = params[j].data_ptr<S>();
      const S* g = grads[j].const_data_ptr<S>();
      S* m = exp_avgs[j].data_ptr<S>();
      S* u = exp_infs[j].data_ptr<S>();
      const S w(1 - beta1), b2(beta2), e(eps), wd(weight_decay), v(neg_clrs[j]);
      at::parallel_for(0, params[j].numel(), cpu::kGrainElems, [&](int64_t begin, int64_t end) {
        cpu::vec_for<S>(begin, end, [&](int64_t i, auto zero) {
          using V = decltype(zero);
          V pi = cpu::load(p + i, zero), mi = cpu::load(m + i, zero), ui = cpu::load(u + i, zero);
          math::adamax_update(pi, cpu::load(g + i, zero), mi, ui, V(w), V(b2), V(e), V(wd), V(v));
          cpu::store(p + i, pi);
          cpu::store(m + i, mi);
          cpu::store(u + i, ui);
        });
      });
    });
  }
}

}  // namespace

HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL)
HVAE_FAST_EXPORT_KERNEL(adamax_, adamax_cpu)
}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu

}  // namespace hvae_fast
