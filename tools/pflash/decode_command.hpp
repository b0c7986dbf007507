// `pflash decode`: FlashDecoding over a KV cache sharded across a mesh of MPI ranks (launch with
// mpirun -np R*C). Every rank fills its shard of a seeded random cache, then each step appends the
// new token's K/V (on the owning rank only) and decodes over the mesh; rank 0 prints per-step latency
// split into local attention and combine, tokens/s, and the bytes each rank read.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

namespace pflash::tool {

struct DecodeCommandArgs {
  std::string mesh = "2x2";
  std::int64_t batch = 1, heads = 32, kv_heads = 8, dim = 128;
  std::int64_t context = 32768;
  std::int64_t query_tokens = 1;
  std::int64_t page_size = 0;
  std::string dtype = "bf16";
  std::int64_t steps = 16;
  int warmup = 2;
  std::vector<std::string> combine{"auto"};
  std::uint64_t seed = 0;
  int threads = 0;  // per rank; 0: this host's cores / the ranks on it
  bool check = false;
  std::string json;
  int fail_rank = -1;           // testing aid: this rank fails at the first step
  std::string fail_mode = "throw";  // throw, or kill (the process dies by SIGKILL)
};

CLI::App* add_decode_command(CLI::App& app, DecodeCommandArgs& args);

// Initialises and finalises MPI itself; returns the process's exit status (failures abort the job).
int run_decode_command(const DecodeCommandArgs& args, int* argc, char*** argv);

}  // namespace pflash::tool
