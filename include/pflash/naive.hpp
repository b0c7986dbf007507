// The baseline a framework without a fused kernel runs: materialise the fp32 scores
// [B, Hq, Nq, Nk], scale and mask them, softmax, then multiply by V (matrix products by BLAS).
// It exists to be measured against: its memory grows as Nq * Nk, and with a budget it reports
// where a device of that size runs out of memory.
#pragma once

#include <cstdint>
#include <optional>

#include "pflash/attention.hpp"

namespace pflash {

struct NaiveOptions {
  // Bytes the call may allocate; nullopt: unlimited. Checked before anything is allocated.
  std::optional<std::uint64_t> memory_budget;
};

// Bytes naive_attention allocates for these arguments (the scores plus fp32 copies of bf16 inputs).
std::uint64_t naive_attention_bytes(const AttentionParams& params);

// Same contract as flash_attention_forward (block sizes are ignored). Throws OutOfMemoryError,
// whose message and bytes_needed() give the bytes required, when they exceed the budget.
void naive_attention(const AttentionParams& params, NaiveOptions options = {});

}  // namespace pflash
