// Included by setup.py's per-level translation units before the instruction-set
// pragma: everything a CPU kernel needs apart from the SIMD code. Inline functions
// compiled here keep the default target, so no AVX code can leak into a copy the
// linker might share with another level.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#include "../inputs.h"
#include "kernels.h"
