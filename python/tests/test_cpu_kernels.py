"""The C++ CPU kernels inside JAX (pallas_flash.cpu_kernels, XLA FFI): what the shared suites, which
run each numerics test on both CPU paths (marker both_cpu_kernels), do not cover: jit, grad and vmap
together, the compiled program (one custom call per kernel, no copies), NaN propagation, run-time
errors from the library's checks, dtypes, and the choice between the two CPU paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash import backend, cpu_kernels
from test_decode import assert_matches, make_cache, paged
from test_flash_attention import random_inputs, rel_l2
from shapes import Shape

pytestmark = pytest.mark.parametrize("cpu_kernels", ["cpp"], indirect=True)

SHAPE = Shape(2, 4, 2, 70, 130, 96)


def loss(attention, causal):
    return lambda q, k, v, do: jnp.sum(attention(q, k, v, causal=causal).astype(jnp.float32) * do)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_vmap_of_jit_grad_matches_the_reference(causal):
    inputs = [jnp.stack([x, -0.5 * x]) for x in random_inputs(SHAPE)]  # a leading vmapped axis of 2
    ours = jax.vmap(jax.jit(jax.grad(loss(pf.flash_attention, causal), argnums=(0, 1, 2))))(*inputs)
    want = jax.vmap(jax.grad(loss(pf.reference_attention, causal), argnums=(0, 1, 2)))(*inputs)
    for got, ref in zip(ours, want):
        assert got.shape == ref.shape
        assert rel_l2(got, ref) < 1e-5


def test_nested_vmap_folds_into_one_kernel_call():
    q, k, v, _ = random_inputs(Shape(1, 2, 1, 17, 33, 32))
    stack = lambda x: jnp.broadcast_to(x, (3, 2) + x.shape) * jnp.arange(1, 7.0).reshape(3, 2, 1, 1, 1, 1)
    f = jax.vmap(jax.vmap(lambda q, k, v: pf.flash_attention(q, k, v, causal=True)))
    got = jax.jit(f)(stack(q), stack(k), stack(v))
    want = jax.vmap(jax.vmap(lambda q, k, v: pf.reference_attention(q, k, v, causal=True)))(stack(q), stack(k), stack(v))
    assert rel_l2(got, want) < 1e-5
    hlo = jax.jit(f).lower(stack(q), stack(k), stack(v)).as_text()
    assert hlo.count("pallas_flash_attention_forward") == 1


def test_the_compiled_program_is_one_custom_call_with_no_copies():
    q, k, v, _ = random_inputs(Shape(1, 8, 2, 1000, 1000, 96), jnp.bfloat16)  # unaligned N, D = 96
    compiled = jax.jit(lambda q, k, v: pf.flash_attention(q, k, v, causal=True)).lower(q, k, v).compile().as_text()
    assert compiled.count("custom_call_target=\"pallas_flash_attention_forward\"") == 1
    for op in (" copy(", " pad(", " transpose(", " dynamic-update-slice("):
        assert op not in compiled, f"the compiled program has a{op[:-1]}"
    step = jax.jit(jax.grad(loss(pf.flash_attention, True), argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v, q).compile().as_text()
    assert compiled.count("custom_call_target=\"pallas_flash_attention_backward\"") == 1
    assert " pad(" not in compiled and " transpose(" not in compiled


def test_interpret_true_still_runs_the_pallas_kernels():
    q, k, v, _ = random_inputs(Shape(1, 1, 1, 8, 8, 32))
    assert "pallas_call" in str(jax.make_jaxpr(lambda q: pf.flash_attention(q, k, v, interpret=True))(q))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda q: pf.flash_attention(q, k, v))(q))
    assert "pallas_flash_attention_forward" in jax.jit(lambda q: pf.flash_attention(q, k, v)).lower(q).as_text()


def test_nan_rows_propagate_and_masked_nans_contribute_nothing():
    q, k, v, _ = random_inputs(Shape(1, 2, 2, 16, 16, 32))
    q = q.at[0, 0, 3].set(jnp.nan)  # row 3 of head 0: NaN output and LSE
    k = k.at[0, 1, 15].set(jnp.nan)  # the last key of head 1: only the causal mask's last row sees it
    v = v.at[0, 1, 15].set(jnp.inf)
    o, lse = pf.flash_attention(q, k, v, causal=True, return_lse=True)
    o, lse = np.asarray(o), np.asarray(lse)
    assert np.all(np.isnan(o[0, 0, 3])) and np.isnan(lse[0, 0, 3])
    assert np.all(np.isfinite(np.delete(o[0, 0], 3, axis=0)))
    assert np.all(np.isnan(o[0, 1, 15])) and np.isnan(lse[0, 1, 15])
    assert np.all(np.isfinite(o[0, 1, :15])) and np.all(np.isfinite(lse[0, 1, :15]))
    clean_k, clean_v = k.at[0, 1, 15].set(0.0), v.at[0, 1, 15].set(0.0)
    ref = pf.reference_attention(q.at[0, 0, 3].set(0.0), clean_k, clean_v, causal=True)
    np.testing.assert_allclose(o[0, 1, :15], np.asarray(ref)[0, 1, :15], rtol=1e-5, atol=1e-5)


def test_vmapped_paged_decode_runs_per_element():
    lengths = np.array([40, 7], np.int32)
    q, k, v = make_cache(2, 4, 2, 1, 32, 64)
    k_pool, v_pool, table = paged(k, v, lengths, 16)
    qs = jnp.stack([q, 2 * q])
    o, lse = jax.jit(jax.vmap(lambda q: pf.flash_decode(q, k_pool, v_pool, jnp.asarray(lengths), page_table=table,
                                                         return_lse=True)))(qs)
    for i in range(2):
        assert_matches(o[i], lse[i], qs[i], k, v, lengths)


def test_vmapped_contiguous_decode_and_merge():
    lengths = np.array([64, 3], np.int32)
    q, k, v = make_cache(2, 4, 2, 2, 32, 64)
    stack = lambda x: jnp.stack([x, -x])
    o = jax.vmap(lambda q, k, v: pf.flash_decode(q, k, v, jnp.asarray(lengths)))(stack(q), stack(k), stack(v))
    assert_matches(o[1], pf.flash_decode(-q, -k, -v, jnp.asarray(lengths), return_lse=True)[1], -q, -k, -v, lengths)
    # Partials along axis 2, in bf16, merged under vmap: the same as jax.numpy's merge.
    parts = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3, 4, 16)).astype(jnp.bfloat16)
    lse_parts = 10 * jax.random.normal(jax.random.PRNGKey(2), (2, 5, 3, 4)).at[0, 1, 2].set(-jnp.inf)
    got = jax.vmap(lambda o, l: pf.merge_attention_states(o, l, axis=1))(parts, lse_parts)
    want = jax.vmap(lambda o, l: pf.merge_attention_states(o, l, axis=1, interpret=True))(parts, lse_parts)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_a_bad_page_id_under_jit_raises_the_librarys_error():
    q, k, v = make_cache(1, 2, 2, 1, 16, 32)
    k_pool, v_pool, table = paged(k, v, np.array([32]), 16)
    decode = jax.jit(lambda table: pf.flash_decode(q, k_pool, v_pool, jnp.array([32], jnp.int32), page_table=table))
    with pytest.raises(Exception, match="block_table"):  # the values are unknown at trace time
        decode(table.at[0, 1].set(99)).block_until_ready()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.int32])
def test_other_dtypes_are_refused_with_their_name(dtype):
    x = jnp.zeros((1, 1, 4, 8), dtype)
    with pytest.raises(ValueError, match=f"float32 or bfloat16 inputs on CPU, got {jnp.dtype(dtype).name}"):
        pf.flash_attention(x, x, x)


def test_the_cpu_kernel_choice():
    with pytest.raises(ValueError, match="use_cpu_kernels: expected one of"):
        with backend.use_cpu_kernels("gpu"):
            pass
    with backend.use_cpu_kernels("interpret"):
        assert backend.kernel_mode(None) == "interpret"
    assert backend.kernel_mode(None) == "cpu"
    assert backend.kernel_mode(True) == "interpret"


def test_without_the_module_calls_fall_back_to_interpret_mode_with_a_warning(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "not built (test)")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="not built \\(test\\); running the Pallas kernels in TPU interpret mode"):
        assert backend.kernel_mode(None) == "interpret"


def test_the_environment_variable_is_checked(monkeypatch):
    monkeypatch.setattr(backend, "_cpu_override", None)
    monkeypatch.setenv("PALLAS_FLASH_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="PALLAS_FLASH_CPU_KERNELS: expected one of"):
        backend.kernel_mode(None)
    monkeypatch.setenv("PALLAS_FLASH_CPU_KERNELS", "interpret")
    assert backend.kernel_mode(None) == "interpret"


def test_the_merge_is_differentiable_as_the_jax_numpy_one():
    parts = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 4, 16))
    lse_parts = 4 * jax.random.normal(jax.random.PRNGKey(4), (3, 5, 4)).at[1, 2, 3].set(-jnp.inf)
    weights = jax.random.normal(jax.random.PRNGKey(5), (5, 4, 16))

    def loss(interpret):
        def f(o, lse):
            merged, merged_lse = pf.merge_attention_states(o, lse, axis=0, interpret=interpret)
            return jnp.sum(merged * weights) + jnp.sum(jnp.where(jnp.isfinite(merged_lse), merged_lse, 0.0))
        return f

    got = jax.jit(jax.grad(loss(None), argnums=(0, 1)))(parts, lse_parts)
    want = jax.grad(loss(True), argnums=(0, 1))(parts, lse_parts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert "pallas_flash_merge" in jax.jit(jax.value_and_grad(loss(None))).lower(parts, lse_parts).as_text()
