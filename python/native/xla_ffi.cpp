// XLA FFI handlers that run the C++ CPU kernels inside JAX's CPU backend: the attention forward and
// backward, decode and the merge of partial results, each a thin adapter from XLA's buffers to the
// library's views. XLA hands over row-major buffers; the kernels read and write them in place.
//
// vmap: jax.ffi.ffi_call(vmap_method="broadcast_all") gives every operand the same extra leading
// dimensions, which fold into the batch dimension (a free reshape of a row-major buffer), so a
// vmapped call is one kernel call. A paged cache cannot fold (its page ids index one pool), and the
// Python side maps it sequentially instead.
//
// Threads: the library's own OpenMP pool (pflash::default_num_threads, OMP_NUM_THREADS), started from
// the XLA thread that runs the custom call; XLA's intra-op pool is not used.
#include <cstdint>
#include <exception>
#include <span>
#include <string>

#include "pflash/pflash.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// An FFI error from whatever a kernel call throws: pflash's argument checks keep their message (it
// names the argument), so the Python caller sees what went wrong.
template <class Body>
ffi::Error guarded(const char* function_name, Body&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const pflash::OutOfMemoryError& error) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, error.what());
  } catch (const pflash::Error& error) {
    const auto code = error.code() == pflash::ErrorCode::kInvalidArgument ? ffi::ErrorCode::kInvalidArgument
                                                                          : ffi::ErrorCode::kInternal;
    return ffi::Error(code, error.what());
  } catch (const std::exception& error) {
    return ffi::Error::Internal(std::string(function_name) + ": " + error.what());
  }
}

pflash::DType dtype_of(ffi::DataType type, const char* name) {
  if (type == ffi::DataType::F32) return pflash::DType::kFloat32;
  if (type == ffi::DataType::BF16) return pflash::DType::kBFloat16;
  throw pflash::Error(pflash::ErrorCode::kInvalidArgument,
                      std::string("pallas_flash CPU kernels: expected ") + name + " of dtype float32 or bfloat16");
}

// A row-major buffer as a rank-`rank` view: the buffer's extra leading dimensions (vmap's) fold into
// the first. The buffer must have at least `rank` dimensions (the Python side guarantees it).
template <class View, class Buffer>
View view_of(const Buffer& buffer, int rank, const char* name) {
  const auto dims = buffer.dimensions();
  const int extra = static_cast<int>(dims.size()) - rank;
  if (extra < 0) {
    throw pflash::Error(pflash::ErrorCode::kInvalidArgument, std::string("pallas_flash CPU kernels: expected ") + name +
                                                                 " of rank >= " + std::to_string(rank));
  }
  View view;
  view.data = buffer.untyped_data();
  view.dtype = dtype_of(buffer.element_type(), name);
  view.rank = rank;
  std::int64_t leading = 1;
  for (int d = 0; d <= extra; ++d) leading *= dims[static_cast<std::size_t>(d)];
  view.shape[0] = leading;
  for (int d = 1; d < rank; ++d) view.shape[static_cast<std::size_t>(d)] = dims[static_cast<std::size_t>(extra + d)];
  std::int64_t stride = 1;
  for (int d = rank - 1; d >= 0; --d) {
    view.strides[static_cast<std::size_t>(d)] = stride;
    stride *= view.shape[static_cast<std::size_t>(d)];
  }
  return view;
}

pflash::TensorView input(const ffi::AnyBuffer& buffer, int rank, const char* name) {
  return view_of<pflash::TensorView>(buffer, rank, name);
}

pflash::MutableTensorView output(ffi::Result<ffi::AnyBuffer>& buffer, int rank, const char* name) {
  return view_of<pflash::MutableTensorView>(*buffer, rank, name);
}

std::span<const std::int32_t> int32_values(const ffi::Buffer<ffi::S32>& buffer) {
  return {buffer.typed_data(), buffer.element_count()};
}

// ------------------------------------------------------------------------------------------------
// The mask and score options of an attention call: the geometry as attributes, segment ids
// ([.., B, Nq] and [.., B, Nk] int32) and sinks ([Hq] f32) as operands, read when present.

struct MaskAttrs {  // every attribute of an attention call (XLA's FFI takes them all as one dictionary)
  float softmax_scale;
  bool causal;
  std::int64_t window_left, window_right, chunk_size, query_offset;
  float logits_soft_cap;
  bool segments, sinks;
};

pflash::AttentionMask mask_of(const MaskAttrs& a, const ffi::Buffer<ffi::S32>& q_ids,
                              const ffi::Buffer<ffi::S32>& kv_ids) {
  pflash::AttentionMask mask;
  mask.causal = a.causal;
  mask.window_left = a.window_left;
  mask.window_right = a.window_right;
  mask.chunk_size = a.chunk_size;
  mask.query_offset = a.query_offset;
  if (a.segments) {
    mask.q_segment_ids = int32_values(q_ids);
    mask.kv_segment_ids = int32_values(kv_ids);
  }
  return mask;
}

pflash::TensorView sinks_of(const MaskAttrs& a, const ffi::AnyBuffer& sinks) {
  return a.sinks ? input(sinks, 1, "sinks") : pflash::TensorView{};
}

// ------------------------------------------------------------------------------------------------
// Attention forward: q [.., B, Hq, Nq, D], k, v [.., B, Hkv, Nk, D] -> o (q's dtype), lse [.., B, Hq, Nq] f32.

ffi::Error attention_forward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_ids,
                             ffi::Buffer<ffi::S32> kv_ids, ffi::AnyBuffer sinks, ffi::Result<ffi::AnyBuffer> o,
                             ffi::Result<ffi::AnyBuffer> lse, MaskAttrs mask) {
  return guarded("flash_attention", [&] {
    pflash::AttentionParams params;
    params.q = input(q, 4, "q");
    params.k = input(k, 4, "k");
    params.v = input(v, 4, "v");
    params.o = output(o, 4, "o");
    params.lse = output(lse, 3, "lse");
    params.mask = mask_of(mask, q_ids, kv_ids);
    params.logits_soft_cap = mask.logits_soft_cap;
    params.sinks = sinks_of(mask, sinks);
    params.softmax_scale = mask.softmax_scale;
    pflash::flash_attention_forward(params);
  });
}

// Attention backward: the forward's q, k, v, o, lse and dO -> dq, dk, dv (the inputs' dtype). The
// sinks' gradient is computed by the caller from O and the LSE.
ffi::Error attention_backward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_ids,
                              ffi::Buffer<ffi::S32> kv_ids, ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer dout,
                              ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                              ffi::Result<ffi::AnyBuffer> dv, MaskAttrs mask) {
  return guarded("flash_attention (backward)", [&] {
    pflash::AttentionBackwardParams params;
    params.q = input(q, 4, "q");
    params.k = input(k, 4, "k");
    params.v = input(v, 4, "v");
    params.o = input(o, 4, "o");
    params.lse = input(lse, 3, "lse");
    params.dout = input(dout, 4, "the cotangent of o");
    params.dq = output(dq, 4, "dq");
    params.dk = output(dk, 4, "dk");
    params.dv = output(dv, 4, "dv");
    params.mask = mask_of(mask, q_ids, kv_ids);
    params.logits_soft_cap = mask.logits_soft_cap;
    params.softmax_scale = mask.softmax_scale;
    pflash::flash_attention_backward(params);
  });
}

// Decode: q [.., B, Hq, T, D] against a contiguous cache [.., B, Hkv, C, D] or (paged) page pools
// [num_pages, Hkv, page_size, D] with block_table [B, pages_per_seq]; seq_lens and positions_after [.., B].
// o [.., B, Hq, T, D] and lse [.., B, Hq, T] in fp32 (partials a merge may still combine).
ffi::Error decode(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> seq_lens,
                  ffi::Buffer<ffi::S32> positions_after, ffi::Buffer<ffi::S32> block_table, ffi::AnyBuffer sinks,
                  ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, float softmax_scale,
                  std::int32_t num_splits, bool paged, std::int64_t window_left, std::int64_t chunk_size,
                  float logits_soft_cap, bool has_sinks) {
  return guarded("flash_decode", [&] {
    pflash::DecodeParams params;
    params.q = input(q, 4, "q");
    params.cache.k = input(k_cache, 4, "k_cache");
    params.cache.v = input(v_cache, 4, "v_cache");
    params.cache.seq_lens = int32_values(seq_lens);
    if (paged) params.cache.block_table = int32_values(block_table);
    params.positions_after = int32_values(positions_after);
    params.o = output(o, 4, "o");
    params.lse = output(lse, 3, "lse");
    params.softmax_scale = softmax_scale;
    params.window_left = window_left;
    params.chunk_size = chunk_size;
    params.logits_soft_cap = logits_soft_cap;
    if (has_sinks) params.sinks = input(sinks, 1, "sinks");
    params.num_splits = num_splits;
    pflash::flash_decode(params);
  });
}

// Merge: o_parts [.., S, M, D] and lse_parts [.., S, M] (the S partials of M rows) -> o [.., M, D] f32,
// lse [.., M]. The leading dimensions are the library's N, the rows its H: strided views, no copy.
ffi::Error merge(ffi::AnyBuffer o_parts, ffi::AnyBuffer lse_parts, ffi::Result<ffi::AnyBuffer> o,
                 ffi::Result<ffi::AnyBuffer> lse) {
  return guarded("merge_attention_states", [&] {
    const auto parts = input(o_parts, 4, "o_parts");     // [L, S, M, D]
    const auto part_lse = input(lse_parts, 3, "lse_parts");  // [L, S, M]
    const auto merged = output(o, 3, "o");                // [L, M, D]
    const auto merged_lse = output(lse, 2, "lse");        // [L, M]
    pflash::MergeParams params;
    params.o_partials = pflash::TensorView::strided(parts.data, parts.dtype,
                                                    {parts.size(1), parts.size(0), parts.size(2), parts.size(3)},
                                                    {parts.stride(1), parts.stride(0), parts.stride(2), 1});
    params.lse_partials = pflash::TensorView::strided(part_lse.data, part_lse.dtype,
                                                      {part_lse.size(1), part_lse.size(0), part_lse.size(2)},
                                                      {part_lse.stride(1), part_lse.stride(0), 1});
    params.o = merged;
    params.lse = merged_lse;
    pflash::merge_attention_states(params);
  });
}

}  // namespace

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(MaskAttrs, xla::ffi::StructMember<float>("softmax_scale"),
                                      xla::ffi::StructMember<bool>("causal"),
                                      xla::ffi::StructMember<std::int64_t>("window_left"),
                                      xla::ffi::StructMember<std::int64_t>("window_right"),
                                      xla::ffi::StructMember<std::int64_t>("chunk_size"),
                                      xla::ffi::StructMember<std::int64_t>("query_offset"),
                                      xla::ffi::StructMember<float>("logits_soft_cap"),
                                      xla::ffi::StructMember<bool>("segments"), xla::ffi::StructMember<bool>("sinks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(pallas_flash_attention_forward, attention_forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<MaskAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(pallas_flash_attention_backward, attention_backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<MaskAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(pallas_flash_decode, decode,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("softmax_scale")
                                  .Attr<std::int32_t>("num_splits")
                                  .Attr<bool>("paged")
                                  .Attr<std::int64_t>("window_left")
                                  .Attr<std::int64_t>("chunk_size")
                                  .Attr<float>("logits_soft_cap")
                                  .Attr<bool>("has_sinks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(pallas_flash_merge, merge,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
