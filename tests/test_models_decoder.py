"""The decoder on its own: packing, positions, scan/remat switches, dtypes, compile size, LM-head memory."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from model_fixtures import packed_batch, tiny_config

from jaxrlhf.models import default_chunk_size, init_model, make_logprob_fn, segment_positions, token_logprobs
from jaxrlhf.ops import losses

_REMAT_NAMES = ("full", "dots_with_no_batch_dims_saveable", "dots_saveable", "save_attention_out_mlp_in")
_SLIDING = tiny_config(model_type="mistral", sliding_window=3, layer_types=("sliding_attention",) * 2)


def _numpy_positions(segment_ids: np.ndarray) -> np.ndarray:
    out = np.zeros_like(segment_ids)
    for b in range(segment_ids.shape[0]):
        for t in range(1, segment_ids.shape[1]):
            out[b, t] = out[b, t - 1] + 1 if segment_ids[b, t] == segment_ids[b, t - 1] else 0
    return out


class DecoderVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_segment_positions_restart_per_segment(self):
        segment_ids = packed_batch(np.random.default_rng(0), 4, 16, 10)["segment_ids"]
        positions = self.variant(segment_positions)(jnp.asarray(segment_ids))
        np.testing.assert_array_equal(positions, _numpy_positions(segment_ids))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("full_attention", tiny_config()), ("sliding_window", _SLIDING))
    def test_packed_row_equals_examples_run_alone(self, config):
        """Segments [1]*6 + [2]*7 + padding give each example's own log-probs (and 0 on padding)."""
        model = init_model(config, seed=1)
        rng = np.random.default_rng(2)
        first, second = rng.integers(0, config.vocab_size, (1, 6)), rng.integers(0, config.vocab_size, (1, 7))
        row = np.concatenate([first, second, np.full((1, 3), 5)], axis=1).astype(np.int32)
        segment_ids = np.array([[1] * 6 + [2] * 7 + [0] * 3], np.int32)

        @self.variant
        def logprobs(tokens, segment_ids):
            return token_logprobs(model, tokens, segment_ids=segment_ids, chunk_size=4)

        packed = np.asarray(logprobs(jnp.asarray(row), jnp.asarray(segment_ids)))
        alone = [np.asarray(logprobs(jnp.asarray(x, jnp.int32), jnp.ones_like(x, jnp.int32))) for x in (first, second)]
        np.testing.assert_allclose(packed, np.concatenate([*alone, np.zeros((1, 3))], axis=1), atol=1e-5)
        assert packed[0, 0] == 0 and packed[0, 6] == 0  # segment starts have no context


def _loss_and_grads(model, batch):
    graphdef, params = nnx.split(model)
    logprob_fn = make_logprob_fn(graphdef, chunk_size=8)

    def loss(params):
        lp = logprob_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return losses.sft_loss(lp, batch["loss_mask"])[0]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    "scan_layers, remat",
    [(True, "full"), (False, "none"), (False, "dots_with_no_batch_dims_saveable"),
     (True, "dots_with_no_batch_dims_saveable"), (True, "save_attention_out_mlp_in")],
)
def test_scan_and_remat_do_not_change_loss_or_gradients(scan_layers, remat):
    # Qwen2 with a full and a sliding layer: scanning must carry the per-layer window.
    config = dataclasses.replace(
        _SLIDING, model_type="qwen2", qkv_bias=True, layer_types=("full_attention", "sliding_attention")
    )
    batch = jax.tree.map(jnp.asarray, packed_batch(np.random.default_rng(3), 2, 16, config.vocab_size))
    reference = _loss_and_grads(init_model(config), batch)
    variant = dataclasses.replace(config, scan_layers=scan_layers, remat=remat)
    chex.assert_trees_all_close(_loss_and_grads(init_model(variant), batch), reference, rtol=1e-5, atol=1e-7)


def test_saving_every_dot_changes_only_float_rounding():
    """JAX's dots_saveable keeps the attention scores from the forward instead of recomputing them: the same
    gradient up to f32 rounding of the softmax (seen: 1.2e-7 absolute on one element of 4096)."""
    config = dataclasses.replace(_SLIDING, model_type="qwen2", qkv_bias=True)
    batch = jax.tree.map(jnp.asarray, packed_batch(np.random.default_rng(3), 2, 16, config.vocab_size))
    reference = _loss_and_grads(init_model(config), batch)
    saved = _loss_and_grads(init_model(dataclasses.replace(config, remat="dots_saveable")), batch)
    chex.assert_trees_all_close(saved, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat, scan_layers", [("none", False), ("none", True), ("full", False), ("dots_saveable", True)])
def test_remat_reaches_the_jaxpr(remat, scan_layers):
    """jax.checkpoint's primitive wraps the layers unless remat is none; scanned, "none" still recomputes
    XLA attention's weights (``test_models_scan_cost``)."""
    config = tiny_config(remat=remat, scan_layers=scan_layers)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    tokens = jnp.zeros((1, 8), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda p: make_logprob_fn(graphdef)(p, tokens, None, None))(params))
    assert ("remat2[" in jaxpr) == (remat != "none" or scan_layers)


def _saved_bytes_per_layer(remat: str, batch: int, seq: int, attention_impl: str = "xla") -> float:
    """Compiled temporaries of a scanned gradient step, per layer (6 layers minus 2, over 4)."""

    def temp_bytes(num_layers):
        config = tiny_config(remat=remat, num_layers=num_layers, attention_impl=attention_impl)
        graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

        def loss(p, t):
            return make_logprob_fn(graphdef)(p, t, None, None).sum()

        return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    return (temp_bytes(6) - temp_bytes(2)) / 4


def test_remat_policies_save_what_they_are_named_after():
    """Each policy keeps, per layer, the float32 bytes of what it names and not much more. The projections run
    behind a custom VJP (f32 weight gradients), which JAX's dot policies cannot see into: a policy "saving
    dots" used to save none of them and cost what "full" costs."""
    b, t = 4, 128
    c = tiny_config()
    layer_input = 4 * b * t * c.hidden_size
    projections = 4 * b * t * ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.hidden_size + 2 * c.intermediate_size)
    scores = 4 * b * c.num_heads * t * t
    saved = {remat: _saved_bytes_per_layer(remat, b, t) for remat in _REMAT_NAMES}
    assert saved["full"] < 1.5 * layer_input
    assert 0.9 * projections <= saved["dots_with_no_batch_dims_saveable"] - saved["full"] < projections + scores / 2
    assert saved["dots_saveable"] - saved["dots_with_no_batch_dims_saveable"] >= 0.9 * scores
    # two [B, T, D] tensors more than "full" (XLA shares part of one buffer with the layer input's)
    assert 1.5 * layer_input <= saved["save_attention_out_mlp_in"] - saved["full"] < projections


def test_dot_saving_remat_keeps_no_blockwise_scores():
    """Blockwise attention's backward recomputes its scores, so no policy should save them: "dots_saveable"
    keeps its output and log-sum-exp instead (it saved 3/4 of [B, H, T, T] in f32 here, the loop's dots)."""
    b, t = 2, 256  # 2 blocks of 128
    c = tiny_config()
    scores = 4 * b * c.num_heads * t * t
    saved = {remat: _saved_bytes_per_layer(remat, b, t, "blockwise") for remat in _REMAT_NAMES[1:3]}
    assert saved["dots_saveable"] - saved["dots_with_no_batch_dims_saveable"] < scores / 8, (saved, scores)


def _lowered_size(num_layers: int, scan_layers: bool) -> int:
    config = tiny_config(num_layers=num_layers, scan_layers=scan_layers)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return len(jax.jit(lambda p, t: make_logprob_fn(graphdef)(p, t, None, None)).lower(params, tokens).as_text())


def test_scanned_layers_compile_to_a_program_independent_of_depth():
    assert _lowered_size(16, scan_layers=True) < 1.1 * _lowered_size(2, scan_layers=True)
    assert _lowered_size(16, scan_layers=False) > 4 * _lowered_size(2, scan_layers=False)


def test_bf16_compute_with_f32_master_weights():
    config = tiny_config(dtype="bfloat16", param_dtype="float32")
    graphdef, params = nnx.split(init_model(config))
    f32_graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(dataclasses.replace(config, dtype="float32"))))
    batch = jax.tree.map(jnp.asarray, packed_batch(np.random.default_rng(4), 2, 16, config.vocab_size))

    @functools.partial(jax.jit, static_argnums=0)
    def total_logprob(graphdef, params):
        logprob_fn = make_logprob_fn(graphdef, chunk_size=8)
        return logprob_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"]).sum()

    # Shapes and dtypes need no compile: activations in bf16, gradients in the f32 of the weights.
    assert jax.eval_shape(lambda p: nnx.merge(graphdef, p)(batch["tokens"]), params).dtype == jnp.bfloat16
    assert nnx.merge(graphdef, params).lm_head_matrix().dtype == jnp.bfloat16
    grads = jax.eval_shape(jax.grad(functools.partial(total_logprob, graphdef)), params)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(total_logprob(graphdef, params), total_logprob(f32_graphdef, params), rtol=2e-2)


def test_tied_head_is_the_embedding_transposed():
    model = init_model(tiny_config(tie_word_embeddings=True))
    assert model.lm_head is None
    np.testing.assert_array_equal(model.lm_head_matrix(), model.embed[...].T)
    assert init_model(tiny_config()).lm_head_matrix().shape == (32, 128)


def test_lm_head_logits_are_never_materialised():
    """Compile-time temp memory of the log-prob pass stays well below one full [B, T, V] f32 logits array."""
    config = tiny_config(vocab_size=65536)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    step = jax.jit(jax.grad(lambda p, t: make_logprob_fn(graphdef, chunk_size=16)(p, t, None, None).sum()))
    temp = step.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    full_logits = 2 * 256 * 65536 * 4
    assert temp < full_logits / 2  # measured: ~0.3x (attention and the 16-position chunks), 2.2x unchunked


def test_default_chunk_size_bounds_the_logits_chunk():
    assert default_chunk_size(8, 152064) == 2**26 // (8 * 152064)
    assert default_chunk_size(1024, 2**20) == 1
