// Registers the CPU kernels: each op's entry calls the build of the active level
// (csrc/cpu/kernels.h). The level is the best this CPU supports, chosen when the module
// loads; hvae_fast/_extension.py applies HVAE_FAST_CPU, which forces a lower one.
#include <torch/library.h>

#include <atomic>

#include "kernels.h"

namespace hvae_fast {
namespace cpu {

namespace generic { HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL) }
#if defined(HVAE_FAST_CPU_AVX2)
namespace avx2 { HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL) }
#else
namespace avx2 = generic;
#endif
#if defined(HVAE_FAST_CPU_AVX512)
namespace avx512 { HVAE_FAST_CPU_KERNELS(HVAE_FAST_DECLARE_KERNEL) }
#else
namespace avx512 = avx2;
#endif

namespace {

bool cpu_has(Level level) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (level) {
    case Level::generic: return true;
    case Level::avx2: return avx2;
    case Level::avx512:  // the subset ATen's AVX512 capability needs
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return level == Level::generic;
#endif
}

Level best_level() {
  const auto levels = levels_supported();
  return levels.back();
}

std::atomic<int> g_level{static_cast<int>(best_level())};
// Kernel calls per level since the module loaded: what a test run can show it exercised.
std::atomic<int64_t> g_calls[3];

// Stub<&generic::f, &avx2::f, &avx512::f>::call has f's signature and calls the build
// of the active level.
template <auto G, auto V2, auto V5>
struct Stub;
template <typename R, typename... A, R (*const* G)(A...), R (*const* V2)(A...), R (*const* V5)(A...)>
struct Stub<G, V2, V5> {
  static R call(A... a) {
    const int level = g_level.load(std::memory_order_relaxed);
    g_calls[level].fetch_add(1, std::memory_order_relaxed);
    switch (static_cast<Level>(level)) {
      case Level::avx512: return (*V5)(a...);
      case Level::avx2: return (*V2)(a...);
      default: return (*G)(a...);
    }
  }
};

}  // namespace

const char* level_name(Level level) {
  switch (level) {
    case Level::generic: return "generic";
    case Level::avx2: return "avx2";
    case Level::avx512: return "avx512";
  }
  return "unknown";
}

std::vector<Level> levels_compiled() {
  std::vector<Level> out{Level::generic};
#if defined(HVAE_FAST_CPU_AVX2)
  out.push_back(Level::avx2);
#endif
#if defined(HVAE_FAST_CPU_AVX512)
  out.push_back(Level::avx512);
#endif
  return out;
}

std::vector<Level> levels_supported() {
  std::vector<Level> out;
  for (Level level : levels_compiled())
    if (cpu_has(level)) out.push_back(level);
  return out;
}

Level active_level() { return static_cast<Level>(g_level.load()); }

int64_t calls(Level level) { return g_calls[static_cast<int>(level)].load(); }

void set_level(const std::string& name) {
  std::string known, runnable;
  for (Level level : levels_compiled()) {
    known += known.empty() ? "" : ", ";
    known += level_name(level);
    if (!cpu_has(level)) continue;
    runnable += runnable.empty() ? "" : ", ";
    runnable += level_name(level);
    if (name == level_name(level)) {
      g_level.store(static_cast<int>(level));
      return;
    }
  }
  if (name == "auto") {
    g_level.store(static_cast<int>(best_level()));
    return;
  }
  for (Level level : levels_compiled())
    TORCH_CHECK_VALUE(name != level_name(level), "CPU level ", name,
                      " needs instructions this CPU lacks; it can run: ", runnable);
  TORCH_CHECK_VALUE(false, "unknown CPU level ", name, ": this build has auto, ", known);
}

}  // namespace cpu

#define HVAE_FAST_REGISTER_KERNEL(name, ret, params) \
  m.impl(#name, &cpu::Stub<&cpu::generic::name, &cpu::avx2::name, &cpu::avx512::name>::call);

TORCH_LIBRARY_IMPL(hvae_fast, CPU, m) { HVAE_FAST_CPU_KERNELS(HVAE_FAST_REGISTER_KERNEL) }

}  // namespace hvae_fast
