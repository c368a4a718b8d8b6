"""Test session setup: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so this module does it at
import time (pytest imports conftest.py before any test module).
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
_CACHE = pathlib.Path(os.environ.get("JAXRLHF_TEST_CACHE", pathlib.Path(__file__).parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests compile a few bucket shapes once; the first example may be slow.
settings.register_profile(
    "jaxrlhf",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("jaxrlhf")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """A tiny random Qwen2-style model with the shipped tokenizer, as a Hugging Face folder."""
    from jaxrlhf.commands.init_model import InitModelConfig, run_init_model

    return str(run_init_model(InitModelConfig(preset="tiny", out=str(tmp_path_factory.mktemp("base") / "tiny"))))
