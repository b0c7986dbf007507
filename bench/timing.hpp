// What every benchmark row shares: random inputs that are never zeros, and timing as the median of
// repeats after a warm-up that also measures the memory a call allocates.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "pflash/dtype.hpp"
#include "pflash/tensor.hpp"

namespace pflash::bench {

// Owned [d0, d1, d2, d3] storage filled with uniform values in [-1, 1) from a seeded hash, in
// parallel (timing on zeros would hide denormal or NaN slow paths).
class RandomBuffer {
 public:
  RandomBuffer(DType dtype, std::int64_t d0, std::int64_t d1, std::int64_t d2, std::int64_t d3, std::uint64_t seed);
  TensorView view() const;
  MutableTensorView mutable_view();
  std::uint64_t bytes() const { return bytes_.size(); }

 private:
  DType dtype_;
  std::int64_t shape_[4];
  std::vector<unsigned char> bytes_;
};

struct Timing {
  double median_s = 0.0;
  int repeats = 0;                // timed calls behind the median
  std::uint64_t extra_bytes = 0;  // peak library allocation during the warm-up
};

// Runs max(warmup, 1) untimed calls, then up to `repeats` timed ones, fewer once they would pass
// max_seconds (at least one). Exceptions from the warm-up propagate.
Timing time_call(const std::function<void()>& call, int warmup, int repeats, double max_seconds);

double median(std::vector<double> values);

}  // namespace pflash::bench
