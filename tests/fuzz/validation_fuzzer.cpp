// libFuzzer target over the argument checks of every public entry point: forward, backward, the
// training step, decode, append, merge and the naive baseline, called with fuzzed shapes, strides,
// ranks, dtype codes, null and overlapping pointers, lengths, block tables, splits, blocks and
// thread counts. Every tensor lies in one arena (or is broken in a way no caller's memory could
// honour: a null pointer, a negative stride, a span past 2^63 bytes), so a call that accepts its
// arguments reads and writes only the arena. What must hold, besides no crash and no sanitizer
// report:
//   - a call throws nothing but pflash::Error;
//   - a rejected call writes nothing (the arena is unchanged);
//   - an accepted call leaves its inputs unchanged.
// Built with clang (-fsanitize=fuzzer,address,undefined) by -DPFLASH_BUILD_FUZZERS=ON; CI runs it for
// a bounded time from tests/fuzz/corpus.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include "pflash/pflash.hpp"

namespace {

using pflash::DType;
using std::int64_t;

constexpr std::size_t kArenaBytes = std::size_t{1} << 18;
alignas(64) unsigned char g_arena[kArenaBytes];
unsigned char g_snapshot[kArenaBytes];

// The bytes [begin, end) of the arena a view or span covers, for the "inputs unchanged" check.
struct Range {
  std::size_t begin = 0, end = 0;
};

class Builder {
 public:
  // A few small sizes the views and spans reuse, so that shapes agree with one another often
  // enough for calls to be accepted (and their kernels run) as well as rejected.
  explicit Builder(FuzzedDataProvider& in) : in_(in) {
    for (int64_t& size : sizes_) size = in_.ConsumeIntegralInRange<int64_t>(1, 12);
  }

  // A view of (usually) `rank` dimensions: TensorView for an input, MutableTensorView for an output.
  template <class View>
  View view(int rank, bool optional = false) {
    View v;
    if (optional && in_.ConsumeIntegralInRange(0, 3) == 0) return v;  // absent
    // The common choices are the low values: FuzzedDataProvider gives the lowest once the input runs
    // out, which should leave the call well-formed, not broken.
    const int kind = in_.ConsumeIntegralInRange(0, 31);
    v.rank = kind == 31 ? in_.ConsumeIntegralInRange(-2, 7) : rank;  // past kMaxRank too
    v.dtype = kind == 30 ? static_cast<DType>(in_.ConsumeIntegral<std::uint8_t>())
                        : (in_.ConsumeBool() ? DType::kFloat32 : DType::kBFloat16);
    for (int d = 0; d < pflash::kMaxRank; ++d) v.shape[d] = extent();
    // Row-major strides, or any.
    if (in_.ConsumeIntegralInRange(0, 3) != 3) {
      int64_t stride = 1;
      for (int d = std::clamp(v.rank, 0, pflash::kMaxRank) - 1; d >= 0; --d) {
        v.strides[d] = stride;
        if (__builtin_mul_overflow(stride, std::max<int64_t>(v.shape[d], 1), &stride)) stride = 1;
      }
    } else {
      for (int d = 0; d < pflash::kMaxRank; ++d) v.strides[d] = stride();
    }
    if (in_.ConsumeIntegralInRange(0, 63) == 63) {
      v.data = nullptr;
      return v;
    }
    place(v);
    return v;
  }

  // Another tensor of the same shape, dtype and strides as `v` (often: q and o, k and v), elsewhere
  // in the arena; or, half the time, a view of its own.
  template <class View, class Like>
  View like(const Like& model, int rank) {
    if (in_.ConsumeBool() || model.data == nullptr) return view<View>(rank);
    View v;
    v.dtype = model.dtype;
    v.rank = model.rank;
    v.shape = model.shape;
    v.strides = model.strides;
    place(v);
    return v;
  }

  // An int32 span in the arena (lengths, a block table, positions_after), or empty.
  template <class T>
  std::span<T> span(std::size_t max_count) {
    const std::size_t count = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<std::size_t>(0, max_count)
                                                : static_cast<std::size_t>(sizes_[in_.ConsumeIntegralInRange(0, 3)]);
    if (count == 0) return {};
    const std::size_t slots = kArenaBytes / 4;
    const std::size_t first = in_.ConsumeIntegralInRange<std::size_t>(0, slots - count);
    auto* base = reinterpret_cast<std::int32_t*>(g_arena) + first;
    // Values that could be right (lengths, page ids), all or some of them, or the arena's pattern.
    const int fill = in_.ConsumeIntegralInRange(0, 2);
    for (std::size_t i = 0; i < count && fill < 2; ++i) {
      if (fill == 0 || in_.ConsumeBool()) base[i] = in_.ConsumeIntegralInRange<std::int32_t>(fill == 0 ? 0 : -2, 12);
    }
    return {base, count};
  }

  int threads() {
    switch (in_.ConsumeIntegralInRange(0, 7)) {
      case 7: return in_.ConsumeIntegralInRange(-3, -1);
      case 6: return 100000;
      case 5: return std::numeric_limits<int>::max();
      default: return in_.ConsumeIntegralInRange(0, 3);
    }
  }

  int small_int(int low, int high) { return in_.ConsumeIntegralInRange(low, high); }
  bool flag() { return in_.ConsumeBool(); }

  std::optional<float> scale() {
    switch (in_.ConsumeIntegralInRange(0, 7)) {
      case 7: return std::numeric_limits<float>::quiet_NaN();
      case 6: return std::numeric_limits<float>::infinity();
      case 5: return in_.ConsumeFloatingPoint<float>();
      default: return std::nullopt;
    }
  }

 private:
  int64_t extent() {
    if (in_.ConsumeIntegralInRange(0, 3) != 3) return sizes_[in_.ConsumeIntegralInRange(0, 3)];
    switch (in_.ConsumeIntegralInRange(0, 31)) {
      case 31: return 0;
      case 30: return -in_.ConsumeIntegralInRange<int64_t>(1, 5);
      case 29: return int64_t{1} << in_.ConsumeIntegralInRange(20, 62);
      case 28: return std::numeric_limits<int64_t>::max();
      case 27: return in_.ConsumeIntegralInRange<int64_t>(10, 300);
      default: return in_.ConsumeIntegralInRange<int64_t>(1, 9);
    }
  }

  int64_t stride() {
    switch (in_.ConsumeIntegralInRange(0, 15)) {
      case 15: return -in_.ConsumeIntegralInRange<int64_t>(1, 64);
      case 14: return int64_t{1} << in_.ConsumeIntegralInRange(30, 62);
      case 13: return 0;
      default: return in_.ConsumeIntegralInRange<int64_t>(1, 64);
    }
  }

  // Points v at a fuzzed element of the arena, then fits it there.
  template <class View>
  void place(View& v) {
    const std::size_t element = pflash::size_of(v.dtype);
    const std::size_t offset = in_.ConsumeIntegralInRange<std::size_t>(0, kArenaBytes / element - 1) * element;
    v.data = g_arena + offset;
    fit(v, offset, element);
  }

  // A view the library could accept must lie in the arena: while its span (which fits in 64 bits,
  // positive extents and non-negative strides) passes the arena's end, its largest extent is halved.
  // Views that are broken anyway (an extent < 1, a negative stride, an overflowing span) stay as they are.
  template <class View>
  static void fit(View& v, std::size_t offset, std::size_t element) {
    if (v.rank < 1 || v.rank > pflash::kMaxRank) return;  // broken: must be rejected
    for (;;) {
      std::uint64_t span = 0;
      for (int d = 0; d < v.rank; ++d) {
        if (v.shape[d] < 1 || v.strides[d] < 0) return;
        std::uint64_t term = 0;
        if (__builtin_mul_overflow(static_cast<std::uint64_t>(v.shape[d] - 1), static_cast<std::uint64_t>(v.strides[d]),
                                   &term) ||
            __builtin_add_overflow(span, term, &span) || span >= (std::uint64_t{1} << 62)) {
          return;
        }
      }
      if (offset + (span + 1) * element <= kArenaBytes) return;
      // The dimension that spans the most (in double: the products may pass 2^63).
      auto spans = [&](int d) { return double(v.shape[d]) * double(std::max<int64_t>(v.strides[d], 1)); };
      int largest = 0;
      for (int d = 1; d < v.rank; ++d) {
        if (spans(d) > spans(largest)) largest = d;
      }
      if (v.shape[largest] == 1) {
        v.data = nullptr;  // cannot be made to fit: a null pointer instead, which must be rejected
        return;
      }
      v.shape[largest] = v.shape[largest] / 2 + v.shape[largest] % 2;
    }
  }

  FuzzedDataProvider& in_;
  int64_t sizes_[4] = {};
};

template <class View>
Range range_of(const View& v) {
  // Computed before the call, for views it may reject too: a broken one covers nothing.
  if (v.data == nullptr || v.rank < 1 || v.rank > pflash::kMaxRank) return {};
  std::uint64_t span = 0;
  for (int d = 0; d < v.rank; ++d) {
    std::uint64_t term = 0;
    if (v.shape[d] < 1 || v.strides[d] < 0 ||
        __builtin_mul_overflow(static_cast<std::uint64_t>(v.shape[d] - 1), static_cast<std::uint64_t>(v.strides[d]), &term) ||
        __builtin_add_overflow(span, term, &span) || span >= kArenaBytes) {
      return {};
    }
  }
  const auto begin = static_cast<std::size_t>(static_cast<const unsigned char*>(v.data) - g_arena);
  return {begin, std::min(kArenaBytes, begin + (static_cast<std::size_t>(span) + 1) * pflash::size_of(v.dtype))};
}

template <class T>
Range range_of(std::span<T> s) {
  if (s.empty()) return {};
  const auto begin = static_cast<std::size_t>(reinterpret_cast<const unsigned char*>(s.data()) - g_arena);
  return {begin, begin + s.size_bytes()};
}

// Runs one call: rejected calls must throw pflash::Error and write nothing; accepted ones must
// leave `inputs` unchanged.
template <class Call>
void check_call(Call&& call, std::initializer_list<Range> inputs) {
  std::memcpy(g_snapshot, g_arena, kArenaBytes);
  bool rejected = false;
  try {
    call();
  } catch (const pflash::Error& e) {
    rejected = true;
    if (std::getenv("PFLASH_FUZZ_VERBOSE") != nullptr) std::fprintf(stderr, "rejected: %s\n", e.what());
  } catch (...) {
    __builtin_trap();  // an exception that is not pflash::Error
  }
  if (rejected) {
    if (std::memcmp(g_snapshot, g_arena, kArenaBytes) != 0) __builtin_trap();  // a rejected call wrote
    return;
  }
  for (const Range& r : inputs) {
    if (r.end > r.begin && std::memcmp(g_snapshot + r.begin, g_arena + r.begin, r.end - r.begin) != 0) {
      __builtin_trap();  // an accepted call modified an input
    }
  }
}

pflash::KVCacheView cache_view(Builder& b, int64_t max_entries) {
  pflash::KVCacheView cache;
  cache.k = b.view<pflash::TensorView>(4);
  cache.v = b.flag() ? cache.k : b.like<pflash::TensorView>(cache.k, 4);
  cache.seq_lens = b.span<const std::int32_t>(static_cast<std::size_t>(std::max<int64_t>(max_entries, 1)));
  if (b.flag()) cache.block_table = b.span<const std::int32_t>(static_cast<std::size_t>(max_entries) * 4);
  return cache;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  // The arena's contents: a pattern from the input's first bytes (values, lengths and page ids).
  const std::uint32_t seed = in.ConsumeIntegral<std::uint32_t>();
  for (std::size_t i = 0; i < kArenaBytes; i += 4) {
    const std::uint32_t x = (static_cast<std::uint32_t>(i) * 2654435761u) ^ seed;
    std::memcpy(g_arena + i, &x, 4);
  }
  Builder b(in);
  pflash::set_max_cpu_isa(b.flag() ? pflash::CpuIsa::kPortable : pflash::CpuIsa::kAmxBf16);  // either kernel
  switch (b.small_int(0, 7)) {
    case 0:
    case 1: {  // forward, or the naive baseline
      pflash::AttentionParams p;
      p.q = b.view<pflash::TensorView>(4);
      p.k = b.view<pflash::TensorView>(4);
      p.v = b.flag() ? p.k : b.like<pflash::TensorView>(p.k, 4);
      p.o = b.like<pflash::MutableTensorView>(p.q, 4);
      p.lse = b.view<pflash::MutableTensorView>(3, /*optional=*/true);
      p.mask.causal = b.flag();
      p.softmax_scale = b.scale();
      p.block_q = b.small_int(-2, 5000);
      p.block_k = b.small_int(-2, 5000);
      p.num_threads = b.threads();
      const bool naive = b.flag();
      check_call(
          [&] {
            if (naive) {
              pflash::naive_attention(p, {.memory_budget = std::uint64_t{1} << 24});
            } else {
              pflash::flash_attention_forward(p);
            }
          },
          {range_of(p.q), range_of(p.k), range_of(p.v)});
      break;
    }
    case 2: {  // backward
      pflash::AttentionBackwardParams p;
      p.q = b.view<pflash::TensorView>(4);
      p.k = b.view<pflash::TensorView>(4);
      p.v = b.like<pflash::TensorView>(p.k, 4);
      p.o = b.like<pflash::TensorView>(p.q, 4);
      p.dout = b.flag() ? p.o : b.like<pflash::TensorView>(p.q, 4);
      p.lse = b.view<pflash::TensorView>(3, /*optional=*/true);
      p.dq = b.like<pflash::MutableTensorView>(p.q, 4);
      p.dk = b.like<pflash::MutableTensorView>(p.k, 4);
      p.dv = b.like<pflash::MutableTensorView>(p.k, 4);
      p.mask.causal = b.flag();
      p.softmax_scale = b.scale();
      p.num_threads = b.threads();
      check_call([&] { pflash::flash_attention_backward(p); },
                 {range_of(p.q), range_of(p.k), range_of(p.v), range_of(p.o), range_of(p.dout), range_of(p.lse)});
      break;
    }
    case 3: {  // the training step
      pflash::AttentionParams p;
      p.q = b.view<pflash::TensorView>(4);
      p.k = b.view<pflash::TensorView>(4);
      p.v = b.like<pflash::TensorView>(p.k, 4);
      p.o = b.like<pflash::MutableTensorView>(p.q, 4);
      p.lse = b.view<pflash::MutableTensorView>(3, /*optional=*/true);
      p.mask.causal = b.flag();
      p.num_threads = b.threads();
      const auto dout = b.like<pflash::TensorView>(p.q, 4);
      const auto dq = b.like<pflash::MutableTensorView>(p.q, 4), dk = b.like<pflash::MutableTensorView>(p.k, 4),
                 dv = b.like<pflash::MutableTensorView>(p.k, 4);
      check_call([&] { pflash::flash_attention_forward_backward(p, dout, dq, dk, dv); },
                 {range_of(p.q), range_of(p.k), range_of(p.v), range_of(dout)});
      break;
    }
    case 4:
    case 5: {  // decode, or the split count it would use
      pflash::DecodeParams p;
      p.q = b.view<pflash::TensorView>(4);
      p.cache = cache_view(b, 12);
      p.o = b.like<pflash::MutableTensorView>(p.q, 4);
      p.lse = b.view<pflash::MutableTensorView>(3, /*optional=*/true);
      if (b.flag()) p.positions_after = b.span<const std::int32_t>(12);
      p.softmax_scale = b.scale();
      p.num_splits = b.small_int(-2, 300);
      p.num_threads = b.threads();
      const bool splits_only = b.flag();
      check_call(
          [&] {
            if (splits_only) {
              (void)pflash::decode_num_splits(p);
            } else {
              pflash::flash_decode(p);
            }
          },
          {range_of(p.q), range_of(p.cache.k), range_of(p.cache.v), range_of(p.cache.seq_lens),
           range_of(p.cache.block_table), range_of(p.positions_after)});
      break;
    }
    case 6: {  // append
      pflash::MutableKVCache cache;
      cache.k = b.view<pflash::MutableTensorView>(4);
      cache.v = b.like<pflash::MutableTensorView>(cache.k, 4);
      cache.seq_lens = b.span<std::int32_t>(12);
      if (b.flag()) cache.block_table = b.span<const std::int32_t>(48);
      const auto k_new = b.view<pflash::TensorView>(4);
      const auto v_new = b.flag() ? k_new : b.like<pflash::TensorView>(k_new, 4);
      check_call([&] { pflash::append_kv(cache, k_new, v_new); },
                 {range_of(k_new), range_of(v_new), range_of(cache.block_table)});
      break;
    }
    default: {  // merge
      pflash::MergeParams p;
      p.o_partials = b.view<pflash::TensorView>(4);
      p.lse_partials = b.view<pflash::TensorView>(3);
      p.o = b.view<pflash::MutableTensorView>(3);
      p.lse = b.view<pflash::MutableTensorView>(2, /*optional=*/true);
      p.num_threads = b.threads();
      check_call([&] { pflash::merge_attention_states(p); }, {range_of(p.o_partials), range_of(p.lse_partials)});
      break;
    }
  }
  return 0;
}
