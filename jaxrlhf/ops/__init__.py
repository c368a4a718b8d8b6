"""Pure math on arrays: target-aligned log-probs and the SFT/DPO losses.

The innermost room of the package: nothing here imports from the rest of jaxrlhf.
"""

from jaxrlhf.ops import logprobs, losses

__all__ = ["logprobs", "losses"]
