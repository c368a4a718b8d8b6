"""The trainer's log-prob function: padded rows without a segment mask give the masked result."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.models.presets import preset


def test_unpacked_rows_skip_the_segment_mask_with_the_same_logprobs():
    config = preset("tiny", vocab_size=97, initializer_range=0.3)
    graphdef, params = nnx.split(init_model(config, seed=1))
    rng = np.random.default_rng(0)
    lengths = [12, 7, 1]
    tokens = rng.integers(0, 97, (3, 12)).astype(np.int32)
    segment_ids = np.zeros((3, 12), np.int32)
    positions = np.zeros((3, 12), np.int32)
    for row, n in enumerate(lengths):  # right-padded, as the data pipeline pads
        segment_ids[row, :n] = 1
        positions[row, :n] = np.arange(n)
    args = [jnp.asarray(a) for a in (tokens, positions, segment_ids)]
    masked = jax.jit(make_logprob_fn(graphdef, chunk_size=5))(params, *args)
    unmasked = jax.jit(make_logprob_fn(graphdef, chunk_size=5, packed=False))(params, *args)
    np.testing.assert_allclose(unmasked, masked, atol=1e-5)
    assert np.all(np.asarray(unmasked)[segment_ids == 0] == 0.0)
    assert np.all(np.asarray(unmasked)[0, 1:] < 0.0)
    # The unmasked path really differs where rows are packed: it must not be used there.
    packed = segment_ids.copy()
    packed[0, 6:] = 2
    packed_positions = positions.copy()
    packed_positions[0, 6:] = np.arange(6)
    args = [jnp.asarray(a) for a in (tokens, packed_positions, packed)]
    masked = jax.jit(make_logprob_fn(graphdef, chunk_size=5))(params, *args)
    unmasked = jax.jit(make_logprob_fn(graphdef, chunk_size=5, packed=False))(params, *args)
    assert not np.allclose(np.asarray(unmasked)[0, 7:], np.asarray(masked)[0, 7:], atol=1e-4)
