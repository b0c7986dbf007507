// Argument checks shared by every entry point. Each message reads
//   "<function>: argument '<name>': expected <what>, got <what was given>".
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/params.hpp"
#include "pflash/error.hpp"
#include "pflash/runtime.hpp"

namespace pflash::detail {
namespace {

std::string shape_string(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < t.rank; ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

std::string dims_string(std::initializer_list<std::int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (std::int64_t d : dims) {
    s += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return s + "]";
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

  void dtype_matches(const std::string& name, const TensorView& t, DType expected) const {
    if (t.dtype != expected) {
      fail(name, std::string("dtype ") + std::string(to_string(expected)) + " (all of q, k, v, o share one dtype)",
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

 private:
  const char* function_name_;
};

struct ByteRange {
  std::uintptr_t begin, end;
};

ByteRange byte_range(const TensorView& t) {
  std::int64_t max_offset = 0;
  for (int d = 0; d < t.rank; ++d) max_offset += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data);
  return {begin, begin + static_cast<std::uintptr_t>(max_offset + 1) * size_of(t.dtype)};
}

bool overlaps(const TensorView& a, const TensorView& b) {
  const ByteRange ra = byte_range(a), rb = byte_range(b);
  return ra.begin < rb.end && rb.begin < ra.end;
}

HeadStrides head_strides(const TensorView& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

FwdParams make_fwd_params(const AttentionParams& params, const char* function_name) {
  const Checker check(function_name);
  constexpr const char* kQLayout = "[B, Hq, Nq, D]";
  constexpr const char* kKvLayout = "[B, Hkv, Nk, D]";
  check.tensor("q", params.q, 4, kQLayout);
  check.tensor("k", params.k, 4, kKvLayout);
  check.tensor("v", params.v, 4, kKvLayout);
  check.tensor("o", params.o, 4, kQLayout);

  const DType dtype = params.q.dtype;
  check.dtype_matches("k", params.k, dtype);
  check.dtype_matches("v", params.v, dtype);
  check.dtype_matches("o", params.o, dtype);

  const std::int64_t batch = params.q.size(0), heads_q = params.q.size(1), seq_q = params.q.size(2),
                     dim = params.q.size(3);
  const std::int64_t heads_kv = params.k.size(1), seq_k = params.k.size(2);
  if (dim > kMaxHeadDim) {
    check.fail("q", "head_dim D <= " + std::to_string(kMaxHeadDim), "D = " + std::to_string(dim));
  }
  check.shape_is("k", params.k, {batch, heads_kv, seq_k, dim}, "(batch and head_dim of q)");
  check.shape_is("v", params.v, {batch, heads_kv, seq_k, dim}, "(the shape of k)");
  if (heads_q % heads_kv != 0) {
    check.fail("k", "a head count Hkv dividing Hq = " + std::to_string(heads_q) + " (GQA/MQA)",
               "Hkv = " + std::to_string(heads_kv));
  }
  check.shape_is("o", params.o, {batch, heads_q, seq_q, dim}, "(the shape of q)");
  check.non_self_overlapping("o", params.o);

  const bool has_lse = !params.lse.empty();
  if (has_lse) {
    check.tensor("lse", params.lse, 3, "[B, Hq, Nq]");
    if (params.lse.dtype != DType::kFloat32) {
      check.fail("lse", "dtype fp32", std::string(to_string(params.lse.dtype)));
    }
    check.shape_is("lse", params.lse, {batch, heads_q, seq_q}, "(the first three dimensions of q)");
    check.non_self_overlapping("lse", params.lse);
  }

  const std::array<std::pair<const char*, TensorView>, 3> inputs{{{"q", params.q}, {"k", params.k}, {"v", params.v}}};
  for (const auto& [name, input] : inputs) {
    if (overlaps(params.o, input)) check.fail("o", std::string("memory disjoint from input '") + name + "'", "an overlap");
    if (has_lse && overlaps(params.lse, input)) {
      check.fail("lse", std::string("memory disjoint from input '") + name + "'", "an overlap");
    }
  }
  if (has_lse && overlaps(params.lse, params.o)) check.fail("lse", "memory disjoint from 'o'", "an overlap");

  if (params.softmax_scale && !std::isfinite(*params.softmax_scale)) {
    check.fail("softmax_scale", "a finite number", std::to_string(*params.softmax_scale));
  }
  constexpr int kMaxBlock = 4096;
  if (params.block_q < 0 || params.block_q > kMaxBlock) {
    check.fail("block_q", "0 (automatic) or 1.." + std::to_string(kMaxBlock), std::to_string(params.block_q));
  }
  if (params.block_k < 0 || params.block_k > kMaxBlock) {
    check.fail("block_k", "0 (automatic) or 1.." + std::to_string(kMaxBlock), std::to_string(params.block_k));
  }
  if (params.num_threads < 0) check.fail("num_threads", "0 (all) or a positive count", std::to_string(params.num_threads));

  FwdParams p;
  p.q = params.q.data;
  p.k = params.k.data;
  p.v = params.v.data;
  p.o = params.o.data;
  p.lse = has_lse ? static_cast<float*>(params.lse.data) : nullptr;
  p.dtype = dtype;
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.dim = dim;
  p.q_strides = head_strides(params.q);
  p.k_strides = head_strides(params.k);
  p.v_strides = head_strides(params.v);
  p.o_strides = head_strides(params.o);
  if (has_lse) p.lse_strides = head_strides(params.lse);
  p.scale = params.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(dim)));
  p.causal = params.causal;
  p.block_q = params.block_q;
  p.block_k = params.block_k;
  p.num_threads = params.num_threads > 0 ? params.num_threads : default_num_threads();
  return p;
}

}  // namespace pflash::detail
