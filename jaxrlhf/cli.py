"""The ``jaxrlhf`` command: ``jaxrlhf COMMAND [--config_path X.yaml] [--dotted.key value ...]``.

Each command is a typed config class and a function that runs it, in its own
module of ``jaxrlhf.commands``; adding a command is adding a row to
``COMMANDS``. Modules are imported lazily so that ``jaxrlhf --help`` does not
pay for jax.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, config class, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("jaxrlhf.commands.demo", "DemoConfig", "run", "SFT then DPO of a tiny model on CPU, showing that it learned"),
    "mask-demo": ("jaxrlhf.commands.mask_demo", "DemoConfig", "run", "the loss-mask bugs other projects shipped, side by side with ours"),
    "sft": ("jaxrlhf.commands.sft", "SftConfig", "run_sft", "supervised fine-tuning of a Hugging Face model folder"),
    "dpo": ("jaxrlhf.commands.dpo", "DpoConfig", "run_dpo", "direct preference optimisation (every TRL loss type)"),
    "kto": ("jaxrlhf.commands.kto", "KtoConfig", "run_kto", "KTO on examples labelled desirable or undesirable"),
    "precompute-ref": ("jaxrlhf.commands.precompute_ref", "DpoConfig", "run_precompute_ref", "reference log-probs of a DPO run's pairs, stored once"),
    "export": ("jaxrlhf.commands.export", "ExportConfig", "run_export", "a run's checkpoint -> Hugging Face folder"),
    "init-model": ("jaxrlhf.commands.init_model", "InitModelConfig", "run_init_model", "a random model of a preset shape as a HF folder"),
    "inspect-data": ("jaxrlhf.commands.inspect_data", "InspectConfig", "run", "encoded examples token by token, and data statistics"),
    "bench": ("jaxrlhf.commands.bench", "BenchConfig", "run", "step time, MFU and memory vs full logits and PyTorch (BENCHMARKS.md)"),
    "generate": ("jaxrlhf.commands.generate", "GenerateConfig", "run_generate", "chat completions from a run's checkpoint or a model folder (KV cache)"),
    "plot": ("jaxrlhf.commands.plot", "PlotConfig", "run_plot", "PNG curves of a run's metrics.jsonl into <run_dir>/plots"),
}


def _usage() -> str:
    lines = ["usage: jaxrlhf COMMAND [--config_path FILE.yaml] [--key.subkey VALUE ...]", "", "commands:"]
    lines += [f"  {name:<14} {entry[3]}" for name, entry in COMMANDS.items()]
    lines += ["", "`jaxrlhf COMMAND --help` lists every option of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxrlhf.config import ConfigError, parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jaxrlhf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, config_name, run_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    try:
        config = parse_config(getattr(module, config_name), rest, prog=f"jaxrlhf {name}")
    except ConfigError as e:
        print(f"jaxrlhf {name}: {e}", file=sys.stderr)
        return 2
    try:
        result = getattr(module, run_name)(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad data or settings, a missing folder, a diverged run: the message says what and where.
        # JAXRLHF_TRACEBACK=1 shows the traceback too, for bug reports.
        if os.environ.get("JAXRLHF_TRACEBACK"):
            raise
        print(f"jaxrlhf {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
