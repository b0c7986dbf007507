#include "distributed/merge_op.hpp"

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "core/merge_row.hpp"
#include "pflash/attention.hpp"

namespace pflash::detail {
namespace {

// MPI's user-function signature: inout[i] = merge(in[i], inout[i]) for `count` states.
void merge_states(void* in, void* inout, int* count, MPI_Datatype* type) {
  int bytes = 0;
  MPI_Type_size(*type, &bytes);
  const std::int64_t stride = bytes / static_cast<int>(sizeof(float)), dim = stride - 1;
  // The two states side by side, so merge_row reads them as two parts of one row.
  float pair[2 * (kMaxHeadDim + 1)];
  const float* a = static_cast<const float*>(in);
  float* b = static_cast<float*>(inout);
  for (int i = 0; i < *count; ++i, a += stride, b += stride) {
    std::copy(a, a + stride, pair);
    std::copy(b, b + stride, pair + stride);
    merge_row(2, dim, pair, stride, pair + dim, stride, b, b + dim);
  }
}

}  // namespace

MPI_Op merge_states_op() {
  static MPI_Op op = MPI_OP_NULL;
  static std::once_flag created;
  std::call_once(created, [] { MPI_Op_create(&merge_states, /*commute=*/1, &op); });
  return op;
}

StateType::StateType(std::int64_t dim) {
  MPI_Type_contiguous(static_cast<int>(dim + 1), MPI_FLOAT, &type_);
  MPI_Type_commit(&type_);
}

StateType::~StateType() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Type_free(&type_);
}

}  // namespace pflash::detail
