// Host tensors for tests: owned storage in fp32 or bf16, [B, H, N, D] views over a chosen memory
// layout, seeded random fills, NaN poisoning, and element access as double.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "pflash/pflash.hpp"

namespace pflash::testing {

// Memory order of a [B, H, N, D] tensor. kBhnd is the default; kBnhd is the [B, N, H, D] layout many
// frameworks store; kPaddedRows leaves a gap after every row of head_dim.
enum class Layout { kBhnd, kBnhd, kPaddedRows };

class HostTensor {
 public:
  HostTensor(DType dtype, std::vector<std::int64_t> shape, Layout layout = Layout::kBhnd);

  TensorView view() const;
  MutableTensorView mutable_view();

  double at(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3 = 0) const;
  void set(double value, std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3 = 0);

  void fill_normal(std::mt19937_64& rng, double stddev = 1.0);
  void fill_integers(std::mt19937_64& rng, int max_abs);  // exact in fp32 and bf16 for small max_abs
  void poison();                                          // every byte of storage set to NaN
  bool all_finite_or_neg_inf() const;                     // no NaN, no +inf left in the view

  const std::vector<std::int64_t>& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  const std::vector<unsigned char>& bytes() const { return storage_; }
  std::int64_t numel() const;

 private:
  std::int64_t offset(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) const;

  DType dtype_;
  std::vector<std::int64_t> shape_;
  std::vector<std::int64_t> strides_;
  std::vector<unsigned char> storage_;
};

// Relative L2 error ||x - ref|| / ||ref|| over all elements (absolute when ref is all zero).
double relative_l2_error(const HostTensor& x, const std::vector<double>& ref);

std::mt19937_64 make_rng();  // freshly seeded each run; the seed is printed to stderr for replay

}  // namespace pflash::testing
