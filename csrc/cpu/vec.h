// CPU loops that run one csrc/formulas.h formula over SIMD vectors, then over the
// scalar tail, and a row sum whose order does not depend on the thread count.
#pragma once

#if !defined(HVAE_FAST_CPU_LEVEL)
#error "compiled once per CPU level by setup.py (csrc/cpu/kernels.h)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../formulas.h"

#include <cstdint>
#include <vector>

#include <sys/mman.h>

namespace hvae_fast {

namespace cpu {
inline namespace HVAE_FAST_CPU_LEVEL {

// Advises a fresh, untouched output onto transparent huge pages. The first write into
// fresh memory faults once per page: with 4 KiB pages that costs more than the kernel
// (~3.5 GB/s here), with 2 MiB pages 512x fewer faults. The same as torch's
// THP_MEM_ALLOC_ENABLE=1, for the ops' own large outputs only; advice, so it cannot fail.
inline const at::Tensor& huge_pages(const at::Tensor& t) {
#if defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + t.nbytes()) & ~(kHuge - 1);
  if (e >= a + 2 * kHuge) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
  return t;
}

// Asks for the cache lines of p[0 .. n) that lie before `end`.
template <typename S>
inline void prefetch(const S* p, int64_t n, const S* end) {
  const char* a = reinterpret_cast<const char*>(p);
  const char* e = reinterpret_cast<const char*>(std::min(p + n, end));
  for (; a < e; a += 64) __builtin_prefetch(a);
}

// Work below this many elements stays on one thread.
constexpr int64_t kGrainElems = 32768;

template <typename S>
inline S load(const S* p, S) { return *p; }
template <typename S>
inline at::vec::Vectorized<S> load(const S* p, at::vec::Vectorized<S>) {
  return at::vec::Vectorized<S>::loadu(p);
}
template <typename S>
inline void store(S* p, S v) { *p = v; }
template <typename S>
inline void store(S* p, const at::vec::Vectorized<S>& v) { v.store(p); }

// Calls f(i, V{}) for i in [begin, end): V = Vectorized<S> while a whole vector
// fits, then V = S for the tail. f is a generic lambda written once for both.
template <typename S, typename F>
inline void vec_for(int64_t begin, int64_t end, const F& f) {
  using Vec = at::vec::Vectorized<S>;
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) f(i, Vec(S(0)));
  for (; i < end; ++i) f(i, S(0));
}

// Vector + scalar accumulator whose total is summed in a fixed order.
template <typename S>
struct SumAcc {
  at::vec::Vectorized<S> v{S(0)};
  S s{0};
  void add(const at::vec::Vectorized<S>& x) { v = v + x; }
  void add(S x) { s += x; }
  S total() const {
    return at::vec::vec_reduce_all<S>([](auto a, auto b) { return a + b; }, v) + s;
  }
};

// The state of for_row_chunks and row_sum, which have none, and their f without it. Named types,
// not lambdas: binutils' demangler gives up on a lambda passed on as a template argument
// (tests/test_cpu_levels.py reads the functions' names).
struct NoState {
  int operator()() const { return 0; }
};
template <typename F>
struct WithoutState {
  const F& f;
  auto operator()(int, int64_t b, int64_t begin, int64_t end) const { return f(b, begin, end); }
};

// Calls f(b, begin, end) on flat ranges of row b (rows of M elements), cut into
// chunks of `chunk`, in parallel. `cost` is an element's work in units of a copy.
// for_row_chunks_with: f(state, b, begin, end), state = make() made once per thread's range
// of chunks (a kernel's scratch memory, allocated once instead of once per chunk).
template <typename Make, typename F>
void for_row_chunks_with(int64_t B, int64_t M, int64_t chunk, int64_t cost, const Make& make, const F& f) {
  const int64_t nc = (M + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (std::max<int64_t>(1, std::min(chunk, M)) * cost));
  at::parallel_for(0, B * nc, grain, [&](int64_t t0, int64_t t1) {
    auto state = make();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nc, begin = b * M + (t % nc) * chunk;
      f(state, b, begin, std::min(b * M + M, begin + chunk));
    }
  });
}
template <typename F>
void for_row_chunks(int64_t B, int64_t M, int64_t chunk, int64_t cost, const F& f) {
  for_row_chunks_with(B, M, chunk, cost, NoState{}, WithoutState<F>{f});
}

// out[b] = sum over j in [0, M) of row b, where chunk(b, begin, end) returns the
// sum over [begin, end). Rows are cut into fixed chunks of `chunk` elements and
// the partial sums are added in chunk order, so the result does not depend on the
// number of threads. `cost` is the work of one element in units of a copy.
// row_sum_with: chunk_sum(state, b, begin, end), state as for for_row_chunks_with.
template <typename acc_t, typename out_t, typename Make, typename F>
void row_sum_with(int64_t B, int64_t M, int64_t chunk, int64_t cost, out_t* out, const Make& make,
                  const F& chunk_sum) {
  const int64_t nc = M == 0 ? 1 : (M + chunk - 1) / chunk;
  std::vector<acc_t> partial(B * nc);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (std::max<int64_t>(1, std::min(chunk, M)) * cost));
  at::parallel_for(0, B * nc, grain, [&](int64_t lo, int64_t hi) {
    auto state = make();
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / nc, c = t % nc;
      const int64_t begin = c * chunk, end = std::min(M, begin + chunk);
      partial[t] = begin < end ? chunk_sum(state, b, begin, end) : acc_t(0);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    acc_t s = 0;
    for (int64_t c = 0; c < nc; ++c) s += partial[b * nc + c];
    out[b] = static_cast<out_t>(s);
  }
}
template <typename acc_t, typename out_t, typename F>
void row_sum(int64_t B, int64_t M, int64_t chunk, int64_t cost, out_t* out, const F& chunk_sum) {
  row_sum_with<acc_t>(B, M, chunk, cost, out, NoState{}, WithoutState<F>{chunk_sum});
}

}  // namespace HVAE_FAST_CPU_LEVEL
}  // namespace cpu
}  // namespace hvae_fast
