#include "support/tensors.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace pflash::testing {

HostTensor::HostTensor(DType dtype, std::vector<std::int64_t> shape, Layout layout)
    : dtype_(dtype), shape_(std::move(shape)), strides_(shape_.size()) {
  const auto rank = shape_.size();
  std::int64_t extent = 1;
  if (layout == Layout::kBnhd && rank == 4) {
    // memory order B, N, H, D
    strides_[3] = 1;
    strides_[1] = shape_[3];
    strides_[2] = shape_[1] * shape_[3];
    strides_[0] = shape_[2] * strides_[2];
    extent = shape_[0] * strides_[0];
  } else {
    const std::int64_t row_gap = layout == Layout::kPaddedRows ? 7 : 0;
    std::int64_t stride = 1;
    for (std::size_t d = rank; d-- > 0;) {
      strides_[d] = stride;
      stride *= shape_[d] + (d == rank - 1 ? row_gap : 0);
    }
    extent = stride;
  }
  storage_.assign(static_cast<std::size_t>(extent) * size_of(dtype_), 0);
}

std::int64_t HostTensor::numel() const {
  std::int64_t n = 1;
  for (std::int64_t e : shape_) n *= e;
  return n;
}

TensorView HostTensor::view() const {
  TensorView v;
  v.data = storage_.data();
  v.dtype = dtype_;
  v.rank = static_cast<int>(shape_.size());
  for (int d = 0; d < v.rank; ++d) {
    v.shape[static_cast<std::size_t>(d)] = shape_[static_cast<std::size_t>(d)];
    v.strides[static_cast<std::size_t>(d)] = strides_[static_cast<std::size_t>(d)];
  }
  return v;
}

MutableTensorView HostTensor::mutable_view() {
  const TensorView v = view();
  return {storage_.data(), v.dtype, v.rank, v.shape, v.strides};
}

std::int64_t HostTensor::offset(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) const {
  const std::int64_t idx[4] = {i0, i1, i2, i3};
  std::int64_t off = 0;
  for (std::size_t d = 0; d < shape_.size(); ++d) off += idx[d] * strides_[d];
  return off;
}

double HostTensor::at(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) const {
  const std::int64_t off = offset(i0, i1, i2, i3);
  if (dtype_ == DType::kFloat32) {
    float x;
    std::memcpy(&x, storage_.data() + off * 4, 4);
    return x;
  }
  bfloat16 x;
  std::memcpy(&x, storage_.data() + off * 2, 2);
  return static_cast<float>(x);
}

void HostTensor::set(double value, std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) {
  const std::int64_t off = offset(i0, i1, i2, i3);
  if (dtype_ == DType::kFloat32) {
    const auto x = static_cast<float>(value);
    std::memcpy(storage_.data() + off * 4, &x, 4);
  } else {
    const bfloat16 x(static_cast<float>(value));
    std::memcpy(storage_.data() + off * 2, &x, 2);
  }
}

namespace {
template <class Fn>
void for_each_index(const std::vector<std::int64_t>& shape, Fn&& fn) {
  std::vector<std::int64_t> s = shape;
  s.resize(4, 1);
  for (std::int64_t a = 0; a < s[0]; ++a)
    for (std::int64_t b = 0; b < s[1]; ++b)
      for (std::int64_t c = 0; c < s[2]; ++c)
        for (std::int64_t d = 0; d < s[3]; ++d) fn(a, b, c, d);
}
}  // namespace

void HostTensor::fill_normal(std::mt19937_64& rng, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  for_each_index(shape_, [&](auto a, auto b, auto c, auto d) { set(normal(rng), a, b, c, d); });
}

void HostTensor::fill_integers(std::mt19937_64& rng, int max_abs) {
  std::uniform_int_distribution<int> uniform(-max_abs, max_abs);
  for_each_index(shape_, [&](auto a, auto b, auto c, auto d) { set(uniform(rng), a, b, c, d); });
}

void HostTensor::poison() {
  if (dtype_ == DType::kFloat32) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (std::size_t i = 0; i + 4 <= storage_.size(); i += 4) std::memcpy(storage_.data() + i, &nan, 4);
  } else {
    const std::uint16_t nan = 0x7fc0;
    for (std::size_t i = 0; i + 2 <= storage_.size(); i += 2) std::memcpy(storage_.data() + i, &nan, 2);
  }
}

bool HostTensor::all_finite_or_neg_inf() const {
  bool ok = true;
  for_each_index(shape_, [&](auto a, auto b, auto c, auto d) {
    const double x = at(a, b, c, d);
    if (std::isnan(x) || x == std::numeric_limits<double>::infinity()) ok = false;
  });
  return ok;
}

double relative_l2_error(const HostTensor& x, const std::vector<double>& ref) {
  double diff = 0.0, norm = 0.0;
  std::size_t i = 0;
  for_each_index(x.shape(), [&](auto a, auto b, auto c, auto d) {
    const double e = x.at(a, b, c, d) - ref[i++];
    diff += e * e;
  });
  for (double r : ref) norm += r * r;
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

std::mt19937_64 make_rng() {
  static const std::uint64_t seed = [] {
    if (const char* env = std::getenv("PFLASH_TEST_SEED")) return std::uint64_t{std::stoull(env)};
    return std::uint64_t{std::random_device{}()} << 32 | std::uint64_t{std::random_device{}()};
  }();
  static std::uint64_t stream = 0;
  static bool printed = false;
  if (!printed) {
    std::fprintf(stderr, "pflash tests: random seed %llu (set PFLASH_TEST_SEED to replay)\n",
                 static_cast<unsigned long long>(seed));
    printed = true;
  }
  return std::mt19937_64(seed + 0x9e3779b97f4a7c15ull * ++stream);
}

}  // namespace pflash::testing
