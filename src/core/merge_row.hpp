// One row of the exact merge of partial attention results (see pflash/merge.hpp):
//   LSE = m + log(sum_s exp(LSE_s - m)),  O = sum_s exp(LSE_s - LSE) O_s,  m = max_s LSE_s.
// Shared by merge_attention_states, the split-KV decode's own combine step, and the combines of a
// sharded decode (the MPI reduction operator, and the CUDA merge after an NCCL all-gather, hence
// host-and-device). Plain C++: the merge reads S x D values per row against the S x (a whole range
// of keys) the partials cost, so it is never the bottleneck, and one definition serves every
// instruction set.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PFLASH_HOST_DEVICE __host__ __device__
#else
#define PFLASH_HOST_DEVICE
#endif

namespace pflash::detail {

template <class TIn, class TOut>
PFLASH_HOST_DEVICE inline void merge_row(std::int64_t parts, std::int64_t dim, const TIn* o_parts,
                                         std::int64_t part_stride, const float* lse_parts, std::int64_t lse_stride,
                                         TOut* o, float* lse) {
  const float neg_inf = -HUGE_VALF;
  float max_lse = neg_inf;
  bool saw_nan = false;  // fmaxf drops a NaN: a part that saw one makes the merged row NaN
  for (std::int64_t s = 0; s < parts; ++s) {
    const float part_lse = lse_parts[s * lse_stride];
    saw_nan |= part_lse != part_lse;
    max_lse = fmaxf(max_lse, part_lse);
  }
  if (saw_nan) {
    const float nan = neg_inf - neg_inf;
    for (std::int64_t d = 0; d < dim; ++d) o[d] = TOut(nan);
    if (lse != nullptr) *lse = nan;
    return;
  }
  if (max_lse == neg_inf) {  // no part saw a key
    for (std::int64_t d = 0; d < dim; ++d) o[d] = TOut(0.0f);
    if (lse != nullptr) *lse = neg_inf;
    return;
  }
  float weight_sum = 0.0f;
  for (std::int64_t s = 0; s < parts; ++s) weight_sum += expf(lse_parts[s * lse_stride] - max_lse);
  const float inv_sum = 1.0f / weight_sum;

  // Columns in chunks so the accumulator lives on the stack (or in registers) whatever D is.
  constexpr std::int64_t kChunk = 64;
  float acc[kChunk];
  for (std::int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    const std::int64_t n = dim - d0 < kChunk ? dim - d0 : kChunk;
    for (std::int64_t i = 0; i < n; ++i) acc[i] = 0.0f;
    for (std::int64_t s = 0; s < parts; ++s) {
      const float weight = expf(lse_parts[s * lse_stride] - max_lse) * inv_sum;
      if (weight == 0.0f) continue;  // LSE_s = -inf: its O_s is never read (it may be anything)
      const TIn* row = o_parts + s * part_stride + d0;
      for (std::int64_t i = 0; i < n; ++i) acc[i] += weight * static_cast<float>(row[i]);
    }
    for (std::int64_t i = 0; i < n; ++i) o[d0 + i] = TOut(acc[i]);
  }
  if (lse != nullptr) *lse = max_lse + logf(weight_sum);
}

}  // namespace pflash::detail
