// Every bad argument gets pflash::Error naming the argument, what was expected and what was given.
#include <gtest/gtest.h>

#include <array>
#include <limits>
#include <string>

#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

struct Fixture {
  HostTensor q{DType::kFloat32, {2, 4, 8, 16}};
  HostTensor k{DType::kFloat32, {2, 2, 10, 16}};
  HostTensor v{DType::kFloat32, {2, 2, 10, 16}};
  HostTensor o{DType::kFloat32, {2, 4, 8, 16}};
  HostTensor lse{DType::kFloat32, {2, 4, 8}};

  AttentionParams params() {
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.mutable_view();
    p.lse = lse.mutable_view();
    return p;
  }
};

void expect_invalid(const AttentionParams& params, const std::string& argument, const std::string& expected,
                    const std::string& got) {
  for (int entry = 0; entry < 2; ++entry) {
    try {
      if (entry == 0) {
        flash_attention_forward(params);
      } else {
        naive_attention(params);
      }
      ADD_FAILURE() << "no error for a bad '" << argument << "'";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << message;
      EXPECT_NE(message.find(entry == 0 ? "flash_attention_forward: " : "naive_attention: "), std::string::npos)
          << message;
      EXPECT_NE(message.find("argument '" + argument + "'"), std::string::npos) << message;
      EXPECT_NE(message.find(expected), std::string::npos) << message;
      EXPECT_NE(message.find(got), std::string::npos) << message;
    }
  }
}

TEST(Validate, ValidArgumentsPass) {
  Fixture f;
  EXPECT_NO_THROW(validate(f.params()));
}

TEST(Validate, NullData) {
  Fixture f;
  auto p = f.params();
  p.k.data = nullptr;
  expect_invalid(p, "k", "non-null data pointer", "null");
  p = f.params();
  p.o.data = nullptr;
  expect_invalid(p, "o", "non-null data pointer", "null");
}

TEST(Validate, WrongRank) {
  Fixture f;
  auto p = f.params();
  p.q.rank = 3;
  expect_invalid(p, "q", "rank 4 [B, Hq, Nq, D]", "rank 3 [2, 4, 8]");
  p.q.rank = 7;  // more than a view holds: named, never read past its kMaxRank extents
  expect_invalid(p, "q", "rank 4 [B, Hq, Nq, D]", "rank 7 [2, 4, 8, 16]");
}

TEST(Validate, MismatchedShapes) {
  Fixture f;
  auto p = f.params();
  p.v.shape[2] = 9;
  expect_invalid(p, "v", "shape [2, 2, 10, 16]", "[2, 2, 9, 16]");
  p = f.params();
  p.k.shape[3] = 8;
  p.v.shape[3] = 8;
  expect_invalid(p, "k", "shape [2, 2, 10, 16]", "[2, 2, 10, 8]");
  p = f.params();
  p.o.shape[2] = 7;
  expect_invalid(p, "o", "shape [2, 4, 8, 16]", "[2, 4, 7, 16]");
  p = f.params();
  p.lse.shape[1] = 3;
  expect_invalid(p, "lse", "shape [2, 4, 8]", "[2, 3, 8]");
  p = f.params();
  p.q.shape[1] = 0;
  expect_invalid(p, "q", "every extent >= 1", "[2, 0, 8, 16]");
}

TEST(Validate, HeadsNotAMultiple) {
  HostTensor q(DType::kFloat32, {1, 5, 4, 8}), kv(DType::kFloat32, {1, 2, 4, 8}), o(DType::kFloat32, {1, 5, 4, 8});
  AttentionParams p;
  p.q = q.view();
  p.k = kv.view();
  p.v = kv.view();
  p.o = o.mutable_view();
  expect_invalid(p, "k", "Hkv dividing Hq = 5", "Hkv = 2");
}

TEST(Validate, HeadDimTooLarge) {
  HostTensor q(DType::kFloat32, {1, 1, 2, 257}), kv(DType::kFloat32, {1, 1, 2, 257}), o(DType::kFloat32, {1, 1, 2, 257});
  AttentionParams p;
  p.q = q.view();
  p.k = kv.view();
  p.v = kv.view();
  p.o = o.mutable_view();
  expect_invalid(p, "q", "head_dim D <= 256", "D = 257");
}

TEST(Validate, MixedDtypes) {
  Fixture f;
  HostTensor v16(DType::kBFloat16, {2, 2, 10, 16});
  auto p = f.params();
  p.v = v16.view();
  expect_invalid(p, "v", "dtype fp32", "bf16");
  HostTensor lse16(DType::kBFloat16, {2, 4, 8});
  p = f.params();
  p.lse = lse16.mutable_view();
  expect_invalid(p, "lse", "dtype fp32", "bf16");
}

TEST(Validate, HeadDimNotContiguous) {
  Fixture f;
  auto p = f.params();
  p.q.strides[3] = 2;
  p.q.shape[3] = 8;
  p.k.shape[3] = 8;
  p.v.shape[3] = 8;
  p.o.shape[3] = 8;
  expect_invalid(p, "q", "contiguous last dimension (stride 1)", "stride 2");
}

TEST(Validate, NegativeStride) {
  Fixture f;
  auto p = f.params();
  p.k.strides[2] = -16;
  expect_invalid(p, "k", "non-negative strides", "stride -16 in dimension 2");
}

TEST(Validate, OffsetsOverflow64Bits) {
  Fixture f;
  auto p = f.params();
  p.q.strides[0] = std::numeric_limits<std::int64_t>::max() / 2;
  p.q.strides[1] = std::numeric_limits<std::int64_t>::max() / 2;
  expect_invalid(p, "q", "offsets that fit in 64 bits", "[2, 4, 8, 16]");
  p = f.params();
  p.k.strides[0] = std::numeric_limits<std::int64_t>::max() / 3;
  expect_invalid(p, "k", "byte offsets that fit in 64 bits", "[2, 2, 10, 16]");
}

// A shape of 2^63 elements or more: contiguous() neither overflows (its strides saturate at
// INT64_MAX, never wrap) nor passes the checks.
TEST(Validate, ContiguousViewsOfHugeShapes) {
  Fixture f;
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  const TensorView wide = TensorView::contiguous(f.q.view().data, DType::kFloat32, {1 << 19, 1 << 20, 1 << 20, 64});
  EXPECT_EQ(wide.strides, (std::array<std::int64_t, 4>{std::int64_t{1} << 46, 1 << 26, 64, 1}));
  const TensorView huge = TensorView::contiguous(f.q.view().data, DType::kFloat32, {2, 1 << 30, 1 << 30, 1024});
  EXPECT_EQ(huge.strides, (std::array<std::int64_t, 4>{kMax, std::int64_t{1} << 40, 1024, 1}));
  for (const TensorView& q : {wide, huge}) {
    auto p = f.params();
    p.q = q;
    expect_invalid(p, "q", "offsets that fit in 64 bits", "");
  }
}

TEST(Validate, OutputAliasingAnInputOrItself) {
  Fixture f;
  auto p = f.params();
  p.o.data = const_cast<void*>(p.q.data);
  expect_invalid(p, "o", "memory disjoint from input 'q'", "an overlap");
  p = f.params();
  p.lse.data = f.o.mutable_view().data;
  expect_invalid(p, "lse", "memory disjoint from 'o'", "an overlap");
  p = f.params();
  p.o.strides[1] = 0;
  expect_invalid(p, "o", "whose elements do not overlap", "strides that alias");
}

TEST(Validate, BadOptions) {
  Fixture f;
  auto p = f.params();
  p.softmax_scale = std::numeric_limits<float>::infinity();
  expect_invalid(p, "softmax_scale", "a finite number", "inf");
  p = f.params();
  p.block_q = -1;
  expect_invalid(p, "block_q", "0 (automatic) or 1..4096", "-1");
  p = f.params();
  p.block_k = 5000;
  expect_invalid(p, "block_k", "0 (automatic) or 1..4096", "5000");
  p = f.params();
  p.num_threads = -3;
  expect_invalid(p, "num_threads", "0 (all) or a positive count", "-3");
}

TEST(Validate, ErrorLeavesOutputsUntouched) {
  Fixture f;
  f.o.poison();
  auto p = f.params();
  p.v.shape[2] = 9;
  EXPECT_THROW(flash_attention_forward(p), Error);
  EXPECT_FALSE(f.o.all_finite_or_neg_inf());
}

}  // namespace
}  // namespace pflash::testing

// The mask and the score options (pflash/mask.hpp), through the forward and the naive baseline.
namespace pflash::testing {
namespace {

TEST(ValidateMask, BadGeometry) {
  Fixture f;
  auto p = f.params();
  p.mask.window_left = -2;
  expect_invalid(p, "window_left", "a window edge >= 0, or kUnboundedWindow (-1)", "-2");
  p = f.params();
  p.mask.window_right = -5;
  expect_invalid(p, "window_right", "a window edge >= 0", "-5");
  p = f.params();
  p.mask.chunk_size = -1;
  expect_invalid(p, "chunk_size", "0 (no chunks) or a chunk of positions > 0", "-1");
}

TEST(ValidateMask, BadSegmentIdsAndLengths) {
  Fixture f;
  const std::vector<std::int32_t> q_ids(2 * 8), kv_ids(2 * 10), short_ids(7), lengths{3, 11}, one_length{3};
  auto p = f.params();
  p.mask.q_segment_ids = q_ids;
  expect_invalid(p, "kv_segment_ids", "segment ids for both queries and keys, or for neither", "only the other's");
  p.mask.kv_segment_ids = short_ids;
  expect_invalid(p, "kv_segment_ids", "one id per key row, [B * Nk] (20 values)", "7 values");
  p = f.params();
  p.mask.kv_lengths = lengths;
  expect_invalid(p, "kv_lengths", "lengths in 0..10", "kv_lengths[1] = 11");
  p = f.params();
  p.mask.q_lengths = one_length;
  expect_invalid(p, "q_lengths", "empty or one length per sequence (2 values)", "1 values");
}

TEST(ValidateMask, BadSoftCapAndSinks) {
  Fixture f;
  auto p = f.params();
  p.logits_soft_cap = -1.0f;
  expect_invalid(p, "logits_soft_cap", "0 (none) or a finite cap > 0", "-1");
  p.logits_soft_cap = std::numeric_limits<float>::infinity();
  expect_invalid(p, "logits_soft_cap", "0 (none) or a finite cap > 0", "inf");
  HostTensor sinks(DType::kFloat32, {3, 1, 1}), bf16_sinks(DType::kBFloat16, {4, 1, 1});
  p = f.params();
  p.sinks = TensorView::contiguous(sinks.view().data, DType::kFloat32, {3});
  expect_invalid(p, "sinks", "shape [4] (one logit per query head)", "[3]");
  p.sinks = TensorView::contiguous(bf16_sinks.view().data, DType::kBFloat16, {4});
  expect_invalid(p, "sinks", "dtype fp32 (sink logits are fp32)", "bf16");
}

TEST(ValidateMask, DsinksNeedsTheSinks) {
  Fixture f;
  HostTensor dout{DType::kFloat32, {2, 4, 8, 16}}, dq{DType::kFloat32, {2, 4, 8, 16}}, dk{DType::kFloat32, {2, 2, 10, 16}},
      dv{DType::kFloat32, {2, 2, 10, 16}}, dsinks{DType::kFloat32, {4, 1, 1}};
  AttentionBackwardParams p;
  p.q = f.q.view();
  p.k = f.k.view();
  p.v = f.v.view();
  p.o = f.o.view();
  p.lse = f.lse.view();
  p.dout = dout.view();
  p.dq = dq.mutable_view();
  p.dk = dk.mutable_view();
  p.dv = dv.mutable_view();
  p.dsinks = MutableTensorView::contiguous(dsinks.mutable_view().data, DType::kFloat32, {4});
  try {
    flash_attention_backward(p);
    ADD_FAILURE() << "no error for dsinks without sinks";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'dsinks': expected the forward's sinks"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace pflash::testing
