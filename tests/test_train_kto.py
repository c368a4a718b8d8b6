"""KTO end to end: the step against a float64 reference of TRL's formula (the reference point over the whole
global batch, any micro-batching), its gradients against plain differentiation, the KL rows the data builds,
TRL's label-balance check, bad KTO data, and a tiny run that learns and resumes bit-identically."""

import dataclasses
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.cli import main
from jaxrlhf.commands.export import ExportConfig, run_export
from jaxrlhf.commands.kto import run_kto
from jaxrlhf.data import Columns, DataError, asset_path, load_tokenizer
from jaxrlhf.data.kto import check_balance, encode_kto, label_census, with_kl_rows
from jaxrlhf.data.pipeline import make_iterator, record_datasets
from jaxrlhf.train import kto_steps
from test_train_steps import dpo_batch, toy_logprob_fn, toy_params
from train_fixtures import kto_config

TOKENIZER = str(asset_path("tokenizer"))


def _logps64(params, batch):
    """Summed log-probs ``[B, 2]`` of each row under the toy model, in float64 numpy (shift written out here)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    tokens, positions, mask = (np.asarray(batch[k]) for k in ("tokens", "positions", "loss_mask"))
    logits = (p["embed"][tokens] + p["pos"][positions]) @ p["head"]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    # Token t is predicted from position t - 1 of the same row.
    lp = np.take_along_axis(logits[..., :-1, :], tokens[..., 1:, None], -1)[..., 0] - logz[..., :-1]
    return (lp * mask[..., 1:]).sum(-1)


def _trl_kto(policy, reference, labels, beta, dw, uw):
    """TRL 1.16 KTOTrainer._compute_loss (kto_trainer.py): kl = mean(KL_logps - ref_KL_logps).clamp(min=0),
    chosen 1 - sigmoid(beta (r - kl)), rejected 1 - sigmoid(beta (kl - r)), weighted, mean over examples."""
    kl = max((policy[:, 1] - reference[:, 1]).mean(), 0.0)
    r = policy[:, 0] - reference[:, 0]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    per = np.where(labels, dw * (1 - sig(beta * (r - kl))), uw * (1 - sig(beta * (kl - r))))
    return per.mean(), kl


def _kto_batch(seed=0, rows=8):
    batch = dpo_batch(rows, seed)
    labels = np.random.default_rng(seed).random(rows) < 0.6
    labels[:2] = True, False
    return {**batch, "label": jnp.asarray(labels.astype(np.int32))}


@pytest.mark.parametrize("head_scale", [1.0, 2.0])  # 1.0: the KL point is clamped to 0; 2.0: it is positive
def test_kto_step_matches_trls_formula_for_any_micro_batching(head_scale):
    spec = kto_steps.KtoLossSpec(beta=0.5, desirable_weight=1.2, undesirable_weight=0.8)
    params, batch = toy_params(0), _kto_batch()
    ref_params = dict(toy_params(1), head=toy_params(1)["head"] * head_scale)
    policy64, ref64 = _logps64(params, batch), _logps64(ref_params, batch)
    want, want_kl = _trl_kto(policy64, ref64, np.asarray(batch["label"]) > 0, 0.5, 1.2, 0.8)
    if head_scale != 1.0:
        assert want_kl > 0.1  # the clamp is not what this case tests

    def grads(n):
        return jax.jit(
            lambda p, r, b: kto_steps.kto_gradients(
                p, b, logprob_fn=toy_logprob_fn, spec=spec, ref_params=r, num_micro_batches=n
            )
        )(params, ref_params, batch)

    one = grads(1)
    np.testing.assert_allclose(float(one[0]), want, rtol=2e-5)
    np.testing.assert_allclose(float(one[3]), want_kl, rtol=2e-5, atol=1e-6)
    for n in (2, 8):
        chex.assert_trees_all_close(grads(n), one, rtol=2e-5, atol=1e-6)

    def direct(p):  # the whole batch at once, the reference point without gradient
        lp = jax.vmap(lambda row: toy_logprob_fn(p, batch["tokens"][:, row], batch["positions"][:, row],
                                                 batch["segment_ids"][:, row]), out_axes=1)(jnp.arange(2))
        seq = jnp.sum(lp * batch["loss_mask"], -1)
        kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(seq[:, 1] - ref64[:, 1]), 0.0))
        per = jnp.where(batch["label"] > 0, 1.2 * (1 - jax.nn.sigmoid(0.5 * (seq[:, 0] - ref64[:, 0] - kl))),
                        0.8 * (1 - jax.nn.sigmoid(0.5 * (kl - seq[:, 0] + ref64[:, 0]))))  # fmt: skip
        return jnp.mean(per)

    chex.assert_trees_all_close(one[1], jax.grad(direct)(params), rtol=1e-4, atol=1e-6)
    labels = np.asarray(batch["label"]) > 0
    np.testing.assert_allclose(float(one[2]["count/chosen"]), labels.sum())
    rewards = 0.5 * (policy64[:, 0] - ref64[:, 0])
    np.testing.assert_allclose(float(one[2]["rewards/chosen_sum"]), rewards[labels].sum(), rtol=1e-4)


def test_kto_eval_metrics_use_every_real_example_and_skip_padding():
    spec = kto_steps.KtoLossSpec(beta=0.2)
    rng = np.random.default_rng(3)
    policy, reference = -rng.uniform(5, 30, (10, 2)), -rng.uniform(5, 30, (10, 2))
    labels = (rng.random(10) < 0.5).astype(np.int32)
    mask = np.array([1] * 7 + [0] * 3, np.int32)
    halves = [dict(policy=policy[s], reference=reference[s], label=labels[s], pair_mask=mask[s]) for s in (slice(0, 5), slice(5, 10))]
    got = kto_steps.kto_eval_metrics(halves, spec)
    want, want_kl = _trl_kto(policy[:7], reference[:7], labels[:7] > 0, 0.2, 1.0, 1.0)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(got["kl"], want_kl, rtol=1e-5, atol=1e-6)
    assert got["examples"] == 7


def _example(prompt_len, completion_len, seed, width):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 50, prompt_len + completion_len).astype(np.int32)
    mask = np.r_[np.zeros(prompt_len), np.ones(completion_len)].astype(np.int32)
    row = lambda a: np.pad(a, (0, width - len(a)))  # noqa: E731
    n = len(tokens)
    return {"tokens": row(tokens), "loss_mask": row(mask), "segment_ids": row(np.ones(n, np.int32)),
            "positions": row(np.arange(n, dtype=np.int32))}, (tokens[:prompt_len], tokens[prompt_len:])  # fmt: skip


def test_kl_rows_pair_each_prompt_with_another_examples_completion():
    width = 12
    made = [_example(p, c, s, width) for s, (p, c) in enumerate([(3, 4), (5, 2), (2, 6), (9, 3)])]
    empty = {k: np.zeros(width, np.int32) for k in made[0][0]}
    rows = [m[0] for m in made[:2]] + [empty] + [m[0] for m in made[2:]]  # an eval place left empty
    batch = {k: np.stack([np.stack([r[k], empty[k]]) for r in rows]) for k in empty}
    batch["label"] = np.zeros(5, np.int32)
    out = with_kl_rows(batch, pad=0)
    real = [0, 1, 3, 4]
    for rank, i in enumerate(real):
        prompt, _ = made[rank][1]
        _, completion = made[rank - 1][1]  # TRL's rotation by one: the previous real example's completion
        want = np.r_[prompt, completion][:width]
        n = len(want)
        np.testing.assert_array_equal(out["tokens"][i, 1, :n], want)
        np.testing.assert_array_equal(out["loss_mask"][i, 1, :n], np.r_[np.zeros(len(prompt)), np.ones(n - len(prompt))])
        np.testing.assert_array_equal(out["positions"][i, 1, :n], np.arange(n))
        assert (out["segment_ids"][i, 1, n:] == 0).all() and (out["segment_ids"][i, 1, :n] == 1).all()
        np.testing.assert_array_equal(out["tokens"][i, 0], batch["tokens"][i, 0])
    # Example 3's 9-token prompt and example 2's 6-token completion: cut at the row's end, 3 completion tokens left.
    assert out["loss_mask"][4, 1].sum() == 3
    assert (out["segment_ids"][2] == 0).all()


def test_paired_records_give_chosen_true_rejected_false_and_kl_rows_never_reuse_their_own_prompt():
    data = kto_config("unused", TOKENIZER).data
    data = dataclasses.replace(data, train=[dataclasses.replace(data.train[0], paths=[str(asset_path("dpo.jsonl"))])])
    batch = next(make_iterator(data, task="kto", split="train"))
    np.testing.assert_array_equal(batch["label"], [1, 0] * 4)
    tokens, mask = batch["tokens"], batch["loss_mask"]
    start = lambda i, r: int(np.argmax(mask[i, r]))  # noqa: E731
    prompts = [tokens[i, 0, : start(i, 0)].tobytes() for i in range(8)]
    completions = [tokens[i, 0, start(i, 0) : (batch["segment_ids"][i, 0] > 0).sum()].tobytes() for i in range(8)]
    assert len(set(prompts)) == 4 and all(prompts[i] == prompts[i + 1] for i in (0, 2, 4, 6))
    for i in range(8):
        # Rotating by one would give example 2k + 1 its own pair's chosen reply: two places mismatch every prompt
        # and still use each completion once, as TRL's rotation does.
        assert tokens[i, 1, : start(i, 1)].tobytes() == prompts[i]
        kl_completion = tokens[i, 1, start(i, 1) : (batch["segment_ids"][i, 1] > 0).sum()].tobytes()
        assert kl_completion == completions[i - 2]


def test_label_balance_warning_gives_trls_suggested_weights():
    shares = {"desirable": 0.75, "undesirable": 0.25, "records": 400}
    # TRL 1.16 kto_trainer.py: des in [u * uw / d, u * uw / d * 1.33], und in [d * dw / u / 1.33, d * dw / u].
    message = check_balance(shares, desirable_weight=1.0, undesirable_weight=1.0)
    assert "desirable_weight in [0.33, 0.44]" in message and "undesirable_weight in [2.26, 3.0]" in message
    assert check_balance(shares, desirable_weight=1.0, undesirable_weight=2.5) is None
    assert check_balance({"desirable": 0.5, "undesirable": 0.5, "records": 2}, desirable_weight=1, undesirable_weight=1) is None
    data = kto_config("unused", TOKENIZER).data
    census = label_census(record_datasets(data, "train"))
    records = [json.loads(line) for line in open(asset_path("kto.jsonl"))]
    assert census["records"] < len(records)  # the eval carve is not counted
    assert 0.5 < census["desirable"] < 0.7 and abs(census["desirable"] + census["undesirable"] - 1) < 1e-9


@pytest.mark.parametrize("label, message", [(None, "missing"), ("true", "expected true or false.*got str"),
                                            (1, "expected true or false.*got int")])  # fmt: skip
def test_a_bad_label_names_the_field(label, message):
    record = {"prompt": "Say hi.", "completion": " hi", **({} if label is None else {"label": label})}
    with pytest.raises(DataError, match=f"field 'label'.*{message}"):
        encode_kto(record, load_tokenizer(TOKENIZER), max_length=64, columns=Columns())


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_bad_kto_data_stops_with_one_line_naming_file_line_and_field(tmp_path, capsys):
    records = [{"prompt": f"q{i}", "completion": f" a{i}", "label": True} for i in range(6)]
    only_desirable = _write(tmp_path / "good.jsonl", records)
    args = ["kto", "--model.path", str(tmp_path / "none"), "--data.tokenizer", TOKENIZER, "--run_dir", str(tmp_path / "r")]
    assert main([*args, "--data.train", f"[{{paths: [{only_desirable}]}}]"]) == 1
    assert "all 6 KTO records are labelled true (desirable)" in capsys.readouterr().err
    records[3]["label"] = "no"
    bad = _write(tmp_path / "bad.jsonl", records)
    assert main([*args, "--data.train", f"[{{paths: [{bad}]}}]"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl line 4, field 'label'" in err[0], err
    assert main([*args, "--kto.desirable_weight", "-1"]) == 1
    assert "kto.desirable_weight must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_kto_learns_and_resumes_bit_identically(base_model, tmp_path):
    from test_train_e2e import eval_rows, train_metrics

    straight = kto_config(tmp_path / "straight", base_model, max_steps=16, eval_every=8, eval_at_start=True)
    run_kto(straight)
    evals = eval_rows(tmp_path / "straight")
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.02, evals
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] + 0.1, evals
    interrupted = dataclasses.replace(straight, run_dir=str(tmp_path / "interrupted"), stop_after_steps=5)
    run_kto(interrupted)
    run_kto(dataclasses.replace(interrupted, stop_after_steps=0))
    want, got = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "interrupted")
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for step in got:
        assert got[step] == want[step], f"step {step} differs after resume"
    # A KTO run's checkpoint exports like any other (its config.yaml has a kto section).
    out = run_export(ExportConfig(run_dir=str(tmp_path / "interrupted"), out=str(tmp_path / "hf")))
    assert (pathlib.Path(out) / "config.json").exists()


def test_inspect_data_shows_each_kto_example_with_its_label(capsys):
    args = ["inspect-data", "--file", str(asset_path("kto.jsonl")), "--data.tokenizer", TOKENIZER, "--json", "true",
            "--num_examples", "4", "--scan", "20"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr()
    shown = [json.loads(line) for line in out.out.splitlines()]
    records = [json.loads(line) for line in open(asset_path("kto.jsonl"))][:4]
    assert [s["label"] for s in shown] == [r["label"] for r in records]
    assert all(("true" if s["label"] else "false") in s["origin"] for s in shown)
    desirable = sum(json.loads(line)["label"] for line in list(open(asset_path("kto.jsonl")))[:20])
    assert f"{desirable} / {20 - desirable}" in out.err
