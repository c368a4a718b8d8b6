"""Model FLOPs of the SFT and DPO train steps, and accelerator peaks, for MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B): training costs, per token,

    6 * N + 12 * L * H * Q * T

FLOPs, where N counts the parameters that multiply activations (every layer's
attention and MLP matrices plus the LM head, tied or not; the embedding lookup is
no matmul, norms and biases are negligible; a MoE layer counts its router and
the top-k experts a token visits, not all experts), L is the number of layers, H of query
heads, Q the head dimension and T the sequence length. 2N is the forward's
multiply-adds, the backward costs twice the forward; 4·L·H·Q·T is the forward's
``Q K^T`` and ``A V`` over the full T x T (causal masking is not discounted, nor
are sliding windows). A forward pass alone costs a third: ``2N + 4·L·H·Q·T``.

Per optimizer step of a batch of B sequences of length T:

- SFT: ``B·T`` tokens trained.
- DPO: ``B/2`` pairs, so ``B·T`` policy tokens trained (chosen + rejected), plus the
  frozen reference's forward over the same tokens (none when its log-probs were
  precomputed).

These are *model* FLOPs: recomputation (``remat``, the chunked LM head redoing
its logits in the backward) is not counted, so MFU never rewards doing more work.
"""

from __future__ import annotations

from jaxrlhf.models.config import ModelConfig

__all__ = [
    "PEAK_BF16_FLOPS",
    "matmul_params",
    "forward_flops_per_token",
    "train_flops_per_token",
    "sft_step_flops",
    "dpo_step_flops",
    "peak_flops",
    "mfu",
]

# Dense (no sparsity) bf16 peak FLOP/s per chip, by ``jax.Device.device_kind`` (which is also
# ``torch.cuda.get_device_name()``). Vendor data sheets: NVIDIA H100/H200, Google Cloud TPU.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100 NVL": 835.0e12,
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA H200 NVL": 835.0e12,
    "TPU v4": 275.0e12,
    "TPU v5 lite": 197.0e12,  # v5e
    "TPU v5e": 197.0e12,
    "TPU v5": 459.0e12,  # v5p
    "TPU v5p": 459.0e12,
    "TPU v6 lite": 918.0e12,  # v6e (Trillium)
}


def matmul_params(config: ModelConfig) -> int:
    """N: parameters that multiply an activation once per token (layers' matrices + LM head). A MoE layer's
    are those a token meets: the router and its top-k experts."""
    d, h, kv, q, f = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    attention = d * h * q + 2 * d * kv * q + h * q * d  # q, k, v, o projections
    mlp = 3 * d * f  # gate, up, down
    layers = config.num_layers * (attention + mlp)
    if config.is_moe:
        moe_layers = config.num_layers - len(config.dense_mlp_layers)
        moe = d * config.num_experts + config.num_experts_per_tok * 3 * d * config.moe_intermediate_size
        layers += moe_layers * (moe - mlp)
    return layers + d * config.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token at sequence length ``seq_len``: ``2N + 4·L·H·Q·T``."""
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 2 * matmul_params(config) + attention


def train_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per token: ``6N + 12·L·H·Q·T``."""
    return 3 * forward_flops_per_token(config, seq_len)


def sft_step_flops(config: ModelConfig, batch: int, seq_len: int) -> int:
    """One SFT step on ``batch`` sequences of ``seq_len`` tokens."""
    return batch * seq_len * train_flops_per_token(config, seq_len)


def dpo_step_flops(config: ModelConfig, pairs: int, seq_len: int, *, reference: bool) -> int:
    """One DPO step on ``pairs`` (chosen, rejected) pairs; ``reference``: a frozen reference runs in the step."""
    tokens = 2 * pairs * seq_len
    per_token = train_flops_per_token(config, seq_len)
    if reference:
        per_token += forward_flops_per_token(config, seq_len)
    return tokens * per_token


def peak_flops(device_kind: str) -> float | None:
    """bf16 peak FLOP/s of one chip of ``device_kind`` from ``PEAK_BF16_FLOPS``; None if unknown (e.g. CPU)."""
    return PEAK_BF16_FLOPS.get(device_kind.strip())


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved ``flops / seconds`` as a fraction of ``peak`` FLOP/s."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"seconds and peak must be positive, got {seconds} and {peak}")
    return flops / seconds / peak
