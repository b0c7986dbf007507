#include "decode_command.hpp"

#include <mpi.h>
#include <omp.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <functional>
#include <cmath>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cli_checks.hpp"
#include "output.hpp"
#include "pflash/distributed/sharded_decode.hpp"
#include "pflash/pflash.hpp"
#include "report.hpp"

namespace pflash::tool {
namespace {

// Counter-based values in [-sqrt(3), sqrt(3)) (unit variance): every rank computes any position's
// K/V, or a step's query, without the others, so the cache is the same however it is sharded.
enum Stream : std::uint64_t { kKeys = 1, kValues = 2, kQueries = 3 };

float seeded_value(std::uint64_t seed, Stream stream, std::uint64_t index) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + stream * 0xbf58476d1ce4e5b9ull + index;  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>((static_cast<double>(z >> 11) * 0x1.0p-53 * 2.0 - 1.0) * 1.7320508075688772);
}

void store(void* base, DType dtype, std::int64_t index, float value) {
  if (dtype == DType::kBFloat16) {
    static_cast<bfloat16*>(base)[index] = bfloat16(value);
  } else {
    static_cast<float*>(base)[index] = value;
  }
}

struct Shape {
  std::int64_t batch, heads_q, heads_kv, dim, tokens, page_size;
  DType dtype;
};

// This rank's shard: K/V storage (contiguous [B, Hkv, positions, D], or pages [B * pages, Hkv, page, D]
// with an identity block table), the lengths it holds, and the whole sequences' lengths.
class Shard {
 public:
  Shard(const Shape& s, const ShardLayout& layout, int rank) : s_(s), layout_(layout), rank_(rank) {
    const std::int64_t positions = std::max<std::int64_t>(layout.size(rank), 1);
    if (s.page_size > 0) {
      pages_per_seq_ = (positions + s.page_size - 1) / s.page_size;
      rows_ = s.page_size;
      blocks_ = s.batch * pages_per_seq_;
      for (std::int32_t page = 0; page < blocks_; ++page) block_table_.push_back(page);
    } else {
      rows_ = positions;
      blocks_ = s.batch;
    }
    const auto bytes = static_cast<std::size_t>(blocks_ * s.heads_kv * rows_ * s.dim) * size_of(s.dtype);
    k_.resize(bytes);
    v_.resize(bytes);
    held_.assign(static_cast<std::size_t>(s.batch), 0);
    seq_lens_.assign(static_cast<std::size_t>(s.batch), 0);
  }

  MutableKVCacheShard view() {
    const MutableTensorView k = MutableTensorView::contiguous(k_.data(), s_.dtype, {blocks_, s_.heads_kv, rows_, s_.dim});
    const MutableTensorView v = MutableTensorView::contiguous(v_.data(), s_.dtype, {blocks_, s_.heads_kv, rows_, s_.dim});
    return {MutableKVCache{k, v, held_, block_table_}, seq_lens_, layout_, rank_};
  }

  // Sets every sequence to `length` positions, writing the seeded values of this shard's part.
  void fill(std::int64_t length, std::uint64_t seed) {
    for (std::int64_t b = 0; b < s_.batch; ++b) {
      seq_lens_[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(length);
      const std::int32_t held = layout_.extent(rank_, length).held;
      held_[static_cast<std::size_t>(b)] = held;
#pragma omp parallel for schedule(static)
      for (std::int64_t p = 0; p < held; ++p) {
        for (std::int64_t h = 0; h < s_.heads_kv; ++h) {
          for (std::int64_t d = 0; d < s_.dim; ++d) {
            const std::uint64_t index = position_index(b, h, layout_.begin(rank_) + p) + static_cast<std::uint64_t>(d);
            store(k_.data(), s_.dtype, offset(b, h, p) + d, seeded_value(seed, kKeys, index));
            store(v_.data(), s_.dtype, offset(b, h, p) + d, seeded_value(seed, kValues, index));
          }
        }
      }
    }
  }

  // The seeded index of (sequence, KV head, global position)'s first element.
  std::uint64_t position_index(std::int64_t b, std::int64_t h, std::int64_t position) const {
    return static_cast<std::uint64_t>(((b * s_.heads_kv + h) * layout_.capacity() + position) * s_.dim);
  }

  // Element offset of local position p of (b, h) in k_ / v_.
  std::int64_t offset(std::int64_t b, std::int64_t h, std::int64_t p) const {
    if (s_.page_size == 0) return ((b * s_.heads_kv + h) * rows_ + p) * s_.dim;
    const std::int64_t page = block_table_[static_cast<std::size_t>(b * pages_per_seq_ + p / s_.page_size)];
    return ((page * s_.heads_kv + h) * rows_ + p % s_.page_size) * s_.dim;
  }

  // The K then V rows this shard holds, [B][Hkv][held_b][D] each, as bytes (for --check's gather).
  std::vector<unsigned char> pack() const {
    std::vector<unsigned char> out;
    const std::size_t row = static_cast<std::size_t>(s_.dim) * size_of(s_.dtype);
    for (const auto* storage : {&k_, &v_})
      for (std::int64_t b = 0; b < s_.batch; ++b)
        for (std::int64_t h = 0; h < s_.heads_kv; ++h)
          for (std::int64_t p = 0; p < held_[static_cast<std::size_t>(b)]; ++p) {
            const unsigned char* src = storage->data() + static_cast<std::size_t>(offset(b, h, p)) * size_of(s_.dtype);
            out.insert(out.end(), src, src + row);
          }
    return out;
  }

  // Bytes of K and V the local decode reads: every held position of every KV head, once.
  double bytes_read() const {
    double positions = 0;
    for (std::int32_t held : held_) positions += held;
    return positions * 2.0 * static_cast<double>(s_.heads_kv * s_.dim) * static_cast<double>(size_of(s_.dtype));
  }

  const std::vector<std::int32_t>& seq_lens() const { return seq_lens_; }
  const std::vector<std::int32_t>& held() const { return held_; }

 private:
  Shape s_;
  ShardLayout layout_;
  int rank_;
  std::int64_t rows_ = 0, blocks_ = 0, pages_per_seq_ = 0;
  std::vector<unsigned char> k_, v_;
  std::vector<std::int32_t> held_, seq_lens_, block_table_;
};

// A [B, H, T, D] tensor of seeded values: the step's query, or its new K/V rows at their positions.
std::vector<unsigned char> seeded_tensor(const Shape& s, std::int64_t heads, std::uint64_t seed, Stream stream,
                                         const std::function<std::uint64_t(std::int64_t, std::int64_t, std::int64_t)>& index) {
  std::vector<unsigned char> out(static_cast<std::size_t>(s.batch * heads * s.tokens * s.dim) * size_of(s.dtype));
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t t = 0; t < s.tokens; ++t)
        for (std::int64_t d = 0; d < s.dim; ++d)
          store(out.data(), s.dtype, ((b * heads + h) * s.tokens + t) * s.dim + d,
                seeded_value(seed, stream, index(b, h, t) + static_cast<std::uint64_t>(d)));
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

CombineAlgorithm parse_combine(const std::string& name) {
  return name == "allreduce" ? CombineAlgorithm::kAllReduce
         : name == "allgather" ? CombineAlgorithm::kAllGather
                               : CombineAlgorithm::kAuto;
}

int threads_per_rank(int requested) {
  if (requested > 0) return requested;
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int local_ranks = 1;
  MPI_Comm_size(node, &local_ranks);
  MPI_Comm_free(&node);
  return std::max(1, omp_get_num_procs() / local_ranks);
}

// Rank 0 assembles the whole cache from every shard, decodes q over it on one device, and compares.
bool check_against_single_device(const Mesh& mesh, const Shape& s, const ShardLayout& layout, const Shard& shard,
                                 const std::vector<unsigned char>& q, const std::vector<unsigned char>& o_sharded,
                                 const std::vector<float>& lse_sharded, nlohmann::json& report) {
  const std::vector<unsigned char> mine = shard.pack();
  const int count = static_cast<int>(mine.size());
  std::vector<int> counts(static_cast<std::size_t>(mesh.size())), displs(static_cast<std::size_t>(mesh.size()));
  MPI_Gather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, mesh.comm());
  std::vector<unsigned char> all;
  if (mesh.rank() == 0) {
    int total = 0;
    for (int r = 0; r < mesh.size(); ++r) {
      displs[static_cast<std::size_t>(r)] = total;
      total += counts[static_cast<std::size_t>(r)];
    }
    all.resize(static_cast<std::size_t>(total));
  }
  MPI_Gatherv(mine.data(), count, MPI_BYTE, all.data(), counts.data(), displs.data(), MPI_BYTE, 0, mesh.comm());
  if (mesh.rank() != 0) return true;

  const std::int64_t capacity = layout.capacity();
  const std::size_t elem = size_of(s.dtype), row = static_cast<std::size_t>(s.dim) * elem;
  std::vector<unsigned char> k(static_cast<std::size_t>(s.batch * s.heads_kv * capacity) * row), v(k.size());
  for (int r = 0; r < mesh.size(); ++r) {
    const unsigned char* src = all.data() + displs[static_cast<std::size_t>(r)];
    for (auto* storage : {&k, &v})
      for (std::int64_t b = 0; b < s.batch; ++b)
        for (std::int64_t h = 0; h < s.heads_kv; ++h) {
          const std::int32_t held = layout.extent(r, shard.seq_lens()[static_cast<std::size_t>(b)]).held;
          for (std::int64_t p = 0; p < held; ++p, src += row) {
            const std::int64_t position = layout.begin(r) + p;
            std::memcpy(storage->data() + static_cast<std::size_t>((b * s.heads_kv + h) * capacity + position) * row, src, row);
          }
        }
  }
  std::vector<unsigned char> o(o_sharded.size());
  std::vector<float> lse(lse_sharded.size());
  DecodeParams one;
  one.q = TensorView::contiguous(q.data(), s.dtype, {s.batch, s.heads_q, s.tokens, s.dim});
  one.cache = KVCacheView{TensorView::contiguous(k.data(), s.dtype, {s.batch, s.heads_kv, capacity, s.dim}),
                          TensorView::contiguous(v.data(), s.dtype, {s.batch, s.heads_kv, capacity, s.dim}),
                          shard.seq_lens(), {}};
  one.o = MutableTensorView::contiguous(o.data(), s.dtype, {s.batch, s.heads_q, s.tokens, s.dim});
  one.lse = MutableTensorView::contiguous(lse.data(), DType::kFloat32, {s.batch, s.heads_q, s.tokens});
  flash_decode(one);

  auto value = [&](const std::vector<unsigned char>& t, std::size_t i) {
    return s.dtype == DType::kBFloat16 ? static_cast<double>(static_cast<float>(reinterpret_cast<const bfloat16*>(t.data())[i]))
                                       : static_cast<double>(reinterpret_cast<const float*>(t.data())[i]);
  };
  double diff2 = 0.0, ref2 = 0.0, lse_diff = 0.0;
  for (std::size_t i = 0; i < o.size() / elem; ++i) {
    const double d = value(o_sharded, i) - value(o, i);
    diff2 += d * d;
    ref2 += value(o, i) * value(o, i);
  }
  for (std::size_t i = 0; i < lse.size(); ++i) lse_diff = std::max(lse_diff, std::abs(double(lse_sharded[i]) - lse[i]));
  const double rel = std::sqrt(diff2 / std::max(ref2, 1e-300));
  // bf16 outputs are rounded once each way: half a bf16 ulp (2^-9) per element, relative.
  const double tolerance = s.dtype == DType::kBFloat16 ? 8e-3 : 1e-5;
  const bool pass = rel <= tolerance && lse_diff <= 1e-3 && std::isfinite(rel);
  std::cout << fmt::format("check: sharded vs single-device decode over the gathered {}-position cache: relative L2 error "
                           "{:.2e} (tolerance {:.0e}), max |LSE difference| {:.2e}: {}\n",
                           shard.seq_lens()[0], rel, tolerance, lse_diff, pass ? "PASS" : "FAIL");
  report["check"] = {{"relative_l2_error", rel}, {"max_lse_difference", lse_diff}, {"tolerance", tolerance}, {"pass", pass}};
  return pass;
}

int run(const DecodeCommandArgs& args) {
  const Mesh mesh(MPI_COMM_WORLD, parse_mesh_shape(args.mesh));
  const int rank = mesh.rank();
  const Shape s{args.batch, args.heads, args.kv_heads, args.dim, args.query_tokens, args.page_size,
                args.dtype == "fp32" ? DType::kFloat32 : DType::kBFloat16};
  const int threads = threads_per_rank(args.threads);
  omp_set_num_threads(threads);
  const std::int64_t runs = static_cast<std::int64_t>(args.combine.size());
  const std::int64_t appended = runs * (args.warmup + args.steps) * s.tokens;
  const ShardLayout layout = ShardLayout::even(args.context + appended, mesh.size());
  const bool root = rank == 0;
  const Progress progress;

  if (root) {
    std::cout << fmt::format(
        "pflash decode: {} mesh over {} ranks (periodic: a 2D torus), B={} Hq={} Hkv={} D={} {} T={}, context {} "
        "(+{} appended), {} shards, {} thread{} per rank, seed {}\n",
        to_string(mesh.shape()), mesh.size(), s.batch, s.heads_q, s.heads_kv, s.dim, to_string(s.dtype), s.tokens,
        args.context, appended, s.page_size ? fmt::format("paged ({}-position pages)", s.page_size) : "contiguous", threads,
        threads == 1 ? "" : "s", args.seed);
    progress.show(fmt::format("filling each rank's shard of the {}-position cache...", args.context));
  }
  Shard shard(s, layout, rank);
  shard.fill(args.context, args.seed);

  // Who holds what: each rank's coordinates, positions and bytes read per step.
  const double my_bytes = shard.bytes_read();
  const int coords[3] = {mesh.coords()[0], mesh.coords()[1], shard.held()[0]};
  std::vector<int> all_coords(static_cast<std::size_t>(3 * mesh.size()));
  std::vector<double> all_bytes(static_cast<std::size_t>(mesh.size()));
  MPI_Gather(coords, 3, MPI_INT, all_coords.data(), 3, MPI_INT, 0, mesh.comm());
  MPI_Gather(&my_bytes, 1, MPI_DOUBLE, all_bytes.data(), 1, MPI_DOUBLE, 0, mesh.comm());
  nlohmann::json report;
  if (root) {
    progress.clear();
    std::cout << fmt::format("\n{:>4}  {:>7}  {:>20}  {:>10}  {:>14}\n", "rank", "coords", "positions owned", "held", "K+V read/step");
    for (int r = 0; r < mesh.size(); ++r) {
      const int* c = &all_coords[static_cast<std::size_t>(3 * r)];
      std::cout << fmt::format("{:>4}  {:>7}  {:>20}  {:>10}  {:>14}\n", r, fmt::format("({},{})", c[0], c[1]),
                               fmt::format("[{}, {})", layout.begin(r), layout.end(r)), c[2],
                               bench::format_bytes(all_bytes[static_cast<std::size_t>(r)]));
      report["ranks"].push_back({{"rank", r}, {"coords", {c[0], c[1]}}, {"begin", layout.begin(r)}, {"end", layout.end(r)},
                                 {"held", c[2]}, {"bytes_read", all_bytes[static_cast<std::size_t>(r)]}});
    }
  }

  std::vector<unsigned char> q, o(static_cast<std::size_t>(s.batch * s.heads_q * s.tokens * s.dim) * size_of(s.dtype));
  std::vector<float> lse(static_cast<std::size_t>(s.batch * s.heads_q * s.tokens));
  std::int64_t step_counter = 0;
  for (const std::string& combine : args.combine) {
    if (root) {
      std::cout << fmt::format("\ncombine {}: {} steps after {} warm-up; local = until the slowest rank's local decode ends, "
                               "combine = the rest of the step (agreement, collective, merge)\n",
                               combine, args.steps, args.warmup);
      std::cout << fmt::format("{:>5}  {:>10}  {:>12}  {:>12}  {:>10}  {:>12}\n", "step", "context", "local ms", "combine ms",
                               "step ms", "append ms");
    }
    std::vector<double> steps_s, locals_s, combines_s;
    for (std::int64_t i = 0; i < args.warmup + args.steps; ++i, ++step_counter) {
      if (rank == args.fail_rank) {
        if (args.fail_mode == "kill") std::raise(SIGKILL);
        throw std::runtime_error("injected failure (--fail-rank " + std::to_string(args.fail_rank) + ")");
      }
      const std::int64_t length = shard.seq_lens()[0];
      q = seeded_tensor(s, s.heads_q, args.seed, kQueries, [&](std::int64_t b, std::int64_t h, std::int64_t t) {
        return static_cast<std::uint64_t>((((step_counter * s.batch + b) * s.heads_q + h) * s.tokens + t) * s.dim);
      });
      const auto position = [&](std::int64_t b, std::int64_t h, std::int64_t t) {
        return shard.position_index(b, h, shard.seq_lens()[static_cast<std::size_t>(b)] + t);
      };
      const auto k_new = seeded_tensor(s, s.heads_kv, args.seed, kKeys, position);
      const auto v_new = seeded_tensor(s, s.heads_kv, args.seed, kValues, position);
      MPI_Barrier(mesh.comm());  // every rank starts the step together
      const double append_start = MPI_Wtime();
      sharded_append_kv(shard.view(), TensorView::contiguous(k_new.data(), s.dtype, {s.batch, s.heads_kv, s.tokens, s.dim}),
                        TensorView::contiguous(v_new.data(), s.dtype, {s.batch, s.heads_kv, s.tokens, s.dim}));
      const double append_s = MPI_Wtime() - append_start;
      MPI_Barrier(mesh.comm());
      ShardedDecodeParams p;
      p.q = TensorView::contiguous(q.data(), s.dtype, {s.batch, s.heads_q, s.tokens, s.dim});
      p.cache = shard.view();
      p.o = MutableTensorView::contiguous(o.data(), s.dtype, {s.batch, s.heads_q, s.tokens, s.dim});
      p.lse = MutableTensorView::contiguous(lse.data(), DType::kFloat32, {s.batch, s.heads_q, s.tokens});
      p.num_threads = threads;
      p.combine = parse_combine(combine);
      // The step on the mesh's clock (one host: every rank reads the same clock): from the first rank
      // starting to the last rank holding the result; local ends when the slowest local decode does,
      // and the combine is the rest. Per-rank durations alone would blur this when ranks share cores
      // and one is descheduled before it starts.
      const double start = MPI_Wtime();
      const ShardedDecodeTimes t = sharded_flash_decode(mesh, p);
      const double mine[4] = {-start, start + t.local_s, start + t.local_s + t.combine_s, append_s};
      double worst[4] = {};
      MPI_Reduce(mine, worst, 4, MPI_DOUBLE, MPI_MAX, 0, mesh.comm());
      if (!root) continue;
      const double first_start = -worst[0], local = worst[1] - first_start, step = worst[2] - first_start;
      const double combine_part = step - local;
      std::cout << fmt::format("{:>5}  {:>10}  {:>12.3f}  {:>12.3f}  {:>10.3f}  {:>12.3f}{}\n", i + 1, length + s.tokens,
                               local * 1e3, combine_part * 1e3, step * 1e3, worst[3] * 1e3, i < args.warmup ? "  (warm-up)" : "");
      if (i < args.warmup) continue;
      steps_s.push_back(step);
      locals_s.push_back(local);
      combines_s.push_back(combine_part);
    }
    if (!root) continue;
    double total_bytes = 0;
    for (double b : all_bytes) total_bytes += b;
    const double step = median(steps_s), local = median(locals_s), combine_part = median(combines_s);
    std::cout << fmt::format(
        "combine {}: median step {:.3f} ms = local {:.3f} ms + combine {:.3f} ms (combine {:.1f}% of the step); {:.1f} "
        "tokens/s; {} of K+V read over the mesh per step = {}/s\n",
        combine, step * 1e3, local * 1e3, combine_part * 1e3, 100.0 * combine_part / step, double(s.batch * s.tokens) / step,
        bench::format_bytes(total_bytes), bench::format_bytes(total_bytes / step));
    report["runs"].push_back({{"combine", combine}, {"median_step_s", step}, {"median_local_s", local},
                              {"median_combine_s", combine_part}, {"combine_share", combine_part / step},
                              {"tokens_per_s", double(s.batch * s.tokens) / step}, {"bytes_read_per_step", total_bytes},
                              {"steps_s", steps_s}, {"local_s", locals_s}, {"combine_s", combines_s}});
  }

  bool pass = true;
  if (args.check) {
    if (root) progress.show("--check: gathering the whole cache to rank 0...");
    pass = check_against_single_device(mesh, s, layout, shard, q, o, lse, report);
  }
  int status = pass ? 0 : 1;
  if (root) {
    report["config"] = {{"mesh", to_string(mesh.shape())}, {"ranks", mesh.size()}, {"batch", s.batch}, {"heads", s.heads_q},
                        {"kv_heads", s.heads_kv}, {"dim", s.dim}, {"dtype", to_string(s.dtype)}, {"query_tokens", s.tokens},
                        {"context", args.context}, {"page_size", s.page_size}, {"threads_per_rank", threads},
                        {"seed", args.seed}};
    status = std::max(status, write_json(args.json, report));
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, mesh.comm());
  return status;
}

}  // namespace

CLI::App* add_decode_command(CLI::App& app, DecodeCommandArgs& a) {
  CLI::App* cmd = app.add_subcommand(
      "decode", "FlashDecoding over a KV cache sharded across a mesh of ranks; launch with mpirun -np R*C");
  const auto positive = positive_integers();
  cmd->add_option("--mesh", a.mesh, "mesh shape ROWSxCOLS; its size must equal the number of ranks")
      ->check([](const std::string& text) {
        try {
          parse_mesh_shape(text);
          return std::string();
        } catch (const Error& e) {
          return std::string(e.what());
        }
      })
      ->capture_default_str();
  cmd->add_option("--batch", a.batch, "sequences B")->check(positive)->capture_default_str();
  cmd->add_option("--heads", a.heads, "query heads Hq")->check(positive)->capture_default_str();
  cmd->add_option("--kv-heads", a.kv_heads, "key/value heads Hkv")->check(positive)->capture_default_str();
  cmd->add_option("--dim", a.dim, "head dim D")->check(integers_from(1, 256))->capture_default_str();
  cmd->add_option("--context", a.context, "positions in the cache before the first step")
      ->check(integers_from(0, std::int64_t{1} << 30))->capture_default_str();
  cmd->add_option("--query-tokens", a.query_tokens, "new tokens per sequence and step (1-16)")
      ->check(integers_from(1, 16))->capture_default_str();
  cmd->add_option("--page-size", a.page_size, "each shard's page size, 0 = contiguous")
      ->check(CLI::IsMember({0, 8, 16, 32, 64, 128, 256, 512}))->capture_default_str();
  cmd->add_option("--dtype", a.dtype, "bf16, fp32")->check(CLI::IsMember({"bf16", "fp32"}))->capture_default_str();
  cmd->add_option("--steps", a.steps, "timed decode steps, each appending its tokens")->check(positive)->capture_default_str();
  cmd->add_option("--warmup", a.warmup, "untimed steps first")->check(non_negative_integer())->capture_default_str();
  cmd->add_option("--combine", a.combine, "auto, allreduce, allgather (several: one run each)")
      ->delimiter(',')->check(CLI::IsMember({"auto", "allreduce", "allgather"}))->capture_default_str();
  cmd->add_option("--seed", a.seed, "seed of the cache's and queries' values")->capture_default_str();
  cmd->add_option("--threads", a.threads, "threads per rank (default: this host's cores / its ranks)")
      ->check(non_negative_integer());
  cmd->add_flag("--check", a.check, "gather the whole cache to rank 0 and compare the last step with one-device decode");
  cmd->add_option("--json", a.json, "also write the results as JSON to this file (rank 0)");
  cmd->add_option("--fail-rank", a.fail_rank, "testing aid: this rank fails at the first step")->group("");
  cmd->add_option("--fail-mode", a.fail_mode, "testing aid: throw or kill")->check(CLI::IsMember({"throw", "kill"}))->group("");
  return cmd;
}

int run_decode_command(const DecodeCommandArgs& args, int* argc, char*** argv) {
  MPI_Init(argc, argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  // Every rank sees the same mismatch, so each leaves cleanly (no abort) after rank 0 says how to launch.
  const MeshShape shape = parse_mesh_shape(args.mesh);
  if (shape.rows * shape.cols != ranks) {
    if (rank == 0) {
      std::cerr << fmt::format(
          "pflash decode: a {}x{} mesh needs {} ranks and this job has {}: launch it as `mpirun -np {} pflash decode "
          "--mesh {}x{} ...`{}\n",
          shape.rows, shape.cols, shape.rows * shape.cols, ranks, shape.rows * shape.cols, shape.rows, shape.cols,
          ranks == 1 ? ", or pass --mesh 1x1 to decode on this one process" : "");
    }
    MPI_Finalize();
    return 2;
  }
  int status = 0;
  try {
    status = run(args);
  } catch (const std::exception& e) {
    // A failure on any rank ends the whole job: the others may be waiting in a collective for it.
    // One write, so that the ranks' lines (mpirun forwards each write as it comes) never interleave.
    const std::string line = "pflash decode: rank " + std::to_string(rank) + ": " + e.what() + "; aborting the job\n";
    std::fflush(stdout);
    std::fputs(line.c_str(), stderr);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}

}  // namespace pflash::tool
