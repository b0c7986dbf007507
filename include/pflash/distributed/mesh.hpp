// A 2D mesh of processes over MPI: rows x cols ranks in a periodic Cartesian communicator (a 2D
// torus, as the chips of a TPU v5e-4 are wired), built collectively from an existing communicator.
// Rank r of the mesh is rank r of that communicator (no reordering), at coordinates
// (r / cols, r % cols). The mesh's communicator returns MPI errors to the caller rather than
// aborting, and every failure becomes a pflash::Error naming the rank.
#pragma once

#include <mpi.h>

#include <array>
#include <string>
#include <string_view>

namespace pflash {

struct MeshShape {
  int rows = 2;
  int cols = 2;
  int size() const { return rows * cols; }
};

// "RxC" (e.g. "2x2", "1x4"), both at least 1; throws pflash::Error naming the text otherwise.
MeshShape parse_mesh_shape(std::string_view text);
std::string to_string(MeshShape shape);

class Mesh {
 public:
  // Collective over comm. Throws pflash::Error on every rank when shape.size() differs from comm's
  // size, or when the ranks were given different shapes.
  explicit Mesh(MPI_Comm comm, MeshShape shape = {});
  ~Mesh();
  Mesh(Mesh&& other) noexcept;
  Mesh& operator=(Mesh&& other) noexcept;
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return shape_.size(); }
  MeshShape shape() const { return shape_; }
  std::array<int, 2> coords() const { return coords_; }  // (row, col)

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  MeshShape shape_;
  int rank_ = 0;
  std::array<int, 2> coords_{};
};

}  // namespace pflash
