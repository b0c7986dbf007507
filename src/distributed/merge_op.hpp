// The merge of partial attention results as MPI objects. A state is one query row's partial result,
// D + 1 floats: O (normalised, fp32) then its LSE; an MPI datatype covers one state, and the
// reduction operator merges two states with merge_row (so an all-reduce gives the exact merge of
// every rank's state, in whatever order MPI pairs them).
#pragma once

#include <mpi.h>

#include <cstdint>

namespace pflash::detail {

// Commutative (the merge is); created on first use, freed by MPI_Finalize.
MPI_Op merge_states_op();

// A committed datatype of one state of head dimension `dim`, freed when this goes out of scope.
class StateType {
 public:
  explicit StateType(std::int64_t dim);
  ~StateType();
  StateType(const StateType&) = delete;
  StateType& operator=(const StateType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

}  // namespace pflash::detail
