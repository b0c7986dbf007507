"""A training step for the Llama-style model: the loss's forward and backward, then AdamW (optax),
on one device or data parallel over a mesh with the weights and optimizer state fully sharded
(FSDP: each array split along its largest axis that the devices divide; XLA gathers a layer's
weights where it multiplies by them and reduce-scatters their gradients).

Mixed precision: float32 master weights and Adam moments, bfloat16 products (each weight cast
where it is used), float32 loss. 16 bytes of state per parameter: 20 GB for the 1B-like model,
more than one 16 GiB v5e holds, hence the sharding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash.models import llama
from pallas_flash.partition import place_on_mesh


def optimizer(learning_rate: float = 3e-4) -> optax.GradientTransformation:
    """AdamW as Llama 3 was trained (betas 0.9 / 0.95, weight decay 0.1), with gradients clipped at 1."""
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def fsdp_spec(shape, devices: int, axes) -> P:
    """Shard an array along its largest axis that `devices` divides (ties: the later axis); replicate
    one no axis of which is divisible (scalars, small vectors)."""
    best = None
    for axis, size in enumerate(shape):
        if size % devices == 0 and size >= devices and (best is None or size >= shape[best]):
            best = axis
    if best is None or devices == 1:
        return P()
    spec = [None] * len(shape)
    spec[best] = axes
    return P(*spec)


def state_shardings(tree, mesh):
    """NamedShardings for a tree of arrays (weights or optimizer state) by fsdp_spec."""
    axes = tuple(mesh.axis_names)
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, mesh.devices.size, axes)), tree)


def fsdp_gather(mesh, dtype=jnp.bfloat16):
    """The weights as a layer uses them under FSDP: cast to the compute dtype, then replicated
    (all-gathered; the gather's transpose reduce-scatters the gradients). The cast comes first so
    the gather moves bfloat16, not the float32 masters."""
    return lambda tree: jax.tree.map(lambda w: place_on_mesh(w.astype(dtype), mesh, P()), tree)


def make_train_step(c: llama.LlamaConfig, attention, opt: optax.GradientTransformation | None = None, *,
                    dtype=jnp.bfloat16, remat: bool = True, loss_chunk: int = 2048, mesh=None):
    """step(params, opt_state, tokens [B, N]) -> (params, opt_state, loss), not yet jitted. mesh: the
    weights are gathered per layer (fsdp_gather), the activations keep the batch's sharding."""
    opt = opt or optimizer()
    weights = None if mesh is None else fsdp_gather(mesh, dtype)

    def step(params, opt_state, tokens):
        value, grads = jax.value_and_grad(
            lambda p: llama.loss(c, p, tokens, attention, dtype=dtype, remat=remat, loss_chunk=loss_chunk,
                                 weights=weights))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def jit_train_step(c: llama.LlamaConfig, attention, params, opt_state, *, mesh=None, **options):
    """make_train_step jitted, the state donated; with a mesh, the batch split over all of its devices
    and the state sharded by state_shardings (the returned state keeps those shardings)."""
    step = make_train_step(c, attention, mesh=mesh, **options)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    state = (state_shardings(params, mesh), state_shardings(opt_state, mesh))
    batch = NamedSharding(mesh, P(tuple(mesh.axis_names), None))
    return jax.jit(step, in_shardings=(*state, batch), out_shardings=(*state, NamedSharding(mesh, P())),
                   donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _abstract_init(c: llama.LlamaConfig):
    params = jax.eval_shape(lambda: llama.init_params(c, jax.random.PRNGKey(0)))
    return params, jax.eval_shape(optimizer().init, params)


def abstract_state(c: llama.LlamaConfig):
    """(params, opt_state) as ShapeDtypeStructs, without allocating them."""
    return _abstract_init(c)
