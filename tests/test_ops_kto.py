"""KTO's loss against a float64 reference of TRL 1.16's ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py,
the lines after ``if self.calculate_KL:``: ``kl = (KL_logps - ref_KL_logps).mean().detach()`` gathered and
``clamp(min=0)``, ``chosen_losses = 1 - sigmoid(beta * (chosen_logratios - kl))``, ``rejected_losses = 1 -
sigmoid(beta * (kl - rejected_logratios))``, the weighted losses concatenated and ``nanmean``ed; rewards
``beta * logratios`` averaged per side over the examples of that side). TRL writes all of it inline next to
its forward passes, so there is no function of TRL's to call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.ops import losses
from jaxrlhf.ops.kto import KTO_METRIC_SUMS, kto_metric_means


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _trl_reference(policy, reference, policy_kl, reference_kl, labels, beta, dw, uw):
    kl = max((policy_kl - reference_kl).mean(), 0.0)
    r = policy - reference
    chosen = 1 - _sigmoid(beta * (r[labels] - kl))
    rejected = 1 - _sigmoid(beta * (kl - r[~labels]))
    loss = np.concatenate([dw * chosen, uw * rejected]).mean()
    metrics = {"kl": kl}
    if labels.any():
        metrics["rewards/chosen"] = (beta * r[labels]).sum() / labels.sum()
        metrics["logps/chosen"] = policy[labels].sum() / labels.sum()
    if (~labels).any():
        metrics["rewards/rejected"] = (beta * r[~labels]).sum() / (~labels).sum()
        metrics["logps/rejected"] = policy[~labels].sum() / (~labels).sum()
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def _examples(seed, n=12, kl_shift=0.5):
    rng = np.random.default_rng(seed)
    policy = -rng.uniform(5, 60, n)
    reference = policy + rng.normal(0, 2, n)
    policy_kl = -rng.uniform(20, 80, n)
    reference_kl = policy_kl - rng.normal(kl_shift, 1.0, n)
    labels = rng.random(n) < 0.6
    labels[0], labels[1] = True, False
    return policy, reference, policy_kl, reference_kl, labels


def _ours(policy, reference, policy_kl, reference_kl, labels, **kwargs):
    f = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    return losses.kto_loss(f(policy), f(reference), f(policy_kl), f(reference_kl), jnp.asarray(labels), **kwargs)


@pytest.mark.parametrize("beta, dw, uw, kl_shift", [(0.1, 1.0, 1.0, 0.5), (0.5, 1.33, 0.8, 2.0), (0.1, 1.0, 1.0, -3.0)])
def test_kto_equals_trls_inline_loss_in_float64(beta, dw, uw, kl_shift):
    inputs = _examples(0, kl_shift=kl_shift)
    loss, metrics = _ours(*inputs, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    want, want_metrics = _trl_reference(*inputs, beta, dw, uw)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)
    if kl_shift < 0:  # the KL estimate is negative on these mismatched pairs: clamped at 0
        assert float(metrics["kl"]) == 0.0


def test_one_sided_batches_log_what_trl_logs():
    policy, reference, policy_kl, reference_kl, _ = _examples(1)
    only_desirable = np.ones(len(policy), bool)
    loss, metrics = _ours(policy, reference, policy_kl, reference_kl, only_desirable, beta=0.1)
    want, want_metrics = _trl_reference(policy, reference, policy_kl, reference_kl, only_desirable, 0.1, 1.0, 1.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert "rewards/rejected" not in want_metrics and float(metrics["rewards/rejected"]) == 0.0
    assert float(metrics["rewards/margins"]) == 0.0 and float(metrics["count/rejected"]) == 0.0


def test_micro_batches_with_the_global_reference_point_add_up_to_one_batch():
    policy, reference, policy_kl, reference_kl, labels = _examples(2, n=16)
    whole, whole_metrics = _ours(policy, reference, policy_kl, reference_kl, labels, beta=0.2)
    kl = whole_metrics["kl"]
    parts = [
        _ours(policy[s], reference[s], None, None, labels[s], beta=0.2, kl=kl, normalizer=16)
        for s in (slice(0, 5), slice(5, 16))
    ]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-6)
    sums = {k: jnp.asarray(sum(float(p[1][k]) for p in parts)) for k in KTO_METRIC_SUMS}
    for key, value in kto_metric_means(sums).items():
        np.testing.assert_allclose(float(value), float(whole_metrics[key]), rtol=1e-5, err_msg=key)


def test_the_reference_point_carries_no_gradient():
    policy, reference, policy_kl, reference_kl, labels = _examples(3)
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    def loss_of(policy, policy_kl):
        return losses.kto_loss(policy, f(reference), policy_kl, f(reference_kl), jnp.asarray(labels), beta=0.1)[0]

    grad_policy, grad_kl = jax.grad(loss_of, argnums=(0, 1))(f(policy), f(policy_kl))
    assert np.all(np.asarray(grad_kl) == 0) and np.any(np.asarray(grad_policy) != 0)
    # desirable examples are pushed up, undesirable down
    assert np.all(np.asarray(grad_policy)[labels] < 0) and np.all(np.asarray(grad_policy)[~labels] > 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": np.ones(4, np.int32)}, "labels must be booleans"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"desirable_weight": -1.0}, "must be >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = dict(labels=np.ones(4, bool), beta=0.1)
    args.update(kwargs)
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match=message):
        losses.kto_loss(x, x, x, x, jnp.asarray(args.pop("labels")), **args)
