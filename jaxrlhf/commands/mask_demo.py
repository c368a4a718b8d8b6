"""`jaxrlhf demo`: the loss-mask bugs real projects shipped, computed their way and ours.

Three cases, each on a fixed toy sequence with seeded random logits:

1. OpenRLHF (issue #973): the dataset marks ``loss_mask[prompt_len:-1] = 1`` on
   the input tokens, then the loss applies ``loss_mask[:, :-1]`` to log-probs of
   the *next* tokens. The first response token is never trained.
2. MiniMind (issues #416, #636): the mask covers ``range(start + 1, end + len(eos) + 1)``
   and is then aligned to the labels: the first answer token is dropped and the
   token after ``<|im_end|>`` (a newline or pad) is trained instead.
3. DPO with chosen == rejected: the loss is exactly ln 2 = 0.6931 and its
   gradient is zero, whatever the model does.

The buggy variants below are reproductions of the other projects' index
arithmetic and exist only to be shown next to ours.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jaxrlhf.ops import logprobs, losses


@dataclasses.dataclass
class DemoConfig:
    """Settings of ``jaxrlhf demo``."""

    seed: int = 0
    """Seed of the random logits the losses are computed on."""
    beta: float = 0.1
    """DPO beta for the identical-pair case."""


@dataclasses.dataclass(frozen=True)
class MaskCase:
    title: str
    pieces: tuple[str, ...]
    ours: tuple[int, ...]
    theirs: tuple[int, ...]
    explanation: str


def openrlhf_case() -> MaskCase:
    pieces = ("Hello", ",", " World", " !", "<eot>")
    prompt_len = 1
    dataset_mask = np.zeros(len(pieces), np.int32)
    dataset_mask[prompt_len:-1] = 1
    # Their loss multiplies log p(token[t+1]) by dataset_mask[t]: in token-indexed
    # terms the mask moves one step to the right.
    theirs = np.concatenate([[0], dataset_mask[:-1]])
    ours = np.array([0, 1, 1, 1, 1], np.int32)
    return MaskCase(
        "OpenRLHF: prompt 'Hello', response ', World !' + EOS",
        pieces,
        tuple(ours),
        tuple(theirs),
        "loss_mask[prompt_len:-1] on inputs, then loss_mask[:, :-1] on shifted log-probs: ',' is never trained",
    )


def minimind_case() -> MaskCase:
    pieces = (
        "<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n",
        "<|im_start|>", "assistant", "\n", "Hello", " there", "<|im_end|>", "\n", "<pad>",
    )  # fmt: skip
    start = 9  # first answer token, right after "<|im_start|>assistant\n"
    end = 11  # the answer's "<|im_end|>"
    theirs = np.zeros(len(pieces), np.int32)
    theirs[start + 1 : end + 1 + 1] = 1
    ours = np.zeros(len(pieces), np.int32)
    ours[start : end + 1] = 1
    return MaskCase(
        "MiniMind: ChatML answer 'Hello there' + <|im_end|>",
        pieces,
        tuple(ours),
        tuple(theirs),
        "mask over range(start + 1, end + len(eos) + 1): 'Hello' dropped, the '\\n' after <|im_end|> trained",
    )


def _mask_table(case: MaskCase, token_lp: np.ndarray) -> Table:
    table = Table(title=case.title, title_justify="left")
    table.add_column("t", justify="right")
    table.add_column("token")
    table.add_column("log p(token | prefix)", justify="right")
    table.add_column("their mask", justify="center")
    table.add_column("our mask", justify="center")
    for t, (piece, theirs, ours) in enumerate(zip(case.pieces, case.theirs, case.ours)):
        style = "bold red" if theirs != ours else ""
        lp = "-" if t == 0 else f"{token_lp[t]:.3f}"
        table.add_row(str(t), repr(piece), lp, str(theirs), str(ours), style=style)
    return table


def _run_mask_case(console: Console, case: MaskCase, key: jax.Array) -> None:
    vocab = sorted(set(case.pieces))
    tokens = jnp.asarray([[vocab.index(p) for p in case.pieces]], jnp.int32)
    logits = 3.0 * jax.random.normal(key, (1, tokens.shape[1], len(vocab)))
    token_lp = logprobs.token_logprobs(logits, tokens)
    ours = jnp.asarray([case.ours], jnp.int32)
    theirs = jnp.asarray([case.theirs], jnp.int32)
    our_loss, our_metrics = losses.sft_loss(token_lp, ours)
    their_loss, their_metrics = losses.sft_loss(token_lp, theirs)
    console.print(_mask_table(case, np.asarray(token_lp[0])))
    console.print(f"  their bug: {escape(case.explanation)}")
    console.print(
        f"  trained targets: theirs {int(their_metrics['trained_tokens'])}, ours {int(our_metrics['trained_tokens'])}"
        f"   loss: theirs {float(their_loss):.4f}, ours {float(our_loss):.4f}\n"
    )


def _run_identical_pairs(console: Console, key: jax.Array, beta: float) -> None:
    pair_logps = -jnp.abs(10.0 * jax.random.normal(key, (4,)))
    ref_logps = pair_logps - 0.5

    def loss_of(policy_chosen, policy_rejected):
        return losses.dpo_loss(policy_chosen, policy_rejected, ref_logps, ref_logps, beta=beta)[0]

    loss, (grad_chosen, grad_rejected) = jax.value_and_grad(loss_of, argnums=(0, 1))(pair_logps, pair_logps)
    console.print("[bold]DPO with chosen == rejected[/bold] (4 pairs, random log-probs)")
    console.print(
        f"  loss {float(loss):.4f} (ln 2 = {math.log(2):.4f}); gradient: chosen {np.asarray(grad_chosen).round(4)}, "
        f"rejected {np.asarray(grad_rejected).round(4)}\n"
        "  the two gradients cancel in every shared token: the policy cannot move. "
        "The data layer refuses such pairs by default (on_identical_pairs: error)."
    )


def run(config: DemoConfig) -> None:
    console = Console()
    console.rule("jaxrlhf demo: loss masks indexed by the token they are about")
    keys = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    _run_mask_case(console, openrlhf_case(), keys[0])
    _run_mask_case(console, minimind_case(), keys[1])
    _run_identical_pairs(console, keys[2], config.beta)
