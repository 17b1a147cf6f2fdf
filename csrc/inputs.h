// Input checks and preparation shared by the CPU and CUDA entry points. The Python
// wrappers (hvae_fast/_checks.py) check the same metadata first; these keep a
// direct torch.ops call from ever reading out of bounds.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

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

// The categorical forward's lse: each row's (max, log of its sum of exps), x's shape + [2].
inline std::vector<int64_t> lse_shape(const at::Tensor& x) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.push_back(2);
  return s;
}

// The categorical backward's lse as the forward saved it: x's shape + [2], on logits'
// device, in the accumulation dtype (float32 for half-precision logits). A pointer from
// another device would be read as this one's.
inline void check_lse(const at::Tensor& lse, const at::Tensor& x, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape(x)), op, ": lse must have shape ",
                    at::IntArrayRef(lse_shape(x)), " (x's shape and 2: each row's max and log sum), got ",
                    lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == logits.device(), op, ": lse is on ", lse.device(), " but logits is on ",
                    logits.device());
  const auto acc = at::toOpMathType(logits.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, op, ": lse must have dtype ", acc, " for ", logits.scalar_type(),
                   " logits (the forward's), got ", lse.scalar_type());
}

// The seed of the posterior_sample_philox ops: a 0-dim int64 tensor on the CPU (a tensor,
// not an int, so that torch.compile keeps its draw in the graph), read here on the host by
// the CPU and CUDA kernels alike. Its 64 bits are the Philox key.
inline uint64_t philox_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK_VALUE(seed.defined(), op, ": seed must be a 0-dim int64 tensor on the CPU, got an undefined tensor");
  TORCH_CHECK_VALUE(seed.device().is_cpu(), op, ": seed must be a 0-dim int64 tensor on the CPU (the kernels read it "
                    "on the host), got one on ", seed.device());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed must be a 0-dim int64 tensor on the CPU, got dtype ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.dim() == 0, op, ": seed must be a 0-dim int64 tensor on the CPU, got shape ", seed.sizes());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

struct PosteriorArgs {
  at::Tensor dmu, dlv, eps, mu_p, lv_p;  // eps undefined: the kernel draws the noise
  bool prior;
  int64_t B, M;
};

// Checked, contiguous inputs of posterior_sample and its backward (need_mu_p false);
// eps is nullptr for the posterior_sample_philox ops.
inline PosteriorArgs prepare_posterior(const at::Tensor& dmu, const at::Tensor& dlv, const at::Tensor* eps,
                      const c10::optional<at::Tensor>& mu_p, const c10::optional<at::Tensor>& lv_p,
                      double min_logvar, double max_logvar, bool need_mu_p) {
  TORCH_CHECK_VALUE(min_logvar < max_logvar, "posterior_sample: min_logvar (", min_logvar,
                    ") must be below max_logvar (", max_logvar, ")");
  check_float(dmu, "posterior_sample", "delta_mu");
  check_batch(dmu, "posterior_sample", "delta_mu");
  check_like(dlv, dmu, "posterior_sample", "delta_logvar", "delta_mu");
  if (eps) check_like(*eps, dmu, "posterior_sample", "eps", "delta_mu");
  const bool prior = lv_p.has_value();
  if (need_mu_p) {
    TORCH_CHECK_VALUE(mu_p.has_value() == prior, "posterior_sample",
                      ": give both mu_p and logvar_p (a lower level) or neither (the top level)");
    if (prior) check_like(*mu_p, dmu, "posterior_sample", "mu_p", "delta_mu");
  }
  if (prior) check_like(*lv_p, dmu, "posterior_sample", "logvar_p", "delta_mu");
  PosteriorArgs a;
  a.dmu = dmu.contiguous();
  a.dlv = dlv.contiguous();
  if (eps) a.eps = eps->contiguous();
  a.prior = prior;
  if (prior) {
    if (need_mu_p) a.mu_p = mu_p->contiguous();
    a.lv_p = lv_p->contiguous();
  }
  a.B = dmu.size(0);
  a.M = a.B == 0 ? 0 : dmu.numel() / a.B;
  return a;
}

// Checked inputs and fresh outputs of posterior_sample_backward.
struct PosteriorBackward {
  PosteriorArgs a;
  at::Tensor gz, gkl;                     // contiguous, in delta_mu's dtype
  at::Tensor g_dmu, g_dlv, g_eps, g_lvp;  // g_lvp empty at the top level, g_eps without eps or eps_grad
};

inline PosteriorBackward prepare_posterior_backward(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& dmu, const at::Tensor& dlv,
    const at::Tensor* eps, const c10::optional<at::Tensor>& lv_p, double min_logvar, double max_logvar,
    bool eps_grad = true) {
  constexpr const char* op = "posterior_sample_backward";
  PosteriorBackward r;
  r.a = prepare_posterior(dmu, dlv, eps, c10::nullopt, lv_p, min_logvar, max_logvar, false);
  check_like(grad_z, r.a.dmu, op, "grad_z", "delta_mu");
  check_grad_batch(grad_kl, r.a.B, r.a.dmu, op);
  r.gz = grad_z.contiguous();
  r.gkl = grad_kl.to(r.a.dmu.scalar_type()).contiguous();
  r.g_dmu = at::empty_like(r.a.dmu);
  r.g_dlv = at::empty_like(r.a.dmu);
  r.g_eps = eps && eps_grad ? at::empty_like(r.a.dmu) : at::empty({0}, r.a.dmu.options());
  r.g_lvp = r.a.prior ? at::empty_like(r.a.dmu) : at::empty({0}, r.a.dmu.options());
  return r;
}

// The tensor lists of adamax_: one (param, grad, exp_avg, exp_inf) per step size, each
// four of one shape, dtype and device, contiguous, floating point. Names what is wrong.
inline void check_adamax(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_infs, c10::ArrayRef<double> neg_clrs) {
  constexpr const char* op = "adamax_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_infs.size() == n && neg_clrs.size() == n,
                    op, ": params, grads, exp_avgs, exp_infs and neg_clrs must have one entry each per "
                    "parameter, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_infs.size(), ", ",
                    neg_clrs.size());
  for (size_t j = 0; j < n; ++j) {
    check_float(params[j], op, "params");
    TORCH_CHECK_VALUE(params[j].is_contiguous(), op, ": params[", j, "] must be contiguous");
    const std::pair<const at::Tensor*, const char*> others[] = {
        {&grads[j], "grads"}, {&exp_avgs[j], "exp_avgs"}, {&exp_infs[j], "exp_infs"}};
    for (const auto& [t, name] : others) {
      check_like(*t, params[j], op, name, "params");
      TORCH_CHECK_VALUE(t->is_contiguous(), op, ": ", name, "[", j, "] must be contiguous");
    }
  }
}

// The inputs of dmol_log_likelihood and its backward: params [B, P, H, W] floating point,
// x [B, C, H, W] integer pixel values (uint8 or int64 read as they are, other integer
// types as int64), P = M (1 + 2C + C(C-1)/2). Their values are checked in the kernels.
struct DmolArgs {
  at::Tensor params, x;  // contiguous
  int64_t B, C, H, W, M, K, P;
};

inline DmolArgs prepare_dmol(const at::Tensor& params, const at::Tensor& x, int64_t num_mixtures, int64_t num_vals,
                             const char* op) {
  check_float(params, op, "params");
  TORCH_CHECK_VALUE(params.dim() == 4, op, ": params must be [B, P, H, W], got shape ", params.sizes());
  check_batch(params, op, "params");
  TORCH_CHECK_VALUE(num_mixtures >= 1, op, ": num_mixtures must be at least 1, got ", num_mixtures);
  TORCH_CHECK_VALUE(num_vals >= 2 && num_vals <= (int64_t(1) << 24), op,
                    ": num_vals must be in 2..2^24, got ", num_vals);
  TORCH_CHECK_VALUE(x.device() == params.device(), op, ": x is on ", x.device(), " but params is on ",
                    params.device());
  TORCH_CHECK_TYPE(at::isIntegralType(x.scalar_type(), /*includeBool=*/false), op,
                   ": x must be an integer tensor of pixel values (uint8 or int64), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == params.size(0) && x.size(2) == params.size(2) &&
                        x.size(3) == params.size(3) && x.size(1) >= 1,
                    op, ": x must be [B, C, H, W] with C >= 1 and B, H, W = ", params.size(0), ", ", params.size(2),
                    ", ", params.size(3), " (params'), got ", x.sizes());
  DmolArgs a;
  a.B = params.size(0);
  a.C = x.size(1);
  a.H = params.size(2);
  a.W = params.size(3);
  a.M = num_mixtures;
  a.K = num_vals;
  a.P = num_mixtures * (1 + 2 * a.C + a.C * (a.C - 1) / 2);
  TORCH_CHECK_VALUE(params.size(1) == a.P, op, ": params has ", params.size(1), " channels, but num_mixtures = ",
                    a.M, " and C = ", a.C, " (x's channels) need M * (1 + 2C + C(C-1)/2) = ", a.P);
  a.params = params.contiguous();
  const auto t = x.scalar_type();
  a.x = (t == at::kByte || t == at::kLong) ? x.contiguous() : x.to(at::kLong).contiguous();
  return a;
}

// x as the logits' dtype for the Bernoulli kernels. A float x of another dtype is
// checked for 0/1 first, so that a conversion cannot round, say, 1 + 1e-12 to 1.
inline at::Tensor as_bernoulli_target(const at::Tensor& x, const at::Tensor& logits, const char* op) {
  if (x.is_floating_point() && x.scalar_type() != logits.scalar_type()) {
    TORCH_CHECK_VALUE(x.eq(0).logical_or(x.eq(1)).all().item<bool>(), op, ": x must hold 0 or 1");
  }
  return x.to(logits.scalar_type()).contiguous();
}

// Class indices as int64, or as the float type they came in (read exactly).
inline at::Tensor as_index(const at::Tensor& x) {
  const auto t = x.scalar_type();
  if (t == at::kHalf || t == at::kBFloat16) return x.to(at::kFloat).contiguous();  // exact
  if (at::isFloatingType(t) || t == at::kLong) return x.contiguous();
  return x.to(at::kLong).contiguous();  // other integer types: exact
}

// Class indices are read as int64 or as the float type they came in.
template <typename F>
inline void dispatch_index(const at::Tensor& x, const F& f) {
  switch (x.scalar_type()) {
    case at::kDouble: return f(x.const_data_ptr<double>());
    case at::kFloat: return f(x.const_data_ptr<float>());
    case at::kLong: return f(x.const_data_ptr<int64_t>());
    default: TORCH_CHECK(false, "unreachable: index dtype ", x.scalar_type());
  }
}

}  // namespace hvae_fast
