"""One process of test_context_parallel's two-process test: `python multiprocess_worker.py RANK PORT`.
Two processes of two CPU devices each form one 2x2 mesh through jax.distributed (a coordinator on
localhost, gloo collectives); both run context_parallel_attention (both strategies, causal, forward
and gradients) and sharded_flash_decode on arrays spread over both processes' devices, and process 0
prints the largest difference from one device's flash_attention and flash_decode."""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
rank, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=rank,
                           initialization_timeout=120)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import pallas_flash as pf  # noqa: E402

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
assert len(jax.local_devices()) == 2 and len(jax.devices()) == 4


def global_array(host, spec):
    """host (the same NumPy array on every process) placed as one array over the mesh."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gathered(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


rng = np.random.default_rng(11)
q, k, v, do = (rng.standard_normal(s).astype(np.float32)
               for s in [(1, 4, 256, 32), (1, 2, 256, 32), (1, 2, 256, 32), (1, 4, 256, 32)])
tokens = P(None, None, ("x", "y"), None)
placed = [global_array(x, tokens) for x in (q, k, v, do)]
local = jax.local_devices()[0]
want_o, want_vjp = jax.vjp(lambda q, k, v: pf.flash_attention(q, k, v, causal=True),
                           *(jax.device_put(x, local) for x in (q, k, v)))
want = [np.asarray(x) for x in (want_o, *want_vjp(jax.device_put(do, local)))]
worst = 0.0
for strategy in ("all_gather", "ring"):
    o, vjp = jax.vjp(jax.jit(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, ("x", "y"),
                                                                           strategy=strategy, causal=True)),
                     *placed[:3])
    got = [gathered(x) for x in (o, *vjp(placed[3]))]
    worst = max([worst] + [float(np.max(np.abs(a - b))) for a, b in zip(got, want)])

# sharded_flash_decode: the cache's positions over both processes' devices; the lengths split over
# the batch, half on each process (their values cannot be read back to validate them on the host)
cache_k, cache_v = (rng.standard_normal((2, 2, 512, 32)).astype(np.float32) for _ in range(2))
query = rng.standard_normal((2, 4, 1, 32)).astype(np.float32)
lengths = np.array([300, 511], np.int32)
decoded = pf.sharded_flash_decode(global_array(query, P()), global_array(cache_k, tokens),
                                  global_array(cache_v, tokens), global_array(lengths, P("x")), mesh)
want_decode = pf.flash_decode(*(jax.device_put(x, local) for x in (query, cache_k, cache_v, lengths)))
worst_decode = float(np.max(np.abs(gathered(decoded) - np.asarray(want_decode))))
if rank == 0:
    print(f"RESULT context_parallel {worst:.3e} decode {worst_decode:.3e}", flush=True)
jax.distributed.shutdown()
