// Public entry points of decoding: validate once, resolve the automatic choices, hand to the backend.
#include "core/params.hpp"
#include "cpu/backend.hpp"
#include "pflash/decode.hpp"
#include "pflash/kv_cache.hpp"
#include "pflash/merge.hpp"

namespace pflash {
namespace {

detail::DecodeParams resolved(const DecodeParams& params, const char* function_name) {
  detail::DecodeParams p = detail::make_decode_params(params, function_name);
  if (p.num_splits == 0) p.num_splits = cpu::choose_decode_splits(p);
  return p;
}

}  // namespace

void flash_decode(const DecodeParams& params) { cpu::flash_decode(resolved(params, "flash_decode")); }

int decode_num_splits(const DecodeParams& params) { return resolved(params, "decode_num_splits").num_splits; }

void append_kv(const MutableKVCache& cache, TensorView k_new, TensorView v_new) {
  cpu::append_kv(detail::make_append_params(cache, k_new, v_new, "append_kv"));
}

void merge_attention_states(const MergeParams& params) {
  cpu::merge_states(detail::make_merge_params(params, "merge_attention_states"));
}

}  // namespace pflash
