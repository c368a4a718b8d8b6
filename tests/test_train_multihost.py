"""Two JAX processes (4 CPU devices each, gloo) train DPO steps like one process with 8 devices.

DPO only: SFT runs the same multi-host path (per-process data slices, global
batch assembly, checkpoints, evaluation), and DPO adds the pair axis and an eval
split that does not divide over the processes; one case keeps CI inside its time.

Each process reads its own contiguous slice of the data, so the single-process
reference reads a file whose records are interleaved block by block to give it
the very same global batches (no shuffling, padded rows). The two-process run is
interrupted and resumed half-way (each process restores its own data position),
and DPO evaluates on an eval file that does not split evenly over the processes.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxrlhf.config import dump_config
from jaxrlhf.data import DatasetConfig, asset_path
from train_fixtures import dpo_config

pytestmark = pytest.mark.slow

STEPS, GLOBAL_BATCH = 3, 8
COMPARED = ("loss", "grad_norm", "trained_tokens", "tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_files(tmp_path, source):
    records = [json.loads(line) for line in source.read_text().splitlines()][: 2 * STEPS * GLOBAL_BATCH]
    half, local = len(records) // 2, GLOBAL_BATCH // 2
    interleaved = []
    for step in range(STEPS):
        interleaved += records[step * local : (step + 1) * local]  # process 0's rows of this step
        interleaved += records[half + step * local : half + (step + 1) * local]  # process 1's rows
    sharded, single = tmp_path / "sharded.jsonl", tmp_path / "single.jsonl"
    sharded.write_text("".join(json.dumps(r) + "\n" for r in records))
    single.write_text("".join(json.dumps(r) + "\n" for r in interleaved))
    return sharded, single


def configure(make, tmp_path, name, base_model, data_file, eval_file=None):
    config = make(tmp_path / name, base_model, max_steps=STEPS, eval_every=2 if eval_file else 0)
    config.data.train = [DatasetConfig(paths=[str(data_file)])]
    config.data.eval = [DatasetConfig(paths=[str(eval_file)])] if eval_file else []
    config.data.eval_fraction = 0.0
    config.data.shuffle = False
    config.data.packing = "none"
    config.data.batch_size = GLOBAL_BATCH
    path = tmp_path / f"{name}.yaml"
    dump_config(config, path)
    return path


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in COMPARED} for r in rows if "loss" in r]


def eval_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


def launch(task, config_path, *, processes, devices, extra=()):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "jaxrlhf.cli", task, "--config_path", str(config_path), *extra]
    if processes == 1:
        commands = [base]
    else:
        port = free_port()
        commands = [
            base
            + ["--distributed.coordinator_address", f"127.0.0.1:{port}", "--distributed.num_processes", str(processes),
               "--distributed.process_id", str(i)]  # fmt: skip
            for i in range(processes)
        ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def test_two_processes_match_one(base_model, tmp_path):
    task, make = "dpo", dpo_config
    sharded, single = write_files(tmp_path, asset_path(f"{task}.jsonl"))
    # 7 eval pairs: 4 + 3 over two processes, padded with a filler pair
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(asset_path("dpo.jsonl").read_text().splitlines(keepends=True)[-7:]))
    two = configure(make, tmp_path, "two", base_model, sharded, eval_file)
    launch(task, two, processes=2, devices=4, extra=["--stop_after_steps", "2"])
    launch(task, two, processes=2, devices=4)
    launch(task, configure(make, tmp_path, "one", base_model, single, eval_file), processes=1, devices=8)
    two_rows, one_rows = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    assert len(two_rows) == len(one_rows) == STEPS
    for a, b in zip(two_rows, one_rows):
        for key in COMPARED:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    assert (tmp_path / "two" / "checkpoints" / str(STEPS)).exists()
    two_eval, one_eval = eval_rows(tmp_path / "two"), eval_rows(tmp_path / "one")
    assert [r["eval/pairs"] for r in two_eval] == [7.0] * len(one_eval)
    for a, b in zip(two_eval, one_eval):
        np.testing.assert_allclose(a["eval/loss"], b["eval/loss"], rtol=1e-5)
        np.testing.assert_allclose(a["eval/rewards/margins"], b["eval/rewards/margins"], rtol=1e-4, atol=1e-6)
