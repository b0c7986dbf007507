// sharded_flash_decode: the local split-KV decode of this rank's shard, an agreement that every rank
// succeeded, and one collective that combines the partial states exactly.
#include "pflash/distributed/sharded_decode.hpp"

#include <mpi.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "core/checker.hpp"
#include "core/merge_row.hpp"
#include "core/shard.hpp"
#include "core/validate_decode.hpp"
#include "distributed/merge_op.hpp"
#include "distributed/mpi_check.hpp"
#include "pflash/decode.hpp"
#include "pflash/dtype.hpp"
#include "pflash/error.hpp"

namespace pflash {
namespace {

constexpr const char* kName = "sharded_flash_decode";

struct Failure {
  bool failed = false;
  ErrorCode code = ErrorCode::kInvalidArgument;
  std::string message;
};

// The problem's sizes, and each query row's state ([B * Hq * T] rows of D + 1 floats: O, then LSE).
struct LocalResult {
  std::int64_t batch = 0, heads_q = 0, tokens = 0, dim = 0;
  std::vector<float> states;
  std::int64_t rows() const { return batch * heads_q * tokens; }
};

LocalResult decode_shard(const Mesh& mesh, const ShardedDecodeParams& params) {
  const detail::Checker check(kName);
  check.tensor("q", params.q, 4, "[B, Hq, T, D]");
  LocalResult r{params.q.size(0), params.q.size(1), params.q.size(2), params.q.size(3), {}};
  const KVCacheShardView& shard = params.cache;
  if (shard.layout.shards() != mesh.size()) {
    check.fail("cache.layout", "one shard per rank of the " + to_string(mesh.shape()) + " mesh (" +
                                   std::to_string(mesh.size()) + ")",
               std::to_string(shard.layout.shards()) + " shards");
  }
  if (shard.shard != mesh.rank()) {
    check.fail("cache.shard", "this rank's index in the mesh, " + std::to_string(mesh.rank()), std::to_string(shard.shard));
  }
  const std::vector<ShardExtent> extents = detail::check_shard(check, shard);
  detail::check_decode_outputs(check, params.q, params.o, params.lse,
                               {{"q", params.q}, {"cache.local.k", shard.local.k}, {"cache.local.v", shard.local.v},
                                {"cache.local.seq_lens", detail::index_view(shard.local.seq_lens)},
                                {"cache.local.block_table", detail::index_view(shard.local.block_table)},
                                {"cache.seq_lens", detail::index_view(shard.seq_lens)}});
  if (params.combine != CombineAlgorithm::kAuto && params.combine != CombineAlgorithm::kAllReduce &&
      params.combine != CombineAlgorithm::kAllGather) {
    check.fail("combine", "kAuto, kAllReduce or kAllGather", std::to_string(static_cast<int>(params.combine)));
  }

  const std::int64_t rows = r.rows(), dim = r.dim;
  r.states.assign(static_cast<std::size_t>(rows * (dim + 1)), 0.0f);
  auto state = [&](std::int64_t row) { return r.states.data() + row * (dim + 1); };
  if (shard.layout.size(shard.shard) == 0 && shard.local.k.empty()) {
    // A shard that owns no positions may come without storage: it sees nothing.
    for (std::int64_t row = 0; row < rows; ++row) state(row)[dim] = -INFINITY;
    return r;
  }
  // The local decode's partials in fp32, whatever q's dtype, so that the merge rounds once.
  std::vector<float> o_part(static_cast<std::size_t>(rows * dim)), lse_part(static_cast<std::size_t>(rows));
  std::vector<std::int32_t> after(extents.size());
  for (std::size_t b = 0; b < extents.size(); ++b) after[b] = extents[b].after;
  DecodeParams local;
  local.q = params.q;
  local.cache = shard.local;
  local.o = MutableTensorView::contiguous(o_part.data(), DType::kFloat32, {r.batch, r.heads_q, r.tokens, dim});
  local.lse = MutableTensorView::contiguous(lse_part.data(), DType::kFloat32, {r.batch, r.heads_q, r.tokens});
  local.softmax_scale = params.softmax_scale;
  local.window_left = params.window_left;
  local.logits_soft_cap = params.logits_soft_cap;
  if (shard.shard == 0) local.sinks = params.sinks;  // merged once: a sink is a partial (O = 0, LSE = sink)
  local.positions_after = after;
  local.num_splits = params.num_splits;
  local.num_threads = params.num_threads;
  try {
    flash_decode(local);
  } catch (const Error& e) {
    throw Error(e.code(), std::string(kName) + " (the local decode of shard " + std::to_string(shard.shard) +
                              "): " + e.what());
  }
  for (std::int64_t row = 0; row < rows; ++row) {
    std::copy(o_part.data() + row * dim, o_part.data() + (row + 1) * dim, state(row));
    state(row)[dim] = lse_part[static_cast<std::size_t>(row)];
  }
  return r;
}

// Every rank learns whether all local decodes succeeded and whether they agree on the problem's size
// (a collective with mismatched counts would otherwise fail or hang); the first failing rank's
// message is broadcast, and every rank throws.
void agree(const Mesh& mesh, const Failure& failure, const LocalResult& r) {
  const int size = mesh.size(), rank = mesh.rank();
  const int rows = failure.failed ? INT_MAX : static_cast<int>(r.rows());
  const int dim = failure.failed ? INT_MAX : static_cast<int>(r.dim);
  int mine[5] = {failure.failed ? rank : size, rows, dim, failure.failed ? INT_MIN + 1 : -rows,
                 failure.failed ? INT_MIN + 1 : -dim};
  int agreed[5] = {};
  detail::check_mpi(MPI_Allreduce(mine, agreed, 5, MPI_INT, MPI_MIN, mesh.comm()), "MPI_Allreduce", rank);
  const int first_failed = agreed[0];
  if (first_failed < size) {
    std::string message = failure.message;
    int length = static_cast<int>(message.size());
    detail::check_mpi(MPI_Bcast(&length, 1, MPI_INT, first_failed, mesh.comm()), "MPI_Bcast", rank);
    message.resize(static_cast<std::size_t>(length));
    detail::check_mpi(MPI_Bcast(message.data(), length, MPI_CHAR, first_failed, mesh.comm()), "MPI_Bcast", rank);
    if (failure.failed) throw Error(failure.code, failure.message);
    throw Error(ErrorCode::kPeerFailed, std::string(kName) + ": rank " + std::to_string(first_failed) +
                                            " of the mesh failed: " + message);
  }
  if (agreed[1] != -agreed[3] || agreed[2] != -agreed[4]) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(kName) + ": argument 'q': expected the same shape on every rank, got B * Hq * T = " + std::to_string(r.rows()) + ", D = " +
                    std::to_string(r.dim) + " on rank " + std::to_string(rank) + " and other sizes elsewhere");
  }
}

// o, lse of every row = the merge of `parts` states, part i of row j at base + i * part_stride + j * (D + 1).
template <class TOut>
void write_rows(const ShardedDecodeParams& params, const LocalResult& r, const float* base, std::int64_t parts,
                std::int64_t part_stride) {
  const std::int64_t dim = r.dim, state = dim + 1;
  const MutableTensorView& o = params.o;
  float* lse = params.lse.empty() ? nullptr : static_cast<float*>(params.lse.data);
  for (std::int64_t b = 0; b < r.batch; ++b) {
    for (std::int64_t h = 0; h < r.heads_q; ++h) {
      for (std::int64_t t = 0; t < r.tokens; ++t) {
        const std::int64_t row = (b * r.heads_q + h) * r.tokens + t;
        TOut* o_row = static_cast<TOut*>(o.data) + b * o.stride(0) + h * o.stride(1) + t * o.stride(2);
        float* lse_row = lse ? lse + b * params.lse.stride(0) + h * params.lse.stride(1) + t * params.lse.stride(2)
                             : nullptr;
        detail::merge_row(parts, dim, base + row * state, part_stride, base + row * state + dim, part_stride, o_row,
                          lse_row);
      }
    }
  }
}

void write_output(const ShardedDecodeParams& params, const LocalResult& r, const float* base, std::int64_t parts,
                  std::int64_t part_stride) {
  if (params.o.dtype == DType::kBFloat16) {
    write_rows<bfloat16>(params, r, base, parts, part_stride);
  } else {
    write_rows<float>(params, r, base, parts, part_stride);
  }
}

}  // namespace

ShardedDecodeTimes sharded_flash_decode(const Mesh& mesh, const ShardedDecodeParams& params) {
  const double start = MPI_Wtime();
  Failure failure;
  LocalResult r;
  try {
    r = decode_shard(mesh, params);
  } catch (const Error& e) {
    failure = {true, e.code(), e.what()};
  } catch (const std::bad_alloc&) {
    failure = {true, ErrorCode::kOutOfMemory, std::string(kName) + ": out of memory on rank " + std::to_string(mesh.rank())};
  } catch (const std::exception& e) {
    failure = {true, ErrorCode::kUnsupported, std::string(kName) + ": " + e.what()};
  }
  const double local_done = MPI_Wtime();
  agree(mesh, failure, r);

  // One (O, LSE) state per query row: the combine moves P x rows x (D + 1) floats, a few KiB, against
  // the shard's hundreds of MiB read by the local decode.
  const detail::StateType state_type(r.dim);
  const auto rows = static_cast<int>(r.rows());
  const std::int64_t state = r.dim + 1;
  if (params.combine == CombineAlgorithm::kAllReduce) {
    detail::check_mpi(MPI_Allreduce(MPI_IN_PLACE, r.states.data(), rows, state_type.get(), detail::merge_states_op(),
                                    mesh.comm()),
                      "MPI_Allreduce", mesh.rank());
    write_output(params, r, r.states.data(), 1, 0);  // the merge of one part: a copy, in o's dtype
  } else {
    std::vector<float> gathered(static_cast<std::size_t>(mesh.size() * r.rows() * state));
    detail::check_mpi(MPI_Allgather(r.states.data(), rows, state_type.get(), gathered.data(), rows, state_type.get(),
                                    mesh.comm()),
                      "MPI_Allgather", mesh.rank());
    write_output(params, r, gathered.data(), mesh.size(), r.rows() * state);
  }
  return {local_done - start, MPI_Wtime() - local_done};
}

}  // namespace pflash
