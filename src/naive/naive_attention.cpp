// The materialising baseline: S = Q K^T * scale (BLAS), mask, softmax in place, O = P V (BLAS).
// Its scores buffer [B, Hq, Nq, Nk] is allocated whole, as an unfused framework does.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "pflash/error.hpp"
#include "pflash/naive.hpp"

namespace pflash {
namespace {

using detail::FwdParams;
using detail::HeadStrides;
using detail::Range;
using detail::RowRanges;
using detail::Workspace;
using std::int64_t;

constexpr std::uint64_t kSaturated = std::numeric_limits<std::uint64_t>::max();

std::uint64_t checked_product(std::initializer_list<std::uint64_t> factors) {
  std::uint64_t product = 1;
  for (std::uint64_t f : factors)
    if (__builtin_mul_overflow(product, f, &product)) return kSaturated;
  return product;
}

std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) { return a > kSaturated - b ? kSaturated : a + b; }

struct NaiveBytes {
  std::uint64_t scores = 0;
  std::uint64_t copies = 0;  // fp32 copies of inputs BLAS cannot read in place, and of a bf16 output
  std::uint64_t total() const { return saturating_add(scores, copies); }
};

// BLAS reads an fp32 head in place when its rows are at least D apart (lda >= D).
// BLAS takes its leading dimension as an int: a row stride past INT_MAX (possible when a single row
// makes it irrelevant to the library's checks) goes through a copy, as a bf16 operand does.
bool blas_readable(const FwdParams& p, const HeadStrides& strides, int64_t rows) {
  return p.dtype == DType::kFloat32 && (rows == 1 || (strides.row >= p.dim && strides.row <= INT_MAX));
}

NaiveBytes naive_bytes(const FwdParams& p) {
  NaiveBytes bytes;
  const auto u = [](int64_t x) { return static_cast<std::uint64_t>(x); };
  bytes.scores = checked_product({u(p.batch), u(p.heads_q), u(p.seq_q), u(p.seq_k), 4});
  const std::uint64_t q_elems = checked_product({u(p.batch), u(p.heads_q), u(p.seq_q), u(p.dim)});
  const std::uint64_t kv_elems = checked_product({u(p.batch), u(p.heads_kv), u(p.seq_k), u(p.dim)});
  if (!blas_readable(p, p.q_strides, p.seq_q)) bytes.copies = saturating_add(bytes.copies, checked_product({q_elems, 4}));
  if (!blas_readable(p, p.k_strides, p.seq_k)) bytes.copies = saturating_add(bytes.copies, checked_product({kv_elems, 4}));
  if (!blas_readable(p, p.v_strides, p.seq_k)) bytes.copies = saturating_add(bytes.copies, checked_product({kv_elems, 4}));
  if (!blas_readable(p, p.o_strides, p.seq_q)) bytes.copies = saturating_add(bytes.copies, checked_product({q_elems, 4}));
  return bytes;
}

std::string gib(std::uint64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  return text;
}

// An fp32 [B, H, N, D] operand as BLAS sees it: the caller's memory, or a contiguous fp32 copy.
struct Operand {
  Workspace<float> copy;
  float* data = nullptr;
  HeadStrides strides;
  int64_t ld = 0;

  float* head(int64_t b, int64_t h) const { return data + b * strides.batch + h * strides.head; }
};

template <class T>
Operand make_operand(const FwdParams& p, const void* data, const HeadStrides& strides, int64_t heads, int64_t rows,
                     bool fill) {
  Operand op;
  if (blas_readable(p, strides, rows)) {
    op.data = static_cast<float*>(const_cast<void*>(data));  // read-only use unless it is the output
    op.strides = strides;
    op.ld = rows == 1 ? p.dim : strides.row;  // one row: its stride is never stepped, BLAS needs ld >= D
    return op;
  }
  op.copy = Workspace<float>(static_cast<std::size_t>(p.batch * heads * rows * p.dim));
  op.data = op.copy.data();
  op.strides = {heads * rows * p.dim, rows * p.dim, p.dim};
  op.ld = p.dim;
  if (fill) {
    const T* src = static_cast<const T*>(data);
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t d = 0; d < p.dim; ++d)
            op.head(b, h)[i * op.ld + d] =
                static_cast<float>(src[b * strides.batch + h * strides.head + i * strides.row + d]);
  }
  return op;
}

template <class T>
void naive_forward(const FwdParams& p) {
  const int64_t group = p.group_size();
  Workspace<float> scores(static_cast<std::size_t>(p.batch * p.heads_q * p.seq_q * p.seq_k));
  const Operand q = make_operand<T>(p, p.q, p.q_strides, p.heads_q, p.seq_q, true);
  const Operand k = make_operand<T>(p, p.k, p.k_strides, p.heads_kv, p.seq_k, true);
  const Operand v = make_operand<T>(p, p.v, p.v_strides, p.heads_kv, p.seq_k, true);
  const Operand o = make_operand<T>(p, p.o, p.o_strides, p.heads_q, p.seq_q, false);
  const auto scores_of = [&](int64_t b, int64_t h) { return scores.data() + (b * p.heads_q + h) * p.seq_q * p.seq_k; };

  const int saved_threads = openblas_get_num_threads();
  openblas_set_num_threads(p.num_threads);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(p.seq_q), static_cast<int>(p.seq_k),
                  static_cast<int>(p.dim), p.scale, q.head(b, h), static_cast<int>(q.ld), k.head(b, h / group),
                  static_cast<int>(k.ld), 0.0f, scores_of(b, h), static_cast<int>(p.seq_k));
    }
  }

  // softmax over each row's visible keys (the mask's ranges; ids compared per score where segments
  // recur apart), with the soft cap and the sinks, in place.
  const RowRanges ranges(p.mask, p.batch, p.seq_q, p.seq_k);
  const int64_t rows = p.batch * p.heads_q * p.seq_q;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % p.seq_q, h = (r / p.seq_q) % p.heads_q, b = r / (p.seq_q * p.heads_q);
    float* row = scores.data() + r * p.seq_k;
    const Range visible = ranges.keys_of_row(b, i);
    for (int64_t j = visible.first; j < visible.end; ++j) {
      if (p.soft_cap > 0.0f) row[j] = p.soft_cap * std::tanh(row[j] / p.soft_cap);
      if (ranges.elementwise() && !ranges.same_segment(b, i, j)) row[j] = kNegInf;
    }
    float row_max = kNegInf;
    for (int64_t j = visible.first; j < visible.end; ++j) row_max = std::max(row_max, row[j]);
    if (p.sinks != nullptr) row_max = std::max(row_max, p.sinks[h]);
    const float shift = row_max == kNegInf ? 0.0f : row_max;
    double row_sum = p.sinks != nullptr ? std::exp(p.sinks[h] - shift) : 0.0;
    for (int64_t j = 0; j < p.seq_k; ++j) {
      row[j] = j >= visible.first && j < visible.end ? std::exp(row[j] - shift) : 0.0f;
      row_sum += row[j];
    }
    const float inv_sum = row_sum > 0.0 ? static_cast<float>(1.0 / row_sum) : 0.0f;
    for (int64_t j = visible.first; j < visible.end; ++j) row[j] *= inv_sum;
    if (p.lse != nullptr) {
      p.lse[b * p.lse_strides.batch + h * p.lse_strides.head + i * p.lse_strides.row] =
          row_sum > 0.0 ? shift + static_cast<float>(std::log(row_sum)) : kNegInf;
    }
  }

  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads_q; ++h) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(p.seq_q), static_cast<int>(p.dim),
                  static_cast<int>(p.seq_k), 1.0f, scores_of(b, h), static_cast<int>(p.seq_k), v.head(b, h / group),
                  static_cast<int>(v.ld), 0.0f, o.head(b, h), static_cast<int>(o.ld));
    }
  }
  openblas_set_num_threads(saved_threads);

  if (o.copy.data() != nullptr) {
    T* dst = static_cast<T*>(p.o);
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_q; ++h)
        for (int64_t i = 0; i < p.seq_q; ++i)
          for (int64_t d = 0; d < p.dim; ++d)
            dst[b * p.o_strides.batch + h * p.o_strides.head + i * p.o_strides.row + d] =
                T(o.head(b, h)[i * o.ld + d]);
  }
}

}  // namespace

std::uint64_t naive_attention_bytes(const AttentionParams& params) {
  return naive_bytes(detail::make_fwd_params(params, "naive_attention_bytes")).total();
}

void naive_attention(const AttentionParams& params, NaiveOptions options) {
  const FwdParams p = detail::make_fwd_params(params, "naive_attention");
  const NaiveBytes bytes = naive_bytes(p);
  if (options.memory_budget && bytes.total() > *options.memory_budget) {
    throw OutOfMemoryError("naive_attention: out of memory: needs " + std::to_string(bytes.total()) + " bytes (" +
                               gib(bytes.total()) + ": fp32 scores [B, Hq, Nq, Nk] " + gib(bytes.scores) +
                               ", fp32 copies " + gib(bytes.copies) + "), memory budget " +
                               std::to_string(*options.memory_budget) + " bytes (" + gib(*options.memory_budget) + ")",
                           bytes.total());
  }
  if (bytes.scores == kSaturated || bytes.total() == kSaturated) {
    throw OutOfMemoryError("naive_attention: out of memory: the fp32 scores [B, Hq, Nq, Nk] need more than 2^64 bytes",
                           kSaturated);
  }
  if (p.dtype == DType::kBFloat16) {
    naive_forward<bfloat16>(p);
  } else {
    naive_forward<float>(p);
  }
}

}  // namespace pflash
