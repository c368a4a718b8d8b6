"""Optimizers: weight decay only where the parameter says so, each optax optimizer against a float64 update,
bf16 first moments, and settings that cannot train refused up front."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.commands.sft import run_sft
from jaxrlhf.config import ConfigError
from jaxrlhf.models import init_model
from jaxrlhf.models.presets import preset
from jaxrlhf.parallel import MeshConfig, make_mesh
from jaxrlhf.train.optim import OptimConfig, decay_mask, init_opt_state, make_optimizer
from train_fixtures import sft_config

CONFIG = preset("tiny", vocab_size=128)
UNTIED = dataclasses.replace(CONFIG, tie_word_embeddings=False)


def _flat(tree) -> dict[str, object]:
    return {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(tree)}


def _params(config=CONFIG, mesh=None):
    return nnx.split(init_model(config, seed=1, mesh=mesh))[1]


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_decay_follows_what_each_parameter_is_not_its_rank(decay_embeddings):
    mask = _flat(decay_mask(_params(UNTIED), decay_embeddings=decay_embeddings))
    for name, decays in mask.items():
        leaf = name.split("/")[-1]
        if leaf == "scale" or leaf.endswith("_bias"):  # norms ([L, D] when stacked) and biases ([L, H, d])
            assert decays is False, name
        elif leaf in ("embed", "lm_head"):
            assert decays is decay_embeddings, name
        else:
            assert leaf.endswith("_proj") and decays is True, name
    assert {"layers/attn_norm/scale", "layers/attn/q_bias", "lm_head"} <= set(mask)


def test_one_adamw_step_with_zero_gradients_decays_kernels_only():
    """With g = 0 Adam's own update is 0, so p' = p * (1 - lr * wd) exactly where decay applies."""
    lr, wd = 0.1, 0.5
    params = _params()
    tx, _ = make_optimizer(OptimConfig(learning_rate=lr, weight_decay=wd, schedule="constant", max_grad_norm=0), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for name, (p, u) in zip(_flat(params), zip(jax.tree.leaves(params), jax.tree.leaves(updates), strict=True)):
        p64, new = np.asarray(p, np.float64), np.asarray(p, np.float64) + np.asarray(u, np.float64)
        decayed = name.endswith("_proj") or name == "embed"
        np.testing.assert_allclose(new, p64 * (1 - lr * wd) if decayed else p64, rtol=1e-6, err_msg=name)


def _one_update(config: OptimConfig, params, grads):
    tx, _ = make_optimizer(config, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return [np.asarray(u, np.float64) for u in jax.tree.leaves(updates)]


def test_lion_sgd_and_adamw_first_steps_match_float64_formulas():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params)
    lr, b1 = 0.01, 0.9
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    base = dict(learning_rate=lr, schedule="constant", max_grad_norm=0.0, b1=b1)
    # Lion (Chen et al. 2023): -lr * sign((1 - b1) g) from zero moments.
    for got, g in zip(_one_update(OptimConfig(name="lion", **base), params, grads), leaves):
        np.testing.assert_allclose(got, -lr * np.sign(g), atol=1e-7)
    # SGD with momentum from a zero buffer: -lr * g.
    for got, g in zip(_one_update(OptimConfig(name="sgd", momentum=0.9, **base), params, grads), leaves):
        np.testing.assert_allclose(got, -lr * g, rtol=1e-5, atol=1e-9)
    # AdamW with bias correction: m_hat = g, v_hat = g^2, so -lr * g / (|g| + eps).
    eps = 1e-8
    for got, g in zip(_one_update(OptimConfig(name="adamw", eps=eps, **base), params, grads), leaves):
        np.testing.assert_allclose(got, -lr * g / (np.abs(g) + eps), rtol=1e-4, atol=1e-9)


def test_adafactor_factors_its_second_moments():
    """A [V, D] embedding keeps V + D statistics, not V * D (optax factors two dims of at least 128)."""
    config = dataclasses.replace(CONFIG, hidden_size=128, intermediate_size=256, vocab_size=256)
    params = _params(config)
    tx, _ = make_optimizer(OptimConfig(name="adafactor", learning_rate=1e-3), 10)
    shapes = [x.shape for x in jax.tree.leaves(tx.init(params))]
    assert (256, 128) not in shapes and (256,) in shapes and (128,) in shapes
    assert sum(np.prod(s) for s in shapes) < 0.5 * sum(x.size for x in jax.tree.leaves(params))


def test_bf16_first_moments_halve_their_memory_and_stay_sharded():
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = _params(mesh=mesh)

    def moment_bytes(mu_dtype):
        tx, _ = make_optimizer(OptimConfig(mu_dtype=mu_dtype), 10)
        with jax.set_mesh(mesh):
            state = init_opt_state(tx, params, mesh)
        mu = state[-1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
        for moment, param in zip(jax.tree.leaves(mu), jax.tree.leaves(params), strict=True):
            assert moment.sharding.is_equivalent_to(param.sharding, param.ndim)
        return sum(x.nbytes for x in jax.tree.leaves(mu)), {x.dtype for x in jax.tree.leaves(mu)}

    full, full_dtypes = moment_bytes(None)
    half, half_dtypes = moment_bytes("bfloat16")
    assert full_dtypes == {jnp.dtype("float32")} and half_dtypes == {jnp.dtype("bfloat16")}
    assert half * 2 == full


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learning_rate": -1e-5}, "optim.learning_rate must be > 0"),
        ({"learning_rate": float("nan")}, "optim.learning_rate must be > 0"),
        ({"b1": 1.0}, "optim.b1 must be in [0, 1)"),
        ({"b2": -0.1}, "optim.b2 must be in [0, 1)"),
        ({"eps": 0.0}, "optim.eps must be > 0"),
        ({"warmup_steps": 50}, "not within the run's 6 steps"),
        ({"name": "adam"}, "optim.name must be one of adamw, adafactor, lion, sgd"),
        ({"mu_dtype": "float16"}, "optim.mu_dtype"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_anything_runs(base_model, tmp_path, override, message):
    config = sft_config(tmp_path / "run", base_model)
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, **override))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run_sft(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
