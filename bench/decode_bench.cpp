#include "decode_bench.hpp"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "pflash/pflash.hpp"
#include "timing.hpp"

namespace pflash::bench {

double decode_bytes(const DecodeBenchConfig& c) {
  const double element = static_cast<double>(size_of(c.dtype));
  const double cache = 2.0 * static_cast<double>(c.batch * c.kv_heads * c.context * c.dim) * element;
  const double q_and_o = 2.0 * static_cast<double>(c.batch * c.heads * c.query_tokens * c.dim) * element;
  return cache + q_and_o;
}

DecodeBenchResult run_decode_config(const DecodeBenchConfig& config, const DecodeBenchOptions& options,
                                    const MachinePeak& peak) {
  DecodeBenchResult result;
  result.config = config;
  result.bytes = decode_bytes(config);

  const bool paged = config.page_size > 0;
  const std::int64_t pages_per_seq = paged ? (config.context + config.page_size - 1) / config.page_size : 0;
  const std::int64_t rows = paged ? pages_per_seq * config.page_size : config.context;
  const std::int64_t slots = paged ? config.batch * pages_per_seq : config.batch;
  const RandomBuffer k(config.dtype, slots, config.kv_heads, paged ? config.page_size : rows, config.dim, 2);
  const RandomBuffer v(config.dtype, slots, config.kv_heads, paged ? config.page_size : rows, config.dim, 3);
  const RandomBuffer q(config.dtype, config.batch, config.heads, config.query_tokens, config.dim, 1);
  RandomBuffer o(config.dtype, config.batch, config.heads, config.query_tokens, config.dim, 4);
  std::vector<float> lse(static_cast<std::size_t>(config.batch * config.heads * config.query_tokens));
  const std::vector<std::int32_t> seq_lens(static_cast<std::size_t>(config.batch),
                                           static_cast<std::int32_t>(config.context));
  std::vector<std::int32_t> block_table(static_cast<std::size_t>(slots));
  if (paged) {
    std::iota(block_table.begin(), block_table.end(), 0);
    std::shuffle(block_table.begin(), block_table.end(), std::mt19937_64(7));
  }

  DecodeParams params;
  params.q = q.view();
  params.cache.k = k.view();
  params.cache.v = v.view();
  params.cache.seq_lens = seq_lens;
  if (paged) params.cache.block_table = block_table;
  params.o = o.mutable_view();
  params.lse = MutableTensorView::contiguous(lse.data(), DType::kFloat32,
                                             {config.batch, config.heads, config.query_tokens});
  params.num_splits = config.splits;
  params.num_threads = options.threads;
  result.splits = decode_num_splits(params);

  const Timing timing = time_call([&] { flash_decode(params); }, options.warmup, options.repeats, options.max_seconds);
  result.median_s = timing.median_s;
  result.repeats = timing.repeats;
  result.extra_bytes = timing.extra_bytes;
  result.gbps = result.bytes / result.median_s / 1e9;
  result.fraction_of_peak_bw = result.bytes / result.median_s / peak.read_bw;
  result.tokens_per_s = static_cast<double>(config.batch * config.query_tokens) / result.median_s;
  return result;
}

}  // namespace pflash::bench
