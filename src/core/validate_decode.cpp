// Argument checks of the decoding entry points: flash_decode, append_kv, merge_attention_states.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/checker.hpp"
#include "core/validate_mask.hpp"
#include "core/params.hpp"
#include "core/validate_decode.hpp"
#include "pflash/error.hpp"
#include "pflash/runtime.hpp"

namespace pflash::detail {
namespace {

// How a message names page i of sequence b's row of the block table.
std::string table_entry(std::int64_t b, std::int64_t pages_per_seq, std::int64_t i) {
  return "block_table[" + std::to_string(b) + " * " + std::to_string(pages_per_seq) + " + " + std::to_string(i) + "]";
}

// The cache's views, lengths and block table; extra_tokens positions are about to be appended to
// every sequence (append_kv) and must fit too.
CacheParams check_cache(const Checker& check, const KVCacheView& cache, std::int64_t extra_tokens) {
  const bool paged = cache.paged();
  const char* layout = paged ? "[num_pages, Hkv, page_size, D] (paged)" : "[B, Hkv, capacity, D] (contiguous)";
  check.tensor("cache.k", cache.k, 4, layout);
  check.tensor("cache.v", cache.v, 4, layout);
  check.dtype_matches("cache.v", cache.v, cache.k.dtype, "k and v of a cache share one dtype");
  check.shape_is("cache.v", cache.v, {cache.k.size(0), cache.k.size(1), cache.k.size(2), cache.k.size(3)},
                 "(the shape of cache.k)");
  const std::int64_t batch = cache.batch();
  if (batch < 1) check.fail("cache.seq_lens", "one length per sequence (B >= 1)", "an empty span");

  CacheParams c;
  c.k = cache.k.data;
  c.v = cache.v.data;
  c.dtype = cache.k.dtype;
  c.k_strides = head_strides(cache.k);
  c.v_strides = head_strides(cache.v);
  c.seq_lens = cache.seq_lens.data();
  if (paged) {
    const std::int64_t page_size = cache.k.size(2);
    if (!std::has_single_bit(static_cast<std::uint64_t>(page_size)) || page_size < kMinPageSize ||
        page_size > kMaxPageSize) {
      check.fail("cache.k", "a page size (dimension 2) that is a power of two from " + std::to_string(kMinPageSize) +
                                " to " + std::to_string(kMaxPageSize),
                 std::to_string(page_size));
    }
    if (static_cast<std::int64_t>(cache.block_table.size()) % batch != 0) {
      check.fail("cache.block_table", "B * pages_per_seq entries for B = " + std::to_string(batch) + " sequences",
                 std::to_string(cache.block_table.size()) + " entries");
    }
    c.block_table = cache.block_table.data();
    c.pages_per_seq = cache.pages_per_seq();
    c.page_size = page_size;
    c.capacity = c.pages_per_seq * page_size;
  } else {
    if (cache.k.size(0) != batch) {
      check.fail("cache.k", "batch (dimension 0) equal to the number of sequence lengths, " + std::to_string(batch),
                 shape_string(cache.k));
    }
    c.capacity = cache.k.size(2);
  }

  const std::int64_t num_pages = cache.k.size(0);
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t length = cache.seq_lens[static_cast<std::size_t>(b)];
    if (length < 0 || length + extra_tokens > c.capacity) {
      const std::string room = extra_tokens > 0 ? " - " + std::to_string(extra_tokens) + " appended" : "";
      check.fail("cache.seq_lens",
                 "lengths from 0 to the capacity " + std::to_string(c.capacity) + room +
                     (paged ? " (pages_per_seq * page_size)" : " (dimension 2 of cache.k)"),
                 "seq_lens[" + std::to_string(b) + "] = " + std::to_string(length));
    }
    if (!paged) continue;
    const std::int64_t pages_used = (length + extra_tokens + c.page_size - 1) / c.page_size;
    for (std::int64_t i = 0; i < pages_used; ++i) {
      const std::int64_t page = c.block_table[b * c.pages_per_seq + i];
      if (page < 0 || page >= num_pages) {
        check.fail("cache.block_table",
                   "page ids in [0, " + std::to_string(num_pages) + ") for every page a sequence uses",
                   table_entry(b, c.pages_per_seq, i) + " = " + std::to_string(page));
      }
    }
  }
  return c;
}

void check_common(const Checker& check, std::optional<float> softmax_scale, int num_threads) {
  if (softmax_scale && !std::isfinite(*softmax_scale)) {
    check.fail("softmax_scale", "a finite number", std::to_string(*softmax_scale));
  }
  if (num_threads < 0) check.fail("num_threads", "0 (all) or a positive count", std::to_string(num_threads));
}

}  // namespace

void check_decode_outputs(const Checker& check, const TensorView& q, const TensorView& o, const TensorView& lse,
                          std::initializer_list<std::pair<const char*, TensorView>> inputs) {
  const std::int64_t batch = q.size(0), heads_q = q.size(1), tokens = q.size(2), dim = q.size(3);
  const DType o_dtype = o.dtype == DType::kFloat32 ? DType::kFloat32 : q.dtype;
  check.output("o", o, o_dtype, "o has q's dtype or fp32", {batch, heads_q, tokens, dim}, "[B, Hq, T, D]",
               "(the shape of q)", inputs);
  if (lse.empty()) return;
  check.output("lse", lse, DType::kFloat32, "an LSE is fp32", {batch, heads_q, tokens}, "[B, Hq, T]",
               "(the first three dimensions of q)", inputs);
  if (overlaps(lse, o)) check.fail("lse", "memory disjoint from 'o'", "an overlap");
}

DecodeParams make_decode_params(const pflash::DecodeParams& params, const char* function_name) {
  const Checker check(function_name);
  constexpr const char* kQLayout = "[B, Hq, T, D]";
  check.tensor("q", params.q, 4, kQLayout);
  const CacheParams cache = check_cache(check, params.cache, 0);

  const std::int64_t batch = params.q.size(0), heads_q = params.q.size(1), tokens = params.q.size(2),
                     dim = params.q.size(3);
  const std::int64_t heads_kv = params.cache.k.size(1);
  if (batch != params.cache.batch()) {
    check.fail("q", "batch (dimension 0) equal to the cache's " + std::to_string(params.cache.batch()) + " sequences",
               shape_string(params.q));
  }
  if (tokens > kMaxDecodeQueryTokens) {
    check.fail("q", "1 to " + std::to_string(kMaxDecodeQueryTokens) + " query tokens T (dimension 2)",
               "T = " + std::to_string(tokens));
  }
  if (dim > kMaxHeadDim) check.fail("q", "head_dim D <= " + std::to_string(kMaxHeadDim), "D = " + std::to_string(dim));
  if (params.cache.k.size(3) != dim) {
    check.fail("cache.k", "head_dim (dimension 3) equal to q's D = " + std::to_string(dim), shape_string(params.cache.k));
  }
  if (heads_q % heads_kv != 0) {
    check.fail("cache.k", "a head count Hkv (dimension 1) dividing Hq = " + std::to_string(heads_q) + " (GQA/MQA)",
               "Hkv = " + std::to_string(heads_kv));
  }
  // Every input the call reads, the lengths and page ids included: an output over them would change
  // what later rows read (or where they read it).
  check_decode_outputs(check, params.q, params.o, params.lse,
                       {{"q", params.q}, {"cache.k", params.cache.k}, {"cache.v", params.cache.v},
                        {"cache.seq_lens", index_view(params.cache.seq_lens)},
                        {"cache.block_table", index_view(params.cache.block_table)},
                        {"positions_after", index_view(params.positions_after)}});
  const bool has_lse = !params.lse.empty();
  if (!params.positions_after.empty()) {
    if (static_cast<std::int64_t>(params.positions_after.size()) != batch) {
      check.fail("positions_after", "empty or one count per sequence (" + std::to_string(batch) + ")",
                 std::to_string(params.positions_after.size()) + " entries");
    }
    for (std::size_t b = 0; b < params.positions_after.size(); ++b) {
      if (params.positions_after[b] < 0) {
        check.fail("positions_after", "counts >= 0",
                   "positions_after[" + std::to_string(b) + "] = " + std::to_string(params.positions_after[b]));
      }
    }
  }
  check_common(check, params.softmax_scale, params.num_threads);
  const bool shard = std::any_of(params.positions_after.begin(), params.positions_after.end(),
                                 [](std::int32_t after) { return after != 0; });
  if (params.chunk_size != 0 && shard) {
    check.fail("chunk_size", "0 when positions_after holds positions (a shard's rows are not the sequence's positions)",
               std::to_string(params.chunk_size));
  }
  const MaskGeometry geometry = check_geometry(check, /*causal=*/true, params.window_left, kUnboundedWindow,
                                               params.chunk_size, 0);
  const float soft_cap = check_soft_cap(check, params.logits_soft_cap);
  const float* sinks = check_sinks(check, params.sinks, heads_q);
  if (params.num_splits < 0 || params.num_splits > kMaxDecodeSplits) {
    check.fail("num_splits", "0 (automatic) or 1.." + std::to_string(kMaxDecodeSplits), std::to_string(params.num_splits));
  }

  DecodeParams p;
  p.q = params.q.data;
  p.o = params.o.data;
  p.lse = has_lse ? static_cast<float*>(params.lse.data) : nullptr;
  p.dtype = params.q.dtype;
  p.o_dtype = params.o.dtype;
  p.positions_after = params.positions_after.empty() ? nullptr : params.positions_after.data();
  p.q_strides = head_strides(params.q);
  p.o_strides = head_strides(params.o);
  if (has_lse) p.lse_strides = head_strides(params.lse);
  p.cache = cache;
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.query_tokens = tokens;
  p.dim = dim;
  for (std::int32_t length : params.cache.seq_lens) p.max_seq_len = std::max<std::int64_t>(p.max_seq_len, length);
  p.scale = params.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(dim)));
  p.geometry = geometry;
  p.soft_cap = soft_cap;
  p.sinks = sinks;
  p.num_splits = params.num_splits;  // 0: the backend chooses
  p.num_threads = resolve_num_threads(params.num_threads);
  return p;
}

AppendParams make_append_params(const MutableKVCache& cache, TensorView k_new, TensorView v_new,
                                const char* function_name) {
  const Checker check(function_name);
  constexpr const char* kNewLayout = "[B, Hkv, T, D]";
  check.tensor("k_new", k_new, 4, kNewLayout);
  check.tensor("v_new", v_new, 4, kNewLayout);
  // The cache's own layout first, so a wrong cache is reported as such.
  const KVCacheView view = cache;
  check.tensor("cache.k", view.k, 4, cache.paged() ? "[num_pages, Hkv, page_size, D] (paged)" : "[B, Hkv, capacity, D] (contiguous)");
  const std::int64_t tokens = k_new.size(2);
  check.shape_is("k_new", k_new, {cache.batch(), view.k.size(1), tokens, view.k.size(3)},
                 "(B sequences, the cache's Hkv and D)");
  check.shape_is("v_new", v_new, {k_new.size(0), k_new.size(1), k_new.size(2), k_new.size(3)}, "(the shape of k_new)");
  check.dtype_matches("k_new", k_new, view.k.dtype, "the cache's dtype");
  check.dtype_matches("v_new", v_new, view.k.dtype, "the cache's dtype");
  const CacheParams c = check_cache(check, view, tokens);
  check.non_self_overlapping("cache.k", view.k);
  check.non_self_overlapping("cache.v", view.v);
  if (overlaps(view.k, view.v)) check.fail("cache.v", "memory disjoint from cache.k", "an overlap");
  // The rows written (cache.k, cache.v) and the lengths advanced (cache.seq_lens) against everything
  // read: the new rows, the lengths and the block table that place them.
  const TensorView lengths = index_view(cache.seq_lens), table = index_view(cache.block_table);
  for (const auto& [name, input] : std::array<std::pair<const char*, TensorView>, 4>{
           {{"k_new", k_new}, {"v_new", v_new}, {"cache.seq_lens", lengths}, {"cache.block_table", table}}}) {
    if (!input.empty() && (overlaps(view.k, input) || overlaps(view.v, input))) {
      check.fail(name, "memory disjoint from the cache rows it places", "an overlap");
    }
  }
  for (const auto& [name, input] : std::array<std::pair<const char*, TensorView>, 3>{
           {{"k_new", k_new}, {"v_new", v_new}, {"cache.block_table", table}}}) {
    if (!input.empty() && overlaps(lengths, input)) {
      check.fail("cache.seq_lens", std::string("memory disjoint from '") + name + "' (the lengths are written)",
                 "an overlap");
    }
  }
  if (c.paged()) {
    // A page appended to must appear once among the pages the table uses: a second use (by another
    // sequence, or by the same sequence at another position) would have its rows overwritten.
    struct Use {
      std::int64_t page, sequence, slot;
      bool written;
    };
    std::vector<Use> uses;
    for (std::int64_t b = 0; b < cache.batch(); ++b) {
      const std::int64_t first_written = c.seq_lens[b] / c.page_size;
      const std::int64_t used = (c.seq_lens[b] + tokens + c.page_size - 1) / c.page_size;
      for (std::int64_t i = 0; i < used; ++i) {
        uses.push_back({c.block_table[b * c.pages_per_seq + i], b, i, i >= first_written});
      }
    }
    std::stable_sort(uses.begin(), uses.end(), [](const Use& x, const Use& y) { return x.page < y.page; });
    for (std::size_t i = 0, end = 0; i < uses.size(); i = end) {
      bool written = false;
      for (end = i; end < uses.size() && uses[end].page == uses[i].page; ++end) written |= uses[end].written;
      if (!written || end - i == 1) continue;
      auto slot = [&](const Use& u) { return table_entry(u.sequence, c.pages_per_seq, u.slot); };
      check.fail("cache.block_table", "every page a sequence appends to used once in the table (no other position "
                 "of it or of another sequence on that page)",
                 "page " + std::to_string(uses[i].page) + " at " + slot(uses[i]) + " and " + slot(uses[i + 1]));
    }
  }
  AppendParams p;
  p.cache = c;
  p.k = cache.k.data;
  p.v = cache.v.data;
  p.seq_lens = cache.seq_lens.data();
  p.k_new = k_new.data;
  p.v_new = v_new.data;
  p.k_new_strides = head_strides(k_new);
  p.v_new_strides = head_strides(v_new);
  p.batch = k_new.size(0);
  p.heads_kv = k_new.size(1);
  p.tokens = tokens;
  p.dim = k_new.size(3);
  return p;
}

MergeParams make_merge_params(const pflash::MergeParams& params, const char* function_name) {
  const Checker check(function_name);
  check.tensor("o_partials", params.o_partials, 4, "[S, N, H, D]");
  const std::int64_t parts = params.o_partials.size(0), n = params.o_partials.size(1),
                     heads = params.o_partials.size(2), dim = params.o_partials.size(3);
  check.shaped_like("lse_partials", params.lse_partials, DType::kFloat32, "an LSE is fp32", {parts, n, heads},
                    "[S, N, H]", "(the first three dimensions of o_partials)");
  const std::initializer_list<std::pair<const char*, TensorView>> inputs = {{"o_partials", params.o_partials},
                                                                            {"lse_partials", params.lse_partials}};
  // o's dtype is free: the merge writes fp32 or bf16 from either.
  check.output("o", params.o, std::nullopt, "", {n, heads, dim}, "[N, H, D]", "(o_partials without its first dimension)",
               inputs);
  const bool has_lse = !params.lse.empty();
  if (has_lse) {
    check.output("lse", params.lse, DType::kFloat32, "an LSE is fp32", {n, heads}, "[N, H]",
                 "(the dimensions N, H of o_partials)", inputs);
    if (overlaps(params.lse, params.o)) check.fail("lse", "memory disjoint from 'o'", "an overlap");
  }
  check_common(check, std::nullopt, params.num_threads);

  MergeParams p;
  p.o_parts = params.o_partials.data;
  p.parts_dtype = params.o_partials.dtype;
  p.lse_parts = static_cast<const float*>(params.lse_partials.data);
  p.o = params.o.data;
  p.o_dtype = params.o.dtype;
  p.lse = has_lse ? static_cast<float*>(params.lse.data) : nullptr;
  p.num_parts = parts;
  p.n = n;
  p.heads = heads;
  p.dim = dim;
  p.parts_strides = head_strides(params.o_partials);
  p.lse_parts_strides = head_strides(params.lse_partials);
  p.o_n_stride = params.o.stride(0);
  p.o_h_stride = params.o.stride(1);
  if (has_lse) {
    p.lse_n_stride = params.lse.stride(0);
    p.lse_h_stride = params.lse.stride(1);
  }
  p.num_threads = resolve_num_threads(params.num_threads);
  return p;
}

}  // namespace pflash::detail
