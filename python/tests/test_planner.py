import jax.numpy as jnp
import pytest

from pallas_flash import describe_plan, plan_block_sizes
from pallas_flash import plan
from pallas_flash.mask import Mask
from pallas_flash.tiles import Grid, Problem, static_steps
from pallas_flash.planner import LANES, backward_vmem_bytes, forward_vmem_bytes, v5e_vmem_bytes, vmem_budget_bytes


def test_v5e_vmem_from_chip_table():
    assert v5e_vmem_bytes() == 128 * 2**20


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq", [2048, 8192, 32768])
def test_plan_fits_v5e_budget_with_large_query_blocks(seq, causal):
    blocks = plan_block_sizes(seq, seq, 128, jnp.bfloat16, causal)
    assert blocks.block_q == min(seq, 2048 if causal else 4096) and blocks.block_k == 1024
    assert seq % blocks.block_q == 0 and seq % blocks.block_k == 0
    assert forward_vmem_bytes(blocks.block_q, blocks.block_k, 128, 2) <= vmem_budget_bytes()
    assert backward_vmem_bytes(blocks.block_q_dkv, blocks.block_k_dkv, 128, 2) <= vmem_budget_bytes()


@pytest.mark.parametrize("seq, block_q, block_k", [(300, 256, 256), (1000, 1024, 1024), (4097, 4096, 1024),
                                                  (4224, 4096, 1024), (100000, 4096, 1024)])
def test_blocks_need_not_divide_the_length(seq, block_q, block_k):
    # The last block may be partial (read in place, its missing rows skipped): N = 4097 keeps N = 4096's
    # blocks, where dividing blocks would fall to 128 x 128 (4224 = 33 x 128).
    blocks = plan_block_sizes(seq, seq, 96)
    assert (blocks.block_q, blocks.block_k) == (block_q, block_k)


@pytest.mark.parametrize("rules, block_k", [({"causal": True}, 1024), ({"causal": True, "window": (4095, 0)}, 2048),
                                            ({"chunk": 8192}, 2048), ({"window": (64, 64)}, 2048)])
def test_bounded_masks_get_longer_key_blocks(rules, block_k):
    # A window's or a chunk's edge tiles hold little work: longer key blocks spread a grid step's
    # fixed cost over more of it.
    blocks = plan_block_sizes(16384, 16384, 128, mask=Mask.bottom_right(16384, 16384, **rules))
    assert blocks.block_k == block_k and blocks.block_q == (2048 if rules.get("causal") else 4096)
    assert forward_vmem_bytes(blocks.block_q, blocks.block_k, 128, 2) <= vmem_budget_bytes()
    # ... updated 256 keys at a time: the band's edge sub-blocks in equal chunks.
    assert blocks.block_k_compute == (256 if block_k == 2048 else 512)


@pytest.mark.parametrize("chunk, block, whole", [(128, 128, False), (256, None, True), (512, None, True),
                                                 (1024, None, True), (1536, 512, False), (3072, 1024, False),
                                                 (8192, None, False), (384, None, False), (1000, None, False)])
def test_chunks_plan_blocks_inside_one_chunk(chunk, block, whole):
    # A tile across a chunk boundary takes the kernels' run-time masking (several times slower than
    # static patterns): blocks are kept where they hold whole chunks (the patterns per chunk: whole)
    # or lie in one; else they stay within one chunk where a block of the chunk's length or of at
    # least 512 rows can (None: the plan of any bounded span).
    n = 16384
    mask = Mask.bottom_right(n, n, causal=True, chunk=chunk)
    blocks = plan_block_sizes(n, n, 128, mask=mask)
    span = plan_block_sizes(n, n, 128, mask=Mask.bottom_right(n, n, causal=True, window=(4095, 0)))
    forward = (blocks.block_q, blocks.block_k)
    backward = [(blocks.block_q_dkv, blocks.block_k_dkv), (blocks.block_q_dq, blocks.block_k_dq)]
    assert mask.chunks_in_tiles(*forward, blocks.block_q_compute) == whole
    static = [mask.static_tiles(*pair, blocks.block_q_compute) for pair in (forward, backward[0])]
    assert static == [chunk % LANES == 0 and chunk != 384] * 2  # 384: its blocks of 128 not taken
    if block is None:
        assert blocks == span
    else:
        assert forward == (min(block, span.block_q), min(block, span.block_k)) and mask.chunks_align(*forward)
        assert backward == [(min(block, 1024), min(block, 1024))] * 2 and mask.chunks_align(*backward[0])


def test_chunk_blocks_need_both_views_aligned():
    # Queries from position 15384 (1000 rows against 16384 keys, bottom-right) start inside a chunk
    # of 512: no block keeps to one chunk or holds whole ones on that axis, so none is bounded.
    mask = Mask.bottom_right(1000, 16384, causal=True, chunk=512)
    blocks = plan_block_sizes(1000, 16384, 128, mask=mask)
    assert (blocks.block_k, blocks.block_k_dkv) == (2048, 1024)
    assert not mask.chunks_align(blocks.block_q, blocks.block_k) and not mask.chunks_in_tiles(blocks.block_q,
                                                                                             blocks.block_k, 256)
    aligned = Mask.bottom_right(1024, 16384, causal=True, chunk=512)
    blocks = plan_block_sizes(1024, 16384, 128, mask=aligned)
    assert aligned.chunks_in_tiles(blocks.block_q, blocks.block_k, 256) and blocks.block_k_dkv == 1024


@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids_plan_as_a_bounded_span(causal):
    # Packed documents: each row's keys end at its document's, whose diagonal tiles are a causal
    # mask's; the plan is a window's.
    mask = Mask.bottom_right(32768, 32768, causal=causal)
    plain = plan_block_sizes(32768, 32768, 128, mask=mask)
    packed = plan_block_sizes(32768, 32768, 128, mask=mask, segments=True)
    assert (plain.block_k, plain.block_k_compute) == (1024, 512)
    assert (packed.block_q, packed.block_k, packed.block_k_compute) == (plain.block_q, 2048, 256)


def test_describe_plan_names_blocks_and_vmem():
    line = describe_plan(1, 16, 8192, 128)
    assert "block_q=" in line and "VMEM" in line and "v5e" in line


def test_describe_plan_says_where_dq_is_computed():
    assert "dQ fused" in describe_plan(1, 16, 8192, 128)
    assert "dQ in its own kernel" in describe_plan(1, 32, 32768, 128, kv_heads=4)  # 4 x 8 heads' dQ^T: 64 MiB
    assert "causal" in describe_plan(1, 16, 8192, 128, causal=True) and "block_q=2048" in describe_plan(
        1, 16, 8192, 128, causal=True)


@pytest.mark.parametrize("rules", [{"causal": True}, {"causal": True, "window": (4096, 0)}, {"window": 1000},
                                   {"chunk": 4096}, {}])
def test_describe_plan_shows_the_kernels_grid(rules):
    # The printed forward grid is the kernel's: (B, query blocks, heads, key steps), the key steps
    # bounded by the mask (tiles.static_steps).
    seq = 32768
    window = rules.get("window")
    line = describe_plan(1, 16, seq, 128, causal=rules.get("causal", False), window=window, chunk=rules.get("chunk"))
    edges = (None, None) if window is None else ((window, window) if isinstance(window, int) else window)
    mask = Mask.bottom_right(seq, seq, causal=rules.get("causal", False), window=edges, chunk=rules.get("chunk"))
    blocks = plan_block_sizes(seq, seq, 128, mask=mask)
    problem = Problem(seq, seq, 1.0, mask, 1, interpret=True)
    grid = Grid.of(blocks.block_q, blocks.block_k, seq, seq)
    steps, _ = static_steps(problem, grid, per_q_block=True)
    assert f"block_k={blocks.block_k}" in line
    assert line.endswith(f"grid fwd 1x{grid.num_q_blocks}x16x{steps}")


def test_describe_plan_shows_the_forwards_tail_call():
    # 4097 rows in 2048-row blocks: two blocks in the main grid, the last row a call of its own that
    # reads every key it sees in one 4224-row K/V block; 3000 rows end in a partial block of 952.
    assert describe_plan(1, 16, 4097, 128, causal=True).endswith("grid fwd 1x2x16x4 + tail 1x1x16x1 (4224-row K/V)")
    assert describe_plan(1, 16, 3000, 128, causal=True).endswith("grid fwd 1x2x16x3")


def test_plan_cli_rejects_a_negative_window(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--window", "-1"])
    assert exit_info.value.code == 2 and "--window: expected an int >= 0, got -1" in capsys.readouterr().err


def test_plan_line_for_packed_documents():
    # python -m pallas_flash.plan --segments: the plan flash_attention makes with segment ids, whose
    # grid has at most the geometry's key steps (the ids' widest range sets them at run time).
    line = describe_plan(1, 16, 32768, 128, causal=True, segments=True)
    assert "causal segment ids:" in line and "block_k=2048 (256 keys an update)" in line
    assert line.endswith("grid fwd 1x16x16x16 at most")
    assert "block_k=1024 (512 keys an update)" in describe_plan(1, 16, 32768, 128, causal=True)
