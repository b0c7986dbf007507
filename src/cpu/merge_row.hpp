// One row of the exact merge of partial attention results (see pflash/merge.hpp):
//   LSE = m + log(sum_s exp(LSE_s - m)),  O = sum_s exp(LSE_s - LSE) O_s,  m = max_s LSE_s.
// Shared by merge_attention_states and the split-KV decode's own combine step. Plain C++: the
// merge reads S x D values per row against the S x (a whole range of keys) the partials cost, so it
// is never the bottleneck, and one definition serves every instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pflash::cpu {

template <class TIn, class TOut>
inline void merge_row(std::int64_t parts, std::int64_t dim, const TIn* o_parts, std::int64_t part_stride,
                      const float* lse_parts, std::int64_t lse_stride, TOut* o, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float max_lse = kNegInf;
  for (std::int64_t s = 0; s < parts; ++s) max_lse = std::max(max_lse, lse_parts[s * lse_stride]);
  if (max_lse == kNegInf) {  // no part saw a key
    for (std::int64_t d = 0; d < dim; ++d) o[d] = TOut(0.0f);
    if (lse != nullptr) *lse = kNegInf;
    return;
  }
  float weight_sum = 0.0f;
  for (std::int64_t s = 0; s < parts; ++s) weight_sum += std::exp(lse_parts[s * lse_stride] - max_lse);
  const float inv_sum = 1.0f / weight_sum;

  // Columns in chunks so the accumulator lives on the stack whatever D is.
  constexpr std::int64_t kChunk = 64;
  float acc[kChunk];
  for (std::int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    const std::int64_t n = std::min(kChunk, dim - d0);
    std::fill(acc, acc + n, 0.0f);
    for (std::int64_t s = 0; s < parts; ++s) {
      const float weight = std::exp(lse_parts[s * lse_stride] - max_lse) * inv_sum;
      if (weight == 0.0f) continue;  // LSE_s = -inf: its O_s is never read (it may be anything)
      const TIn* row = o_parts + s * part_stride + d0;
      for (std::int64_t i = 0; i < n; ++i) acc[i] += weight * static_cast<float>(row[i]);
    }
    for (std::int64_t i = 0; i < n; ++i) o[d0 + i] = TOut(acc[i]);
  }
  if (lse != nullptr) *lse = max_lse + std::log(weight_sum);
}

}  // namespace pflash::cpu
