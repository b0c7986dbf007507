// A non-owning, strided view of a tensor in host memory. Strides are in elements, not bytes.
// The library never copies a view's data to change its layout: any layout whose last dimension
// (head_dim) is contiguous is read in place.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "pflash/dtype.hpp"

namespace pflash {

inline constexpr int kMaxRank = 4;

template <class Pointer>
struct BasicTensorView {
  Pointer data = nullptr;
  DType dtype = DType::kFloat32;
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};

  // Row-major (contiguous) view: the last dimension has stride 1.
  static BasicTensorView contiguous(Pointer data, DType dtype, std::initializer_list<std::int64_t> shape) {
    BasicTensorView view;
    view.data = data;
    view.dtype = dtype;
    view.rank = static_cast<int>(shape.size());
    int i = 0;
    for (std::int64_t extent : shape) view.shape[static_cast<std::size_t>(i++)] = extent;
    // A stride past 2^63 saturates at INT64_MAX rather than overflowing here, in the caller's code:
    // the library's own checks then reject the view ("element offsets that fit in 64 bits").
    std::int64_t stride = 1;
    for (int d = view.rank - 1; d >= 0; --d) {
      view.strides[static_cast<std::size_t>(d)] = stride;
      if (d > 0 && __builtin_mul_overflow(stride, view.shape[static_cast<std::size_t>(d)], &stride)) {
        stride = INT64_MAX;
      }
    }
    return view;
  }

  // Any strides, e.g. a [B, N, H, D] buffer viewed as [B, H, N, D].
  static BasicTensorView strided(Pointer data, DType dtype, std::initializer_list<std::int64_t> shape,
                                 std::initializer_list<std::int64_t> strides) {
    BasicTensorView view = contiguous(data, dtype, shape);
    int i = 0;
    for (std::int64_t stride : strides) view.strides[static_cast<std::size_t>(i++)] = stride;
    return view;
  }

  std::int64_t size(int dim) const { return shape[static_cast<std::size_t>(dim)]; }
  std::int64_t stride(int dim) const { return strides[static_cast<std::size_t>(dim)]; }
  // A default-constructed view: "no tensor" for optional arguments such as AttentionParams::lse.
  bool empty() const { return data == nullptr && rank == 0; }

  // A writable view is readable.
  operator BasicTensorView<const void*>() const  // NOLINT(google-explicit-constructor)
    requires(!std::is_same_v<Pointer, const void*>)
  {
    return {data, dtype, rank, shape, strides};
  }
};

using TensorView = BasicTensorView<const void*>;   // read-only input
using MutableTensorView = BasicTensorView<void*>;  // output

}  // namespace pflash
