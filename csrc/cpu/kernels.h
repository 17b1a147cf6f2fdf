// The CPU kernels, and the instruction-set levels each is built for.
//
// setup.py compiles every csrc/cpu/<op>.cpp once per level (generic, AVX2+FMA, AVX-512),
// as ATen builds its kernels once per CPU_CAPABILITY; each build defines its kernels in
// hvae_fast::cpu::<level>. csrc/cpu/dispatch.cpp registers one entry per kernel that
// calls the level chosen at load time from the running CPU's features.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <vector>

// X(name, return type, parameter list): every CPU kernel, named as its op.
#define HVAE_FAST_CPU_KERNELS(X)                                                                             \
  X(posterior_sample, (std::tuple<at::Tensor, at::Tensor>),                                                  \
    (const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,              \
     const c10::optional<at::Tensor>&, double, double))                                                      \
  X(posterior_sample_backward, (std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>),                 \
    (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,          \
     const c10::optional<at::Tensor>&, double, double, bool))                                                \
  X(posterior_sample_philox, (std::tuple<at::Tensor, at::Tensor>),                                           \
    (const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, \
     const at::Tensor&, double, double))                                                                     \
  X(posterior_sample_philox_backward, (std::tuple<at::Tensor, at::Tensor, at::Tensor>),                      \
    (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,                             \
     const c10::optional<at::Tensor>&, const at::Tensor&, double, double))                                   \
  X(categorical_log_likelihood, (std::tuple<at::Tensor, at::Tensor>),                                        \
    (const at::Tensor&, const at::Tensor&, bool))                                                            \
  X(categorical_log_likelihood_backward, (at::Tensor),                                                       \
    (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&))                            \
  X(categorical_log_likelihood_backward_, (void),                                                            \
    (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&))                            \
  X(bernoulli_log_likelihood, (at::Tensor), (const at::Tensor&, const at::Tensor&))                          \
  X(bernoulli_log_likelihood_backward, (at::Tensor), (const at::Tensor&, const at::Tensor&, const at::Tensor&)) \
  X(dmol_log_likelihood, (at::Tensor), (const at::Tensor&, const at::Tensor&, int64_t, int64_t, double))       \
  X(dmol_log_likelihood_backward, (at::Tensor),                                                              \
    (const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double))                     \
  X(adamax_, (void),                                                                                         \
    (at::TensorList, at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<double>, double, double,  \
     double, double))

#define HVAE_FAST_UNPAREN(...) __VA_ARGS__
// Each level's build exports its kernels as constant pointers: one definition per kernel
// checks the kernel's type against the list above.
#define HVAE_FAST_DECLARE_KERNEL(name, ret, params) extern HVAE_FAST_UNPAREN ret (*const name) params;
// In a kernel file, inside hvae_fast::cpu::<level>: exports function `impl` as kernel `name`.
#define HVAE_FAST_EXPORT_KERNEL(name, impl) decltype(name) name = &impl;

namespace hvae_fast {
namespace cpu {

// Levels in increasing order; a level runs only on a CPU that has all its features.
enum class Level : int { generic = 0, avx2 = 1, avx512 = 2 };

// "generic", "avx2", "avx512"
const char* level_name(Level level);
// The levels built into this module, and those of them this CPU can run.
std::vector<Level> levels_compiled();
std::vector<Level> levels_supported();
// The level every kernel call runs; set_level refuses a level not supported.
Level active_level();
void set_level(const std::string& name);
// CPU kernel calls made at `level` since the module loaded.
int64_t calls(Level level);

}  // namespace cpu
}  // namespace hvae_fast
