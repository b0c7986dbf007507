// Element types of the tensors the library reads and writes.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace pflash {

enum class DType : std::uint8_t { kFloat32, kBFloat16 };

constexpr std::size_t size_of(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

constexpr std::string_view to_string(DType dtype) {
  return dtype == DType::kFloat32 ? "fp32" : "bf16";
}

// bfloat16: the upper 16 bits of an IEEE float32. Conversion from float rounds to nearest even, as
// hardware converts (vcvtneps2bf16); NaN stays NaN.
struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  explicit bfloat16(float value) : bits(round_from_float(value)) {}
  explicit operator float() const { return std::bit_cast<float>(std::uint32_t{bits} << 16); }

  static constexpr std::uint16_t round_from_float(float value) {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(value);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
  }
};
static_assert(sizeof(bfloat16) == 2);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<bfloat16>() { return DType::kBFloat16; }

}  // namespace pflash
