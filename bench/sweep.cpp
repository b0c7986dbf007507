#include "sweep.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "pflash/pflash.hpp"

namespace pflash::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Owned [B, H, N, D] storage filled with uniform values in [-1, 1) (never zeros: timing on zeros
// flatters nothing here, but it would hide denormal or NaN slow paths).
class Buffer {
 public:
  Buffer(DType dtype, std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t d, std::uint64_t seed)
      : dtype_(dtype), shape_{b, h, n, d}, bytes_(static_cast<std::size_t>(b * h * n * d) * size_of(dtype)) {
    const std::int64_t count = b * h * n * d;
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < count; ++i) {
      std::uint64_t x = (static_cast<std::uint64_t>(i) + 1) * 0x9e3779b97f4a7c15ull ^ seed;
      x ^= x >> 31;
      x *= 0xbf58476d1ce4e5b9ull;
      x ^= x >> 29;
      const float value = static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f;
      if (dtype == DType::kFloat32) {
        reinterpret_cast<float*>(bytes_.data())[i] = value;
      } else {
        reinterpret_cast<bfloat16*>(bytes_.data())[i] = bfloat16(value);
      }
    }
  }
  TensorView view() const {
    return TensorView::contiguous(bytes_.data(), dtype_, {shape_[0], shape_[1], shape_[2], shape_[3]});
  }
  MutableTensorView mutable_view() {
    return MutableTensorView::contiguous(bytes_.data(), dtype_, {shape_[0], shape_[1], shape_[2], shape_[3]});
  }

 private:
  DType dtype_;
  std::int64_t shape_[4];
  std::vector<unsigned char> bytes_;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace

double attention_flops(const BenchConfig& c) {
  const double full = 4.0 * static_cast<double>(c.batch * c.heads) * static_cast<double>(c.seq_q) *
                      static_cast<double>(c.seq_k) * static_cast<double>(c.dim);
  return c.causal && c.seq_q == c.seq_k ? full / 2.0 : full;
}

BenchResult run_config(const BenchConfig& config, const BenchOptions& options, const MachinePeak& peak) {
  BenchResult result;
  result.config = config;
  result.flops = attention_flops(config);

  const Buffer q(config.dtype, config.batch, config.heads, config.seq_q, config.dim, 1);
  const Buffer k(config.dtype, config.batch, config.kv_heads, config.seq_k, config.dim, 2);
  const Buffer v(config.dtype, config.batch, config.kv_heads, config.seq_k, config.dim, 3);
  Buffer o(config.dtype, config.batch, config.heads, config.seq_q, config.dim, 4);
  std::vector<float> lse(static_cast<std::size_t>(config.batch * config.heads * config.seq_q));

  AttentionParams params;
  params.q = q.view();
  params.k = k.view();
  params.v = v.view();
  params.o = o.mutable_view();
  params.lse = MutableTensorView::contiguous(lse.data(), DType::kFloat32, {config.batch, config.heads, config.seq_q});
  params.causal = config.causal;
  params.num_threads = options.threads;
  params.block_q = options.block_q;
  params.block_k = options.block_k;

  const bool naive = config.impl == "naive";
  if (naive) result.bytes_needed = naive_attention_bytes(params);
  const auto call = [&] {
    if (naive) {
      naive_attention(params, {.memory_budget = options.memory_budget});
    } else {
      flash_attention_forward(params);
    }
  };

  // The warm-up call also measures the memory the call allocates.
  const std::uint64_t before = memory_stats().current_bytes;
  reset_peak_memory_stats();
  const auto warmup_start = Clock::now();
  try {
    for (int i = 0; i < std::max(options.warmup, 1); ++i) call();
  } catch (const OutOfMemoryError& e) {
    result.status = "oom";
    result.bytes_needed = e.bytes_needed();
    return result;
  }
  result.extra_bytes = memory_stats().peak_bytes - before;
  const double call_s = std::chrono::duration<double>(Clock::now() - warmup_start).count() / std::max(options.warmup, 1);
  const int repeats = std::clamp(static_cast<int>(options.max_seconds / call_s), 1, std::max(options.repeats, 1));

  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const auto start = Clock::now();
    call();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  result.status = "ok";
  result.median_s = median(seconds);
  result.repeats = repeats;
  result.tflops = result.flops / result.median_s / 1e12;
  const double ceiling = config.dtype == DType::kBFloat16 ? peak.peak_flops_bf16 : peak.peak_flops_fp32;
  result.fraction_of_peak = result.flops / result.median_s / ceiling;
  result.tokens_per_s = static_cast<double>(config.batch * config.seq_q) / result.median_s;
  return result;
}

std::vector<BenchResult> run_sweep(const std::vector<BenchConfig>& configs, const BenchOptions& options,
                                   const MachinePeak& peak,
                                   const std::function<void(std::size_t, std::size_t, const BenchConfig&)>& progress) {
  std::vector<BenchResult> results;
  for (std::size_t i = 0; i < configs.size(); ++i) {
    if (progress) progress(i, configs.size(), configs[i]);
    results.push_back(run_config(configs[i], options, peak));
  }
  return results;
}

}  // namespace pflash::bench
