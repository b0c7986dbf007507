"""Every kernel compiled for a TPU v5e by the real compiler (libtpu, deviceless), at sizes interpret
mode cannot reach. A compile failure fails the test. On the compiled program, for shapes that need no
padding: nothing but parameters and the Pallas custom calls touches the inputs and outputs (no copy,
pad, transpose, slice or relayout), every output's HBM size is within 10% of its logical size (no
(N, 1) columns stored in (8, 128) tiles), and the planner's VMEM prediction bounds what the compiler
gives each kernel. Checks that could pass vacuously are each shown failing on a planted defect."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash import append_kv, flash_attention, flash_decode, plan_block_sizes, sharded_flash_decode, v5e
from pallas_flash.planner import (BlockSizes, backward_vmem_bytes, forward_vmem_bytes, fused_backward_vmem_bytes,
                                  fuses_dq)
from pallas_flash.reference import naive_attention
from tpu_compiler import requires_libtpu

pytestmark = requires_libtpu

def compile_attention(fn, *args):
    return v5e.compile_row_major(fn, *args)


def assert_kernels_only(program, allow_fusions=False):
    moved = program.data_movement()
    assert not moved, [f"{i.opcode} {i.name} {i.shape[:80]}" for i in moved]
    # copy-start/copy-done left by data_movement() are XLA's prefetches into VMEM, same layout.
    others = {i.opcode for i in program.entry} - {"parameter", "custom-call", "get-tuple-element", "tuple", "bitcast",
                                                   "constant", "copy-start", "copy-done"}
    if allow_fusions:
        others -= {"fusion"}  # the backward's D_i = rowsum(dO * O): a reduction, not a copy
    assert not others, others


def assert_outputs_dense(program, head_dim=128):
    """Every output within 10% of its logical size in HBM. A row-major [..., N, D] array with D < 128
    fills D of the 128 lanes of its (8, 128) tiles (what the kernels' [B, H, N, D] contract costs at
    D = 64: XLA's own default layout stores such arrays N-minor instead); anything else, the LSE
    above all, must be dense."""
    for array in program.outputs:
        lanes = -(-head_dim // 128) * 128 / head_dim if array.dims[-1] == head_dim else 1.0
        assert array.tiled_bytes <= 1.1 * lanes * array.logical_bytes, (
            f"{array} takes {array.tiled_bytes} bytes in HBM for {array.logical_bytes} of data (tile {array.tile})")


def assert_planner_bounds_vmem(program, predicted):
    """The planner's prediction bounds the VMEM the compiler gives each kernel (plus any whole operand
    XLA chose to keep in VMEM, which the kernel's allocation may count: not the planner's to predict)."""
    for kernel in program.kernels:
        assert 0 < kernel.scoped_vmem_bytes <= predicted + kernel.vmem_operand_bytes, (
            kernel.name, kernel.scoped_vmem_bytes, predicted, kernel.vmem_operand_bytes)


FORWARD = [  # (B, Hq, Hkv, N, D, causal, dtype)
    (1, 16, 16, 32768, 128, True, jnp.bfloat16),
    (1, 16, 16, 32768, 128, False, jnp.bfloat16),
    (1, 16, 16, 8192, 64, True, jnp.bfloat16),
    (1, 16, 16, 8192, 256, False, jnp.bfloat16),
    (2, 32, 8, 8192, 128, True, jnp.bfloat16),  # GQA 4
    (1, 8, 1, 4096, 96, False, jnp.bfloat16),  # MQA, D = 96 read in place
    (1, 4, 4, 4096, 128, True, jnp.float32),
]


@pytest.mark.parametrize("batch, heads_q, heads_kv, seq, dim, causal, dtype", FORWARD,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_forward_compiles_to_the_kernel_alone(batch, heads_q, heads_kv, seq, dim, causal, dtype):
    q = v5e.abstract((batch, heads_q, seq, dim), dtype)
    kv = v5e.abstract((batch, heads_kv, seq, dim), dtype)
    program = compile_attention(lambda q, k, v: flash_attention(q, k, v, causal=causal, return_lse=True,
                                                                interpret=False), q, kv, kv)
    assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_fwd"]
    assert_kernels_only(program)
    assert_outputs_dense(program, dim)  # O and the LSE [B, H, N]
    blocks = plan_block_sizes(seq, seq, dim, dtype, causal)
    itemsize = jnp.dtype(dtype).itemsize
    assert_planner_bounds_vmem(program, forward_vmem_bytes(blocks.block_q, blocks.block_k, dim, itemsize))


BACKWARD = [  # (B, Hq, Hkv, N, D, causal, kernels): dQ fused while its accumulators fit VMEM
    (1, 16, 16, 8192, 128, True, ["bwd", "fwd"]),
    (1, 16, 16, 32768, 128, False, ["bwd", "fwd"]),  # 16 MiB of dQ^T per head
    (1, 8, 2, 4096, 64, True, ["bwd", "fwd"]),
    (1, 4, 4, 4096, 256, False, ["bwd", "fwd"]),
    (1, 8, 1, 32768, 128, True, ["bwd_dkv", "bwd_dq", "fwd"]),  # MQA: 128 MiB for the group, a dQ kernel
]


@pytest.mark.parametrize("batch, heads_q, heads_kv, seq, dim, causal, kernels", BACKWARD,
                         ids=lambda x: "-".join(x) if isinstance(x, list) else str(x))
def test_training_step_compiles_to_the_planned_kernels(batch, heads_q, heads_kv, seq, dim, causal, kernels):
    q = v5e.abstract((batch, heads_q, seq, dim), jnp.bfloat16)
    kv = v5e.abstract((batch, heads_kv, seq, dim), jnp.bfloat16)

    def train_step(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False), q, k, v)
        return (o, *vjp(do))

    program = compile_attention(train_step, q, kv, kv, q)
    names = sorted(k.name.split(".")[0].split("pallas_flash_")[-1].rstrip("_") for k in program.kernels)
    assert names == kernels, names
    assert_kernels_only(program, allow_fusions=True)
    assert_outputs_dense(program, dim)
    blocks = plan_block_sizes(seq, seq, dim, causal=causal)
    group = heads_q // heads_kv
    assert fuses_dq(blocks, seq, group, dim, 2) == ("bwd" in names)
    backward = (fused_backward_vmem_bytes(blocks.block_q_dkv, blocks.block_k_dkv, dim, 2, seq, group)
                if "bwd" in names else backward_vmem_bytes(blocks.block_q_dkv, blocks.block_k_dkv, dim, 2))
    assert_planner_bounds_vmem(program, max(forward_vmem_bytes(blocks.block_q, blocks.block_k, dim, 2), backward))


def cache_parameters_feed_only_the_kernel(program, cache_params):
    """The cache is read in place: every use of a cache parameter is a Pallas custom call."""
    for inst in program.entry:
        if any(name in inst.operands for name in cache_params):
            assert inst.custom_call_target == "tpu_custom_call", f"{inst.opcode} {inst.name} reads the cache"
    big = [i for i in program.data_movement() if any(a.logical_bytes >= 1 << 20 for a in i.arrays)]
    assert not big, [f"{i.opcode} {i.name} {i.shape[:80]}" for i in big]


@pytest.mark.parametrize("context, tokens, batch", [(32768, 1, 1), (131072, 1, 2), (32768, 4, 2)])
def test_decode_compiles_reading_the_cache_in_place(context, tokens, batch):
    q = v5e.abstract((batch, 32, tokens, 128), jnp.bfloat16)
    cache = v5e.abstract((batch, 8, context, 128), jnp.bfloat16)
    lengths = v5e.abstract((batch,), jnp.int32)
    program = v5e.compile_for_v5e(lambda q, k, v, n: flash_decode(q, k, v, n, return_lse=True, interpret=False),
                                  q, cache, cache, lengths)
    assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_decode"]
    caches = [p.name for p in program.parameters if p.arrays[0].dims == cache.shape]
    cache_parameters_feed_only_the_kernel(program, caches)
    o = program.outputs[0]
    assert o.tiled_bytes <= 1.1 * o.logical_bytes


@pytest.mark.parametrize("context, tokens, batch, page_size", [(32768, 1, 16, 128), (131072, 4, 2, 16), (65536, 1, 1, 512)])
def test_paged_decode_compiles_reading_the_pools_in_place(context, tokens, batch, page_size):
    q = v5e.abstract((batch, 32, tokens, 128), jnp.bfloat16)
    pool = v5e.abstract((batch * context // page_size, 8, page_size, 128), jnp.bfloat16)
    table = v5e.abstract((batch, context // page_size), jnp.int32)
    lengths = v5e.abstract((batch,), jnp.int32)
    program = v5e.compile_for_v5e(
        lambda q, k, v, n, t: flash_decode(q, k, v, n, page_table=t, return_lse=True, interpret=False),
        q, pool, pool, lengths, table)
    assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_decode"]
    pools = [p.name for p in program.parameters if p.arrays[0].dims == pool.shape]
    assert len(pools) == 2
    cache_parameters_feed_only_the_kernel(program, pools)


def test_a_d64_cache_with_kv_heads_packed_per_row_takes_its_own_bytes():
    # A bf16 [..., 128, 64] pool in the row-major layout the kernel reads is laid out in 128 lanes:
    # twice its bytes in HBM (XLA's own layout for it at a jit boundary, page positions minor, is
    # dense, but then copied to the kernel's, the whole pool each call). Two KV heads a row,
    # [..., 4, 128, 128], hold the same cache in its own bytes, read in place.
    batch, context, page_size = 16, 32768, 128
    q = v5e.abstract((batch, 32, 1, 64), jnp.bfloat16)
    table = v5e.abstract((batch, context // page_size), jnp.int32)
    lengths = v5e.abstract((batch,), jnp.int32)
    padding = {}
    for per_row in (1, 2):
        pool = v5e.abstract((batch * context // page_size, 8 // per_row, page_size, 64 * per_row), jnp.bfloat16)
        program = v5e.compile_row_major(
            lambda q, k, v, n, t: flash_decode(q, k, v, n, page_table=t, interpret=False), q, pool, pool, lengths, table)
        assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_decode"]
        pools = [p for p in program.parameters if p.arrays[0].dims == pool.shape]
        assert len(pools) == 2
        padding[per_row] = pools[0].arrays[0].tiled_bytes / pools[0].arrays[0].logical_bytes
        cache_parameters_feed_only_the_kernel(program, [p.name for p in pools])
    assert padding == {1: 2.0, 2: 1.0}


def compile_append(donate, tokens=1, dim=128):
    pool = v5e.abstract((2048, 8, 128, dim), jnp.bfloat16)  # 512 MiB each (D = 128)
    new = v5e.abstract((8, 8, tokens, dim), jnp.bfloat16)
    table, lengths = v5e.abstract((8, 256), jnp.int32), v5e.abstract((8,), jnp.int32)
    program = v5e.compile_for_v5e(append_kv, pool, pool, lengths, table, new, new,
                                  donate_argnums=(0, 1) if donate else ())
    return program, pool.size * 2


def pool_copies(program, pool_bytes):
    """Instructions that move a pool's worth of data, other than the writes of the new rows into their
    operand's buffer: scatters (XLA's aliasing_operands: in place) and dynamic-update-slices (in
    place whenever the result shares the operand's buffer, which the alias check below pins)."""
    return [f"{i.opcode} {i.name}" for i in program.data_movement()
            if any(a.logical_bytes >= pool_bytes for a in i.arrays) and i.opcode != "dynamic-update-slice"
            and not ("scatter" in i.name and "aliasing_operands" in i.attributes)]


@pytest.mark.parametrize("tokens, dim, writes", [(1, 128, "dynamic_update_slice"), (1, 64, "dynamic_update_slice"),
                                                  (16, 128, "scatter")])
def test_append_with_donated_pools_writes_in_place(tokens, dim, writes):
    # 8 rows: one in-place update each; 128 (past decode.ROW_LOOP_MAX): one scatter per pool. D = 64
    # is where a scatter made XLA copy a pool the kernels read to its own layout and back.
    program, pool_bytes = compile_append(donate=True, tokens=tokens, dim=dim)
    assert not pool_copies(program, pool_bytes)
    assert program.memory.alias_size_in_bytes == 2 * pool_bytes  # both pools are the outputs' buffers
    assert sum(writes in i.name for i in program.entry) == (2 * 8 * tokens if writes != "scatter" else 2)


def test_checks_catch_an_append_that_copies_the_pools():
    program, pool_bytes = compile_append(donate=False)  # functional without donation: XLA copies
    assert len(pool_copies(program, pool_bytes)) == 2 and program.memory.alias_size_in_bytes == 0


def test_sharded_paged_decode_compiles_for_the_2x2_mesh():
    mesh = v5e.mesh_2x2()
    replicated = NamedSharding(mesh, P())
    q = v5e.abstract((4, 32, 1, 128), jnp.bfloat16, replicated)
    pool = v5e.abstract((4 * 256, 8, 128, 128), jnp.bfloat16, NamedSharding(mesh, P(("x", "y"), None, None, None)))
    table = v5e.abstract((4, 256), jnp.int32, NamedSharding(mesh, P(None, ("x", "y"))))
    lengths = v5e.abstract((4,), jnp.int32, replicated)
    program = v5e.compile_for_v5e(
        lambda q, k, v, n, t: sharded_flash_decode(q, k, v, n, mesh, page_table=t, interpret=False),
        q, pool, pool, lengths, table)
    assert "all-gather" in {i.opcode for i in program.entry}
    assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_decode"]
    shards = [p.name for p in program.parameters if p.arrays[0].dims == (256, 8, 128, 128)]
    assert len(shards) == 2, [p.arrays[0].dims for p in program.parameters]  # a quarter of the pages each
    cache_parameters_feed_only_the_kernel(program, shards)


def test_sharded_decode_compiles_for_the_2x2_mesh():
    mesh = v5e.mesh_2x2()
    replicated = NamedSharding(mesh, P())
    q = v5e.abstract((1, 32, 1, 128), jnp.bfloat16, replicated)
    cache = v5e.abstract((1, 8, 131072, 128), jnp.bfloat16, NamedSharding(mesh, P(None, None, ("x", "y"), None)))
    lengths = v5e.abstract((1,), jnp.int32, replicated)
    program = v5e.compile_for_v5e(lambda q, k, v, n: sharded_flash_decode(q, k, v, n, mesh, interpret=False),
                                  q, cache, cache, lengths)
    assert "all-gather" in {i.opcode for i in program.entry}  # the partials cross the mesh
    assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_decode"]
    params = [p.name for p in program.parameters]
    cache_shards = [p.name for p in program.parameters if p.arrays[0].dims == (1, 8, 32768, 128)]
    assert len(cache_shards) == 2, params  # each device holds a quarter of the positions
    cache_parameters_feed_only_the_kernel(program, cache_shards)


def test_the_naive_baseline_runs_out_of_hbm_where_the_kernel_does_not():
    q = v5e.abstract((1, 16, 16384, 128), jnp.bfloat16)
    with pytest.raises(v5e.CompileError) as failure:
        v5e.compile_for_v5e(lambda q, k, v: naive_attention(q, k, v, causal=True), q, q, q)
    assert failure.value.oom, failure.value.summary
    program = v5e.compile_for_v5e(lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False), q, q, q)
    assert program.hbm_bytes_in_use < 1 << 30


# --------------------------------------------------------------------------------------------------
# The checks above, each shown failing on a planted defect


def test_checks_catch_an_lse_stored_as_a_column():
    q = v5e.abstract((1, 16, 4096, 128), jnp.bfloat16)
    program = compile_attention(
        lambda q, k, v: flash_attention(q, k, v, return_lse=True, interpret=False)[1][..., None], q, q, q)
    with pytest.raises(AssertionError, match="takes"):
        assert_outputs_dense(program)  # f32[1,16,4096,1] in (8, 128) tiles: 128x


def test_checks_catch_a_copy_around_the_kernel():
    q = v5e.abstract((1, 16, 4096, 128), jnp.bfloat16)
    program = compile_attention(lambda q, k, v: flash_attention(q[:, :, ::-1], k, v, interpret=False), q, q, q)
    with pytest.raises(AssertionError):
        assert_kernels_only(program)


def test_checks_catch_the_default_layout_transpose_at_d64():
    # Without row-major entry layouts XLA stores a bf16 [.., N, 64] array with N minor: a relayout.
    q = v5e.abstract((1, 16, 4096, 64), jnp.bfloat16)
    program = v5e.compile_for_v5e(lambda q, k, v: flash_attention(q, k, v, interpret=False), q, q, q)
    with pytest.raises(AssertionError):
        assert_kernels_only(program)


def test_compiler_rejects_blocks_that_do_not_fit_vmem():
    q = v5e.abstract((1, 1, 4096, 128), jnp.float32)
    # One sub-block of 4096 x 4096 fp32 scores alone is 64 MiB.
    too_big = BlockSizes(4096, 4096, 128, 128, 128, 128, block_q_compute=4096)
    with pytest.raises(v5e.CompileError) as failure:
        v5e.compile_for_v5e(lambda q, k, v: flash_attention(q, k, v, block_sizes=too_big, interpret=False), q, q, q)
    assert failure.value.vmem and not failure.value.oom, failure.value.summary


@pytest.mark.parametrize("seq", [1000, 3000, 4097, 4224])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_unaligned_lengths_are_read_in_place(seq, pass_):
    # A length that is not a multiple of the blocks: the partial last blocks are read and written in
    # place (no pad, slice or copy around the kernels); head_dim = 96 is read in place too. A last
    # query block of at most 128 rows (4097 and 4224 in 2048-row blocks) is the forward's tail call,
    # writing into the main call's O and LSE (aliased: no copy either).
    q = v5e.abstract((1, 8, seq, 96), jnp.bfloat16)
    attention = lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False)  # noqa: E731
    if pass_ == "fwd":
        program = compile_attention(attention, q, q, q)
    else:
        def step(q, k, v, do):
            return jax.vjp(attention, q, k, v)[1](do)
        program = compile_attention(step, q, q, q, q)
    assert_kernels_only(program, allow_fusions=pass_ != "fwd")
    names = sorted(k.name.split(".")[0].split("pallas_flash_")[-1].rstrip("_") for k in program.kernels)
    tail = ["fwd_tail"] if seq in (4097, 4224) else []
    assert names == (["fwd"] + tail if pass_ == "fwd" else ["bwd", "fwd"] + tail), names


# The mask variants on the real compiler: Mosaic lowers every rule (the window's bounded grids, the
# chunk's vector division, the segment ids' SMEM block ranges and id columns, the soft cap's tanh, the
# sinks in SMEM), and the compiled program is the kernels alone (plus the backward's D_i fusion, the
# segment ranges' and the sinks' small XLA ops).
VARIANTS = [  # (name, flash_attention kwargs)
    ("window", {"causal": True, "window": (1024, 0)}),
    ("window_two_sided", {"window": (700, 300)}),
    ("chunk", {"causal": True, "chunk": 2048}),
    ("chunk_across_blocks", {"causal": True, "chunk": 1000}),
    ("chunks_in_blocks", {"causal": True, "chunk": 512}),  # forward: 4 chunks a block; backward: 1 a block
    ("soft_cap", {"causal": True, "logits_soft_cap": 50.0}),
    ("segments", {"causal": True, "segment_ids": "ids"}),
    ("sinks", {"causal": True, "sinks": "sinks"}),
]


@pytest.mark.parametrize("name, kwargs", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_mask_variants_compile(name, kwargs, pass_):
    seq, heads = 8192, 4
    q = v5e.abstract((1, heads, seq, 128), jnp.bfloat16)
    extra = []
    if kwargs.get("segment_ids"):
        extra.append(v5e.abstract((1, seq), jnp.int32))
    if kwargs.get("sinks"):
        extra.append(v5e.abstract((heads,), jnp.float32))

    def attention(q, k, v, *extra):
        options = dict(kwargs)
        if "segment_ids" in options:
            options["segment_ids"] = extra[0]
        if "sinks" in options:
            options["sinks"] = extra[-1]
        return flash_attention(q, k, v, interpret=False, **options)

    if pass_ == "fwd":
        program = compile_attention(attention, q, q, q, *extra)
    else:
        def step(q, k, v, *extra):
            return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, *extra).astype(jnp.float32)), (0, 1, 2))(q, k, v)
        program = compile_attention(step, q, q, q, *extra)
    names = {k.name.split(".")[0] for k in program.kernels}
    assert "pallas_flash_fwd" in "".join(names), names
    moved = [i for i in program.data_movement() if i.arrays and max(a.logical_bytes for a in i.arrays) > 1 << 16]
    assert not moved, [f"{i.opcode} {i.name}" for i in moved]


@pytest.mark.parametrize("page_size", [0, 16, 128], ids=["contiguous", "paged16", "paged128"])
def test_windowed_decode_compiles_without_copies(page_size):
    # Paged: the window's pages in blocks of whole 128-row tiles (16-row pages: 56 a block).
    q = v5e.abstract((1, 32, 1, 128), jnp.bfloat16)
    if page_size:
        cache = v5e.abstract((131072 // page_size, 8, page_size, 128), jnp.bfloat16)
        table = v5e.abstract((1, 131072 // page_size), jnp.int32)
    else:
        cache, table = v5e.abstract((1, 8, 131072, 128), jnp.bfloat16), None
    program = v5e.compile_for_v5e(lambda q, k, v, t: flash_decode(q, k, v, 131072, page_table=t, window=4096,
                                                                  logits_soft_cap=30.0, interpret=False),
                                  q, cache, cache, table)
    assert [k.name.split(".")[0] for k in program.kernels] == ["pallas_flash_decode"]
    assert not program.data_movement(), [i.name for i in program.data_movement()]


@pytest.mark.parametrize("spec, batch, heads_kv", [(P("x", "y"), 2, 2), (P(None, ("x", "y")), 1, 4)])
def test_sharded_inputs_compile_to_per_chip_kernels_on_the_2x2_mesh(spec, batch, heads_kv):
    # Explicit axes (jax.make_mesh's default): the kernels run per chip, forward and backward, with no
    # collective, and the outputs keep q's sharding (Auto axes cannot: jax-ml/jax#38196).
    import numpy as np
    from jax.sharding import AxisType, Mesh

    mesh = Mesh(np.array(v5e.topology().devices).reshape(2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    sharding = NamedSharding(mesh, spec)
    q = v5e.abstract((batch, 8, 1024, 128), jnp.bfloat16, sharding)
    k = v5e.abstract((batch, heads_kv, 1024, 128), jnp.bfloat16, sharding)

    def step(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False), q, k, v)
        return (o, *vjp(do))

    compiled = jax.jit(step).lower(q, k, k, q).compile()
    text = compiled.as_text()
    assert not [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
                if c in text]
    assert [s.spec[:len(spec)] for s in compiled.output_shardings] == [tuple(spec)] * 4
    kernel_q_shapes = {i.shape for i in v5e.entry_instructions(text) if i.opcode == "parameter"}
    local = f"bf16[{batch // (2 if spec[0] else 1)},{8 // (4 if spec[0] is None else 2)},1024,128]"
    assert any(shape.startswith(local) for shape in kernel_q_shapes), kernel_q_shapes


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("spec", [P("x", "y"), P(None, ("x", "y"))])
def test_batch_and_head_sharded_decode_compiles_to_per_chip_kernels(spec, paged):
    # flash_decode under data and tensor parallelism (explicit axes): one decode kernel per chip on its
    # own sequences and heads, no collective, the output sharded like q. A page pool is sharded over
    # its heads only (a sequence's pages may lie anywhere in it).
    import numpy as np
    from jax.sharding import AxisType, Mesh

    mesh = Mesh(np.array(v5e.topology().devices).reshape(2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    batch = 4 if spec[0] else 1
    q = v5e.abstract((batch, 32, 1, 128), jnp.bfloat16, NamedSharding(mesh, spec))
    lengths = v5e.abstract((batch,), jnp.int32, NamedSharding(mesh, P(spec[0])))
    if paged:
        pool = v5e.abstract((256, 8, 256, 128), jnp.bfloat16, NamedSharding(mesh, P(None, spec[1])))
        table = v5e.abstract((batch, 64), jnp.int32, NamedSharding(mesh, P(spec[0])))
        args = (q, pool, pool, lengths, table)
        decode = lambda q, k, v, n, t: flash_decode(q, k, v, n, page_table=t, interpret=False)  # noqa: E731
    else:
        cache = v5e.abstract((batch, 8, 16384, 128), jnp.bfloat16, NamedSharding(mesh, spec))
        args = (q, cache, cache, lengths)
        decode = lambda q, k, v, n: flash_decode(q, k, v, n, interpret=False)  # noqa: E731
    compiled = jax.jit(decode).lower(*args).compile()
    text = compiled.as_text()
    assert not [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
                if c in text]
    assert jax.tree.leaves(compiled.output_shardings)[0].spec[:len(spec)] == tuple(spec)
    heads_kv = 8 // (2 if spec[0] else 4)
    assert f"bf16[{batch // (2 if spec[0] else 1)},{heads_kv}," in text  # per-chip operands of the kernel


def _context_parallel_step(mesh, strategy):
    from pallas_flash import context_parallel_attention

    def step(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: context_parallel_attention(q, k, v, mesh, ("x", "y"), strategy=strategy,
                                                                    causal=True, interpret=False), q, k, v)
        return (o, *vjp(do))
    return step


def _explicit_mesh_2x2():
    import numpy as np
    from jax.sharding import AxisType, Mesh

    return Mesh(np.array(v5e.topology().devices).reshape(2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_context_parallel_training_step_compiles_for_the_2x2_mesh(strategy):
    # N = 32768 over the four chips, causal: each chip's kernels take its own queries (two zigzag
    # halves of 4096); the ring moves K, V and dK, dV by collective-permute alone, the all-gather by
    # all-gather and reduce-scatter (XLA:TPU's all-reduce + slice); the outputs stay sequence-sharded.
    mesh = _explicit_mesh_2x2()
    tokens = NamedSharding(mesh, P(None, None, ("x", "y"), None))
    q = v5e.abstract((1, 16, 32768, 128), jnp.bfloat16, tokens)
    compiled = jax.jit(_context_parallel_step(mesh, strategy)).lower(q, q, q, q).compile()
    text = compiled.as_text()
    found = {c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
             if f" {c}(" in text or f" {c}-start(" in text}
    assert found == ({"collective-permute"} if strategy == "ring" else {"all-gather", "all-reduce",
                                                                       "collective-permute"}), found
    assert "bf16[1,16,4096,128]" in text  # a zigzag half of one chip's queries, the kernels' operand
    assert text.count("tpu_custom_call") >= 4
    for sharding in compiled.output_shardings:
        assert tuple(sharding.spec)[:3] == (None, None, ("x", "y"))
    # What a chip receives (CompiledProgram.collectives, the bench's ICI bytes) against the plan: one
    # chip's bf16 K and V are 64 MiB (8192 tokens), its float32 dK and dV 128 MiB, q, O and their
    # gradients 32 MiB each. The layout's exchanges move q, k, v, O and their gradients once each.
    program = v5e.CompiledProgram(text, None, v5e.entry_instructions(text), {})
    received = sum(c.received_bytes for c in program.collectives(4)) / 2**20
    layout = 8 * 32 + 2  # and the LSE and its cotangent, 0.5 MiB each
    if strategy == "ring":  # 3 steps forward (K, V), 3 backward (K, V, dK, dV), dK, dV home; XLA may keep
        # the forward's received K, V for the backward (the same permutes of the same K, V): at least
        # the forward's K, V and three steps of dK, dV
        planned, least = 3 * 64 + 3 * (64 + 128) + 128, 3 * 64 + 3 * 128
    else:  # the whole K, V (256 MiB) gathered twice, (P-1)/P of it each time; the whole float32 dK, dV
        # (512 MiB) all-reduced (XLA:TPU's reduce-scatter), 2 (P-1)/P of it by a ring all-reduce
        planned = least = 2 * 256 * 3 / 4 + 512 * 2 * 3 / 4
    assert least <= received <= planned + layout, (received, planned)
    if strategy == "ring":
        # The schedule overlaps the forward's K, V transfers (bf16 blocks of 8192 tokens) and the
        # backward's dK, dV ones (float32) with kernels (the first step's directly, a conditional holds
        # each later step's): a kernel runs between their start and their done.
        entry = program.entry
        overlapped = {"bf16": 0, "f32": 0}
        for n, inst in enumerate(entry):
            if inst.opcode == "collective-permute-start" and ",16,8192,128]" in inst.shape:
                end = next(m for m in range(n, len(entry)) if entry[m].opcode == "collective-permute-done"
                           and entry[m].operands[:1] == (inst.name,))
                if any(i.opcode == "conditional" or i.custom_call_target == "tpu_custom_call" for i in entry[n:end]):
                    overlapped[inst.shape.lstrip("(").split("[")[0]] += 1
        assert overlapped["bf16"] >= 2 * 3 and overlapped["f32"] >= 2 * 3, overlapped


def test_context_parallel_ring_compiles_for_a_multi_host_slice():
    # v5e:4x4, 16 chips of 4 hosts, 8192 tokens a chip (N = 131072): the ring's memory per chip does
    # not grow with the chips. It holds one K, V block computing and one arriving (64 MiB each here):
    # 0.85 GiB a chip, as the 2x2 does at 8192 tokens a chip; a ring that let XLA issue every step's
    # transfer at once held all 15 blocks.
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = v5e.topology("v5e:4x4").devices
    assert len({d.process_index for d in devices}) == 4
    mesh = Mesh(np.array(devices).reshape(4, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    q = v5e.abstract((1, 16, 131072, 128), jnp.bfloat16, NamedSharding(mesh, P(None, None, ("x", "y"), None)))
    program = v5e.compile_for_v5e(_context_parallel_step(mesh, "ring"), q, q, q, q)
    assert {c.opcode for c in program.collectives(16)} == {"collective-permute"}
    assert program.hbm_bytes_in_use < 1.0 * 2**30, program.hbm_bytes_in_use / 2**30


def test_context_parallel_fits_a_sequence_one_chip_cannot_hold():
    # B=1, H=16, D=128, causal, bf16: the training step at N = 524288 runs out of one chip's HBM; over
    # the four chips (131072 tokens each) the ring's fits, and auto picks the ring there (the
    # all-gather would hold the whole sequence's K, V and float32 dK, dV).
    from pallas_flash import context_parallel
    from pallas_flash.hardware import TPU_V5E

    shape = (1, 16, 524288, 128)
    single = v5e.abstract(shape, jnp.bfloat16)

    def one_chip(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False), q, k, v)
        return (o, *vjp(do))

    with pytest.raises(v5e.CompileError) as failure:
        v5e.compile_for_v5e(one_chip, single, single, single, single)
    assert failure.value.oom, failure.value.summary
    mesh = _explicit_mesh_2x2()
    q = v5e.abstract(shape, jnp.bfloat16, NamedSharding(mesh, P(None, None, ("x", "y"), None)))
    assert context_parallel.choose_strategy(shape, shape, 2, True, 4) == "ring"
    program = v5e.compile_for_v5e(_context_parallel_step(mesh, "auto"), q, q, q, q)
    assert program.hbm_bytes_in_use < TPU_V5E.hbm_capacity, program.hbm_bytes_in_use
