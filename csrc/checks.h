// Input checks shared by the CPU and CUDA entry points. The Python wrappers in
// hvae_fast/ops.py check the same things first, with friendlier messages; these
// keep a direct torch.ops call from ever reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace hvae_fast {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(),
                    " but ", ref_name, " has shape ", ref.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but ", ref_name, " is on ", ref.device());
}

inline void check_batch(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) > 0, op, ": ", name,
                    " must have a non-empty batch dimension, got shape ", t.sizes());
}

// grad of a per-example output: shape [B]
inline void check_grad_batch(const at::Tensor& g, int64_t B, const at::Tensor& ref, const char* op) {
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == B, op, ": grad must have shape [", B,
                    "], got ", g.sizes());
  TORCH_CHECK_VALUE(g.device() == ref.device(), op, ": grad is on ", g.device(),
                    " but the inputs are on ", ref.device());
}

// logits [B, ..., K] with targets x [B, ...] (class_dim) or logits and x of one
// shape (Bernoulli).
inline void check_likelihood(const at::Tensor& logits, const at::Tensor& x, bool class_dim,
                             const char* op) {
  check_float(logits, op, "logits");
  check_batch(logits, op, "logits");
  TORCH_CHECK_VALUE(x.device() == logits.device(), op, ": x is on ", x.device(),
                    " but logits is on ", logits.device());
  TORCH_CHECK_TYPE(!x.is_complex(), op, ": x must be real, got ", x.scalar_type());
  if (class_dim) {
    TORCH_CHECK_VALUE(logits.dim() >= 2, op, ": logits must have shape [B, ..., K], got ",
                      logits.sizes());
    TORCH_CHECK_VALUE(logits.size(-1) >= 2, op, ": logits need K >= 2 classes in the last "
                      "dimension, got K = ", logits.size(-1));
    TORCH_CHECK_VALUE(x.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
                      ": x must have shape ", logits.sizes().slice(0, logits.dim() - 1),
                      " (logits without the class dimension), got ", x.sizes());
    TORCH_CHECK_TYPE(x.scalar_type() != at::kBool, op, ": x holds class indices; got bool");
  } else {
    TORCH_CHECK_VALUE(x.sizes() == logits.sizes(), op, ": x must have the shape of logits ",
                      logits.sizes(), ", got ", x.sizes());
  }
}

}  // namespace hvae_fast
