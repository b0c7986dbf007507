#include "support/merge.hpp"

namespace pflash::testing {

Merged merge_parts(const HostTensor& o_parts, const HostTensor& lse_parts, DType o_dtype) {
  const auto& s = o_parts.shape();
  Merged m{HostTensor(o_dtype, {s[1], s[2], s[3]}), HostTensor(DType::kFloat32, {s[1], s[2]})};
  m.o.poison();
  m.lse.poison();
  MergeParams params;
  params.o_partials = o_parts.view();
  params.lse_partials = lse_parts.view();
  params.o = m.o.mutable_view();
  params.lse = m.lse.mutable_view();
  merge_attention_states(params);
  return m;
}

}  // namespace pflash::testing
