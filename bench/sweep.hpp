// The benchmark suite behind `pflash bench`: one configuration per row, timed as the median of
// repeats after a warm-up, on random inputs, against the machine's measured peak.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "machine_peak.hpp"
#include "pflash/dtype.hpp"

namespace pflash::bench {

struct BenchConfig {
  std::string impl;  // "flash" or "naive"
  std::string pass;  // "fwd", "bwd" or "fwd+bwd" (flash only)
  std::int64_t batch = 1, heads = 1, kv_heads = 1, seq_q = 1, seq_k = 1, dim = 64;
  DType dtype = DType::kBFloat16;
  bool causal = false;
  std::int64_t window = -1;    // a left window (pflash::AttentionMask::window_left); -1: none
  std::int64_t segments = 1;   // packed documents of equal length per sequence (1: one)
  float soft_cap = 0.0f;       // logits_soft_cap; 0: none
  // Which CPU kernel sets run (flash rows): "measured", the library's default rule (the environment's
  // cap and rule), or an instruction set's name: the widest set under it, whatever it measures.
  std::string kernels = "measured";

  // The mask in a word or a few: "full", "causal", "causal w4096 seg8 cap50".
  std::string mask_name() const;
};

struct BenchOptions {
  int threads = 1;
  int repeats = 5;
  int warmup = 1;
  // Timed repeats stop early once they would exceed this many seconds (at least one always runs),
  // so a sweep over long sequences stays short; the median is over the repeats that ran.
  double max_seconds = 2.0;
  std::optional<std::uint64_t> memory_budget;  // naive only
  int block_q = 0;
  int block_k = 0;
};

struct BenchResult {
  BenchConfig config;
  std::string status;  // "ok" or "oom"
  double median_s = 0.0;
  int repeats = 0;  // timed calls behind the median
  double flops = 0.0;  // per call
  double tflops = 0.0;
  double fraction_of_peak = 0.0;
  double tokens_per_s = 0.0;  // query tokens per second
  std::uint64_t extra_bytes = 0;
  std::optional<std::uint64_t> bytes_needed;  // naive rows
  // The kernel sets the row's passes ran (pflash::cpu_kernel_choice): "avx512", or "avx512/avx512_bf16"
  // for a training step whose forward and backward differ; empty for naive rows.
  std::string kernel_sets;
};

// The (query, key) pairs the mask lets through, per batch entry and head (Nq * Nk when it masks nothing).
double visible_pairs(const BenchConfig& config);

// The forward: 4 * B * Hq * D * the visible pairs (what a kernel that skips masked work must do). The
// backward counts 2.5 times that (five matrix products against two, FlashAttention's convention),
// fwd+bwd 3.5 times.
double attention_flops(const BenchConfig& config);

BenchResult run_config(const BenchConfig& config, const BenchOptions& options, const MachinePeak& peak);

// Runs every configuration in order; progress(i, n, config) is called before each.
std::vector<BenchResult> run_sweep(const std::vector<BenchConfig>& configs, const BenchOptions& options,
                                   const MachinePeak& peak,
                                   const std::function<void(std::size_t, std::size_t, const BenchConfig&)>& progress);

}  // namespace pflash::bench
