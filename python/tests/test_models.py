"""The Llama-style model (pallas_flash.models): every attention gives the reference's logits and
gradients; generation over the paged cache equals recomputing the causal forward; the FSDP step
equals the one-device step; sharded_append_kv equals append_kv; the model report's rows."""

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.models import attention, generate, llama, train
from tpu_compiler import requires_libtpu

TINY = llama.config("tiny")


def _tokens(shape, seed, vocab=TINY.vocab):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab, jnp.int32)


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b))))
    assert np.max(np.abs(a - b)) <= tol * scale, f"max diff {np.max(np.abs(a - b))} (scale {scale})"


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("impl", ["pallas_flash", "jax_xla", "jax_cudnn"])
@pytest.mark.parametrize("variant", [{}, {"window": 5, "logits_soft_cap": 3.0},
                                     {"window": 5, "logits_soft_cap": 3.0, "global_every": 2}],
                         ids=["causal", "window+softcap", "gemma-pattern"])
def test_model_logits_and_gradients_match_the_reference(impl, variant, cpu_kernels):
    if impl != "pallas_flash" and variant.get("logits_soft_cap"):
        pytest.skip("jax.nn.dot_product_attention takes no soft cap")
    c = dataclasses.replace(TINY, **variant)
    params = llama.init_params(c, jax.random.PRNGKey(3))
    tokens = _tokens((2, 37), 4)  # odd length, GQA 4:2
    ref = attention.attention_fn("reference", window=c.window, logits_soft_cap=c.logits_soft_cap)
    ours = attention.attention_fn(impl, window=c.window, logits_soft_cap=c.logits_soft_cap, cpu_fallback=True)
    _close(llama.forward(c, params, tokens, ours, dtype=jnp.float32),
           llama.forward(c, params, tokens, ref, dtype=jnp.float32), 2e-5)
    remat = cpu_kernels == "cpp"  # interpret mode's callbacks cannot be rematerialised
    grads = [jax.grad(lambda p: llama.loss(c, p, tokens, a, dtype=jnp.float32, loss_chunk=16, remat=remat))(params)
             for a in (ours, ref)]
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        _close(got, want, 5e-5)


def test_chunked_loss_equals_the_plain_cross_entropy():
    params = llama.init_params(TINY, jax.random.PRNGKey(0))
    tokens = _tokens((3, 21), 1)
    ref = attention.attention_fn("reference")
    logits = llama.forward(TINY, params, tokens, ref, dtype=jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1])
    want = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    for chunk in (4, 7, 64):
        _close(llama.loss(TINY, params, tokens, ref, dtype=jnp.float32, loss_chunk=chunk), want, 1e-6)


def test_a_layer_pattern_gives_each_layer_its_window():
    """Gemma's pattern: every global_every-th layer global, the others windowed; each layer's attention
    is called with its own window, and the logits differ from an all-windowed model's."""
    c = dataclasses.replace(TINY, layers=4, window=3, global_every=2)
    assert c.layer_windows() == (3, None)
    assert dataclasses.replace(c, global_every=None).layer_windows() == (3,)
    ref = attention.attention_fn("reference")
    seen = []

    def spy(q, k, v, window=None):
        seen.append(window)
        return ref(q, k, v, window=window)

    params = llama.init_params(c, jax.random.PRNGKey(2))
    tokens = _tokens((1, 19), 3)
    logits = llama.forward(c, params, tokens, spy, dtype=jnp.float32)
    assert seen == [3, None]  # one run of the pattern traced, scanned over the model's two runs
    # The same weights and the same calls by hand: layer 0 windowed, 1 global, 2 windowed, 3 global.
    x = llama.embed(params, tokens, jnp.float32)
    positions = jnp.arange(19)[None]
    for i in range(4):
        p = jax.tree.map(lambda a: a[i], params["layers"])
        q, k, v = llama.project_qkv(c, p, x, positions)
        x = llama.finish_layer(c, p, x, ref(q, k, v, window=3 if i % 2 == 0 else None))
    _close(logits, llama.head(c, params, x), 1e-5)
    uniform = llama.forward(dataclasses.replace(c, global_every=None), params, tokens, ref, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(uniform - logits))) > 1e-3
    for bad in (dict(global_every=3), dict(window=None, global_every=2), dict(global_every=0)):
        with pytest.raises(ValueError, match="global_every"):
            dataclasses.replace(c, **bad)


def test_attention_pairs_closed_form():
    for window in (None, 0, 3, 50):
        c = dataclasses.replace(TINY, window=window)
        for seq, context in ((1, 1), (7, 7), (5, 40), (64, 64), (1, 300)):
            left = context if window is None else window
            brute = sum(min(context - seq + i, left) + 1 for i in range(seq))
            assert c.attention_pairs(seq, context) == brute
    pattern = dataclasses.replace(TINY, window=3, global_every=2)  # mean of a windowed and a global layer
    windowed, full = dataclasses.replace(TINY, window=3), TINY
    assert pattern.attention_pairs(64, 100) == (windowed.attention_pairs(64, 100) + full.attention_pairs(64, 100)) / 2


# The mesh layouts with the C++ kernels only: Pallas' TPU interpret mode aborts the process when
# sharded_flash_decode runs inside the decode step's lax.scan on four CPU devices (the sharded
# decode's interpret-mode numerics are tested on their own in test_decode.py).
@pytest.mark.parametrize("layout, cpu_kernels", [("one device", "interpret"), ("one device", "cpp"),
                                                 ("2x2 batch", "cpp"), ("2x2 sequence", "cpp"),
                                                 ("one device, heads packed", "interpret"),
                                                 ("2x2 sequence, heads packed", "cpp")],
                         indirect=["cpu_kernels"])
def test_generation_with_the_paged_cache_equals_recomputing(layout, cpu_kernels):
    params = llama.init_params(TINY, jax.random.PRNGKey(5))
    prompt = _tokens((4, 11), 6)
    mesh = None if layout.startswith("one device") else jax.make_mesh((2, 2), ("x", "y"))
    split = "sequence" if "sequence" in layout else "batch"
    per_row = 2 if layout.endswith("heads packed") else 1  # both KV heads in one row of the pools
    tokens, logits = generate.generate(TINY, params, prompt, 6, attention.attention_fn("pallas_flash"),
                                       dtype=jnp.float32, mesh=mesh, split=split, page_size=16, heads_per_row=per_row)
    tokens, logits = np.asarray(tokens), np.asarray(logits)
    full = jnp.concatenate([prompt, jnp.asarray(tokens)], axis=1)
    recomputed = llama.forward(TINY, params, full, attention.attention_fn("reference"), dtype=jnp.float32)
    _close(logits, np.asarray(recomputed)[:, 10:16], 2e-5)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)
def test_generation_with_a_layer_pattern_equals_recomputing(cpu_kernels):
    """Windowed and global layers decoded from the paged cache (the window shorter than the context)
    equal the full forward recomputed with each layer's window and the soft cap."""
    c = dataclasses.replace(TINY, layers=4, window=5, logits_soft_cap=3.0, global_every=2)
    params = llama.init_params(c, jax.random.PRNGKey(11))
    prompt = _tokens((2, 9), 12)
    tokens, logits = generate.generate(c, params, prompt, 5, attention.attention_fn("pallas_flash",
                                       logits_soft_cap=c.logits_soft_cap), dtype=jnp.float32, page_size=16)
    full = jnp.concatenate([prompt, tokens], axis=1)
    recomputed = llama.forward(c, params, full, attention.attention_fn("reference", logits_soft_cap=c.logits_soft_cap),
                               dtype=jnp.float32)
    _close(logits, np.asarray(recomputed)[:, 8:13], 2e-5)


@pytest.mark.parametrize("per_row", [1, 2])
def test_decode_step_with_gathered_pages_equals_flash_decode(per_row):
    params = llama.init_params(TINY, jax.random.PRNGKey(7))
    cache = generate.init_cache(TINY, 2, 64, page_size=16, dtype=jnp.float32, heads_per_row=per_row)
    _, cache = generate.prefill(TINY, params, _tokens((2, 23), 8), cache, attention.attention_fn("reference"),
                                dtype=jnp.float32)
    token = _tokens((2,), 9)
    ours, _ = generate.decode_step(TINY, params, token, cache, dtype=jnp.float32)
    gathered, _ = generate.decode_step(TINY, params, token, cache, dtype=jnp.float32, attention="jax_xla")
    _close(ours, gathered, 2e-5)
    with pytest.raises(ValueError, match="attention"):
        generate.decode_step(TINY, params, token, cache, attention="splash")


def test_a_cache_packs_kv_heads_per_row_only_where_they_divide():
    cache = generate.init_cache(TINY, 2, 64, page_size=16, heads_per_row=2)
    assert cache.k.shape == (2 * 4 * TINY.layers, 1, 16, 2 * TINY.head_dim)
    with pytest.raises(ValueError, match="init_cache: expected heads_per_row dividing the 2 KV heads, got 3"):
        generate.init_cache(TINY, 2, 64, page_size=16, heads_per_row=3)


def test_page_tables_name_each_page_once_and_on_its_device():
    for split in ("batch", "sequence"):
        table, stride = generate.cache_page_table(8, 4, 3, devices=4, split=split)
        pages = np.stack([table + layer * stride for layer in range(3)])
        part = 8 * 4 * 3 // 4
        if split == "sequence":  # device d holds page column d, every layer, all sequences
            assert len(np.unique(pages)) == pages.size and pages.max() < 8 * 4 * 3
            assert (pages // part == np.arange(4)[None, None, :]).all()
        else:  # ids local to a device's part, unique within it
            for d in range(4):
                local = pages[:, 2 * d:2 * d + 2]
                assert len(np.unique(local)) == local.size and local.max() < part
    with pytest.raises(ValueError, match="divisible"):
        generate.cache_page_table(6, 4, 2, devices=4, split="batch")
    with pytest.raises(ValueError, match="split"):
        generate.cache_page_table(8, 4, 2, devices=4, split="rows")


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_sharded_append_kv_equals_append_kv(paged):
    rng = np.random.default_rng(0)
    batch, heads, dim, tokens, page_size = 3, 2, 8, 5, 16
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    capacity = 128
    if paged:
        table, _ = generate.cache_page_table(batch, capacity // page_size, 1, devices=4, split="sequence")
        shape = (batch * capacity // page_size, heads, page_size, dim)
    else:
        table, shape = None, (batch, heads, capacity, dim)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    k_new, v_new = (jnp.asarray(rng.standard_normal((batch, heads, tokens, dim)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([0, 30, 93], jnp.int32)  # the second and third cross devices' boundaries (32, 96)
    k_before = np.asarray(k)
    want = pf.append_kv(k, v, lengths, None if table is None else jnp.asarray(table), k_new, v_new)
    got = pf.sharded_append_kv(k, v, lengths, mesh, None if table is None else jnp.asarray(table), k_new, v_new)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(k), k_before)  # inputs untouched
    with pytest.raises(ValueError, match="k_new"):
        pf.sharded_append_kv(k, v, lengths, mesh, None if table is None else jnp.asarray(table), k_new[:, :1], v_new)


@pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)
def test_fsdp_step_equals_the_one_device_step_and_learns():
    params = llama.init_params(TINY, jax.random.PRNGKey(11))
    opt_state = train.optimizer().init(params)
    tokens = _tokens((4, 24), 12)
    attn = attention.attention_fn("pallas_flash")
    one = jax.jit(train.make_train_step(TINY, attn, dtype=jnp.float32))
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    sharded = train.jit_train_step(TINY, attn, params, opt_state, mesh=mesh, dtype=jnp.float32)
    p1, s1, loss1 = one(params, opt_state, tokens)
    p4, s4, loss4 = sharded(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state), tokens)
    _close(loss4, loss1, 1e-5)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        _close(a, b, 1e-5)
    assert p4["layers"]["w_up"].sharding.spec == train.fsdp_spec(p4["layers"]["w_up"].shape, 4, ("x", "y"))
    losses = [float(loss1)]
    for _ in range(3):
        p1, s1, loss = one(p1, s1, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses


def test_fsdp_spec_shards_the_largest_divisible_axis():
    assert train.fsdp_spec((16, 2048, 8192), 4, ("x", "y")) == jax.sharding.PartitionSpec(None, None, ("x", "y"))
    assert train.fsdp_spec((128256, 2048), 4, "d") == jax.sharding.PartitionSpec("d", None)
    assert train.fsdp_spec((3, 5), 4, "d") == jax.sharding.PartitionSpec()
    assert train.fsdp_spec((), 4, "d") == jax.sharding.PartitionSpec()


def test_configs_have_the_published_sizes_and_bad_names_say_so():
    assert abs(llama.config("llama-1b").params_count - 1.236e9) < 1e7  # Llama-3.2-1B: 1.24B
    assert abs(llama.config("llama-8b").params_count - 7.505e9) < 1e7  # 8.03B untied; tied here
    assert llama.config("llama-1b:2").layers == 2
    assert llama.config("llama-1b:2:32000").vocab == 32000
    for bad in ("llama-2b", "llama-1b:0", "llama-1b:x", "llama-1b:2:3:4"):
        with pytest.raises(ValueError, match="--model"):
            llama.config(bad)
    with pytest.raises(ValueError, match="kv_heads"):
        dataclasses.replace(TINY, kv_heads=3)
    with pytest.raises(ValueError, match="unknown implementation"):
        attention.attention_fn("flash3")


@pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)
def test_model_report_on_cpu_writes_every_column(tmp_path, capsys):
    from pallas_flash.bench import model

    out = tmp_path / "rows.json"
    plot = tmp_path / "rows.png"
    plotting = importlib.util.find_spec("matplotlib") is not None  # not in the oldest-JAX environment
    code = model.main(["--target", "cpu", "--model", "tiny", "--pass", "train,prefill,decode", "--seq", "32",
                       "--batch", "1", "--attention", "pallas_flash,jax_xla,jax_flash", "--json", str(out)]
                      + (["--plot", str(plot)] if plotting else []))
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert not plotting or plot.stat().st_size > 0
    required = {"model", "pass", "attention", "seq", "batch", "status", "source", "tokens_per_s", "mfu",
                "attention_share", "hbm_bytes", "usd_per_million_tokens"}
    assert all(required <= set(r) for r in rows)
    measured = [r for r in rows if r["status"] == "ok"]
    assert {(r["pass"], r["attention"]) for r in measured} == {
        (p, a) for p in ("train", "prefill", "decode") for a in ("pallas_flash", "jax_xla")}
    for r in measured:
        assert r["tokens_per_s"] > 0 and r["usd_per_million_tokens"] > 0 and 0 <= r["attention_share"] < 1
        assert r["source"].startswith("measured on")
    assert all(r["status"] == "skipped" for r in rows if r["attention"] == "jax_flash")


def test_model_report_gpu_rows_say_not_measured_without_a_gpu(tmp_path):
    from pallas_flash.bench import model

    out = tmp_path / "rows.json"
    assert model.main(["--target", "gpu", "--model", "tiny", "--pass", "decode", "--seq", "16", "--batch", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["status"] == "not measured" and r["tokens_per_s"] is None for r in rows)


def test_model_report_skips_what_an_attention_cannot_take():
    from pallas_flash.bench.model import ModelCase, skip_reason

    assert "soft cap" in skip_reason(ModelCase("gemma2-2b", "train", "jax_xla", 2048, 4), "cpu")
    assert "soft cap" in skip_reason(ModelCase("gemma2-2b", "train", "jax_flash", 2048, 4), "v5e")
    assert skip_reason(ModelCase("gemma2-2b", "train", "pallas_flash", 2048, 4), "v5e") is None


def test_model_report_rejects_bad_arguments():
    from pallas_flash.bench import model

    for argv, match in ((["--pass", "serve"], None), (["--model", "gpt-9"], "unknown model"),
                        (["--attention", "magic"], "unknown"), (["--seq", "0"], "--seq")):
        with pytest.raises(SystemExit) as exc:
            model.main(["--target", "cpu"] + argv)
        if match:
            assert match in str(exc.value)


@requires_libtpu
def test_program_cost_counts_a_loop_body_per_trip():
    from pallas_flash import v5e
    from pallas_flash.bench import program
    from pallas_flash.hardware import TPU_V5E

    x = v5e.abstract((1024, 1024), jnp.bfloat16)
    ws = v5e.abstract((32, 1024, 1024), jnp.bfloat16)  # 64 MiB stacked: a body reads 2 MiB of it

    def scanned(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    def once(x, w):
        return jnp.tanh(x @ w)

    looped = program.program_cost(v5e.compile_for_v5e(scanned, x, ws), TPU_V5E, 1)
    single = program.program_cost(v5e.compile_for_v5e(once, x, v5e.abstract((1024, 1024), jnp.bfloat16)), TPU_V5E, 1)
    assert max(o.runs for o in looped.ops) == 32
    # Each trip's matmul reads its layer's slice, not the stacked array (64 MiB / 819 GB/s = 82 us a
    # trip, against about 20 us of compute, were the whole array counted: ~150x one call).
    assert 30 * single.seconds() < looped.seconds() < 45 * single.seconds()
    flops = 2 * 1024**3
    assert single.seconds() > flops / TPU_V5E.peak_flops  # never faster than the peak


@requires_libtpu
def test_v5e_kernel_calls_scale_to_the_chip_and_correct_for_gqa_sharing():
    from pallas_flash.bench.model import ModelCase
    from pallas_flash.bench.model_v5e import _kernel_seconds, kernel_cases
    from pallas_flash.hardware import TPU_V5E

    short = kernel_cases(ModelCase("llama-1b", "train", "pallas_flash", 2048, 8))
    assert set(short) == {"fwd", "bwd"}
    assert (short["fwd"].case.heads, short["fwd"].case.kv_heads, short["fwd"].scale) == (4, 1, 2 * 8)
    long = kernel_cases(ModelCase("llama-1b", "prefill", "pallas_flash", 8192, 4))
    assert set(long) == {"fwd"} and long["fwd"].scale == 32 and long["fwd"].sharing[0].seq_q == 4096
    ok = {"status": "ok", "est_cycles": 1000}
    seconds = _kernel_seconds(long["fwd"], ok, ({"status": "ok", "est_cycles": 3000}, {"status": "ok", "est_cycles": 1000}))
    assert seconds == pytest.approx(1000 * 32 * 3000 / (4 * 1000) / TPU_V5E.clock_hz)
    assert _kernel_seconds(long["fwd"], {"status": "error"}, None) is None
    jax_flash = kernel_cases(ModelCase("llama-1b", "train", "jax_flash", 8192, 4))
    assert jax_flash["fwd"].sharing is None and jax_flash["fwd"].scale == 32  # MHA: K, V repeated
    decode = kernel_cases(ModelCase("llama-1b", "decode", "pallas_flash", 32768, 1))["decode"]
    assert (decode.case.mesh, decode.case.batch, decode.case.seq_k) == ("1x1", 1, 32768 // 4)
    assert kernel_cases(ModelCase("llama-1b", "decode", "jax_xla", 32768, 32)) == {}
    # Gemma's pattern: the windowed and the global layers profiled apart, each for half the layers,
    # with the soft cap; a windowed decode prices only the window's bytes.
    gemma = kernel_cases(ModelCase("gemma2-2b", "train", "pallas_flash", 8192, 4))
    assert set(gemma) == {"fwd@w4096", "fwd@global", "bwd@w4096", "bwd@global"}
    assert {k: (v.case.mask, v.layers) for k, v in gemma.items() if k.startswith("fwd")} == {
        "fwd@w4096": ("window:4096+softcap:50", 13), "fwd@global": ("softcap:50", 13)}
    gemma_decode = kernel_cases(ModelCase("gemma2-2b", "decode", "pallas_flash", 32768, 32))
    local = gemma_decode["decode@w4096"].case
    assert local.cache_bytes_read_per_device() == local.cache_bytes_per_device() * 4097 // 32768
    assert gemma_decode["decode@global"].case.cache_bytes_read_per_device() == \
        gemma_decode["decode@global"].case.cache_bytes_per_device()


@requires_libtpu
@pytest.mark.parametrize("batch", [1, 8], ids=["sequence split", "batch split"])
def test_v5e_decode_step_reads_the_weights_and_the_packed_cache_in_place(batch):
    """The report's decode program (two of llama-1b's layers, D = 64) moves no weight and no cache:
    the weights take the layout the program asks for, the pools (two KV heads a row) are read by the
    kernel and written by in-place updates; and a chip holds the cache at its own size."""
    from pallas_flash import v5e
    from pallas_flash.bench.model import ModelCase
    from pallas_flash.bench.model_v5e import build, mesh

    case = ModelCase("llama-1b:2:32000", "decode", "pallas_flash", 8192, batch)
    fn, args, options = build(case, mesh())
    cache = args[2]
    assert cache.k.shape[1:] == (4, 128, 128)  # 8 KV heads of 64, two a row
    program = v5e.compile_for_v5e(fn, *args, **options)
    moved = [f"{i.opcode} {i.shape[:80]}" for i in program.data_movement()
             if i.opcode not in ("dynamic-update-slice", "dynamic-slice") and any(a.logical_bytes >= 1 << 20 for a in i.arrays)]
    assert not moved
    pool_bytes = cache.k.size * 2 // 4  # a chip's quarter of each pool
    assert program.memory.alias_size_in_bytes >= 2 * pool_bytes  # the pools are the outputs' buffers
