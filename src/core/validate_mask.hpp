// The checks of the mask and the score options (pflash/mask.hpp, logits_soft_cap, sinks) that the
// forward, the backward and the decode share.
#pragma once

#include <cstdint>

#include "core/checker.hpp"
#include "core/mask.hpp"
#include "pflash/mask.hpp"
#include "pflash/tensor.hpp"

namespace pflash::detail {

// The geometry of a window and chunk (query_offset: the position of query row 0).
MaskGeometry check_geometry(const Checker& check, bool causal, std::int64_t window_left, std::int64_t window_right,
                            std::int64_t chunk_size, std::int64_t query_offset);

// The whole mask of an attention call over B sequences of Nq queries and Nk keys.
MaskParams check_mask(const Checker& check, const AttentionMask& mask, std::int64_t batch, std::int64_t seq_q,
                      std::int64_t seq_k);

// A soft cap >= 0 and finite (0: none).
float check_soft_cap(const Checker& check, float logits_soft_cap);

// Optional sinks [Hq] fp32; null when empty.
const float* check_sinks(const Checker& check, const TensorView& sinks, std::int64_t heads_q);

}  // namespace pflash::detail
