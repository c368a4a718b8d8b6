"""Compile-time memory of the LM-head log-probs: chunked vs full logits, value and gradient.

    python scripts/bench_logprob_memory.py                      # B=2, T=2048, D=256, V=32768
    python scripts/bench_logprob_memory.py --vocab 151936 --chunk_sizes "[256,1024]"

Memory comes from XLA's ``memory_analysis()`` of the compiled function (temporary
buffers, not counting inputs and outputs): deterministic, so it is also asserted
in tests/test_ops_logprobs.py. Nothing is executed, so large shapes are fine on CPU.
"""

import dataclasses

import draccus
import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from jaxrlhf.ops import logprobs


@dataclasses.dataclass
class BenchConfig:
    batch: int = 2
    length: int = 2048
    hidden: int = 256
    vocab: int = 32768
    chunk_sizes: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512, 1024])
    dtype: str = "float32"


def _temp_mib(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(cfg: BenchConfig) -> None:
    dtype = jnp.dtype(cfg.dtype)
    hidden = jax.ShapeDtypeStruct((cfg.batch, cfg.length, cfg.hidden), dtype)
    lm_head = jax.ShapeDtypeStruct((cfg.hidden, cfg.vocab), dtype)
    tokens = jax.ShapeDtypeStruct((cfg.batch, cfg.length), jnp.int32)

    def full(h, w, t):
        def loss(h, w):
            logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
            return logprobs.token_logprobs(logits, t).sum()

        return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

    full_mib = _temp_mib(full, hidden, lm_head, tokens)
    table = Table(
        title=f"log-probs + grad, B={cfg.batch} T={cfg.length} D={cfg.hidden} V={cfg.vocab} {cfg.dtype} "
        f"({jax.devices()[0].platform})"
    )
    for column in ("path", "temp MiB", "full / this"):
        table.add_column(column, justify="right")
    table.add_row("full logits", f"{full_mib:.1f}", "1.0x")
    for chunk in cfg.chunk_sizes:

        def chunked(h, w, t, chunk=chunk):
            def loss(h, w):
                return logprobs.chunked_token_logprobs(h, w, t, chunk_size=chunk).sum()

            return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

        mib = _temp_mib(chunked, hidden, lm_head, tokens)
        table.add_row(f"chunked, chunk_size={chunk}", f"{mib:.1f}", f"{full_mib / mib:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main(draccus.parse(BenchConfig))
