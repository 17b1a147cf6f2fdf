// CUDA kernel of hvae_fast::adamax_: torch.optim.Adamax's step over many tensors, one
// multi-tensor launch per device and dtype (up to kMaxTensors tensors and kMaxBlocks
// chunks of kChunk elements per launch, whose table travels as the kernel's argument),
// where torch's foreach step makes about 7. The update of csrc/formulas.h in float32
// (float64 for double), line by line as csrc/cpu/adamax.cpp; in float16 and bfloat16 the
// state rounds as torch's foreach step rounds it (math::adamax_update's `round`).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "../inputs.h"
#include "../formulas.h"
#include "launch.cuh"

namespace hvae_fast {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 16 * cuda::kThreads;

// The launch's tensors and, per block, its tensor and chunk: 2.8 KB at most (double), under
// the 4 KB of kernel arguments every CUDA version takes.
template <typename S>
struct Table {
  using A = at::opmath_type<S>;
  S* p[kMaxTensors];
  const S* g[kMaxTensors];
  S* m[kMaxTensors];
  S* u[kMaxTensors];
  int64_t n[kMaxTensors];
  A neg_clr[kMaxTensors];
  uint8_t tensor[kMaxBlocks];
  int32_t chunk[kMaxBlocks];
};
static_assert(sizeof(Table<double>) <= 4096, "kernel arguments");

// Rounds to S and back: the rounding of torch's S-typed intermediate tensors.
template <typename S>
struct RoundTo {
  template <typename T>
  __device__ T operator()(T v) const { return static_cast<T>(static_cast<S>(v)); }
};

template <typename S>
using Rounding = std::conditional_t<std::is_same<S, at::opmath_type<S>>::value, math::NoRounding, RoundTo<S>>;

template <typename S>
__global__ void __launch_bounds__(cuda::kThreads) adamax_kernel(const Table<S> t, at::opmath_type<S> w,
                                                                at::opmath_type<S> b2, at::opmath_type<S> e,
                                                                at::opmath_type<S> wd) {
  using A = at::opmath_type<S>;
  const int j = t.tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(t.chunk[blockIdx.x]) * kChunk;
  const int64_t end = std::min(t.n[j], begin + kChunk);
  S* p = t.p[j];
  const S* g = t.g[j];
  S* m = t.m[j];
  S* u = t.u[j];
  const A v = t.neg_clr[j];
  for (int64_t i = begin + threadIdx.x; i < end; i += cuda::kThreads) {
    A pi = static_cast<A>(p[i]), mi = static_cast<A>(m[i]), ui = static_cast<A>(u[i]);
    math::adamax_update(pi, static_cast<A>(g[i]), mi, ui, w, b2, e, wd, v, Rounding<S>());
    p[i] = static_cast<S>(pi);
    m[i] = static_cast<S>(mi);
    u[i] = static_cast<S>(ui);
  }
}

template <typename S>
void launch_group(const std::vector<size_t>& idx, at::TensorList params, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_infs, c10::ArrayRef<double> neg_clrs, double beta1,
                  double beta2, double eps, double weight_decay) {
  using A = at::opmath_type<S>;
  const A w(1 - beta1), b2(beta2), e(eps), wd(weight_decay);
  Table<S> t;
  int nt = 0, nb = 0;
  const auto flush = [&] {
    if (nb > 0) {
      adamax_kernel<S><<<nb, cuda::kThreads, 0, cuda::stream()>>>(t, w, b2, e, wd);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    nt = nb = 0;
  };
  for (size_t j : idx) {
    const int64_t n = params[j].numel();
    if (n == 0) continue;
    if (nt == kMaxTensors) flush();
    t.p[nt] = params[j].data_ptr<S>();
    t.g[nt] = grads[j].const_data_ptr<S>();
    t.m[nt] = exp_avgs[j].data_ptr<S>();
    t.u[nt] = exp_infs[j].data_ptr<S>();
    t.n[nt] = n;
    t.neg_clr[nt] = static_cast<A>(neg_clrs[j]);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT32_MAX, "adamax_: params[", j, "] has too many elements (", n, ")");
    for (int64_t c = 0; c < chunks; ++c) {
      if (nb == kMaxBlocks) {  // the tensor's remaining chunks go into the next launch, first
        const int keep = nt;
        flush();
        t.p[0] = t.p[keep];
        t.g[0] = t.g[keep];
        t.m[0] = t.m[keep];
        t.u[0] = t.u[keep];
        t.n[0] = t.n[keep];
        t.neg_clr[0] = t.neg_clr[keep];
      }
      t.tensor[nb] = static_cast<uint8_t>(nt);
      t.chunk[nb] = static_cast<int32_t>(c);
      ++nb;
    }
    ++nt;
  }
  flush();
}

void adamax_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_infs,
                 c10::ArrayRef<double> neg_clrs, double beta1, double beta2, double eps, double weight_decay) {
  check_adamax(params, grads, exp_avgs, exp_infs, neg_clrs);
  // groups of one device and dtype, each in the order of the lists
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t j = 0; j < params.size(); ++j) {
    TORCH_CHECK_VALUE(params[j].is_cuda(), "adamax_: params[", j, "] is on ", params[j].device(),
                      " but params[0] is on ", params[0].device(), ": one call takes the tensors of one device type");
    groups[{params[j].get_device(), static_cast<int>(params[j].scalar_type())}].push_back(j);
  }
  for (const auto& [key, idx] : groups) {
    const c10::cuda::CUDAGuard guard(params[idx[0]].device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[idx[0]].scalar_type(), "adamax_", [&] {
      launch_group<scalar_t>(idx, params, grads, exp_avgs, exp_infs, neg_clrs, beta1, beta2, eps, weight_decay);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
  m.impl("adamax_", &adamax_cuda);
}

}  // namespace hvae_fast
