"""Precomputed reference log-probs: equal to the live reference, and stale ones are refused."""

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from jaxrlhf.data import DatasetConfig
from jaxrlhf.train.reference import StaleReference, pair_keys
from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.commands.precompute_ref import run_precompute_ref
from jaxrlhf.train.run_config import DpoArgs, LoraArgs
from train_fixtures import dpo_config

pytestmark = pytest.mark.slow

COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")


def metrics(run_dir):
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in COMPARED} for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]


def test_precomputed_reference_dpo_equals_live_reference_dpo(base_model, tmp_path):
    live = dpo_config(tmp_path / "live", base_model, max_steps=4, eval_every=2)
    run_dpo(live)
    pre = dataclasses.replace(live, run_dir=str(tmp_path / "pre"), dpo=DpoArgs(reference="precomputed", reference_dtype="float32"))
    folder = run_precompute_ref(pre)
    assert folder == tmp_path / "pre" / "ref_logps"
    run_dpo(pre)
    (live_train, live_eval), (pre_train, pre_eval) = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    assert len(live_train) == len(pre_train) == 4
    for a, b in zip(live_train, pre_train):
        for key in COMPARED:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(live_eval, pre_eval):
        np.testing.assert_allclose(b["eval/loss"], a["eval/loss"], rtol=1e-5)


def test_a_qlora_runs_precomputed_reference_is_its_quantized_base(base_model, tmp_path):
    """Precomputed for a QLoRA policy, the reference is the base as training holds it (nf4), adapters off: the
    first step's policy (B = 0) equals it, so the loss is ln 2 and the margins 0 (the float base would differ)."""
    pre = dpo_config(tmp_path / "pre", base_model, max_steps=2, dpo=DpoArgs(reference="precomputed"))
    pre = dataclasses.replace(
        pre, model=dataclasses.replace(pre.model, lora=LoraArgs(rank=4, alpha=8.0, weight_qtype="nf4"))
    )
    run_precompute_ref(pre)
    run_dpo(pre)
    first = metrics(tmp_path / "pre")[0][0]
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)


def test_changed_model_tokenizer_or_data_is_refused(base_model, tmp_path):
    pre = dpo_config(tmp_path / "pre", base_model, max_steps=2, dpo=DpoArgs(reference="precomputed"))
    run_precompute_ref(pre)
    # A different max_length encodes different pairs.
    with pytest.raises(StaleReference, match="encoding settings"):
        run_dpo(dataclasses.replace(pre, data=dataclasses.replace(pre.data, max_length=40)))
    # Plain strings tokenized whole instead of split at the prompt encode other tokens.
    with pytest.raises(StaleReference, match="encoding settings"):
        run_dpo(dataclasses.replace(pre, data=dataclasses.replace(pre.data, string_boundary="whole")))
    # The same model folder with other weights.
    changed = tmp_path / "changed_model"
    shutil.copytree(base_model, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StaleReference, match="reference model"):
        run_dpo(dataclasses.replace(pre, model=dataclasses.replace(pre.model, path=str(changed))))
    # New records that were never precomputed.
    extra = tmp_path / "extra.jsonl"
    extra.write_text(
        "".join(
            json.dumps({"prompt": f"new prompt {i}", "chosen": "yes.", "rejected": "NO!"}) + "\n" for i in range(16)
        )
    )
    new_data = dataclasses.replace(pre.data, train=[DatasetConfig(paths=[str(extra)])], eval_fraction=0.0)
    with pytest.raises(StaleReference, match="missing from the precomputed reference"):
        run_dpo(dataclasses.replace(pre, data=new_data))


def test_pair_keys_ignore_padding_and_see_the_mask():
    tokens = np.array([[[5, 6, 7, 0], [5, 6, 8, 0]]], np.int32)
    mask = np.array([[[0, 1, 1, 0], [0, 1, 1, 0]]], np.int32)
    seg = np.array([[[1, 1, 1, 0], [1, 1, 1, 0]]], np.int32)
    key = pair_keys({"tokens": tokens, "loss_mask": mask, "segment_ids": seg})
    padded_differently = tokens.copy()
    padded_differently[..., 3] = 9
    assert np.array_equal(key, pair_keys({"tokens": padded_differently, "loss_mask": mask, "segment_ids": seg}))
    other_mask = mask.copy()
    other_mask[0, 0, 1] = 0
    assert not np.array_equal(key, pair_keys({"tokens": tokens, "loss_mask": other_mask, "segment_ids": seg}))
