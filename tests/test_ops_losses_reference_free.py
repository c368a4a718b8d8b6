"""ORPO, SimPO and CPO (reference-free pair losses) against TRL 1.16's own loss code and float64 references.

TRL's ``ORPOTrainer.odds_ratio_loss`` and ``CPOTrainer.cpo_loss`` are methods that
read a few attributes of ``self``: they are called here with a stub ``self`` on the
same float64 inputs. What TRL writes inline next to its forward pass (the chosen
reply's NLL as a token mean over the batch, the per-token averaging of log-probs,
``loss = nll - mean(beta * log_sigmoid(log_odds))`` for ORPO and ``loss =
mean(losses) + cpo_alpha * nll`` for CPO: ``orpo_trainer.py`` get_batch_loss_metrics
and ``cpo_trainer.py`` lines 885-890) is recomputed in float64 numpy here.
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrlhf.config import ConfigError
from jaxrlhf.ops import losses
from jaxrlhf.train.run_config import DpoArgs

trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")

RTOL = 1e-6


def _pairs(seed=0, n=16):
    """Summed log-probs and trained-token counts of n pairs, from per-token log-probs (float64)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=(n, 2)).astype(np.float64)
    per_token = rng.uniform(-2.5, -0.05, size=(n, 2))  # mean log-prob per token of each reply
    sums = per_token * lengths
    return sums[:, 0], sums[:, 1], lengths[:, 0], lengths[:, 1]


def _ours(chosen, rejected, chosen_len, rejected_len, **kwargs):
    zeros = np.zeros_like(chosen)
    loss, metrics = losses.dpo_loss(
        jnp.asarray(chosen, jnp.float32),
        jnp.asarray(rejected, jnp.float32),
        jnp.asarray(zeros, jnp.float32),
        jnp.asarray(zeros, jnp.float32),
        chosen_lengths=jnp.asarray(chosen_len),
        rejected_lengths=jnp.asarray(rejected_len),
        **kwargs,
    )
    return float(loss), {k: float(np.asarray(v)) for k, v in metrics.items() if k != "per_pair_loss"}


def _nll(chosen, chosen_len):
    """TRL's NLL term: cross-entropy over every chosen token of the batch (a token mean)."""
    return -chosen.sum() / chosen_len.sum()


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _stub(**attributes):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **attributes)


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_equals_trls_odds_ratio_loss_plus_the_nll(orpo_lambda):
    chosen, rejected, chosen_len, rejected_len = _pairs(1)
    average = chosen / chosen_len, rejected / rejected_len  # TRL's get_batch_logps(average_log_prob=True)
    ratio_losses, chosen_rewards, rejected_rewards, ratio, log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(
        _stub(beta=orpo_lambda), _t(average[0]), _t(average[1])
    )
    want = _nll(chosen, chosen_len) - ratio_losses.mean().item()
    loss, metrics = _ours(chosen, rejected, chosen_len, rejected_len, beta=0.1, loss_type="orpo", orpo_lambda=orpo_lambda)
    assert loss == pytest.approx(want, rel=RTOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=RTOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=RTOL)
    margins = (chosen_rewards - rejected_rewards).mean().item()
    assert metrics["rewards/margins"] == pytest.approx(margins, rel=1e-5, abs=1e-7)
    assert metrics["rewards/accuracies"] == pytest.approx((chosen_rewards > rejected_rewards).double().mean().item())
    assert metrics["log_odds_ratio"] == pytest.approx(ratio.item(), rel=RTOL)
    assert metrics["log_odds_chosen"] == pytest.approx(log_odds.item(), rel=1e-5)
    assert metrics["nll_loss"] == pytest.approx(_nll(chosen, chosen_len), rel=RTOL)


def _cpo_stub(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    return _stub(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0, 0.3])
def test_cpo_equals_trls_cpo_loss_with_the_sigmoid_loss(cpo_alpha, label_smoothing):
    chosen, rejected, chosen_len, rejected_len = _pairs(2)
    # CPO's sigmoid loss reads summed log-probs (average_log_prob only for ipo and simpo).
    trl_losses, chosen_rewards, rejected_rewards = trl_cpo.CPOTrainer.cpo_loss(
        _cpo_stub("sigmoid", 0.2, label_smoothing), _t(chosen), _t(rejected)
    )
    want = trl_losses.mean().item() + cpo_alpha * _nll(chosen, chosen_len)
    loss, metrics = _ours(
        chosen, rejected, chosen_len, rejected_len, beta=0.2, loss_type="cpo", cpo_alpha=cpo_alpha,
        label_smoothing=label_smoothing,
    )  # fmt: skip
    assert loss == pytest.approx(want, rel=RTOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=RTOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=RTOL)
    assert metrics["nll_loss"] == pytest.approx(_nll(chosen, chosen_len), rel=RTOL)


@pytest.mark.parametrize("beta, gamma, label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.0, 0.2)])
def test_simpo_equals_trls_cpo_loss_with_the_simpo_loss(beta, gamma, label_smoothing):
    chosen, rejected, chosen_len, rejected_len = _pairs(3)
    average = chosen / chosen_len, rejected / rejected_len
    trl_losses, chosen_rewards, rejected_rewards = trl_cpo.CPOTrainer.cpo_loss(
        _cpo_stub("simpo", beta, label_smoothing, gamma), _t(average[0]), _t(average[1])
    )
    common = dict(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    # TRL's CPO with loss_type="simpo" and cpo_alpha=0 is SimPO ...
    loss, metrics = _ours(chosen, rejected, chosen_len, rejected_len, loss_type="simpo", **common)
    assert loss == pytest.approx(trl_losses.mean().item(), rel=RTOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=RTOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=RTOL)
    # ... and with cpo_alpha > 0 it is simpo plus cpo_alpha x the NLL: our [simpo, sft] weighted [1, cpo_alpha].
    loss, _ = _ours(
        chosen, rejected, chosen_len, rejected_len, loss_type=["simpo", "sft"], loss_weights=[1.0, 0.7], **common
    )
    assert loss == pytest.approx(trl_losses.mean().item() + 0.7 * _nll(chosen, chosen_len), rel=RTOL)


def test_reference_free_losses_ignore_the_reference_and_dpo_does_not():
    chosen, rejected, chosen_len, rejected_len = _pairs(4)
    args = [jnp.asarray(a, jnp.float32) for a in (chosen, rejected)]
    lengths = dict(chosen_lengths=jnp.asarray(chosen_len), rejected_lengths=jnp.asarray(rejected_len))
    some_ref = list(jnp.asarray(np.random.default_rng(5).normal(size=(2,) + chosen.shape) * 10, jnp.float32))
    zero_ref = [jnp.zeros_like(args[0])] * 2
    for loss_type in ("orpo", "simpo", "cpo"):
        with_ref = losses.dpo_loss(*args, *some_ref, beta=0.5, loss_type=loss_type, **lengths)[0]
        without = losses.dpo_loss(*args, *zero_ref, beta=0.5, loss_type=loss_type, **lengths)[0]
        assert float(with_ref) == float(without), loss_type
    assert losses.REFERENCE_FREE == {"orpo", "simpo", "cpo", "sft"}
    dpo = [float(losses.dpo_loss(*args, *ref, beta=0.5, **lengths)[0]) for ref in (some_ref, zero_ref)]
    assert dpo[0] != dpo[1]


def test_orpo_log_odds_stay_finite_near_probability_one():
    """log(1 - exp(x)) at mean log-probs a hair below 0 (a reply the model is sure of): finite, not NaN."""
    chosen = np.array([-1e-9, -1e-4, -30.0])
    rejected = np.array([-2.0, -1e-8, -1e-3])
    loss, metrics = _ours(chosen, rejected, np.ones(3), np.ones(3), beta=0.1, loss_type="orpo")
    assert np.isfinite(loss) and np.isfinite(metrics["log_odds_chosen"])
    want = (chosen - rejected) - (np.log(-np.expm1(np.minimum(chosen, -1e-7))) - np.log(-np.expm1(np.minimum(rejected, -1e-7))))
    assert metrics["log_odds_chosen"] == pytest.approx(want.mean(), rel=1e-4)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"orpo_lambda": 0.0}, "dpo.orpo_lambda must be > 0"),
        ({"orpo_lambda": -1.0}, "dpo.orpo_lambda must be > 0"),
        ({"simpo_gamma": -0.1}, "dpo.simpo_gamma must be >= 0"),
        ({"cpo_alpha": -1.0}, "dpo.cpo_alpha must be >= 0"),
    ],
)
def test_bad_reference_free_settings_name_their_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        DpoArgs(loss_type=["orpo"], **setting).spec()


def test_only_reference_free_losses_make_a_run_reference_free():
    assert DpoArgs(loss_type=["simpo"]).spec().reference_free
    assert DpoArgs(loss_type=["cpo", "sft"]).spec().reference_free
    assert not DpoArgs(loss_type=["simpo", "sigmoid"]).spec().reference_free
    assert losses.dpo_metric_keys(["orpo"])[-3:] == ("log_odds_ratio", "log_odds_chosen", "nll_loss")
