// What the host code of hvae_fast::categorical_log_likelihood calls: the launchers of its
// kernels for logits of type S and class indices of type I, defined in kernels.cuh and
// instantiated once per S, each dtype in its own file beside this one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace hvae_fast {
namespace categorical_cuda {

template <typename S, typename I>
struct Launch {
  // ll[b] = example b's sum of log_softmax(logits)[x]; lse: each row's (max, log sum exp)
  static void forward(const at::Tensor& logits, const I* x, int64_t B, int64_t D, int64_t K, at::Tensor& ll,
                      at::Tensor& lse);
  // out = grad * (onehot(x) - softmax(logits)); out may be logits itself
  static void backward(const at::Tensor& grad, const at::Tensor& logits, const I* x, const at::Tensor& lse,
                       int64_t B, int64_t D, int64_t K, at::Tensor& out);
};

// PREFIX: extern (declaration) or nothing (definition, in <dtype>.cu); I: the index types
// inputs.h's dispatch_index passes
#define HVAE_FAST_CATEGORICAL_LAUNCH(PREFIX, S) \
  PREFIX template struct Launch<S, double>;     \
  PREFIX template struct Launch<S, float>;      \
  PREFIX template struct Launch<S, int64_t>;

HVAE_FAST_CATEGORICAL_LAUNCH(extern, float)
HVAE_FAST_CATEGORICAL_LAUNCH(extern, double)
HVAE_FAST_CATEGORICAL_LAUNCH(extern, at::Half)
HVAE_FAST_CATEGORICAL_LAUNCH(extern, at::BFloat16)

}  // namespace categorical_cuda
}  // namespace hvae_fast
