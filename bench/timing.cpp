#include "timing.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>

#include "pflash/runtime.hpp"

namespace pflash::bench {

using Clock = std::chrono::steady_clock;

RandomBuffer::RandomBuffer(DType dtype, std::int64_t d0, std::int64_t d1, std::int64_t d2, std::int64_t d3,
                           std::uint64_t seed)
    : dtype_(dtype), shape_{d0, d1, d2, d3}, bytes_(static_cast<std::size_t>(d0 * d1 * d2 * d3) * size_of(dtype)) {
  const std::int64_t count = d0 * d1 * d2 * d3;
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

TensorView RandomBuffer::view() const {
  return TensorView::contiguous(bytes_.data(), dtype_, {shape_[0], shape_[1], shape_[2], shape_[3]});
}

MutableTensorView RandomBuffer::mutable_view() {
  return MutableTensorView::contiguous(bytes_.data(), dtype_, {shape_[0], shape_[1], shape_[2], shape_[3]});
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

Timing time_call(const std::function<void()>& call, int warmup, int repeats, double max_seconds) {
  Timing timing;
  const std::uint64_t before = memory_stats().current_bytes;
  reset_peak_memory_stats();
  const int warmup_calls = std::max(warmup, 1);
  const auto warmup_start = Clock::now();
  for (int i = 0; i < warmup_calls; ++i) call();
  timing.extra_bytes = memory_stats().peak_bytes - before;
  const double call_s = std::chrono::duration<double>(Clock::now() - warmup_start).count() / warmup_calls;
  timing.repeats = std::clamp(static_cast<int>(max_seconds / call_s), 1, std::max(repeats, 1));

  std::vector<double> seconds;
  for (int i = 0; i < timing.repeats; ++i) {
    const auto start = Clock::now();
    call();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  timing.median_s = median(seconds);
  return timing;
}

}  // namespace pflash::bench
