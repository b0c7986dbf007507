// `pflash bench --mode decode`: FlashDecoding rows, judged by the bytes they must read (the KV cache
// once, plus Q and O) against the machine's measured read bandwidth.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "machine_peak.hpp"
#include "pflash/dtype.hpp"

namespace pflash::bench {

struct DecodeBenchConfig {
  std::int64_t batch = 1, heads = 32, kv_heads = 8, dim = 128;
  std::int64_t context = 32768;    // positions in every sequence's cache
  std::int64_t page_size = 0;      // 0: contiguous cache
  std::int64_t query_tokens = 1;
  DType dtype = DType::kBFloat16;  // of the cache, q and o
  int splits = 0;                  // 0: automatic
};

struct DecodeBenchOptions {
  int threads = 1;
  int repeats = 20;
  int warmup = 2;
  double max_seconds = 2.0;
};

struct DecodeBenchResult {
  DecodeBenchConfig config;
  int splits = 0;  // the split count that ran (the automatic choice resolved)
  double median_s = 0.0;
  int repeats = 0;
  double bytes = 0.0;  // per call: K and V once, plus Q and O
  double gbps = 0.0;
  double fraction_of_peak_bw = 0.0;
  double tokens_per_s = 0.0;  // new tokens (B x T) per second
  std::uint64_t extra_bytes = 0;
};

double decode_bytes(const DecodeBenchConfig& config);

// The cache is filled with random values; a paged cache's pages are handed to sequences in a
// shuffled order, as a long-running server's free list would.
DecodeBenchResult run_decode_config(const DecodeBenchConfig& config, const DecodeBenchOptions& options,
                                    const MachinePeak& peak);

}  // namespace pflash::bench
