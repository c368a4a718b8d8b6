"""Train steps: exact gradient accumulation (8x1 == 1x8) for SFT and DPO, references, micro-batch split."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.ops import logprobs, losses
from jaxrlhf.train import steps

VOCAB, DIM, LENGTH = 23, 8, 12


def toy_logprob_fn(params, tokens, positions, segment_ids):
    hidden = params["embed"][tokens] + params["pos"][positions]
    return logprobs.chunked_token_logprobs(hidden, params["head"], tokens, chunk_size=5, segment_ids=segment_ids)


def toy_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "embed": jax.random.normal(k1, (VOCAB, DIM)),
        "pos": 0.1 * jax.random.normal(k2, (LENGTH, DIM)),
        "head": jax.random.normal(k3, (DIM, VOCAB)) / np.sqrt(DIM),
    }


def sft_batch(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, LENGTH)).astype(np.int32)
    segment_ids = np.zeros((rows, LENGTH), np.int32)
    loss_mask = np.zeros((rows, LENGTH), np.int32)
    positions = np.zeros((rows, LENGTH), np.int32)
    for r in range(rows):  # one example per row, different prompt and response lengths
        length = rng.integers(4, LENGTH + 1)
        prompt = rng.integers(1, length - 1)
        segment_ids[r, :length] = 1
        positions[r, :length] = np.arange(length)
        loss_mask[r, prompt:length] = 1
    return {k: jnp.asarray(v) for k, v in dict(tokens=tokens, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions).items()}


def dpo_batch(pairs=8, seed=0):
    chosen, rejected = sft_batch(pairs, seed), sft_batch(pairs, seed + 100)
    return {k: jnp.stack([chosen[k], rejected[k]], axis=1) for k in chosen}


def test_split_micro_batches_takes_strided_rows():
    batch = {"x": jnp.arange(8)}
    split = steps.split_micro_batches(batch, 4)["x"]
    np.testing.assert_array_equal(split, [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="not divisible"):
        steps.split_micro_batches({"x": jnp.arange(6)}, 4)


def test_sft_accumulation_8x1_equals_1x8():
    params, batch = toy_params(), sft_batch()
    one = jax.jit(lambda p, b: steps.sft_gradients(p, b, logprob_fn=toy_logprob_fn, num_micro_batches=1))(params, batch)
    eight = jax.jit(lambda p, b: steps.sft_gradients(p, b, logprob_fn=toy_logprob_fn, num_micro_batches=8))(params, batch)
    chex.assert_trees_all_close(eight, one, rtol=1e-5, atol=1e-6)
    # And both equal the plain token mean over the whole batch.
    token_lp = toy_logprob_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    np.testing.assert_allclose(one[0], losses.sft_loss(token_lp, batch["loss_mask"])[0], rtol=1e-6)
    assert float(one[2]["trained_tokens"]) == float(batch["loss_mask"].sum())


@pytest.mark.parametrize("loss_type", [("sigmoid",), ("sigmoid", "sft"), ("ipo",)])
def test_dpo_accumulation_8x1_equals_1x8(loss_type):
    spec = steps.DpoLossSpec(beta=0.2, loss_type=loss_type, loss_weights=(1.0,) * len(loss_type))
    params, ref_params, batch = toy_params(0), toy_params(1), dpo_batch()

    def grads(n):
        return jax.jit(
            lambda p, r, b: steps.dpo_gradients(
                p, b, logprob_fn=toy_logprob_fn, spec=spec, ref_params=r, num_micro_batches=n
            )
        )(params, ref_params, batch)

    chex.assert_trees_all_close(grads(8), grads(1), rtol=1e-5, atol=1e-6)
    # The unaccumulated loss equals dpo_loss on the whole batch's sequence log-probs.
    policy, lengths = steps.pair_logps(toy_logprob_fn, params, batch)
    reference, _ = steps.pair_logps(toy_logprob_fn, ref_params, batch)
    want, _ = losses.dpo_loss(
        policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=0.2, loss_type=list(loss_type),
        chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
    )
    np.testing.assert_allclose(grads(1)[0], want, rtol=1e-5)


def test_precomputed_reference_equals_live_reference():
    spec = steps.DpoLossSpec(beta=0.1)
    params, ref_params, batch = toy_params(0), toy_params(1), dpo_batch()
    live = steps.dpo_gradients(params, batch, logprob_fn=toy_logprob_fn, spec=spec, ref_params=ref_params)
    reference, _ = steps.pair_logps(toy_logprob_fn, ref_params, batch)
    pre = steps.dpo_gradients(params, {**batch, "ref_logps": reference}, logprob_fn=toy_logprob_fn, spec=spec)
    chex.assert_trees_all_close(pre, live, rtol=1e-6)


def test_reference_free_uses_zero_reference():
    spec = steps.DpoLossSpec(beta=0.1)
    params, batch = toy_params(0), dpo_batch()
    loss, _, _ = steps.dpo_gradients(params, batch, logprob_fn=toy_logprob_fn, spec=spec)
    policy, _ = steps.pair_logps(toy_logprob_fn, params, batch)
    np.testing.assert_allclose(loss, np.mean(np.logaddexp(0.0, -0.1 * (policy[:, 0] - policy[:, 1]))), rtol=1e-5)


def test_step_applies_optimizer_and_reports_metrics():
    params, batch = toy_params(), sft_batch()
    tx = optax.sgd(0.5)
    state = steps.TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    new_state, metrics = steps.sft_step(state, batch, logprob_fn=toy_logprob_fn, tx=tx, schedule=lambda s: 0.5, num_micro_batches=2)
    loss, grads, _ = steps.sft_gradients(params, batch, logprob_fn=toy_logprob_fn)
    chex.assert_trees_all_close(new_state.params, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), rtol=1e-5)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert float(metrics["tokens"]) == float((batch["segment_ids"] > 0).sum())


def test_dpo_eval_metrics_ignore_padding_pairs():
    spec = steps.DpoLossSpec(beta=0.1)
    policy = np.array([[-1.0, -3.0], [-2.0, -1.0], [0.0, 0.0]])
    reference = np.zeros_like(policy)
    lengths = np.ones_like(policy)
    metrics = steps.dpo_eval_metrics(
        [{"policy": policy, "reference": reference, "lengths": lengths, "pair_mask": np.array([1, 1, 0])}], spec
    )
    assert metrics["pairs"] == 2.0
    np.testing.assert_allclose(metrics["rewards/accuracies"], 0.5)
    want = np.mean([np.logaddexp(0, -0.1 * 2.0), np.logaddexp(0, 0.1 * 1.0)])
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)


def test_loss_spec_is_checked_when_made():
    with pytest.raises(ValueError, match="one weight per loss_type"):
        steps.DpoLossSpec(loss_type=("sft", "sigmoid"), loss_weights=(2.0,))
    with pytest.raises(ValueError, match="unknown dpo loss_type"):
        steps.DpoLossSpec(loss_type=("kto",))
    with pytest.raises(ValueError, match="beta"):
        steps.DpoLossSpec(beta=0.0)
    spec = steps.DpoLossSpec(loss_type=("sigmoid", "sft"))
    assert spec.loss_weights == (1.0, 1.0) and not spec.sorts_across_batch
    assert steps.DpoLossSpec(loss_type=("aot",)).sorts_across_batch
