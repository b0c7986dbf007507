// The mask grid the CPU kernels are checked on (every rule and score option of pflash/mask.hpp) and
// the check itself: a forward and a backward, run by whatever kernels a test names, against the
// float64 reference given each rule's own definition.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "pflash/pflash.hpp"

namespace pflash::testing {

struct MaskCase {
  std::string name;
  std::int64_t batch, heads_q, heads_kv, seq_q, seq_k, dim;
  AttentionMask mask;  // the geometry; segment ids and lengths from the fields below
  int segments = 0;    // 0: none, 1: packed documents (contiguous runs), 2: random ids in 0..2
  bool lengths = false;
  float soft_cap = 0.0f;
  bool sinks = false;
  double input_stddev = 1.0;
};

AttentionMask geometry(bool causal, std::int64_t left, std::int64_t right, std::int64_t chunk = 0,
                       std::optional<std::int64_t> offset = std::nullopt);

std::vector<MaskCase> mask_cases();

// How a check runs the kernels under test: pflash's API (public_kernels()), or kernels of the tests' own.
struct KernelRunner {
  std::function<void(const AttentionParams&)> forward;
  std::function<void(const AttentionBackwardParams&)> backward;
};
KernelRunner public_kernels();

// Runs case c in dtype through `kernels` (forward, then backward from its O and LSE) and compares O,
// LSE, dq, dk, dv and dsinks with the float64 reference (gtest expectations).
void expect_mask_case_matches_reference(const MaskCase& c, DType dtype, const KernelRunner& kernels);

}  // namespace pflash::testing
