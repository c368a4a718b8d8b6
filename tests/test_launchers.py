"""The launch scripts: the TPU pod launcher's gcloud calls (recorded by a fake gcloud) and a GPU-host dry run."""

import os
import pathlib
import stat
import subprocess
import sys

from jaxrlhf.data import asset_path

SCRIPTS = pathlib.Path(__file__).parent.parent / "scripts"


def fake_gcloud(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$GCLOUD_LOG"\necho --- >> "$GCLOUD_LOG"\n')
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(tmp_path / "gcloud.log")}


def test_tpu_pod_run_starts_the_command_on_every_worker(tmp_path):
    env = fake_gcloud(tmp_path)
    subprocess.run(
        [SCRIPTS / "launch_tpu_pod.sh", "run", "my-pod", "us-east5-a", "my-project", "--",
         "sft", "--config_path", "configs/llama3-8b_sft_tpu_v5p.yaml", "--optim.learning_rate", "2e-5"],
        env=env, check=True,
    )  # fmt: skip
    args = (tmp_path / "gcloud.log").read_text().split("\n")
    assert args[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone", "us-east5-a", "--project"]
    assert "--worker=all" in args
    command = args[args.index("--command") + 1]
    assert command == (
        "cd ~/jaxrlhf && .venv/bin/jaxrlhf sft --config_path configs/llama3-8b_sft_tpu_v5p.yaml "
        "--optim.learning_rate 2e-5 --distributed.force true"
    )


def test_tpu_pod_setup_copies_and_installs_on_every_worker(tmp_path):
    env = fake_gcloud(tmp_path)
    subprocess.run([SCRIPTS / "launch_tpu_pod.sh", "setup", "my-pod", "us-east5-a"], env=env, check=True)
    calls = (tmp_path / "gcloud.log").read_text().split("---\n")
    assert calls[0].split("\n")[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in calls[0] and "--worker=all" in calls[1]
    assert "pip install -q -e '.[tpu]'" in calls[1]


def test_tpu_pod_usage_error_without_a_command(tmp_path):
    result = subprocess.run(
        [SCRIPTS / "launch_tpu_pod.sh", "run", "my-pod", "us-east5-a"], env=fake_gcloud(tmp_path), capture_output=True
    )
    assert result.returncode == 2 and b"launch_tpu_pod.sh" in result.stderr


def test_gpu_host_launcher_runs_jaxrlhf_with_its_settings(tmp_path):
    result = subprocess.run(
        [SCRIPTS / "launch_gpu_host.sh", "sft", "--config_path", str(SCRIPTS.parent / "configs/demo_sft.yaml"),
         "--dry_run", "true", "--dry_run_devices", "2", "--model.preset", "tiny",
         "--data.tokenizer", str(asset_path("tokenizer")), "--mesh.fsdp", "-1"],
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
             "JAXRLHF": str(pathlib.Path(sys.executable).parent / "jaxrlhf")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memory per device" in result.stdout
    assert "'fsdp': 2" in result.stdout
