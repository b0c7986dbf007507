// pflash: the command-line tool. `pflash bench` runs a benchmark sweep and prints a table (and JSON);
// `pflash decode`, launched with mpirun, runs FlashDecoding over a KV cache sharded across a mesh.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "decode_bench.hpp"
#include "machine_peak.hpp"
#include "cli_checks.hpp"
#include "output.hpp"
#include "pflash/pflash.hpp"
#include "report.hpp"
#include "sweep.hpp"
#include "units.hpp"

#ifdef PFLASH_HAVE_MPI
#include "decode_command.hpp"
#endif

namespace {

using pflash::bench::BenchConfig;
using pflash::tool::integers_from;
using pflash::tool::non_negative_integer;
using pflash::tool::positive_integers;
using pflash::tool::positive_number;
using pflash::tool::Progress;
using pflash::tool::write_json;
using pflash::bench::parse_bytes;

struct BenchArgs {
  std::vector<std::int64_t> batch{1};
  // The default sweep (about a minute on 2 cores): naive slows down quadratically and, at
  // Nq = Nk = 16384, needs more than a 16 GiB device; flash runs on with a few MiB.
  std::vector<std::int64_t> heads{16};
  std::vector<std::int64_t> kv_heads;  // empty: same as heads
  std::vector<std::int64_t> seq{1024, 2048, 4096, 8192, 16384};
  std::vector<std::int64_t> seq_q, seq_k;
  std::vector<std::int64_t> dim{64};
  std::vector<std::string> dtype{"bf16"};
  std::vector<std::string> causal{"off"};
  std::vector<std::int64_t> window{-1};
  std::vector<std::int64_t> segments{1};
  std::vector<float> soft_cap{0.0f};
  std::vector<std::string> impl{"flash", "naive"};
  std::vector<std::string> pass{"fwd"};
  std::vector<std::string> cpu_kernels{"measured"};
  std::string memory_budget = "16GiB";
  int threads = 0;
  int repeats = 5;
  int warmup = 1;
  double max_seconds = 2.0;
  int block_q = 0;
  int block_k = 0;
  std::string json;

  // --mode decode
  std::string mode = "attention";
  std::vector<std::int64_t> page_size{0};
  std::vector<std::int64_t> query_tokens{1};
  std::vector<std::string> splits{"auto"};
};

// Decode rows default to the shape decode is judged on (B=1, Hq=32, Hkv=8, D=128, a 32k context);
// flags given on the command line win.
void apply_decode_defaults(BenchArgs& a, const CLI::App& bench) {
  if (bench.count("--heads") == 0) a.heads = {32};
  if (bench.count("--kv-heads") == 0) a.kv_heads = {8};
  if (bench.count("--dim") == 0) a.dim = {128};
  if (bench.count("--seq") == 0) a.seq = {32768};
  if (bench.count("--repeats") == 0) a.repeats = 20;
  if (bench.count("--warmup") == 0) a.warmup = 2;
}

// Empty when every row of the sweep can run, else what is wrong with the flags.
std::string check_sweep(const BenchArgs& a) {
  for (auto h : a.heads) {
    for (auto hkv : a.kv_heads) {
      if (h % hkv != 0) {
        return fmt::format("--kv-heads: expected counts that divide every --heads value (GQA/MQA), got {} for --heads {}",
                           hkv, h);
      }
    }
  }
  if (const std::string problem = pflash::tool::check_writable(a.json); !problem.empty()) return "--json: " + problem;
  return "";
}

std::vector<pflash::bench::DecodeBenchConfig> make_decode_configs(const BenchArgs& a) {
  std::vector<pflash::bench::DecodeBenchConfig> configs;
  for (const auto& dtype : a.dtype)
    for (auto b : a.batch)
      for (auto h : a.heads)
        for (auto hkv : a.kv_heads.empty() ? std::vector<std::int64_t>{h} : a.kv_heads)
          for (auto d : a.dim)
            for (auto t : a.query_tokens)
              for (auto context : a.seq)
                for (auto page : a.page_size)
                  for (const auto& splits : a.splits) {
                    pflash::bench::DecodeBenchConfig c;
                    c.batch = b;
                    c.heads = h;
                    c.kv_heads = hkv;
                    c.dim = d;
                    c.query_tokens = t;
                    c.context = context;
                    c.page_size = page;
                    c.dtype = dtype == "fp32" ? pflash::DType::kFloat32 : pflash::DType::kBFloat16;
                    c.splits = splits == "auto" ? 0 : std::stoi(splits);
                    configs.push_back(c);
                  }
  return configs;
}

pflash::bench::MachinePeak measure_peak(int threads, bool measure_portable = false) {
  std::cerr << "measuring this machine's peak FLOP/s and read bandwidth...\n";
  const auto peak = pflash::bench::measure_machine_peak(threads, measure_portable);
  std::cout << pflash::bench::format_machine(peak);
  return peak;
}

// Rows above the ceiling measured before the sweep: measured again, and said so.
template <class Result>
void note_rows_above_ceiling(const std::vector<Result>& results, const pflash::bench::MachinePeak& before, int threads) {
  const bool any = std::any_of(results.begin(), results.end(),
                               [](const Result& r) { return pflash::bench::above_ceiling(r); });
  if (!any) return;
  std::cerr << "a row is above the measured ceiling: measuring it again...\n";
  std::cout << '\n' << pflash::bench::format_above_ceiling_note(before, pflash::bench::measure_machine_peak(threads));
}

// The timing flags every mode shares.
template <class Options>
Options timing_options(const BenchArgs& args) {
  Options options;
  options.threads = args.threads > 0 ? args.threads : pflash::default_num_threads();
  options.repeats = args.repeats;
  options.warmup = args.warmup;
  options.max_seconds = args.max_seconds;
  return options;
}

int run_decode_bench(const BenchArgs& args) {
  const auto options = timing_options<pflash::bench::DecodeBenchOptions>(args);
  const auto configs = make_decode_configs(args);
  const auto peak = measure_peak(options.threads);
  std::cout << fmt::format(
      "timing: median of up to {} repeats (n; fewer when they would pass {} s) after {} warm-up; read = K and V "
      "once + Q + O; %bw against the measured DRAM read bandwidth\n\n",
      options.repeats, options.max_seconds, options.warmup);
  std::cout << pflash::bench::format_decode_header() << std::endl;
  const Progress progress;
  std::vector<pflash::bench::DecodeBenchResult> results;
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const auto& c = configs[i];
    progress.show(fmt::format("[{}/{}] decode B={} Hq={} Hkv={} D={} context={} page={} T={} {} splits={}", i + 1,
                              configs.size(), c.batch, c.heads, c.kv_heads, c.dim, c.context, c.page_size,
                              c.query_tokens, pflash::to_string(c.dtype), c.splits == 0 ? "auto" : std::to_string(c.splits)));
    results.push_back(pflash::bench::run_decode_config(c, options, peak));
    progress.clear();
    std::cout << pflash::bench::format_decode_row(results.back()) << std::endl;
  }
  note_rows_above_ceiling(results, peak, options.threads);
  return write_json(args.json, pflash::bench::to_json(peak, {}, results));
}

std::vector<BenchConfig> make_configs(const BenchArgs& a) {
  std::vector<std::pair<std::int64_t, std::int64_t>> lengths;
  if (!a.seq_q.empty() || !a.seq_k.empty()) {
    const auto& qs = a.seq_q.empty() ? a.seq : a.seq_q;
    const auto& ks = a.seq_k.empty() ? a.seq : a.seq_k;
    for (auto nq : qs)
      for (auto nk : ks) lengths.emplace_back(nq, nk);
  } else {
    for (auto n : a.seq) lengths.emplace_back(n, n);
  }
  std::vector<BenchConfig> configs;
  for (const auto& pass : a.pass)
    for (const auto& dtype : a.dtype)
      for (const auto& causal : a.causal)
        for (auto window : a.window)
        for (auto segments : a.segments)
        for (auto cap : a.soft_cap)
        for (auto b : a.batch)
          for (auto h : a.heads)
            for (auto hkv : a.kv_heads.empty() ? std::vector<std::int64_t>{h} : a.kv_heads)
              for (auto d : a.dim)
                for (auto [nq, nk] : lengths)
                  for (const auto& impl : a.impl)
                  for (const auto& kernels : impl == "naive" ? std::vector<std::string>{"measured"} : a.cpu_kernels) {
                    if (impl == "naive" && pass != "fwd") continue;  // no naive backward
                    BenchConfig c;
                    c.kernels = kernels;
                    c.impl = impl;
                    c.pass = pass;
                    c.batch = b;
                    c.heads = h;
                    c.kv_heads = hkv;
                    c.seq_q = nq;
                    c.seq_k = nk;
                    c.dim = d;
                    c.dtype = dtype == "fp32" ? pflash::DType::kFloat32 : pflash::DType::kBFloat16;
                    c.causal = causal == "on";
                    c.window = window;
                    c.segments = segments;
                    c.soft_cap = cap;
                    configs.push_back(c);
                  }
  return configs;
}

int run_bench(const BenchArgs& args) {
  auto options = timing_options<pflash::bench::BenchOptions>(args);
  options.memory_budget = parse_bytes(args.memory_budget);
  options.block_q = args.block_q;
  options.block_k = args.block_k;
  const std::vector<BenchConfig> configs = make_configs(args);

  const bool portable_rows =
      std::find(args.cpu_kernels.begin(), args.cpu_kernels.end(), "portable") != args.cpu_kernels.end();
  const auto peak = measure_peak(options.threads, portable_rows);
  std::cout << fmt::format(
      "timing: median of up to {} repeats (n; fewer when they would pass {} s) after {} warm-up; naive memory budget: {}\n\n",
      options.repeats, options.max_seconds, options.warmup,
      options.memory_budget ? pflash::bench::format_bytes(double(*options.memory_budget)) : "none");
  std::cout << pflash::bench::format_table_header() << std::endl;

  const Progress progress;
  std::vector<pflash::bench::BenchResult> results;
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const BenchConfig& c = configs[i];
    progress.show(fmt::format("[{}/{}] {} {} B={} Hq={} Hkv={} Nq={} Nk={} D={} {} {}{}", i + 1, configs.size(),
                              c.impl, c.pass, c.batch, c.heads, c.kv_heads, c.seq_q, c.seq_k, c.dim,
                              pflash::to_string(c.dtype), c.mask_name(),
                              c.kernels == "measured" ? "" : " kernels " + c.kernels));
    results.push_back(pflash::bench::run_config(c, options, peak));
    progress.clear();
    std::cout << pflash::bench::format_row(results.back()) << std::endl;
  }
  note_rows_above_ceiling(results, peak, options.threads);
  return write_json(args.json, pflash::bench::to_json(peak, results));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pflash: IO-aware exact attention (FlashAttention-2) kernels and their benchmarks"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", [] {
    std::string isa, choices;
    try {
      isa = std::string(pflash::to_string(pflash::active_cpu_isa()));
      for (pflash::CpuPass pass : {pflash::CpuPass::kForward, pflash::CpuPass::kBackward, pflash::CpuPass::kDecode}) {
        const pflash::CpuKernelChoice choice = pflash::cpu_kernel_choice(pass, pflash::DType::kBFloat16);
        choices += fmt::format("\n  bf16 {}: {} ({})", pflash::to_string(pass), pflash::to_string(choice.isa),
                               choice.reason);
      }
    } catch (const pflash::Error& e) {
      isa = e.what();
    }
    return fmt::format("pflash {} (kernels on this CPU: {}; detected: {}; fp32 runs the widest){}", pflash::version(),
                       isa, pflash::to_string(pflash::detected_cpu_isa()), choices);
  });
  BenchArgs args;
  CLI::App* bench = app.add_subcommand(
      "bench", "run a benchmark sweep: flash vs naive attention, or (--mode decode) FlashDecoding over a KV cache");
  const auto positive = positive_integers();
  bench->add_option("--batch", args.batch, "batch sizes")->delimiter(',')->check(positive)->capture_default_str();
  bench->add_option("--heads", args.heads, "query heads Hq")->delimiter(',')->check(positive)->capture_default_str();
  bench->add_option("--kv-heads", args.kv_heads, "key/value heads Hkv (default: Hq)")->delimiter(',')->check(positive);
  bench->add_option("--seq", args.seq, "sequence lengths (Nq = Nk)")->delimiter(',')->check(positive)->capture_default_str();
  bench->add_option("--seq-q", args.seq_q, "query lengths (crossed with --seq-k)")->delimiter(',')->check(positive);
  bench->add_option("--seq-k", args.seq_k, "key lengths (crossed with --seq-q)")->delimiter(',')->check(positive);
  bench->add_option("--dim", args.dim, "head dims")->delimiter(',')->check(integers_from(1, 256))->capture_default_str();
  bench->add_option("--dtype", args.dtype, "bf16, fp32")->delimiter(',')->check(CLI::IsMember({"bf16", "fp32"}))->capture_default_str();
  bench->add_option("--causal", args.causal, "on, off")->delimiter(',')->check(CLI::IsMember({"on", "off"}))->capture_default_str();
  bench->add_option("--window", args.window, "sliding windows: the positions before a query it sees (-1: none)")
      ->delimiter(',')->check(integers_from(-1, 1 << 30))->capture_default_str();
  bench->add_option("--segments", args.segments, "packed documents of equal length per sequence (1: none)")
      ->delimiter(',')->check(positive)->capture_default_str();
  bench->add_option("--softcap", args.soft_cap, "logit soft caps (0: none)")
      ->delimiter(',')->check(CLI::NonNegativeNumber)->capture_default_str();
  bench->add_option("--impl", args.impl, "flash, naive")->delimiter(',')->check(CLI::IsMember({"flash", "naive"}))->capture_default_str();
  bench->add_option("--pass", args.pass, "fwd, bwd, fwd+bwd (the naive baseline runs fwd only)")
      ->delimiter(',')->check(CLI::IsMember({"fwd", "bwd", "fwd+bwd"}))->capture_default_str();
  std::vector<std::string> kernel_choices{"measured"};
  for (pflash::CpuIsa isa : {pflash::CpuIsa::kPortable, pflash::CpuIsa::kAvx2, pflash::CpuIsa::kAvx512,
                             pflash::CpuIsa::kAvx512Bf16, pflash::CpuIsa::kAmxBf16}) {
    kernel_choices.emplace_back(pflash::to_string(isa));
  }
  bench->add_option("--cpu-kernels", args.cpu_kernels,
                    "flash rows' CPU kernel sets, each a row of its own, run back to back: measured (the library's "
                    "rule: pflash --version says what it picks) or an instruction set (the widest set under it, "
                    "as PFLASH_MAX_CPU_ISA with PFLASH_CPU_KERNELS=widest); a set above this CPU's runs its best")
      ->delimiter(',')->check(CLI::IsMember(kernel_choices))->capture_default_str();
  bench->add_option("--memory-budget", args.memory_budget, "naive's memory budget, e.g. 16GiB, or none")
      ->check([](const std::string& s) {
        try {
          parse_bytes(s);
          return std::string();
        } catch (const std::invalid_argument& e) {
          return std::string(e.what());
        }
      })
      ->capture_default_str();
  bench->add_option("--threads", args.threads, "threads (default: all)")->check(non_negative_integer());
  bench->add_option("--repeats", args.repeats, "timed repeats per row (median)")->check(positive)->capture_default_str();
  bench->add_option("--warmup", args.warmup, "untimed calls before timing")->check(non_negative_integer())->capture_default_str();
  bench->add_option("--max-time", args.max_seconds, "seconds of timed repeats per row before stopping early")
      ->check(positive_number())->capture_default_str();
  bench->add_option("--block-q", args.block_q, "query block rows (0: automatic)")->check(integers_from(0, 4096));
  bench->add_option("--block-k", args.block_k, "key block columns (0: automatic)")->check(integers_from(0, 4096));
  bench->add_option("--json", args.json, "also write the results as JSON to this file");
  bench->add_option("--mode", args.mode, "attention (training-shaped rows) or decode (FlashDecoding rows; the defaults shown are "
                    "attention's: decode's are --heads 32 --kv-heads 8 --dim 128 --seq 32768 (the context) "
                    "--repeats 20 --warmup 2)")
      ->check(CLI::IsMember({"attention", "decode"}))->capture_default_str();
  bench->add_option("--page-size", args.page_size, "decode: KV cache page sizes, 0 = contiguous")
      ->delimiter(',')->check(CLI::IsMember({0, 8, 16, 32, 64, 128, 256, 512}))->capture_default_str();
  bench->add_option("--query-tokens", args.query_tokens, "decode: new query tokens per sequence (1-16)")
      ->delimiter(',')->check(integers_from(1, 16))->capture_default_str();
  bench->add_option("--splits", args.splits, "decode: KV splits per sequence, auto or 1-256")
      ->delimiter(',')
      ->check([](const std::string& s) {
        if (s == "auto") return std::string();
        try {
          std::size_t used = 0;
          const int n = std::stoi(s, &used);
          if (used == s.size() && n >= 1 && n <= pflash::kMaxDecodeSplits) return std::string();
        } catch (const std::exception&) {
        }
        return "expected auto or a split count from 1 to " + std::to_string(pflash::kMaxDecodeSplits) + ", got " + s;
      })
      ->capture_default_str();

#ifdef PFLASH_HAVE_MPI
  pflash::tool::DecodeCommandArgs decode_args;
  CLI::App* decode = pflash::tool::add_decode_command(app, decode_args);
#else
  CLI::App* decode = app.add_subcommand("decode", "sharded FlashDecoding over MPI (not built: no MPI was found)");
  decode->allow_extras();
#endif

  CLI11_PARSE(app, argc, argv);
  if (app.got_subcommand(decode)) {
#ifdef PFLASH_HAVE_MPI
    return pflash::tool::run_decode_command(decode_args, &argc, &argv);
#else
    std::cerr << "pflash decode: this pflash was built without MPI; install it (Debian: libopenmpi-dev openmpi-bin) "
                 "and reconfigure\n";
    return 2;
#endif
  }
  if (app.got_subcommand(bench)) {
    try {
      if (args.mode == "decode") apply_decode_defaults(args, *bench);
      // Everything a row could reject, before the first timed call: a sweep that stops part-way, or
      // finds its --json path unwritable at the end, has lost the rows it ran.
      if (const std::string problem = check_sweep(args); !problem.empty()) {
        std::cerr << "pflash bench: " << problem << '\n';
        return 2;
      }
      if (args.mode == "decode") {
        return run_decode_bench(args);
      }
      return run_bench(args);
    } catch (const pflash::Error& e) {
      std::cerr << "\npflash: " << e.what() << '\n';
      return 2;
    }
  }
  std::cerr << app.help() << "\npflash: expected a subcommand: bench or decode (pflash bench --help)\n";
  return 2;
}
