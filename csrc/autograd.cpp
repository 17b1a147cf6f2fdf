// Autograd of the hvae_fast operators, for every backend: each op's forward and backward
// run below autograd through the dispatcher (so on CPU, CUDA, or the Python fallback).
// C++ rather than torch.library.register_autograd: the Python version cost about 100 us
// per call, more than the kernels at the small sizes of a training step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace hvae_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor or_undefined(const Opt& t) { return t.has_value() ? *t : at::Tensor(); }
Opt or_none(const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

// ---- posterior_sample and posterior_sample_philox ----------------------------------------
// Gradients in the op's argument order (eps is an argument of posterior_sample only);
// dL/dmu_p is grad_z itself.
variable_list posterior_grads(AutogradContext* ctx, bool has_eps, const at::Tensor& grad_z, at::Tensor g_dmu,
                              at::Tensor g_dlv, at::Tensor g_eps, at::Tensor g_lvp) {
  const bool prior = ctx->saved_data["prior"].toBool();
  variable_list out = {g_dmu, g_dlv};
  if (has_eps) out.push_back(g_eps);
  out.push_back(prior ? grad_z : at::Tensor());
  out.push_back(prior ? g_lvp : at::Tensor());
  out.resize(7);  // both ops take 7 arguments; the bounds (and the seed) get no gradient
  return out;
}

struct PosteriorSample : public torch::autograd::Function<PosteriorSample> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& dmu, const at::Tensor& dlv,
                               const at::Tensor& eps, const Opt& mu_p, const Opt& lv_p, double lo, double hi) {
    static const auto fwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                                    double, double)>("hvae_fast::posterior_sample");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl] = fwd.call(dmu, dlv, eps, mu_p, lv_p, lo, hi);
    ctx->save_for_backward({dmu, dlv, eps, or_undefined(lv_p)});
    ctx->saved_data["prior"] = mu_p.has_value();
    ctx->saved_data["lo"] = lo;
    ctx->saved_data["hi"] = hi;
    return {z, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
        double, double, bool)>("hvae_fast::posterior_sample_backward");
    const auto s = ctx->get_saved_variables();
    const bool eps_grad = ctx->needs_input_grad(2);  // the noise rarely needs one: skip its write
    auto [g_dmu, g_dlv, g_eps, g_lvp] = bwd.call(grads[0], grads[1], s[0], s[1], s[2], or_none(s[3]),
                                                 ctx->saved_data["lo"].toDouble(), ctx->saved_data["hi"].toDouble(),
                                                 eps_grad);
    return posterior_grads(ctx, true, grads[0], g_dmu, g_dlv, eps_grad ? g_eps : at::Tensor(), g_lvp);
  }
};

struct PosteriorSamplePhilox : public torch::autograd::Function<PosteriorSamplePhilox> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& dmu, const at::Tensor& dlv, const Opt& mu_p,
                               const Opt& lv_p, const at::Tensor& seed, double lo, double hi) {
    static const auto fwd = op<Pair(const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const at::Tensor&,
                                    double, double)>("hvae_fast::posterior_sample_philox");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl] = fwd.call(dmu, dlv, mu_p, lv_p, seed, lo, hi);
    // the seed tensor itself, not its value: under torch.compile it is a traced tensor
    ctx->save_for_backward({dmu, dlv, or_undefined(lv_p), seed});
    ctx->saved_data["prior"] = mu_p.has_value();
    ctx->saved_data["lo"] = lo;
    ctx->saved_data["hi"] = hi;
    return {z, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
        double, double)>("hvae_fast::posterior_sample_philox_backward");
    const auto s = ctx->get_saved_variables();
    auto [g_dmu, g_dlv, g_lvp] = bwd.call(grads[0], grads[1], s[0], s[1], or_none(s[2]), s[3],
                                          ctx->saved_data["lo"].toDouble(), ctx->saved_data["hi"].toDouble());
    return posterior_grads(ctx, false, grads[0], g_dmu, g_dlv, at::Tensor(), g_lvp);
  }
};

// ---- categorical_log_likelihood ------------------------------------------------------------
// Traced by torch.compile (fake or functional tensors): no in-place backward there.
bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

struct Categorical : public torch::autograd::Function<Categorical> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& x,
                               bool overwrite) {
    static const auto fwd =
        op<Pair(const at::Tensor&, const at::Tensor&, bool)>("hvae_fast::categorical_log_likelihood");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [ll, lse] = fwd.call(logits, x, overwrite);
    ctx->save_for_backward({logits, x, lse});
    ctx->mark_non_differentiable({lse});
    ctx->saved_data["overwrite"] = overwrite && logits.is_contiguous();
    return {ll, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "hvae_fast::categorical_log_likelihood_backward");
    static const auto bwd_ = op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "hvae_fast::categorical_log_likelihood_backward_");
    const auto s = ctx->get_saved_variables();
    const at::Tensor& logits = s[0];
    if (ctx->saved_data["overwrite"].toBool() && !traced(logits)) {
      bwd_.call(grads[0], logits, s[1], s[2]);
      torch::autograd::impl::bump_version(logits);  // other saved uses of the logits now fail loudly
      return {logits, at::Tensor(), at::Tensor()};
    }
    return {bwd.call(grads[0], logits, s[1], s[2]), at::Tensor(), at::Tensor()};
  }
};

// ---- bernoulli_log_likelihood --------------------------------------------------------------
struct Bernoulli : public torch::autograd::Function<Bernoulli> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& x) {
    static const auto fwd = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("hvae_fast::bernoulli_log_likelihood");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, x});
    return fwd.call(logits, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "hvae_fast::bernoulli_log_likelihood_backward");
    const auto s = ctx->get_saved_variables();
    return {bwd.call(grads[0], s[0], s[1]), at::Tensor()};
  }
};

// ---- dmol_log_likelihood -------------------------------------------------------------------
// Saves only the inputs: the backward recomputes everything from params.
struct Dmol : public torch::autograd::Function<Dmol> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& params, const at::Tensor& x, int64_t M, int64_t K,
                            double lo) {
    static const auto fwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>(
        "hvae_fast::dmol_log_likelihood");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({params, x});
    ctx->saved_data["M"] = M;
    ctx->saved_data["K"] = K;
    ctx->saved_data["lo"] = lo;
    return fwd.call(params, x, M, K, lo);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>(
            "hvae_fast::dmol_log_likelihood_backward");
    const auto s = ctx->get_saved_variables();
    return {bwd.call(grads[0], s[0], s[1], ctx->saved_data["M"].toInt(), ctx->saved_data["K"].toInt(),
                     ctx->saved_data["lo"].toDouble()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Pair as_pair(const variable_list& v) { return {v[0], v[1]}; }

Pair posterior_sample_autograd(const at::Tensor& dmu, const at::Tensor& dlv, const at::Tensor& eps, const Opt& mu_p,
                               const Opt& lv_p, double lo, double hi) {
  return as_pair(PosteriorSample::apply(dmu, dlv, eps, mu_p, lv_p, lo, hi));
}

Pair posterior_sample_philox_autograd(const at::Tensor& dmu, const at::Tensor& dlv, const Opt& mu_p,
                                      const Opt& lv_p, const at::Tensor& seed, double lo, double hi) {
  return as_pair(PosteriorSamplePhilox::apply(dmu, dlv, mu_p, lv_p, seed, lo, hi));
}

Pair categorical_autograd(const at::Tensor& logits, const at::Tensor& x, bool overwrite) {
  return as_pair(Categorical::apply(logits, x, overwrite));
}

at::Tensor bernoulli_autograd(const at::Tensor& logits, const at::Tensor& x) { return Bernoulli::apply(logits, x); }

at::Tensor dmol_autograd(const at::Tensor& params, const at::Tensor& x, int64_t M, int64_t K, double lo) {
  return Dmol::apply(params, x, M, K, lo);
}

}  // namespace

TORCH_LIBRARY_IMPL(hvae_fast, Autograd, m) {
  m.impl("posterior_sample", &posterior_sample_autograd);
  m.impl("posterior_sample_philox", &posterior_sample_philox_autograd);
  m.impl("categorical_log_likelihood", &categorical_autograd);
  m.impl("bernoulli_log_likelihood", &bernoulli_autograd);
  m.impl("dmol_log_likelihood", &dmol_autograd);
}

}  // namespace hvae_fast
