#include "report.hpp"

#include <fmt/format.h>

namespace pflash::bench {

std::string format_bytes(double bytes) {
  if (bytes >= double(1ull << 30)) return fmt::format("{:.2f} GiB", bytes / double(1ull << 30));
  if (bytes >= double(1ull << 20)) return fmt::format("{:.1f} MiB", bytes / double(1ull << 20));
  if (bytes >= 1024.0) return fmt::format("{:.1f} KiB", bytes / 1024.0);
  return fmt::format("{:.0f} B", bytes);
}

std::string format_machine(const MachinePeak& peak) {
  const std::string reference =
      fmt::format("widest fp32 FMA {:.1f}", peak.widest_fma_flops / 1e9) +
      (peak.native_bf16 ? fmt::format(", bf16 vdpbf16ps {:.1f}", peak.bf16_dot_flops / 1e9) : std::string()) +
      (peak.amx_flops > 0.0 ? fmt::format(", bf16 AMX tiles {:.1f}", peak.amx_flops / 1e9) : std::string());
  return fmt::format(
      "machine: {} | {} threads | kernels: {}\n"
      "ceiling of the kernels' units: fp32 FMA on the {} kernels' vectors {:.1f} GFLOP/s; bf16 rows {}; "
      "DRAM read {:.1f} GB/s; for reference: {} GFLOP/s\n",
      peak.cpu_name, peak.threads, peak.isa, peak.isa, peak.peak_flops_fp32 / 1e9,
      fmt::format("forward on {} ({:.1f} GFLOP/s), backward on {} ({:.1f} GFLOP/s): {}",
                  peak.bf16_forward_isa, peak.peak_flops_bf16 / 1e9, peak.bf16_backward_isa,
                  peak.peak_flops_bf16_backward / 1e9,
                  peak.bf16_forward_reason == peak.bf16_backward_reason
                      ? peak.bf16_forward_reason
                      : peak.bf16_forward_reason + "; " + peak.bf16_backward_reason),
      peak.read_bw / 1e9, reference);
}

std::string format_table_header() {
  return fmt::format("{:<6} {:<7} {:>3} {:>4} {:>4} {:>6} {:>6} {:>4} {:<5} {:<20} {:<11} {:>11} {:>11} {:>8} {:>7} {:>11} {:>3}",
                     "impl", "pass", "B", "Hq", "Hkv", "Nq", "Nk", "D", "dtype", "mask", "kernels", "median", "tokens/s",
                     "TFLOP/s", "%peak", "extra mem", "n");
}

std::string format_row(const BenchResult& r) {
  const BenchConfig& c = r.config;
  // A forced set is marked with '=' (the widest under that cap), the measured rule's choice bare.
  const std::string kernels =
      r.kernel_sets.empty() ? std::string("-") : fmt::format("{}{}", c.kernels == "measured" ? "" : "=", r.kernel_sets);
  std::string row = fmt::format("{:<6} {:<7} {:>3} {:>4} {:>4} {:>6} {:>6} {:>4} {:<5} {:<20} {:<11} ", c.impl, c.pass,
                                c.batch, c.heads, c.kv_heads, c.seq_q, c.seq_k, c.dim, to_string(c.dtype), c.mask_name(),
                                kernels);
  if (r.status == "oom") {
    return row + fmt::format("OOM (needs {})", format_bytes(double(r.bytes_needed.value_or(0))));
  }
  const std::string median = r.median_s >= 1.0 ? fmt::format("{:.3f} s", r.median_s)
                                                : fmt::format("{:.3f} ms", r.median_s * 1e3);
  return row + fmt::format("{:>11} {:>11.0f} {:>8.4f} {:>6.1f}%{}{:>11} {:>3}", median, r.tokens_per_s, r.tflops,
                           100.0 * r.fraction_of_peak, above_ceiling(r) ? "!" : " ", format_bytes(double(r.extra_bytes)),
                           r.repeats);
}

std::string format_decode_header() {
  return fmt::format("{:<6} {:>3} {:>4} {:>4} {:>4} {:>7} {:>5} {:>2} {:<5} {:>6} {:>10} {:>10} {:>10} {:>8} {:>6} {:>10} {:>3}",
                     "mode", "B", "Hq", "Hkv", "D", "context", "page", "T", "dtype", "splits", "median", "tokens/s",
                     "read", "GB/s", "%bw", "extra mem", "n");
}

std::string format_decode_row(const DecodeBenchResult& r) {
  const DecodeBenchConfig& c = r.config;
  const std::string page = c.page_size > 0 ? std::to_string(c.page_size) : "-";
  const std::string splits = c.splits == 0 ? fmt::format("auto:{}", r.splits) : std::to_string(r.splits);
  const std::string median = r.median_s >= 1.0 ? fmt::format("{:.3f} s", r.median_s)
                                                : fmt::format("{:.3f} ms", r.median_s * 1e3);
  return fmt::format("{:<6} {:>3} {:>4} {:>4} {:>4} {:>7} {:>5} {:>2} {:<5} {:>6} {:>10} {:>10.0f} {:>10} {:>8.1f} {:>5.1f}%{}{:>10} {:>3}",
                     "decode", c.batch, c.heads, c.kv_heads, c.dim, c.context, page, c.query_tokens, to_string(c.dtype),
                     splits, median, r.tokens_per_s, format_bytes(r.bytes), r.gbps, 100.0 * r.fraction_of_peak_bw,
                     above_ceiling(r) ? "!" : " ", format_bytes(double(r.extra_bytes)), r.repeats);
}

bool above_ceiling(const BenchResult& r) { return r.status == "ok" && r.fraction_of_peak > 1.0; }

bool above_ceiling(const DecodeBenchResult& r) { return r.fraction_of_peak_bw > 1.0; }

std::string format_above_ceiling_note(const MachinePeak& before, const MachinePeak& after) {
  return fmt::format(
      "! above the ceiling measured before the sweep: a measurement problem, not a result (the machine was busier,\n"
      "  or clocked lower, while the ceiling ran than while the row did). Ceiling re-measured after the sweep:\n"
      "  fp32 FMA {:.1f} GFLOP/s (before {:.1f}), DRAM read {:.1f} GB/s (before {:.1f}); rerun on an idle machine.\n",
      after.peak_flops_fp32 / 1e9, before.peak_flops_fp32 / 1e9, after.read_bw / 1e9, before.read_bw / 1e9);
}

nlohmann::json to_json(const MachinePeak& peak, const std::vector<BenchResult>& results,
                       const std::vector<DecodeBenchResult>& decode_results) {
  nlohmann::json out;
  out["machine"] = {{"threads", peak.threads},
                    {"cpu", peak.cpu_name},
                    {"isa", peak.isa},
                    {"peak_flops_fp32", peak.peak_flops_fp32},
                    {"peak_flops_bf16", peak.peak_flops_bf16},
                    {"peak_flops_bf16_backward", peak.peak_flops_bf16_backward},
                    {"bf16_forward_kernels", peak.bf16_forward_isa},
                    {"bf16_backward_kernels", peak.bf16_backward_isa},
                    {"bf16_forward_reason", peak.bf16_forward_reason},
                    {"bf16_backward_reason", peak.bf16_backward_reason},
                    {"native_bf16", peak.native_bf16},
                    {"widest_fma_flops", peak.widest_fma_flops},
                    {"fma_flops_avx512", peak.fma_flops_avx512},
                    {"fma_flops_avx2", peak.fma_flops_avx2},
                    {"bf16_dot_flops", peak.bf16_dot_flops},
                    {"amx_flops", peak.amx_flops},
                    {"read_bw", peak.read_bw}};
  out["results"] = nlohmann::json::array();
  for (const BenchResult& r : results) {
    const BenchConfig& c = r.config;
    nlohmann::json row = {{"mode", "attention"}, {"impl", c.impl},       {"pass", c.pass},
                          {"batch", c.batch},      {"heads", c.heads},     {"kv_heads", c.kv_heads},
                          {"seq_q", c.seq_q},      {"seq_k", c.seq_k},     {"dim", c.dim},
                          {"dtype", to_string(c.dtype)}, {"causal", c.causal}, {"window", c.window},
                          {"segments", c.segments}, {"soft_cap", c.soft_cap}, {"mask", c.mask_name()},
                          {"kernels", c.kernels}, {"kernel_sets", r.kernel_sets},
                          {"status", r.status},
                          {"flops", r.flops},      {"extra_bytes", r.extra_bytes}};
    if (r.status == "ok") {
      row["median_s"] = r.median_s;
      row["tflops"] = r.tflops;
      row["fraction_of_peak"] = r.fraction_of_peak;
      row["tokens_per_s"] = r.tokens_per_s;
      row["repeats"] = r.repeats;
    } else {
      row["median_s"] = nullptr;
      row["tflops"] = nullptr;
      row["fraction_of_peak"] = nullptr;
      row["tokens_per_s"] = nullptr;
    }
    row["above_ceiling"] = above_ceiling(r);
    row["bytes_needed"] = r.bytes_needed ? nlohmann::json(*r.bytes_needed) : nlohmann::json(nullptr);
    out["results"].push_back(row);
  }
  for (const DecodeBenchResult& r : decode_results) {
    const DecodeBenchConfig& c = r.config;
    out["results"].push_back({{"mode", "decode"},
                              {"impl", "flash"},
                              {"batch", c.batch},
                              {"heads", c.heads},
                              {"kv_heads", c.kv_heads},
                              {"dim", c.dim},
                              {"dtype", to_string(c.dtype)},
                              {"context", c.context},
                              {"page_size", c.page_size},
                              {"query_tokens", c.query_tokens},
                              {"splits", r.splits},
                              {"splits_requested", c.splits == 0 ? nlohmann::json("auto") : nlohmann::json(c.splits)},
                              {"status", "ok"},
                              {"median_s", r.median_s},
                              {"repeats", r.repeats},
                              {"bytes", r.bytes},
                              {"gbps", r.gbps},
                              {"fraction_of_peak_bw", r.fraction_of_peak_bw},
                              {"above_ceiling", above_ceiling(r)},
                              {"tokens_per_s", r.tokens_per_s},
                              {"extra_bytes", r.extra_bytes}});
  }
  return out;
}

}  // namespace pflash::bench
