// merge_attention_states into fresh tensors, for tests that check a merge (or a combine built on it).
#pragma once

#include "support/tensors.hpp"

namespace pflash::testing {

struct Merged {
  HostTensor o;    // [N, H, D]
  HostTensor lse;  // [N, H]
};

// The merge of o_parts [S, N, H, D] and lse_parts [S, N, H], written into NaN-poisoned outputs.
Merged merge_parts(const HostTensor& o_parts, const HostTensor& lse_parts, DType o_dtype = DType::kFloat32);

}  // namespace pflash::testing
