// The benchmark rows: FLOP counting, the OOM row, and the JSON keys scripts depend on.
#include <gtest/gtest.h>

#include "decode_bench.hpp"
#include "pflash/error.hpp"
#include "pflash/runtime.hpp"
#include "report.hpp"
#include "sweep.hpp"

namespace pflash::bench {
namespace {

MachinePeak fake_peak() {
  MachinePeak peak;
  peak.threads = 2;
  peak.cpu_name = "test";
  peak.isa = "avx2";
  peak.peak_flops_fp32 = 1e11;
  peak.peak_flops_bf16 = 2e11;
  peak.peak_flops_bf16_backward = 2e11;
  peak.read_bw = 1e10;
  return peak;
}

BenchConfig config(const char* impl, bool causal, std::int64_t nq, std::int64_t nk) {
  BenchConfig c;
  c.impl = impl;
  c.pass = "fwd";
  c.batch = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.seq_q = nq;
  c.seq_k = nk;
  c.dim = 32;
  c.causal = causal;
  return c;
}

// 4 * B * Hq * D * the (query, key) pairs the mask lets through.
TEST(AttentionFlops, FourBHDTimesTheVisiblePairs) {
  EXPECT_DOUBLE_EQ(attention_flops(config("flash", false, 100, 300)), 4.0 * 2 * 4 * 32 * (100 * 300));
  EXPECT_DOUBLE_EQ(attention_flops(config("flash", true, 300, 300)), 4.0 * 2 * 4 * 32 * (300 * 301 / 2));
  // Bottom-right: query i sees keys 0..200 + i.
  EXPECT_DOUBLE_EQ(attention_flops(config("flash", true, 100, 300)), 4.0 * 2 * 4 * 32 * (100 * 200 + 100 * 101 / 2));
  BenchConfig window = config("flash", true, 300, 300);
  window.window = 9;  // rows 0..9 see i + 1 keys, the others 10
  EXPECT_DOUBLE_EQ(visible_pairs(window), 10 * 11 / 2 + 290 * 10);
  BenchConfig documents = config("flash", true, 300, 300);
  documents.segments = 3;  // three causal documents of 100
  EXPECT_DOUBLE_EQ(visible_pairs(documents), 3 * (100 * 101 / 2));
  documents.causal = false;
  EXPECT_DOUBLE_EQ(visible_pairs(documents), 3 * 100 * 100);
  EXPECT_EQ(documents.mask_name(), "full seg3");
  window.soft_cap = 50.0f;
  EXPECT_EQ(window.mask_name(), "causal w9 cap50");
}

TEST(AttentionFlops, BackwardCountsTwoAndAHalfForwards) {
  BenchConfig c = config("flash", true, 300, 300);
  const double forward = attention_flops(c);
  c.pass = "bwd";
  EXPECT_DOUBLE_EQ(attention_flops(c), 2.5 * forward);
  c.pass = "fwd+bwd";
  EXPECT_DOUBLE_EQ(attention_flops(c), 3.5 * forward);
}

TEST(RunConfig, BackwardRowsAreTimedAndNaiveHasNone) {
  BenchOptions options;
  options.threads = 2;
  options.repeats = 2;
  for (const char* pass : {"bwd", "fwd+bwd"}) {
    BenchConfig c = config("flash", true, 70, 90);
    c.pass = pass;
    const BenchResult r = run_config(c, options, fake_peak());
    EXPECT_EQ(r.status, "ok") << pass;
    EXPECT_DOUBLE_EQ(r.fraction_of_peak, r.flops / r.median_s / 2e11) << pass;
    EXPECT_NE(format_row(r).find(pass), std::string::npos) << format_row(r);
  }
  BenchConfig naive = config("naive", false, 64, 64);
  naive.pass = "bwd";
  EXPECT_THROW(run_config(naive, options, fake_peak()), Error);
}

TEST(RunConfig, FlashRowIsTimedAgainstTheDtypePeak) {
  BenchOptions options;
  options.threads = 2;
  options.repeats = 3;
  const BenchResult r = run_config(config("flash", true, 96, 96), options, fake_peak());
  EXPECT_EQ(r.status, "ok");
  EXPECT_GT(r.median_s, 0.0);
  EXPECT_GE(r.repeats, 1);
  EXPECT_LE(r.repeats, 3);
  EXPECT_DOUBLE_EQ(r.fraction_of_peak, r.flops / r.median_s / 2e11);  // bf16 peak
  EXPECT_DOUBLE_EQ(r.tokens_per_s, 2 * 96 / r.median_s);
  EXPECT_GT(r.extra_bytes, 0u);
}

// --cpu-kernels: a row forced onto a set runs that set (the widest under it, where the CPU has it) and
// is judged against that set's unit; the library's own rule is back in force after the row.
TEST(RunConfig, AForcedKernelSetRunsAndIsJudgedAgainstItsUnit) {
  BenchOptions options;
  options.threads = 2;
  options.repeats = 1;
  MachinePeak peak = fake_peak();
  peak.fma_flops_portable = 1e9;
  peak.fma_flops_avx2 = 3e10;
  peak.fma_flops_avx512 = 6e10;
  peak.bf16_dot_flops = 9e10;
  peak.amx_flops = 5e11;
  peak.native_bf16 = true;
  const CpuIsa detected = detected_cpu_isa();
  for (CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmxBf16}) {
    BenchConfig c = config("flash", true, 40, 40);
    c.pass = "fwd+bwd";
    c.kernels = std::string(to_string(isa));
    const BenchResult r = run_config(c, options, peak);
    const CpuIsa ran = std::min(isa, detected);
    EXPECT_EQ(r.kernel_sets, to_string(ran));
    const double unit = ran == CpuIsa::kAmxBf16      ? 5e11
                        : ran == CpuIsa::kAvx512Bf16 ? 9e10
                        : ran == CpuIsa::kAvx512   ? 6e10
                        : ran == CpuIsa::kAvx2     ? 3e10
                                                   : 1e9;
    EXPECT_DOUBLE_EQ(r.fraction_of_peak, r.flops / r.median_s / unit) << c.kernels;
    EXPECT_NE(format_row(r).find("=" + r.kernel_sets), std::string::npos) << format_row(r);
    EXPECT_EQ(to_json(peak, {r})["results"][0]["kernels"], c.kernels);
    EXPECT_EQ(to_json(peak, {r})["results"][0]["kernel_sets"], r.kernel_sets);
    EXPECT_EQ(active_cpu_isa(), detected) << "the cap outlived the row";
  }
  BenchConfig measured = config("flash", false, 40, 40);
  const BenchResult r = run_config(measured, options, peak);
  EXPECT_EQ(r.kernel_sets, to_string(cpu_kernel_choice(CpuPass::kForward, DType::kBFloat16).isa));
  EXPECT_DOUBLE_EQ(r.fraction_of_peak, r.flops / r.median_s / 2e11);  // the default rule's unit
  BenchConfig bad = config("flash", false, 40, 40);
  bad.kernels = "avx1024";  // no such set
  try {
    run_config(bad, options, peak);
    ADD_FAILURE() << "no error for kernels avx1024";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected measured or an instruction set"), std::string::npos) << e.what();
  }
}

TEST(RunConfig, NaiveOverBudgetIsAnOomRowWithBytesNeeded) {
  BenchOptions options;
  options.memory_budget = 1024;
  const BenchResult r = run_config(config("naive", false, 64, 64), options, fake_peak());
  EXPECT_EQ(r.status, "oom");
  ASSERT_TRUE(r.bytes_needed.has_value());
  EXPECT_GE(*r.bytes_needed, 2ull * 4 * 64 * 64 * 4);
  EXPECT_NE(format_row(r).find("OOM (needs "), std::string::npos) << format_row(r);
}

TEST(Report, JsonKeepsTheContractKeys) {
  BenchOptions options;
  options.repeats = 1;
  std::vector<BenchResult> results = {run_config(config("flash", false, 33, 47), options, fake_peak())};
  options.memory_budget = 1;
  results.push_back(run_config(config("naive", false, 33, 47), options, fake_peak()));
  const nlohmann::json j = to_json(fake_peak(), results);
  for (const char* key : {"threads", "peak_flops_bf16", "peak_flops_fp32", "read_bw"}) {
    EXPECT_TRUE(j["machine"].contains(key)) << key;
  }
  ASSERT_EQ(j["results"].size(), 2u);
  for (const auto& row : j["results"]) {
    EXPECT_EQ(row["mode"], "attention");
    for (const char* key : {"impl", "pass", "batch", "heads", "kv_heads", "seq_q", "seq_k", "dim", "dtype", "causal",
                            "status", "median_s", "flops", "tflops", "fraction_of_peak", "extra_bytes",
                            "bytes_needed", "kernels", "kernel_sets"}) {
      EXPECT_TRUE(row.contains(key)) << key;
    }
  }
  EXPECT_EQ(j["results"][0]["status"], "ok");
  EXPECT_TRUE(j["results"][0]["causal"].is_boolean());
  EXPECT_EQ(j["results"][0]["dtype"], "bf16");
  EXPECT_EQ(j["results"][1]["status"], "oom");
  EXPECT_TRUE(j["results"][1]["bytes_needed"].is_number());
}

// A fraction of peak above 1 is a measurement problem: marked in the table and in the JSON.
TEST(Report, RowsAboveTheirCeilingAreFlagged) {
  BenchResult r;
  r.config = config("flash", false, 33, 47);
  r.status = "ok";
  r.median_s = 1e-3;
  for (double fraction : {0.5, 1.047}) {
    r.fraction_of_peak = fraction;
    const bool above = fraction > 1.0;
    EXPECT_EQ(above_ceiling(r), above);
    EXPECT_EQ(format_row(r).find("%!") != std::string::npos, above) << format_row(r);
    EXPECT_EQ(to_json(fake_peak(), {r})["results"][0]["above_ceiling"], above);
  }
  DecodeBenchResult d;
  d.fraction_of_peak_bw = 1.1;
  EXPECT_TRUE(above_ceiling(d));
  EXPECT_NE(format_decode_row(d).find("110.0%!"), std::string::npos) << format_decode_row(d);
  const std::string note = format_above_ceiling_note(fake_peak(), fake_peak());
  EXPECT_NE(note.find("a measurement problem, not a result"), std::string::npos) << note;
}

TEST(DecodeBytes, CacheOncePlusQueriesAndOutputs) {
  DecodeBenchConfig c;
  c.batch = 2;
  c.heads = 8;
  c.kv_heads = 2;
  c.dim = 64;
  c.context = 1000;
  c.query_tokens = 3;
  c.dtype = DType::kBFloat16;
  EXPECT_DOUBLE_EQ(decode_bytes(c), 2.0 * 2 * 2 * 1000 * 64 * 2 + 2.0 * 2 * 8 * 3 * 64 * 2);
}

TEST(RunDecodeConfig, PagedRowIsTimedAgainstTheReadBandwidth) {
  DecodeBenchConfig c;
  c.heads = 4;
  c.kv_heads = 2;
  c.dim = 32;
  c.context = 300;
  c.page_size = 16;
  c.splits = 0;
  DecodeBenchOptions options;
  options.threads = 2;
  options.repeats = 3;
  const DecodeBenchResult r = run_decode_config(c, options, fake_peak());
  EXPECT_GT(r.median_s, 0.0);
  EXPECT_GE(r.splits, 1);
  EXPECT_DOUBLE_EQ(r.fraction_of_peak_bw, r.bytes / r.median_s / 1e10);
  EXPECT_DOUBLE_EQ(r.gbps, r.bytes / r.median_s / 1e9);
  EXPECT_NE(format_decode_row(r).find("auto:"), std::string::npos) << format_decode_row(r);

  const nlohmann::json j = to_json(fake_peak(), {}, {r});
  ASSERT_EQ(j["results"].size(), 1u);
  const auto& row = j["results"][0];
  for (const char* key : {"mode", "batch", "heads", "kv_heads", "dim", "dtype", "context", "page_size", "query_tokens",
                          "splits", "median_s", "bytes", "gbps", "fraction_of_peak_bw", "tokens_per_s"}) {
    EXPECT_TRUE(row.contains(key)) << key;
  }
  EXPECT_EQ(row["mode"], "decode");
  EXPECT_EQ(row["page_size"], 16);
  EXPECT_EQ(row["splits_requested"], "auto");
}

}  // namespace
}  // namespace pflash::bench
