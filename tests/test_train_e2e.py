"""End-to-end training on 8 fake CPU devices: learning, exact resume, SIGTERM, export, mesh change."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.config import dump_config
from jaxrlhf.data import make_iterator
from jaxrlhf.models import load_hf, make_logprob_fn
from jaxrlhf.parallel.mesh import MeshConfig
from jaxrlhf.train.checkpoint import CheckpointConfig
from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.commands.export import ExportConfig, run_export
from jaxrlhf.commands.sft import run_sft
from train_fixtures import dpo_config, sft_config

pytestmark = pytest.mark.slow

# Everything derived from the loss; timings differ between runs by nature.
LOSS_DERIVED = ("loss", "grad_norm", "learning_rate", "trained_tokens", "tokens", "rewards/chosen",
                "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")  # fmt: skip


def train_metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSS_DERIVED if k in r} for r in rows if "loss" in r}


def eval_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


@pytest.mark.parametrize("algo", ["sft_packed", "dpo_padded"])
def test_resume_is_bit_identical(algo, base_model, tmp_path):
    make, run = (sft_config, run_sft) if algo == "sft_packed" else (dpo_config, run_dpo)
    straight = make(tmp_path / "straight", base_model)
    run(straight)
    interrupted = make(tmp_path / "interrupted", base_model, stop_after_steps=3)
    first = run(interrupted)
    assert first["step"] == 3 and (tmp_path / "interrupted" / "checkpoints" / "3").exists()
    second = run(dataclasses.replace(interrupted, stop_after_steps=0))
    assert second["step"] == 6
    want, got = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "interrupted")
    assert sorted(want) == sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == want[step], f"step {step} differs after resume"


def test_restore_onto_a_different_mesh(base_model, tmp_path):
    config = sft_config(tmp_path / "run", base_model, stop_after_steps=3, mesh=MeshConfig(data=1, fsdp=8, tensor=1))
    run_sft(config)
    run_sft(dataclasses.replace(config, stop_after_steps=0, mesh=MeshConfig(data=2, fsdp=2, tensor=2)))
    straight = sft_config(tmp_path / "straight", base_model)
    run_sft(straight)
    want, got = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "run")
    for step in range(4, 7):  # different reductions: equal up to float rounding, not bitwise
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-4)


def test_sft_learns_and_export_matches_transformers(base_model, tmp_path):
    config = sft_config(tmp_path / "sft", base_model, max_steps=40, eval_every=20, eval_at_start=True, export=True)
    summary = run_sft(config)
    evals = eval_rows(tmp_path / "sft")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["eval/loss"] < 0.75 * evals[0]["eval/loss"], evals

    # The exported folder loads in transformers and gives the trained model's log-probs.
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(summary["export"], dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        logits = hf_model(torch.tensor(tokens)).logits.double()
    hf_lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.tensor(tokens)[:, 1:, None])[..., 0].numpy()
    ours, _ = load_hf(summary["export"], dtype=jnp.float32)
    graphdef, params = nnx.split(ours)
    ones = jnp.ones(tokens.shape, jnp.int32)
    token_lp = make_logprob_fn(graphdef)(params, jnp.asarray(tokens), jnp.cumsum(ones, 1) - 1, ones)
    np.testing.assert_allclose(np.asarray(token_lp)[:, 1:], hf_lp, atol=1e-4)

    # `jaxrlhf export` of the last checkpoint writes the same weights.
    out = run_export(ExportConfig(run_dir=str(tmp_path / "sft"), out=str(tmp_path / "exported")))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(), hf_model(torch.tensor(tokens)).logits.numpy())


def test_dpo_learns_the_preference(base_model, tmp_path):
    config = dpo_config(tmp_path / "dpo", base_model, max_steps=30, eval_every=15, eval_at_start=True)
    run_dpo(config)
    evals = eval_rows(tmp_path / "dpo")
    np.testing.assert_allclose(evals[0]["eval/loss"], np.log(2), rtol=1e-5)  # policy == reference at step 0
    assert evals[-1]["eval/rewards/accuracies"] >= 0.8, evals[-1]
    assert evals[-1]["eval/loss"] < 0.6


def test_sigterm_saves_and_exits_cleanly(base_model, tmp_path):
    config = sft_config(tmp_path / "run", base_model, max_steps=10_000, checkpoint=CheckpointConfig(save_every=0))
    dump_config(config, tmp_path / "run.yaml")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxrlhf.cli", "sft", "--config_path", str(tmp_path / "run.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reason"] == "preempted"
    assert (tmp_path / "run" / "checkpoints" / str(summary["step"])).exists()
    assert 3 <= summary["step"] < 10_000


def test_epochs_are_counted_so_the_schedule_ends_with_the_data(base_model, tmp_path):
    config = sft_config(tmp_path / "run", base_model, max_steps=0)
    config.data.num_epochs = 2
    config.data.batch_size = 32
    one_pass = sum(1 for _ in make_iterator(dataclasses.replace(config.data, num_epochs=1), task="sft", split="train"))
    summary = run_sft(config)
    assert summary["reason"] == "done" and summary["step"] == 2 * one_pass
    rows = train_metrics(tmp_path / "run")
    # Cosine decay to 0 reaches its end exactly at the last step.
    assert rows[2 * one_pass]["learning_rate"] < 0.05 * config.optim.learning_rate
