// The attention shape grid the forward and backward tests share: ragged and degenerate lengths,
// every head_dim class, GQA ratios, both maskings, both dtypes and three memory layouts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "support/tensors.hpp"

namespace pflash::testing {

struct Shape {
  std::int64_t batch, heads_q, heads_kv, seq_q, seq_k, dim;
};

struct Case {
  Shape shape;
  bool causal;
  DType dtype;
  Layout layout = Layout::kBhnd;
};

std::string case_name(const Case& c, CpuIsa isa);
std::vector<Case> attention_cases();

}  // namespace pflash::testing
