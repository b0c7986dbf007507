// merge_attention_states on the CPU: rows in parallel, each merged by merge_row.
#include <omp.h>

#include <cstdint>

#include "cpu/backend.hpp"
#include "core/merge_row.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {

template <class TIn, class TOut>
void merge_all(const detail::MergeParams& p) {
  const std::int64_t rows = p.n * p.heads;
#pragma omp parallel for schedule(static) num_threads(p.num_threads) if (rows * p.num_parts * p.dim > 32768)
  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t n = row / p.heads, h = row % p.heads;
    const TIn* parts = static_cast<const TIn*>(p.o_parts) + n * p.parts_strides.head + h * p.parts_strides.row;
    const float* lse_parts = p.lse_parts + n * p.lse_parts_strides.head + h * p.lse_parts_strides.row;
    TOut* o = static_cast<TOut*>(p.o) + n * p.o_n_stride + h * p.o_h_stride;
    float* lse = p.lse != nullptr ? p.lse + n * p.lse_n_stride + h * p.lse_h_stride : nullptr;
    detail::merge_row(p.num_parts, p.dim, parts, p.parts_strides.batch, lse_parts, p.lse_parts_strides.batch, o, lse);
  }
}

template <class TIn>
void merge_to(const detail::MergeParams& p) {
  if (p.o_dtype == DType::kBFloat16) {
    merge_all<TIn, bfloat16>(p);
  } else {
    merge_all<TIn, float>(p);
  }
}

}  // namespace

void merge_states(detail::MergeParams p) {
  if (p.parts_dtype == DType::kBFloat16) {
    merge_to<bfloat16>(p);
  } else {
    merge_to<float>(p);
  }
}

}  // namespace pflash::cpu
