"""The chunked LM head on a mesh: its [D, V] gradient is reduced over the batch shards once, after the chunk
loop, never inside it (read from the compiled HLO); values and gradients as without a mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.ops.logprobs import chunked_token_logprobs, token_logprobs
from jaxrlhf.parallel import MeshConfig, make_mesh

B, T, D, V = 8, 64, 64, 512


def _loss(batch_axes):
    def loss(hidden, lm_head, tokens, weights):
        lp = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=16, batch_axes=batch_axes)
        return jnp.sum(lp * weights)

    return loss


def _inputs():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(B, T, D)).astype(np.float32),
        (0.1 * rng.normal(size=(D, V))).astype(np.float32),
        rng.integers(0, V, (B, T)).astype(np.int32),
        rng.normal(size=(B, T)).astype(np.float32),
    )


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in hlo.splitlines():
        match = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if match and not line.startswith(" "):
            current = match.group(1)
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    return comps


def _collective_sizes(lines) -> list[int]:
    """Element counts of every operand of the all-reduces and reduce-scatters (tuples: XLA combines them)."""
    sizes = []
    for line in lines:
        match = re.search(r"= (.*?) (all-reduce|reduce-scatter)(-start)?\(", line)
        if match:
            for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
                sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return sizes


def test_lm_head_gradient_is_reduced_once_after_the_chunk_loop():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    shardings = (rows, NamedSharding(mesh, P("fsdp", "tensor")), rows, rows)
    inputs = _inputs()
    placed = [jax.device_put(x, s) for x, s in zip(inputs, shardings)]
    grad = jax.jit(jax.value_and_grad(_loss(("data", "fsdp")), argnums=(0, 1)))
    with jax.set_mesh(mesh):
        compiled = grad.lower(*placed).compile()
        value, (hidden_grad, lm_head_grad) = compiled(*placed)
    comps = _computations(compiled.as_text())
    bodies = set(re.findall(r"body=%?([\w.\-]+)", compiled.as_text()))
    shard_of_head = D * V // 8  # the [D, V] gradient per device, fully sharded
    in_loops = [n for b in bodies for n in _collective_sizes(comps.get(b, []))]
    assert in_loops and max(in_loops) < shard_of_head, in_loops  # only [B, c] / [B, c, D] reductions remain
    outside = [n for name, lines in comps.items() if name not in bodies for n in _collective_sizes(lines)]
    assert sum(n >= shard_of_head for n in outside) == 1, outside  # the one reduction, after the loop

    # Against the plain log-softmax of the full logits, off the mesh.
    def reference(hidden, lm_head, tokens, weights):
        return jnp.sum(token_logprobs(hidden @ lm_head, tokens) * weights)

    want, (want_hidden, want_head) = jax.value_and_grad(reference, argnums=(0, 1))(*inputs)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hidden_grad), np.asarray(want_hidden), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lm_head_grad), np.asarray(want_head), rtol=1e-4, atol=1e-6)
