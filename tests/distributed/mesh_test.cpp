// The mesh over however many ranks mpirun started (1, 2 or 4 in CI).
#include <gtest/gtest.h>
#include <mpi.h>

#include "distributed/world.hpp"
#include "pflash/distributed/mesh.hpp"
#include "pflash/error.hpp"
#include "support/errors.hpp"

namespace pflash::testing {
namespace {

TEST(Mesh, TorusCoordinatesAndWrapAround) {
  const int p = world_size();
  // Every factorisation of the world into rows x cols.
  for (int rows = 1; rows <= p; ++rows) {
    if (p % rows != 0) continue;
    const Mesh mesh(MPI_COMM_WORLD, {rows, p / rows});
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    EXPECT_EQ(mesh.rank(), world_rank) << "no reordering";
    EXPECT_EQ(mesh.size(), p);
    EXPECT_EQ(mesh.coords()[0], world_rank / (p / rows));
    EXPECT_EQ(mesh.coords()[1], world_rank % (p / rows));
    int topology = 0;
    MPI_Topo_test(mesh.comm(), &topology);
    EXPECT_EQ(topology, MPI_CART);
    // Periodic: the neighbour below the last row is the first row.
    int source = 0, below = 0;
    MPI_Cart_shift(mesh.comm(), 0, 1, &source, &below);
    EXPECT_EQ(below, ((mesh.coords()[0] + 1) % rows) * (p / rows) + mesh.coords()[1]);
  }
}

TEST(Mesh, SizeMismatchIsAnErrorOnEveryRank) {
  const int p = world_size();
  expect_invalid_argument([&] { Mesh(MPI_COMM_WORLD, {p + 1, 1}); }, "Mesh", "shape",
                          "expected " + std::to_string(p) + " ranks (the communicator's size)",
                          "a " + std::to_string(p + 1) + "x1 mesh of " + std::to_string(p + 1));
  if (p != 4) {
    expect_invalid_argument([&] { Mesh(MPI_COMM_WORLD); }, "Mesh", "shape", "", "a 2x2 mesh of 4");
  }
}

TEST(Mesh, ParsesShapes) {
  EXPECT_EQ(parse_mesh_shape("2x2").size(), 4);
  EXPECT_EQ(parse_mesh_shape("1X4").cols, 4);
  EXPECT_EQ(parse_mesh_shape("3x1").rows, 3);
  for (const char* bad : {"", "2", "2x", "x2", "0x4", "2x2x2", "-1x4", "axb"}) {
    try {
      parse_mesh_shape(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("expected ROWSxCOLS"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace pflash::testing
