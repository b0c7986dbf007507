#include "sweep.hpp"

#include <optional>
#include <vector>

#include <fmt/format.h>

#include <algorithm>
#include <string>

#include "pflash/pflash.hpp"
#include "timing.hpp"

namespace pflash::bench {

std::string BenchConfig::mask_name() const {
  std::string name = causal ? "causal" : "full";
  if (window >= 0) name += " w" + std::to_string(window);
  if (segments > 1) name += " seg" + std::to_string(segments);
  if (soft_cap > 0.0f) name += " cap" + fmt::format("{:g}", soft_cap);
  return name;
}

namespace {

// The mask of a configuration (bottom-right positions, as the library's default), and its segment ids.
AttentionMask mask_of(const BenchConfig& c, std::vector<std::int32_t>& q_ids, std::vector<std::int32_t>& kv_ids) {
  AttentionMask mask;
  mask.causal = c.causal;
  mask.window_left = c.window;
  if (c.segments > 1) {
    const auto ids = [&](std::int64_t n) {
      std::vector<std::int32_t> out(static_cast<std::size_t>(c.batch * n));
      for (std::int64_t i = 0; i < c.batch * n; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % n * c.segments / n);
      return out;
    };
    q_ids = ids(c.seq_q);
    kv_ids = ids(c.seq_k);
    mask.q_segment_ids = q_ids;
    mask.kv_segment_ids = kv_ids;
  }
  return mask;
}

// Applies a row's kernel selection (BenchConfig::kernels) for its lifetime; the library's default
// (the environment's cap and rule) after.
class KernelSelection {
 public:
  explicit KernelSelection(const std::string& kernels) {
    if (kernels == "measured") return;
    const std::optional<CpuIsa> cap = cpu_isa_from_string(kernels);
    if (!cap) {
      throw Error(ErrorCode::kInvalidArgument, "pflash bench: kernels: expected measured or an instruction set (" +
                                                   std::string(cpu_isa_names()) + "), got '" + kernels + "'");
    }
    set_max_cpu_isa(*cap);
    set_cpu_kernel_rule(CpuKernelRule::kWidest);
  }
  ~KernelSelection() {
    reset_max_cpu_isa();
    reset_cpu_kernel_rule();
  }
  KernelSelection(const KernelSelection&) = delete;
  KernelSelection& operator=(const KernelSelection&) = delete;
};

}  // namespace

double visible_pairs(const BenchConfig& c) {
  double pairs = 0.0;
  const std::int64_t offset = c.seq_k - c.seq_q;
  for (std::int64_t i = 0; i < c.seq_q; ++i) {
    const std::int64_t p = offset + i;
    std::int64_t first = 0, end = c.seq_k;
    if (c.causal) end = std::min(end, p + 1);
    if (c.window >= 0) first = std::max<std::int64_t>(first, p - c.window);
    if (c.segments > 1) {  // the same document on both sides (equal lengths per side)
      const std::int64_t doc = i * c.segments / c.seq_q;
      first = std::max(first, (doc * c.seq_k + c.segments - 1) / c.segments);
      end = std::min(end, ((doc + 1) * c.seq_k + c.segments - 1) / c.segments);
    }
    pairs += static_cast<double>(std::max<std::int64_t>(end - first, 0));
  }
  return pairs;
}

double attention_flops(const BenchConfig& c) {
  const double forward = 4.0 * static_cast<double>(c.batch * c.heads) * static_cast<double>(c.dim) * visible_pairs(c);
  if (c.pass == "bwd") return 2.5 * forward;
  if (c.pass == "fwd+bwd") return 3.5 * forward;
  return forward;
}

BenchResult run_config(const BenchConfig& config, const BenchOptions& options, const MachinePeak& peak) {
  BenchResult result;
  result.config = config;
  result.flops = attention_flops(config);

  const RandomBuffer q(config.dtype, config.batch, config.heads, config.seq_q, config.dim, 1);
  const RandomBuffer k(config.dtype, config.batch, config.kv_heads, config.seq_k, config.dim, 2);
  const RandomBuffer v(config.dtype, config.batch, config.kv_heads, config.seq_k, config.dim, 3);
  RandomBuffer o(config.dtype, config.batch, config.heads, config.seq_q, config.dim, 4);
  std::vector<float> lse(static_cast<std::size_t>(config.batch * config.heads * config.seq_q));

  AttentionParams params;
  params.q = q.view();
  params.k = k.view();
  params.v = v.view();
  params.o = o.mutable_view();
  params.lse = MutableTensorView::contiguous(lse.data(), DType::kFloat32, {config.batch, config.heads, config.seq_q});
  std::vector<std::int32_t> q_ids, kv_ids;
  params.mask = mask_of(config, q_ids, kv_ids);
  params.logits_soft_cap = config.soft_cap;
  params.num_threads = options.threads;
  params.block_q = options.block_q;
  params.block_k = options.block_k;

  // The backward's extra tensors, only for backward rows.
  const bool backward = config.pass != "fwd";
  std::optional<RandomBuffer> dout, dq, dk, dv;
  AttentionBackwardParams grads;
  if (backward) {
    dout.emplace(config.dtype, config.batch, config.heads, config.seq_q, config.dim, 5);
    dq.emplace(config.dtype, config.batch, config.heads, config.seq_q, config.dim, 6);
    dk.emplace(config.dtype, config.batch, config.kv_heads, config.seq_k, config.dim, 7);
    dv.emplace(config.dtype, config.batch, config.kv_heads, config.seq_k, config.dim, 8);
    flash_attention_forward(params);  // the backward's inputs o and lse
    grads.q = params.q;
    grads.k = params.k;
    grads.v = params.v;
    grads.o = params.o;
    grads.lse = params.lse;
    grads.dout = dout->view();
    grads.dq = dq->mutable_view();
    grads.dk = dk->mutable_view();
    grads.dv = dv->mutable_view();
    grads.mask = params.mask;
    grads.logits_soft_cap = config.soft_cap;
    grads.num_threads = options.threads;
  }

  const bool naive = config.impl == "naive";
  const KernelSelection selection(naive ? std::string("measured") : config.kernels);
  const CpuIsa forward_set = cpu_kernel_choice(CpuPass::kForward, config.dtype).isa;
  const CpuIsa backward_set = cpu_kernel_choice(CpuPass::kBackward, config.dtype).isa;
  if (!naive) {
    result.kernel_sets = std::string(to_string(config.pass == "bwd" ? backward_set : forward_set));
    if (config.pass == "fwd+bwd" && backward_set != forward_set) {
      result.kernel_sets = fmt::format("{}/{}", to_string(forward_set), to_string(backward_set));
    }
  }
  if (naive && backward) throw Error(ErrorCode::kUnsupported, "pflash bench: the naive baseline has no backward pass");
  if (naive) result.bytes_needed = naive_attention_bytes(params);
  const auto call = [&] {
    if (naive) {
      naive_attention(params, {.memory_budget = options.memory_budget});
    } else if (config.pass == "bwd") {
      flash_attention_backward(grads);
    } else if (config.pass == "fwd+bwd") {
      flash_attention_forward_backward(params, grads.dout, grads.dq, grads.dk, grads.dv);
    } else {
      flash_attention_forward(params);
    }
  };

  Timing timing;
  try {
    timing = time_call(call, options.warmup, options.repeats, options.max_seconds);
  } catch (const OutOfMemoryError& e) {
    result.status = "oom";
    result.bytes_needed = e.bytes_needed();
    return result;
  }
  result.status = "ok";
  result.median_s = timing.median_s;
  result.repeats = timing.repeats;
  result.extra_bytes = timing.extra_bytes;
  result.tflops = result.flops / result.median_s / 1e12;
  const bool bf16 = config.dtype == DType::kBFloat16;
  const double ceiling = naive || config.kernels == "measured"
                             ? ceiling_flops(peak, bf16, naive ? "fwd" : config.pass)
                             : ceiling_flops(peak, bf16, config.pass, forward_set, backward_set);
  result.fraction_of_peak = result.flops / result.median_s / ceiling;
  result.tokens_per_s = static_cast<double>(config.batch * config.seq_q) / result.median_s;
  return result;
}

std::vector<BenchResult> run_sweep(const std::vector<BenchConfig>& configs, const BenchOptions& options,
                                   const MachinePeak& peak,
                                   const std::function<void(std::size_t, std::size_t, const BenchConfig&)>& progress) {
  std::vector<BenchResult> results;
  for (std::size_t i = 0; i < configs.size(); ++i) {
    if (progress) progress(i, configs.size(), configs[i]);
    results.push_back(run_config(configs[i], options, peak));
  }
  return results;
}

}  // namespace pflash::bench
