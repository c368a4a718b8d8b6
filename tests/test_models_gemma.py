"""Gemma 2 and Gemma 3 beyond the shared parity tests (test_models_hf/generate run both on every path):
config.json in its older Hub form and as a multimodal Gemma 3, a Gemma3ForConditionalGeneration checkpoint
loading as its language model, the repeating layer groups, and the final-logit soft cap in the chunked head.

References are transformers' own config classes and forward passes, and plain autodiff of the unchunked
log-softmax.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx
from model_fixtures import VOCAB, hf_config

from jaxrlhf.models import config_from_hf, init_model, load_hf, make_logprob_fn
from jaxrlhf.models.attention import LayerGroup, LayerKind, layer_groups, layer_kinds
from jaxrlhf.models.presets import preset
from jaxrlhf.ops import logprobs


def _gemma3_hub_dict(**extra) -> dict:
    """A Gemma 3 text config.json as the Hub's files write it (pre-v5 keys), on a tiny shape."""
    base = dict(
        model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=3,
    )  # fmt: skip
    return {**base, **extra}


def test_gemma3_hub_keys_mean_what_transformers_reads_from_them():
    hub = _gemma3_hub_dict()
    ours = config_from_hf(hub)
    theirs = config_from_hf(transformers.Gemma3TextConfig(**hub).to_dict())  # v5's nested rope_parameters
    assert ours == theirs
    assert ours.layer_windows() == (4, 4, None, 4, 4, None)
    assert (ours.rope.theta, ours.rope.rope_type, ours.rope.factor) == (1_000_000.0, "linear", 8.0)
    assert (ours.local_rope.theta, ours.local_rope.rope_type) == (10_000.0, "default")
    assert ours.query_pre_attn_scalar == 16 and ours.qk_norm and ours.tie_word_embeddings


@pytest.mark.parametrize("context", [8192, None])
def test_gemma3_llama3_global_rope_without_original_length_uses_the_context_length(context):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hub = _gemma3_hub_dict(rope_scaling=scaling)
    if context is not None:
        hub["max_position_embeddings"] = context
    filled = transformers.Gemma3TextConfig(**hub).rope_parameters["full_attention"]
    ours = config_from_hf(hub).rope
    assert ours.rope_type == "llama3"
    assert ours.original_max_position_embeddings == filled["original_max_position_embeddings"]


def test_gemma2_defaults_follow_gemma2config():
    hf = {k: v for k, v in hf_config("gemma2").to_dict().items() if k not in ("attn_logit_softcapping",
                                                                                  "final_logit_softcapping")}
    config = config_from_hf(hf)
    reference = transformers.Gemma2Config(**hf)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (
        reference.attn_logit_softcapping, reference.final_logit_softcapping
    ) == (50.0, 30.0)
    assert config.hidden_act == "gelu_pytorch_tanh" and config.layer_windows() == (4, None, 4, None)


def test_multimodal_config_reads_its_text_config():
    text = hf_config("gemma3").to_dict()
    outer = transformers.Gemma3Config(text_config=text, vision_config=_tiny_vision()).to_dict()
    assert outer["model_type"] == "gemma3"
    assert config_from_hf(outer) == config_from_hf(text)


def _tiny_vision() -> dict:
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                patch_size=14)  # fmt: skip


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_conditional_generation_checkpoint_loads_its_language_model(tmp_path, layout, caplog):
    """Gemma3ForConditionalGeneration saved by transformers 5 (``model.language_model.``) and with the Hub
    files' names (``language_model.model.``, ``vision_tower.``): the text tower loads, the rest is skipped
    with a note, and text-only logits equal the multimodal model's."""
    import torch

    torch.manual_seed(3)
    config = transformers.Gemma3Config(
        text_config=hf_config("gemma3").to_dict(), vision_config=_tiny_vision(), mm_tokens_per_image=1
    )
    torch_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in torch_model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    torch_model.save_pretrained(tmp_path)
    if layout == "hub":
        (file,) = tmp_path.glob("*.safetensors")
        tensors = safetensors.numpy.load_file(file)
        renamed = {
            name.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
            .replace("model.multi_modal_projector.", "multi_modal_projector."): value
            for name, value in tensors.items()
        }  # fmt: skip
        assert any(name.startswith("vision_tower.") for name in renamed)
        safetensors.numpy.save_file(renamed, str(file), metadata={"format": "pt"})
    tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 11)).astype(np.int32)
    with caplog.at_level("WARNING"):
        model, model_config = load_hf(tmp_path, dtype=jnp.float32)
    assert "skipped" in caplog.text and "vision tower" in caplog.text
    with torch.no_grad():
        reference = torch_model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()
    logits = np.asarray(nnx.jit(lambda m, t: m.logits(m(t)))(model, jnp.asarray(tokens)))
    assert model_config.model_type == "gemma3_text" and reference.std() > 0.5
    np.testing.assert_array_less(np.abs(logits - reference).max(), 1e-4)


def test_layer_groups_repeat_each_pattern():
    s, f = LayerKind("xla", 4096, False), LayerKind("xla", None, False)
    gemma2 = layer_kinds(preset("gemma2-9b"), "xla")
    assert layer_groups(gemma2) == [LayerGroup(0, 21, (s, f))]
    local, glob = LayerKind("xla", 512, True), LayerKind("xla", None, False)
    assert layer_groups(layer_kinds(preset("gemma3-1b"), "xla")) == [
        LayerGroup(0, 4, (local,) * 5 + (glob,)),
        LayerGroup(24, 2, (local,)),
    ]
    assert layer_groups([f] * 3 + [s] * 5) == [LayerGroup(0, 3, (f,)), LayerGroup(3, 5, (s,))]  # qwen2's
    assert layer_groups([f]) == [LayerGroup(0, 1, (f,))]
    # pallas_gpu has no soft cap or window: Gemma 2's layers all run blockwise (so one group), Gemma 3's global
    # ones keep the kernel; cuDNN has no soft cap (Gemma 2: blockwise) but takes Gemma 3's windows as a mask.
    assert {kind.impl for kind in layer_kinds(preset("gemma2-2b"), "pallas_gpu")} == {"blockwise"}
    assert {kind.impl for kind in layer_kinds(preset("gemma3-1b"), "pallas_gpu")} == {"blockwise", "pallas_gpu"}
    assert {kind.impl for kind in layer_kinds(preset("gemma2-2b"), "cudnn")} == {"blockwise"}
    assert {kind.impl for kind in layer_kinds(preset("gemma3-1b"), "cudnn")} == {"cudnn"}


def _lowered_size(num_layers: int) -> int:
    config = config_from_hf(
        _gemma3_hub_dict(num_hidden_layers=num_layers, hidden_size=32, intermediate_size=32, vocab_size=64),
        dtype="float32",
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return len(jax.jit(lambda p, t: make_logprob_fn(graphdef)(p, t, None, t)).lower(params, tokens).as_text())


def test_alternating_layers_compile_to_a_program_independent_of_depth():
    """5 local : 1 global over 12 and over 48 layers: one scan over the 6-layer pattern either way."""
    assert _lowered_size(48) < 1.05 * _lowered_size(12)


def test_blockwise_model_gradients_equal_xla_ones():
    """Gemma 3 (sliding and global layers) on two packed rows of 300, scanned and rematerialised: the gradients of the
    log-probs with blockwise attention (3 blocks of 128, the last one padded; soft cap and windows) equal XLA
    attention's."""
    hub = _gemma3_hub_dict(vocab_size=64, attn_logit_softcapping=0.7)
    grads = {}
    for impl in ("xla", "blockwise"):
        config = dataclasses.replace(config_from_hf(hub, dtype="float32", remat="full"), attention_impl=impl)
        graphdef, params = nnx.split(init_model(config, seed=1))
        logprob_fn = make_logprob_fn(graphdef, chunk_size=16)
        rng = np.random.default_rng(2)
        tokens = jnp.asarray(rng.integers(0, 64, (2, 300)), jnp.int32)
        segment_ids = jnp.asarray([[1] * 140 + [2] * 160, [1] * 250 + [0] * 50], jnp.int32)
        positions = jnp.asarray([list(range(140)) + list(range(160)), list(range(250)) + [0] * 50], jnp.int32)

        def loss(p):
            return logprob_fn(p, tokens, positions, segment_ids).sum()

        grads[impl] = jax.jit(jax.grad(loss))(params)
    flat = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads["xla"])}
    for key, value in nnx.to_flat_state(grads["blockwise"]):
        scale = np.abs(flat[key]).max()  # f32 sums of 600 tokens' terms in another order: 1e-5 of the largest
        np.testing.assert_allclose(np.asarray(value.get_value()), flat[key], atol=1e-5 * scale, err_msg=str(key))
        assert scale > 1e-3, key


def test_chunked_head_soft_cap_values_and_gradients():
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
    lm_head = jnp.asarray(rng.normal(size=(8, 40)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 40, (2, 9)), jnp.int32)
    weights = jnp.linspace(0.5, 1.5, 9)
    cap = 2.0  # logits here reach ~8: the cap bends them hard

    def capped(h, w):  # plain autodiff of the full-logits path
        return logprobs.token_logprobs(h @ w, tokens, soft_cap=cap)

    def chunked(h, w):
        return logprobs.chunked_token_logprobs(h, w, tokens, chunk_size=4, soft_cap=cap)

    z = np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64)
    z = cap * np.tanh(z / cap)
    log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = np.zeros((2, 9))
    expected[:, 1:] = np.take_along_axis(log_softmax[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(chunked(hidden, lm_head), expected, atol=1e-5)
    loss = lambda fn: lambda h, w: jnp.sum(fn(h, w) * weights)  # noqa: E731
    want = jax.grad(loss(capped), argnums=(0, 1))(hidden, lm_head)
    got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(hidden, lm_head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert np.abs(np.asarray(want[1]) - np.asarray(jax.grad(loss(lambda h, w: logprobs.token_logprobs(
        h @ w, tokens)), argnums=(0, 1))(hidden, lm_head)[1])).max() > 0.1  # fmt: skip


def test_export_writes_gemma3_as_text_only_causal_lm(tmp_path):
    from jaxrlhf.models import save_hf

    config = config_from_hf(hf_config("gemma3").to_dict(), dtype="float32")
    save_hf(init_model(config), config, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Gemma3ForCausalLM"] and written["model_type"] == "gemma3_text"
    assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
