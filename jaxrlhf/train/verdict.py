"""Does a dry-run plan fit its device? Known accelerators' memory, the verdict, and the settings that fit.

The plan is XLA's for the devices it was compiled on: on fake CPU devices that is
XLA:CPU's, not the TPU's or GPU's (other fusions, other layouts), so a plan must
leave ``dry_run_headroom`` (10% by default) of the device free to count as fitting.
When it does not fit, a few candidate settings are compiled, cheapest first (more
micro-batches, then each remat policy in ``REMAT_ORDER``, then full remat with more
micro-batches), and the first that fits is the way out.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf.config import ConfigError

GIB = 2**30

# Memory per device, GiB.
ACCELERATORS: dict[str, float] = {
    "h100": 80, "h200": 141, "a100-40gb": 40, "a100-80gb": 80, "b200": 180,
    "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32, "laptop-cpu": 16,
}  # fmt: skip
_PARTS = ("parameters", "frozen", "optimizer", "reference", "batch", "temporaries")
_MAX_CANDIDATES = 10


class PlanDoesNotFit(RuntimeError):
    """The dry run's plan needs more memory than the device has (``report`` holds the plan)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Budget:
    device: str
    bytes: int


def budget_of(config) -> Budget | None:
    """The device the plan is judged against: --dry_run_device_memory_gib, --dry_run_device, else `hardware`."""
    if config.dry_run_device_memory_gib > 0:
        return Budget(f"{config.dry_run_device_memory_gib:g} GiB device", int(config.dry_run_device_memory_gib * GIB))
    name = (config.dry_run_device or config.hardware).lower()
    if not name:
        return None
    if name not in ACCELERATORS:
        raise ConfigError(f"unknown device {name!r} (hardware / --dry_run_device); known: {', '.join(ACCELERATORS)}")
    return Budget(f"{name} ({ACCELERATORS[name]:g} GiB)", int(ACCELERATORS[name] * GIB))


def platform_of(config) -> str:
    """tpu | gpu | cpu: the platform of the device the plan is for (--dry_run_device, else `hardware`; none: cpu)."""
    name = (config.dry_run_device or config.hardware).lower()
    if name.startswith("tpu"):
        return "tpu"
    return "gpu" if name in ACCELERATORS and not name.endswith("cpu") else "cpu"


def _needed(report: dict) -> int:
    return max(report["total"], report.get("eval_total", 0))


@dataclasses.dataclass(frozen=True)
class Verdict:
    fits: bool
    needed: int
    usable: int
    budget: Budget
    headroom: float
    contributors: tuple[tuple[str, int], ...]

    @property
    def word(self) -> str:
        return "fits" if self.fits else "does not fit"

    @property
    def line(self) -> str:
        head = (
            f"verdict: {self.word} on {self.budget.device}: {self.needed / GIB:.1f} GiB per device of "
            f"{self.usable / GIB:.1f} GiB usable ({self.headroom:.0%} of the device kept free: a CPU plan is not "
            "the accelerator's own)"
        )
        if self.fits:
            return head
        biggest = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in self.contributors[:3])
        return f"{head}; biggest: {biggest}"

    def summary(self, ways_out: list[str]) -> str:
        way = ways_out[0] if ways_out else "no setting tried fits (more devices, or a shorter data.max_length)"
        return f"the plan does not fit {self.budget.device}: {self.needed / GIB:.1f} GiB per device; {way}"

    def as_dict(self) -> dict:
        return {"device": self.budget.device, "bytes": self.budget.bytes, "usable": self.usable, "needed": self.needed}


def judge(report: dict, budget: Budget, headroom: float) -> Verdict:
    usable = int(budget.bytes * (1 - headroom))
    contributors = sorted(((k, report[k]) for k in _PARTS), key=lambda kv: -kv[1])
    if report.get("eval_total", 0) > report["total"]:
        contributors.insert(0, ("eval temporaries", report["eval_temporaries"]))
    needed = _needed(report)
    return Verdict(needed <= usable, needed, usable, budget, headroom, tuple(contributors))


# Remat policies from least to most recomputation (models.decoder), then full remat.
REMAT_ORDER = ("dots_with_no_batch_dims_saveable", "dots_saveable", "save_attention_out_mlp_in", "full")


def _candidates(config, data_parallel: int):
    """Settings to try, cheapest first: 2, 4, 8 times the micro-batches; each remat policy (REMAT_ORDER);
    full remat with 2, 4, 8 times the micro-batches."""
    batch = config.data.batch_size

    def valid(micro: int) -> bool:
        return micro <= batch and batch % micro == 0 and (batch // micro) % data_parallel == 0

    micros = [config.micro_batches * 2**k for k in range(4)]
    tries = [(m, config.model.remat) for m in micros[1:]]
    tries += [(config.micro_batches, remat) for remat in REMAT_ORDER if remat != config.model.remat]
    if config.model.remat != "full":
        tries += [(m, "full") for m in micros[1:]]
    return [(m, remat) for m, remat in tries if valid(m)]


def ways_out(config, task: str, report: dict, budget: Budget, *, plan_fn) -> list[str]:
    """Compile a few candidate settings; the first that fits, as a line to print (empty when none does)."""
    data_parallel = report["mesh"]["data"] * report["mesh"]["fsdp"]
    for tried, (micro, remat) in enumerate(_candidates(config, data_parallel)):
        if tried >= _MAX_CANDIDATES:
            break
        candidate = dataclasses.replace(
            config, micro_batches=micro, model=dataclasses.replace(config.model, remat=remat)
        )
        try:
            planned = plan_fn(candidate, task)
        except ValueError:  # a setting the config checks refuse (e.g. eval rows)
            continue
        verdict = judge(planned, budget, config.dry_run_headroom)
        if verdict.fits:
            changes = [f"micro_batches: {micro}"] if micro != config.micro_batches else []
            changes += [f"model.remat: {remat}"] if remat != config.model.remat else []
            return [f"{', '.join(changes)} ({verdict.needed / GIB:.1f} GiB per device)"]
    return []
