"""The largest arrays a compiled step materialises, read from its optimized HLO: what a dry run lists.

``memory_analysis()`` gives one number for the temporaries; this says which
arrays they are: every instruction outside fused computations (fusion internals
are never materialised) with an array shape, per device, largest first, named by
the JAX operation that made it (its ``op_name`` metadata).
"""

from __future__ import annotations

import math
import re

__all__ = ["largest_arrays"]

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\{[^}]*\} ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
# Views and loop plumbing: no buffer of their own.
_NOT_BUFFERS = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "reshape"}


def largest_arrays(hlo_text: str, count: int = 5) -> list[dict]:
    """``[{"bytes", "shape", "op"}]``: the ``count`` largest distinct arrays (shape and op), largest first."""
    found: dict[tuple[str, str], int] = {}
    skipping = False
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            skipping = header.group(1).startswith(("fused_", "wrapped_", "region_", "horizontally_fused"))
            continue
        instruction = _INSTRUCTION.match(line)
        if skipping or not instruction or instruction.group(3) in _NOT_BUFFERS:
            continue
        dtype, dims, _ = instruction.groups()
        if dtype not in _BYTES:
            continue
        size = math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
        op = _OP_NAME.search(line)
        key = (f"{dtype}[{dims}]", _short(op.group(1)) if op else "?")
        found[key] = max(found.get(key, 0), size)
    ranked = sorted(found.items(), key=lambda item: -item[1])[:count]
    return [{"bytes": size, "shape": shape, "op": op} for (shape, op), size in ranked]


def _short(op_name: str) -> str:
    """The last three parts of a JAX op path (``jit(step)/.../dot_product_attention/...``), without ``jit(...)``."""
    parts = [p for p in op_name.split("/") if not p.startswith(("jit(", "pjit"))]
    return "/".join(parts[-3:])
