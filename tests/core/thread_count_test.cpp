// A thread count past what the machine runs is clamped, never fatal: each entry point asked for
// 100000 threads, with enough work items to use them all, gives the bits one thread gives.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "pflash/pflash.hpp"
#include "support/kv_cache.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

constexpr int kTooMany = 100000;

TEST(ThreadCount, ResolvedCountsStayWithinTheMachine) {
  EXPECT_EQ(resolve_num_threads(0), default_num_threads());
  EXPECT_EQ(resolve_num_threads(1), 1);
  const int machine = std::max(omp_get_num_procs(), omp_get_max_threads());
  EXPECT_GE(resolve_num_threads(kTooMany), 1);
  EXPECT_LE(resolve_num_threads(kTooMany), machine);
}

TEST(ThreadCount, ForwardWithOneQueryRowPerBlock) {
  auto rng = make_rng();
  constexpr std::int64_t kRows = 100000;  // block_q = 1: one task per query row
  HostTensor q(DType::kFloat32, {1, 1, kRows, 8}), k(DType::kFloat32, {1, 1, 5, 8}), v(DType::kFloat32, {1, 1, 5, 8});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  std::vector<HostTensor> outputs;
  for (int threads : {1, kTooMany}) {
    HostTensor o(DType::kFloat32, {1, 1, kRows, 8});
    o.poison();
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.mutable_view();
    p.block_q = 1;
    p.num_threads = threads;
    ASSERT_NO_THROW(flash_attention_forward(p));
    outputs.push_back(o);
  }
  EXPECT_EQ(outputs[0].bytes(), outputs[1].bytes());
}

TEST(ThreadCount, DecodeWithManySplits) {
  auto rng = make_rng();
  TestCache cache(CacheSpec{DType::kBFloat16, 400, 1, 16, 512, 0}, rng);
  cache.fill(std::vector<std::int32_t>(400, 512), rng);
  HostTensor q(DType::kBFloat16, {400, 2, 1, 16});
  q.fill_normal(rng);
  std::vector<HostTensor> outputs;
  for (int threads : {1, kTooMany}) {
    HostTensor o(DType::kFloat32, {400, 2, 1, 16});
    o.poison();
    DecodeParams p;
    p.q = q.view();
    p.cache = cache.view();
    p.o = o.mutable_view();
    p.num_splits = kMaxDecodeSplits;
    p.num_threads = threads;
    ASSERT_NO_THROW(flash_decode(p));
    outputs.push_back(o);
  }
  EXPECT_EQ(outputs[0].bytes(), outputs[1].bytes());
}

TEST(ThreadCount, MergeOfManyRows) {
  auto rng = make_rng();
  HostTensor o_parts(DType::kFloat32, {4, 512, 1, 128}), lse_parts(DType::kFloat32, {4, 512, 1});
  o_parts.fill_normal(rng);
  lse_parts.fill_normal(rng);
  std::vector<HostTensor> outputs;
  for (int threads : {1, kTooMany}) {
    HostTensor o(DType::kFloat32, {512, 1, 128}), lse(DType::kFloat32, {512, 1});
    o.poison();
    MergeParams p;
    p.o_partials = o_parts.view();
    p.lse_partials = lse_parts.view();
    p.o = o.mutable_view();
    p.lse = lse.mutable_view();
    p.num_threads = threads;
    ASSERT_NO_THROW(merge_attention_states(p));
    outputs.push_back(o);
  }
  EXPECT_EQ(outputs[0].bytes(), outputs[1].bytes());
}

}  // namespace
}  // namespace pflash::testing
