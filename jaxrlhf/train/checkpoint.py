"""Checkpoints with orbax: train state (params, optimizer, step, RNG) plus the data position.

The data position is the Grain iterator state *after the last batch the step
consumed* (the prefetcher records it per batch): saving the live iterator would
record batches that were prefetched but never trained on. It goes through Grain's
checkpoint handler, which writes one file per process, since every process reads,
drops and packs its own slice.

One ``CheckpointManager`` per run directory keeps the last N checkpoints, saves
every K steps asynchronously, and restores onto whatever mesh the abstract state
describes, so a run can resume on a different mesh shape. Each checkpoint also
holds a small JSON ``meta`` item (the run's length and the settings that give the
checkpoint its meaning), read before anything is built on resume.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import grain
import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass
class CheckpointConfig:
    save_every: int = 100
    """Save every N optimizer steps (and always at the end and on SIGTERM)."""
    keep: int = 3
    """How many checkpoints to keep."""
    async_save: bool = True
    resume: bool = True
    """Resume from the newest checkpoint in the run directory when there is one."""
    allow_config_change: bool = False
    """Resume even when settings that change what the checkpoint means (model, data, loss, optimizer) differ
    from the checkpoint's; micro_batches and the mesh may always change."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file system gone read-only...)."""


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (orbax wraps what its writer threads raise), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class Checkpointer:
    def __init__(self, directory: pathlib.Path, config: CheckpointConfig):
        self.config = config
        self.meta: dict | None = None  # written into every checkpoint once the run sets it
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self._directory = directory.absolute()
        self._manager = ocp.CheckpointManager(self._directory, options=options)

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def is_due(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write a checkpoint."""
        return self.config.save_every > 0 and step % self.config.save_every == 0

    def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
        """Save every ``save_every`` steps, or now with ``force``; a step already saved is skipped."""
        if not (force or self.is_due(step)) or step in self._manager.all_steps():
            return False
        args = {"state": ocp.args.StandardSave(state)}
        if self.meta is not None:
            args["meta"] = ocp.args.JsonSave(self.meta)
        if data_state is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_DataPosition(data_state))
        # The interval is decided above; orbax's own policy would also save the very first step.
        try:
            return self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            raise self._write_error(step, e) from None

    def _write_error(self, step: int | None, error: Exception) -> Exception:
        """One message for a failed write, naming the last complete checkpoint; other errors pass through."""
        cause = _os_error(error)
        if cause is None:
            return error
        self._failed = True
        complete = [s for s in self._manager.all_steps() if s != step]
        last = f"step {max(complete)}" if complete else "none"
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        return CheckpointWriteError(
            f"{what} could not be written to {self._directory} ({cause.strerror or cause}); the last complete "
            f"checkpoint is {last}: free space (or fix the file system) and re-run the command to resume from it"
        )

    def restore(self, step: int, abstract_state, *, with_data: bool = True):
        """Restore onto the shardings of ``abstract_state``; returns ``(state, data_state or None)``.

        ``with_data=False`` skips the data position (export, or another process count).
        """
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        position = None
        if with_data and (self._directory / str(step) / "data").exists():
            position = _DataPosition()
            args["data"] = grain.checkpoint.CheckpointRestore(position)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], None if position is None else position.state

    def saved_meta(self, step: int) -> dict | None:
        """The ``meta`` item of checkpoint ``step`` (None for checkpoints written without one)."""
        if not (self._directory / str(step) / "meta").exists():
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            already_reported = self._failed
            error = self._write_error(None, e)
            if not (already_reported and isinstance(error, CheckpointWriteError)):
                raise error from None
        finally:
            self._manager.close()


class _DataPosition:
    """A recorded iterator state in the shape Grain's checkpoint handler reads and writes (JSON bytes)."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Grain calls this after restoring; there is nothing to prefetch in a recorded state."""


def abstract_like(tree):
    """Shape, dtype and sharding of every array in ``tree``: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
