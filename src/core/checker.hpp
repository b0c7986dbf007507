// The argument checks every entry point shares. Each message reads
//   "<function>: argument '<name>': expected <what>, got <what was given>".
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "core/params.hpp"
#include "pflash/error.hpp"
#include "pflash/tensor.hpp"

namespace pflash::detail {


// The extents a view holds (a rank past kMaxRank, which no view can hold, shows the kMaxRank it has).
inline std::string shape_string(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < std::min(t.rank, kMaxRank); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

inline std::string dims_string(std::initializer_list<std::int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (std::int64_t d : dims) {
    s += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return s + "]";
}

struct ByteRange {
  std::uintptr_t begin, end;
};

inline ByteRange byte_range(const TensorView& t) {
  std::int64_t max_offset = 0;
  for (int d = 0; d < t.rank; ++d) max_offset += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data);
  return {begin, begin + static_cast<std::uintptr_t>(max_offset + 1) * size_of(t.dtype)};
}

// An index array a call reads (lengths, a block table) as a 1-D view of 4-byte elements, so the
// overlap checks cover it like any tensor input; empty when the span is.
inline TensorView index_view(std::span<const std::int32_t> indices) {
  if (indices.empty()) return {};
  return TensorView::contiguous(indices.data(), DType::kFloat32, {static_cast<std::int64_t>(indices.size())});
}

inline bool overlaps(const TensorView& a, const TensorView& b) {
  const ByteRange ra = byte_range(a), rb = byte_range(b);
  return ra.begin < rb.end && rb.begin < ra.end;
}

class Checker {
 public:
  explicit Checker(const char* function_name) : function_name_(function_name) {}

  [[noreturn]] void fail(const std::string& arg, const std::string& expected, const std::string& got) const {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(function_name_) + ": argument '" + arg + "': expected " + expected + ", got " + got);
  }

  // Data present, rank, dtype, positive extents, non-negative strides, unit stride on the last
  // dimension, and element/byte offsets that fit in 64 bits.
  void tensor(const std::string& name, const TensorView& t, int rank, const char* layout) const {
    if (t.data == nullptr) fail(name, "a non-null data pointer", "null");
    if (t.rank != rank) {
      fail(name, "rank " + std::to_string(rank) + " " + layout, "rank " + std::to_string(t.rank) + " " + shape_string(t));
    }
    if (t.dtype != DType::kFloat32 && t.dtype != DType::kBFloat16) {
      fail(name, "dtype fp32 or bf16", "dtype code " + std::to_string(static_cast<int>(t.dtype)));
    }
    for (int d = 0; d < rank; ++d) {
      if (t.size(d) < 1) fail(name, std::string("every extent >= 1 in ") + layout, shape_string(t));
      if (t.stride(d) < 0) {
        fail(name, "non-negative strides", "stride " + std::to_string(t.stride(d)) + " in dimension " + std::to_string(d));
      }
    }
    if (t.stride(rank - 1) != 1 && t.size(rank - 1) > 1) {
      fail(name, "a contiguous last dimension (stride 1)", "stride " + std::to_string(t.stride(rank - 1)));
    }
    std::int64_t max_offset = 0;
    for (int d = 0; d < rank; ++d) {
      std::int64_t term = 0;
      if (__builtin_mul_overflow(t.size(d) - 1, t.stride(d), &term) ||
          __builtin_add_overflow(max_offset, term, &max_offset)) {
        fail(name, "element offsets that fit in 64 bits", "shape " + shape_string(t) + " with overflowing strides");
      }
    }
    std::int64_t bytes = 0;
    if (__builtin_add_overflow(max_offset, 1, &bytes) ||
        __builtin_mul_overflow(bytes, static_cast<std::int64_t>(size_of(t.dtype)), &bytes) ||
        reinterpret_cast<std::uintptr_t>(t.data) + static_cast<std::uint64_t>(bytes) <
            reinterpret_cast<std::uintptr_t>(t.data)) {
      fail(name, "byte offsets that fit in 64 bits", "shape " + shape_string(t) + " spanning more than 2^63 bytes");
    }
  }

  // An output must not write one element twice: sorted by stride, each dimension must step past
  // everything the smaller ones span.
  void non_self_overlapping(const std::string& name, const TensorView& t) const {
    std::vector<int> dims;
    for (int d = 0; d < t.rank; ++d)
      if (t.size(d) > 1) dims.push_back(d);
    std::sort(dims.begin(), dims.end(), [&](int a, int b) { return t.stride(a) < t.stride(b); });
    std::int64_t span = 0;
    for (int d : dims) {
      if (t.stride(d) <= span) fail(name, "an output layout whose elements do not overlap", "strides that alias");
      span += (t.size(d) - 1) * t.stride(d);
    }
  }

  void dtype_matches(const std::string& name, const TensorView& t, DType expected,
                     const char* why = "all of q, k, v, o share one dtype") const {
    if (t.dtype != expected) {
      fail(name, std::string("dtype ") + std::string(to_string(expected)) + " (" + why + ")",
           std::string(to_string(t.dtype)));
    }
  }

  void shape_is(const std::string& name, const TensorView& t, std::initializer_list<std::int64_t> dims,
                const char* layout) const {
    int d = 0;
    for (std::int64_t extent : dims) {
      if (t.size(d++) != extent) fail(name, std::string("shape ") + dims_string(dims) + " " + layout, shape_string(t));
    }
  }

  // A tensor whose shape (and dtype, when one is required) follows from the others: `tensor`'s
  // checks, then the dtype, then the shape.
  void shaped_like(const std::string& name, const TensorView& t, std::optional<DType> dtype, const char* dtype_why,
                   std::initializer_list<std::int64_t> dims, const char* layout, const char* shape_note) const {
    tensor(name, t, static_cast<int>(dims.size()), layout);
    if (dtype) dtype_matches(name, t, *dtype, dtype_why);
    shape_is(name, t, dims, shape_note);
  }

  // An output: shaped_like, elements that do not alias one another, and memory disjoint from every
  // input named (empty inputs are skipped).
  void output(const std::string& name, const TensorView& t, std::optional<DType> dtype, const char* dtype_why,
              std::initializer_list<std::int64_t> dims, const char* layout, const char* shape_note,
              std::initializer_list<std::pair<const char*, TensorView>> inputs) const {
    shaped_like(name, t, dtype, dtype_why, dims, layout, shape_note);
    non_self_overlapping(name, t);
    for (const auto& [input_name, input] : inputs) {
      if (!input.empty() && overlaps(t, input)) {
        fail(name, std::string("memory disjoint from input '") + input_name + "'", "an overlap");
      }
    }
  }

 private:
  const char* function_name_;
};

inline HeadStrides head_strides(const TensorView& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace pflash::detail
