"""Packed DPO pair-rows: the same pairs packed and padded give the same log-probs, losses and gradients on a
tiny model; micro-batches add up; the pipeline's packed rows keep their invariants; a precomputed reference
joins packed pairs; a packed run resumes bit-identically."""

import collections
import dataclasses
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_fixtures import read_jsonl, write_jsonl
from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.commands.precompute_ref import run_precompute_ref
from jaxrlhf.data import DataConfig, DatasetConfig, asset_path, encode_dpo, make_iterator
from jaxrlhf.data.tokenizer import load_tokenizer
from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.ops import losses
from jaxrlhf.train import steps
from jaxrlhf.train.run_config import DpoArgs
from model_fixtures import tiny_config
from train_fixtures import dpo_config

LENGTH, SLOTS, VOCAB = 32, 16, 64


def random_pairs(seed=0, n=7):
    """(chosen, rejected) of (tokens, loss_mask), 3-8 tokens a side, trained after a random prompt."""
    rng = np.random.default_rng(seed)

    def side():
        size = int(rng.integers(3, 9))
        mask = (np.arange(size) >= rng.integers(1, size)).astype(np.int32)
        return rng.integers(0, VOCAB, size).astype(np.int32), mask

    return [(side(), side()) for _ in range(n)]


def _place(row, start, tokens, mask, segment):
    n = len(tokens)
    row["tokens"][start : start + n], row["loss_mask"][start : start + n] = tokens, mask
    row["segment_ids"][start : start + n], row["positions"][start : start + n] = segment, np.arange(n)


def layout(pairs, rows_of_pairs):
    """A ``[R, 2, T]`` batch: row r holds the pairs ``rows_of_pairs[r]`` one after another, segment k = k-th."""
    batch = {k: np.zeros((len(rows_of_pairs), 2, LENGTH), np.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    for r, members in enumerate(rows_of_pairs):
        for side in (0, 1):
            row, start = {k: v[r, side] for k, v in batch.items()}, 0
            for k, p in enumerate(members, start=1):
                _place(row, start, *pairs[p][side], k)
                start += len(pairs[p][side][0])
            assert start <= LENGTH
    return {k: jnp.asarray(v) for k, v in batch.items()}


PACKED_ROWS = [[0, 1, 2], [3], [4, 5], []]  # an empty row too: batches of packed rows vary in pairs
ORDER = [p for row in PACKED_ROWS for p in row]


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(vocab_size=VOCAB)
    graphdef, params = nnx.split(init_model(config, seed=1))
    _, ref_params = nnx.split(init_model(config, seed=2))
    pairs = random_pairs()
    padded = layout(pairs, [[p] for p in ORDER])
    packed = layout(pairs, PACKED_ROWS)
    fns = {"padded": make_logprob_fn(graphdef, chunk_size=8, packed=False), "packed": make_logprob_fn(graphdef, chunk_size=8)}
    return fns, params, ref_params, padded, packed


def _real(x, packed):
    """Packed ``[R, S, 2]`` slots -> the real pairs ``[P, 2]`` in ORDER."""
    mask = np.asarray(steps.packed_pair_mask(packed["segment_ids"], SLOTS)).astype(bool)
    return np.asarray(x)[mask]


def test_packed_pairs_have_the_padded_log_probs_and_every_loss(tiny):
    fns, params, ref_params, padded, packed = tiny
    logps = {
        name: [steps.pair_logps(fns[name], p, batch, pairs_per_row=SLOTS if name == "packed" else None) for p in (params, ref_params)]
        for name, batch in (("padded", padded), ("packed", packed))
    }
    (pol, lengths), (ref, _) = logps["padded"]
    (ppol, plengths), (pref, _) = logps["packed"]
    assert ppol.shape == (len(PACKED_ROWS), SLOTS, 2)
    np.testing.assert_allclose(_real(ppol, packed), pol, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_real(pref, packed), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(_real(plengths, packed), lengths)
    mask = steps.packed_pair_mask(packed["segment_ids"], SLOTS).reshape(-1)
    assert float(mask.sum()) == len(ORDER)
    flat = lambda x: x.reshape(-1, 2)  # noqa: E731
    for name in losses.DPO_LOSSES:
        kw = dict(beta=0.5, loss_type=name, label_smoothing=0.1 if name == "exo_pair" else 0.0)
        call = lambda p, r, l, **e: losses.dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], chosen_lengths=l[:, 0], rejected_lengths=l[:, 1], **kw, **e)  # noqa: E731,E501
        want, want_metrics = call(pol, ref, lengths)
        got, got_metrics = call(flat(ppol), flat(pref), flat(plengths), pair_mask=mask)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        if "per_pair_loss" in want_metrics:
            np.testing.assert_allclose(
                np.asarray(got_metrics["per_pair_loss"])[np.asarray(mask) > 0], want_metrics["per_pair_loss"],
                rtol=1e-5, atol=1e-5, err_msg=name,
            )  # fmt: skip


@pytest.mark.parametrize("loss_type", [("sigmoid",), ("aot",), ("sigmoid", "sft")])
def test_packed_step_loss_and_gradients_equal_padded(tiny, loss_type):
    fns, params, ref_params, padded, packed = tiny
    spec = steps.DpoLossSpec(beta=0.5, loss_type=loss_type)

    def run(name, batch):
        slots = SLOTS if name == "packed" else None
        fn = jax.jit(lambda p, r, b: steps.dpo_gradients(p, b, logprob_fn=fns[name], spec=spec, ref_params=r, pairs_per_row=slots))
        return fn(params, ref_params, batch)

    want, got = run("padded", padded), run("packed", packed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    for key in spec.metric_keys:
        np.testing.assert_allclose(got[2][key], want[2][key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert float(steps.real_pairs(packed, SLOTS)) == len(ORDER)


def test_packed_micro_batches_add_up_to_one_batch(tiny):
    fns, params, ref_params, _, packed = tiny
    spec = steps.DpoLossSpec(beta=0.5, loss_type=("sigmoid", "sft"))

    def grads(n):
        return jax.jit(
            lambda p, r, b: steps.dpo_gradients(
                p, b, logprob_fn=fns["packed"], spec=spec, ref_params=r, num_micro_batches=n, pairs_per_row=SLOTS
            )
        )(params, ref_params, packed)

    chex.assert_trees_all_close(grads(2), grads(1), rtol=1e-5, atol=1e-6)


def _pipeline_config(tmp_path, records, **overrides):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(
        tokenizer=str(asset_path("tokenizer")), train=[DatasetConfig(paths=[str(path)])], max_length=64,
        batch_size=2, read_threads=1, cache_dir=str(tmp_path / "cache"), packing="first_fit", packing_bins=3,
    )  # fmt: skip
    return dataclasses.replace(config, **overrides)


def _pairs_of(batches):
    """Every (chosen, rejected) of packed pair-rows, each side's (tokens, loss_mask), checking segment ids."""
    out = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][row]
            ids = np.unique(seg[0][seg[0] > 0])
            np.testing.assert_array_equal(ids, np.unique(seg[1][seg[1] > 0]))  # both sides hold pairs 1..k
            np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
            out += [tuple((tuple(b["tokens"][row, s][seg[s] == k]), tuple(b["loss_mask"][row, s][seg[s] == k])) for s in (0, 1)) for k in ids]
    return out


def test_pipeline_packs_whole_pairs_exactly_once(tmp_path):
    records = read_jsonl(asset_path("dpo.jsonl"))[:24]
    records.append({"prompt": "a " * 20, "chosen": "b", "rejected": "c " * 12})  # long rejected: its own bin
    tok = load_tokenizer(str(asset_path("tokenizer")))
    want = []
    for r in records:
        pair = encode_dpo(r, tok, max_length=64)
        want.append(tuple((tuple(pair[s]["tokens"]), tuple(pair[s]["loss_mask"])) for s in ("chosen", "rejected")))
    batches = list(make_iterator(_pipeline_config(tmp_path, records, batch_size=1), task="dpo"))
    got = _pairs_of(batches)
    assert collections.Counter(got) == collections.Counter(want)  # every pair exactly once, both sides together
    assert len(batches) < len(records) and max(int(b["segment_ids"].max()) for b in batches) > 1
    for b in batches:  # no row overflows, so a pair that did not fit on both sides went to another bin
        assert (b["segment_ids"] > 0).sum(-1).max() <= 64


def packed_config(run_dir, base_model, packing, **overrides):
    config = dpo_config(run_dir, base_model, **overrides)  # rows of 128 hold 2-4 of the shipped pairs
    return dataclasses.replace(config, data=dataclasses.replace(config.data, packing=packing, max_length=128))


def test_precomputed_reference_joins_packed_pairs(base_model, tmp_path):
    live = packed_config(tmp_path / "live", base_model, "best_fit", max_steps=2)
    run_dpo(live)
    pre = dataclasses.replace(live, run_dir=str(tmp_path / "pre"), dpo=DpoArgs(reference="precomputed", reference_dtype="float32"))
    run_precompute_ref(pre)
    run_dpo(pre)
    a, b = _train_metrics(live.run_dir), _train_metrics(pre.run_dir)
    assert sorted(a) == sorted(b) == [1, 2] and a[1]["pairs"] > live.data.batch_size  # rows held several pairs
    for step in a:
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "pairs"):
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, atol=1e-6, err_msg=key)


def _train_metrics(run_dir):
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_packed_dpo_run_resumes_bit_identically(base_model, tmp_path):
    make = lambda run_dir, **kw: packed_config(run_dir, base_model, "first_fit", max_steps=4, **kw)  # noqa: E731
    run_dpo(make(tmp_path / "straight"))
    run_dpo(make(tmp_path / "cut", stop_after_steps=2))
    run_dpo(make(tmp_path / "cut"))
    want, got = _train_metrics(tmp_path / "straight"), _train_metrics(tmp_path / "cut")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    keys = ("loss", "grad_norm", "learning_rate", "trained_tokens", "tokens", "pairs", *losses.DPO_METRIC_KEYS)
    for step in want:
        assert {k: got[step][k] for k in keys} == {k: want[step][k] for k in keys}, f"step {step} differs"


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_a_packed_dpo_config_dry_runs(reference):
    """Packed pair-rows have the padded shapes; a precomputed reference arrives as [B, max_length // 2, 2]."""
    from jaxrlhf.config import load_config
    from jaxrlhf.train.run_config import DpoConfig

    config = load_config(DpoConfig, pathlib.Path(__file__).parent.parent / "configs" / "demo_dpo.yaml", [
        "--dry_run", "true", "--model.preset", "tiny", "--data.tokenizer", str(asset_path("tokenizer")),
        "--data.max_length", "64", "--data.packing", "first_fit", "--dpo.reference", reference,
        "--dry_run_devices", "0",
    ])  # fmt: skip
    report = run_dpo(config)
    ref_bytes = config.data.batch_size * 32 * 2 * 4 if reference == "precomputed" else 0  # f32 [B, 32, 2]
    assert report["batch"] * report["devices"] == config.data.batch_size * 2 * 64 * 4 * 4 + ref_bytes
