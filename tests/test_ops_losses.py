"""SFT and DPO losses against float64 numpy references written independently here."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.ops import losses

LN2 = math.log(2.0)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_per_pair(name, pc, pr, rc, rr, beta, eps, lc, lr, tau=0.05):
    """Each formula as TRL documents it, in float64."""
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    cl, rl = pc - rc, pr - rr
    x = beta * (cl - rl)
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)
    if name == "robust":
        return (-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps)
    if name == "hinge":
        return np.maximum(0.0, 1 - x)
    if name == "ipo":
        d = cl / lc - rl / lr
        return (d - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        return sigmoid(x) * (log_sigmoid(x) - np.log(1 - eps)) + sigmoid(-x) * (log_sigmoid(-x) - np.log(eps))
    if name == "nca_pair":
        c, r = beta * cl, beta * rl
        return -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r)
    if name == "bco_pair":
        return -log_sigmoid(beta * cl) - log_sigmoid(-beta * rl)
    if name == "sppo_hard":
        return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    if name == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        return -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
    if name == "aot_unpaired":
        d = np.sort(cl) - np.sort(rl)
        return -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
    if name == "apo_zero":
        return (1 - sigmoid(beta * cl)) + sigmoid(beta * rl)
    if name == "apo_down":
        return sigmoid(beta * cl) + (1 - sigmoid(x))
    if name == "discopop":
        m = sigmoid(x / tau)
        return -log_sigmoid(x) * (1 - m) + np.exp(-x) * m
    if name == "sigmoid_norm":
        return -log_sigmoid(beta * (cl / lc - rl / lr))
    nll_share = -pc * len(pc) / lc.sum()  # each pair's share of the chosen replies' token-mean NLL
    if name == "sft":
        return np.full_like(pc, -pc.sum() / lc.sum())
    smoothed = lambda z: -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)  # noqa: E731
    if name == "orpo":  # orpo_lambda 0.1 (the default), on mean log-probs per token
        ac, ar = pc / lc, pr / lr
        log_odds = (ac - ar) - (np.log(-np.expm1(ac)) - np.log(-np.expm1(ar)))
        return nll_share - 0.1 * log_sigmoid(log_odds)
    if name == "simpo":  # simpo_gamma 0.5 (the default)
        return smoothed(beta * (pc / lc - pr / lr) - 0.5)
    if name == "cpo":  # cpo_alpha 1.0 (the default), on summed log-probs
        return smoothed(beta * (pc - pr)) + 1.0 * nll_share
    raise AssertionError(name)


def pairs(seed=0, batch=6):
    rng = np.random.default_rng(seed)
    pc = -rng.uniform(5, 40, batch)
    pr = -rng.uniform(5, 40, batch)
    rc = pc + rng.normal(0, 2, batch)
    rr = pr + rng.normal(0, 2, batch)
    lc = rng.integers(3, 30, batch).astype(np.float64)
    lr = rng.integers(3, 30, batch).astype(np.float64)
    return pc, pr, rc, rr, lc, lr


def call_dpo(pc, pr, rc, rr, lc, lr, **kwargs):
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return losses.dpo_loss(f(pc), f(pr), f(rc), f(rr), chosen_lengths=f(lc), rejected_lengths=f(lr), **kwargs)


@pytest.mark.parametrize("name", sorted(losses.DPO_LOSSES))
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_each_dpo_loss_matches_its_float64_reference(name, beta, eps):
    pc, pr, rc, rr, lc, lr = pairs()
    if name == "exo_pair" and eps == 0:  # EXO's epsilon must be set (TRL refuses 0 too), never a silent 1e-3
        with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
            call_dpo(pc, pr, rc, rr, lc, lr, beta=beta, loss_type=name, label_smoothing=eps)
        return
    loss, metrics = jax.jit(lambda *a: call_dpo(*a, beta=beta, loss_type=name, label_smoothing=eps))(
        pc, pr, rc, rr, lc, lr
    )
    want = reference_per_pair(name, pc, pr, rc, rr, beta, eps, lc, lr)
    np.testing.assert_allclose(loss, want.mean(), rtol=2e-5, atol=1e-6)
    if name in ("aot", "aot_unpaired"):
        assert "per_pair_loss" not in metrics
    else:
        per_pair = want if name != "sft" else -pc * len(pc) / lc.sum()
        np.testing.assert_allclose(metrics["per_pair_loss"], per_pair, rtol=2e-5, atol=1e-6)


def test_reward_metrics():
    pc, pr, rc, rr, lc, lr = pairs(1)
    beta = 0.2
    _, metrics = call_dpo(pc, pr, rc, rr, lc, lr, beta=beta)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    want = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    assert set(losses.DPO_METRIC_KEYS) <= set(metrics)
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)


def test_weighted_combination_is_rpo():
    pc, pr, rc, rr, lc, lr = pairs(2)
    loss, _ = call_dpo(pc, pr, rc, rr, lc, lr, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    want = reference_per_pair("sigmoid", pc, pr, rc, rr, 0.1, 0.0, lc, lr).mean() + 0.5 * (-pc.sum() / lc.sum())
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_reference_free_training_takes_zero_references():
    pc, pr, _, _, lc, lr = pairs(3)
    zeros = np.zeros_like(pc)
    loss, _ = call_dpo(pc, pr, zeros, zeros, lc, lr, beta=0.1)
    np.testing.assert_allclose(loss, -log_sigmoid(0.1 * (pc - pr)).mean(), rtol=1e-5)


@pytest.mark.parametrize(
    "name,eps,slope",
    [
        ("sigmoid", 0.0, lambda b, e: -b / 2),
        ("sigmoid", 0.1, lambda b, e: -b * (1 - 2 * e) / 2),  # cDPO
        ("robust", 0.1, lambda b, e: -b / (2 * (1 - 2 * e))),
        ("robust", 0.0, lambda b, e: -b / 2),
    ],
)
def test_policy_equal_to_reference_gives_ln2_and_the_known_gradient(name, eps, slope):
    beta = 0.3
    logps = jnp.asarray([-12.0, -30.0, -7.5])

    def loss_of_delta(delta):
        # Delta enters through the chosen policy log-prob; the pair is otherwise policy == reference.
        return losses.dpo_loss(logps + delta, logps, logps, logps, beta=beta, loss_type=name, label_smoothing=eps)[0]

    value, grad = jax.value_and_grad(loss_of_delta)(jnp.zeros(3))
    np.testing.assert_allclose(value, LN2, rtol=1e-6)
    # The loss is a batch mean, so each pair's dL/dDelta is the per-pair slope / B.
    np.testing.assert_allclose(grad, np.full(3, slope(beta, eps) / 3), rtol=1e-5)


class SftLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_token_mean_and_counts(self):
        rng = np.random.default_rng(0)
        lp = -rng.uniform(0, 5, (3, 7)).astype(np.float32)
        mask = rng.integers(0, 2, (3, 7)).astype(np.int32)
        loss, metrics = self.variant(losses.sft_loss)(jnp.asarray(lp), jnp.asarray(mask))
        np.testing.assert_allclose(loss, -(lp.astype(np.float64) * mask).sum() / mask.sum(), rtol=1e-6)
        assert float(metrics["trained_tokens"]) == mask.sum()

    def test_empty_mask_divides_by_one(self):
        loss, metrics = losses.sft_loss(jnp.ones((2, 4)), jnp.zeros((2, 4), jnp.int32))
        assert float(loss) == 0.0 and float(metrics["trained_tokens"]) == 0.0

    def test_normalizer_zero_is_respected_not_treated_as_missing(self):
        # A normaliser of 0.0 is falsy; it must not fall back to the token count.
        loss, _ = losses.sft_loss(jnp.full((1, 3), -1.0), jnp.ones((1, 3), jnp.int32), normalizer=0.0)
        assert np.isinf(float(loss))

    def test_accumulating_8_micro_batches_with_the_global_count_equals_one_batch(self):
        rng = np.random.default_rng(1)
        logits = jnp.asarray(rng.normal(size=(8, 6, 5)), jnp.float32)
        mask = jnp.asarray(rng.integers(0, 2, (8, 6)), jnp.int32)

        def token_lp(l):  # any differentiable per-token log-prob
            return jax.nn.log_softmax(l)[..., 0]

        def full(l):
            return losses.sft_loss(token_lp(l), mask)[0]

        total = jnp.sum(mask)

        def accumulated(l):
            return sum(losses.sft_loss(token_lp(l[i : i + 1]), mask[i : i + 1], normalizer=total)[0] for i in range(8))

        chex.assert_trees_all_close(jax.value_and_grad(accumulated)(logits), jax.value_and_grad(full)(logits), rtol=1e-5)
        # The naive alternative (mean of per-micro-batch means) differs when counts differ.
        naive = np.mean([float(losses.sft_loss(token_lp(logits[i : i + 1]), mask[i : i + 1])[0]) for i in range(8)])
        assert not np.isclose(naive, float(full(logits)))


class DpoErrorsTest(chex.TestCase):
    def _args(self):
        x = jnp.zeros(4)
        return x, x, x, x

    def test_unknown_loss_type_lists_the_known_ones(self):
        with self.assertRaisesRegex(ValueError, "unknown dpo loss_type.*sigmoid.*discopop"):
            losses.dpo_loss(*self._args(), beta=0.1, loss_type="kto")

    def test_bad_beta_and_label_smoothing(self):
        with self.assertRaisesRegex(ValueError, "beta"):
            losses.dpo_loss(*self._args(), beta=0.0)
        with self.assertRaisesRegex(ValueError, "label_smoothing"):
            losses.dpo_loss(*self._args(), beta=0.1, label_smoothing=0.5)
        with self.assertRaisesRegex(ValueError, "label_smoothing"):
            losses.dpo_loss(*self._args(), beta=0.1, label_smoothing=-0.1)

    def test_mismatched_shapes(self):
        with self.assertRaisesRegex(ValueError, r"one shape \[B\]"):
            losses.dpo_loss(jnp.zeros(4), jnp.zeros(3), jnp.zeros(4), jnp.zeros(4), beta=0.1)
        with self.assertRaisesRegex(ValueError, r"one shape \[B\]"):
            losses.dpo_loss(*(jnp.zeros((4, 2)),) * 4, beta=0.1)

    def test_loss_weights_must_match(self):
        with self.assertRaisesRegex(ValueError, "one weight per loss_type"):
            losses.dpo_loss(*self._args(), beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0])

    def test_errors_are_raised_at_trace_time_under_jit(self):
        with self.assertRaisesRegex(ValueError, "unknown dpo loss_type"):
            jax.jit(lambda a: losses.dpo_loss(a, a, a, a, beta=0.1, loss_type="nope")[0])(jnp.zeros(2))


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "sft"])
def test_length_normalised_losses_say_they_need_lengths(name):
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match=f"{name}.*chosen_lengths and rejected_lengths"):
        losses.dpo_loss(x, x, x, x, beta=0.1, loss_type=name)


def test_discopop_is_finite_for_very_negative_margins():
    # exp(-x) overflows where the modulation underflows; the product must stay finite.
    x = jnp.asarray([-900.0, -50.0, 0.0, 50.0])
    zeros = jnp.zeros(4)

    def loss(delta):
        return losses.dpo_loss(delta, zeros, zeros, zeros, beta=0.1, loss_type="discopop")[0]

    value, grad = jax.value_and_grad(loss)(x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    want = reference_per_pair("discopop", x[1:], np.zeros(3), np.zeros(3), np.zeros(3), 0.1, 0.0, None, None)
    np.testing.assert_allclose(
        losses.dpo_loss(x[1:], zeros[1:], zeros[1:], zeros[1:], beta=0.1, loss_type="discopop")[1]["per_pair_loss"],
        want,
        rtol=1e-5,
    )


def test_sft_term_takes_the_global_tokens_per_pair():
    pc, pr, rc, rr, lc, lr = pairs(4)
    _, metrics = call_dpo(pc, pr, rc, rr, lc, lr, beta=0.1, loss_type="sft", chosen_tokens_per_pair=10.0)
    np.testing.assert_allclose(metrics["per_pair_loss"], -pc / 10.0, rtol=1e-6)
