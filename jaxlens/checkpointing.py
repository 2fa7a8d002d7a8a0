"""Saving and resuming a tuned-lens training run with Orbax (the only module that imports it).

A run's checkpoint directory (`workdir/"checkpoints"`) holds one Orbax step directory per saved
step: one item per array tree the caller names (training saves "translators", the lens, apart
from "optim", the step counter and optimizer state, so reading a lens needs no optimizer), each
in Orbax's standard pytree format; "extra", a small JSON dict the caller owns (the data
position); and "checksums", two 32-bit sums per array (`checksums`), because Orbax restores
flipped bits inside large arrays silently. A step that fails to read or to match its sums is
reported and `restore` falls back to the previous one. Beside the steps, `run_metadata.json`
(model, shapes, lens type), written once by process 0, lets a `Checkpointer` refuse checkpoints
of a different lens instead of resuming into the wrong shape or meaning. Every process calls
`save` and `restore` (Orbax coordinates hosts); saves are asynchronous until `wait` or `close`.
Opened without `metadata`, a Checkpointer only reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxlens.checksums import checksums_of

METADATA_FILENAME = "run_metadata.json"
# Metadata keys that may change between a run and its resumption without changing what the
# checkpoints mean (training longer is the usual reason to resume).
DEFAULT_FREE_KEYS = frozenset({"num_steps"})

logger = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """Existing checkpoints belong to a different lens than the one asked for."""


class CheckpointReadError(RuntimeError):
    """No checkpoint (or not the one asked for) could be read."""


ITEMS = ("translators", "optim")  # the array trees of a training checkpoint


class Checkpointer:
    """Periodic, pruned, resumable checkpoints of named array trees plus a JSON `extra` dict.

    Use as a context manager (or call `close`) so that the last asynchronous save completes.
    """

    def __init__(
        self,
        directory: epath.PathLike,
        *,
        metadata: Mapping[str, Any] | None = None,
        save_every: int = 1,
        keep: int = 1,
        items: Collection[str] = ITEMS,
        compare_keys: Collection[str] | None = None,
        free_keys: Collection[str] = DEFAULT_FREE_KEYS,
    ):
        """Opens (creating if needed) a checkpoint directory and checks it fits this run.

        Args:
            directory: where the step directories and `run_metadata.json` live; local or any
                path `etils.epath` understands (e.g. `gs://`).
            metadata: the run's fixed description, JSON-serialisable; None opens the directory
                for reading only (no check, nothing written, `save` refused).
            save_every: `save` writes a checkpoint at steps divisible by this (or when forced).
            keep: how many of the newest checkpoints to keep; older ones are deleted.
            items: the names of the array trees a step holds.
            compare_keys: the metadata keys that must match existing checkpoints; default: all
                keys of either side except `free_keys`.
            free_keys: keys that may differ when `compare_keys` is None.

        Raises:
            IncompatibleCheckpointError: the directory holds checkpoints of another lens.
        """
        if save_every < 1 or keep < 1:
            raise ValueError(
                f"save_every and keep must be at least 1; got save_every={save_every}, keep={keep}."
            )
        self._directory = epath.Path(directory)
        if not self._directory.is_absolute():  # Orbax rejects relative paths (--workdir=runs/x)
            self._directory = self._directory.absolute()
        self._save_every = save_every
        self._items = tuple(items)
        # A JSON round trip makes tuples and lists compare equal to what the file holds.
        self._metadata = (
            None if metadata is None else json.loads(_to_json(dict(metadata), "metadata"))
        )
        self._compare_keys = None if compare_keys is None else frozenset(compare_keys)
        self._free_keys = frozenset(free_keys)
        # Steps whose content belongs to this run: written by this object, or the one it
        # restored. Any other step at or after a step being saved comes from a different
        # trajectory (see `save`).
        self._own_steps: set[int] = set()
        # Unreadable steps newer than the one `restore` fell back to; deleted at the next save.
        self._unreadable_steps: set[int] = set()

        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in self._items:
            registry.add(item, ocp.args.StandardSave)
            registry.add(item, ocp.args.StandardRestore)
        for item in ("extra", "checksums"):
            registry.add(item, ocp.args.JsonSave)
            registry.add(item, ocp.args.JsonRestore)
        options = ocp.CheckpointManagerOptions(
            # `save` decides itself (and always forces), so that a step which is not a
            # multiple of `save_every`, e.g. the final one, is saved when asked.
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            # The run metadata is our own file, checked before anything is written.
            save_root_metadata=False,
        )
        if metadata is None and not self._directory.is_dir():
            raise CheckpointReadError(f"There is no checkpoint directory at {self._directory}.")
        self._manager = ocp.CheckpointManager(
            self._directory, options=options, handler_registry=registry
        )
        if metadata is None:
            return
        try:
            self.check_compatible()
        except IncompatibleCheckpointError:
            self._manager.close()
            raise
        if not self.all_steps() and jax.process_index() == 0:
            _write_atomically(self._directory / METADATA_FILENAME, _to_json(self._metadata))

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def check_compatible(self) -> None:
        """Raises if existing checkpoints were written for a different lens. Writes nothing.

        Raises:
            IncompatibleCheckpointError: naming each differing metadata field with both values.
        """
        steps = self.all_steps()
        if not steps:
            return
        path = self._directory / METADATA_FILENAME
        advice = f"Choose a new --workdir, or delete {self._directory} to start over."
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise IncompatibleCheckpointError(
                f"{self._directory} holds checkpoints (steps {steps}) but its {METADATA_FILENAME} "
                f"is missing or unreadable ({e}), so it cannot be checked against this run. "
                + advice
            ) from e
        keys = self._compare_keys
        if keys is None:
            keys = (stored.keys() | self._metadata.keys()) - self._free_keys
        missing = "<absent>"
        diffs = [
            f"  {key}: checkpoints have {stored.get(key, missing)!r}, "
            f"this run has {self._metadata.get(key, missing)!r}"
            for key in sorted(keys)
            if stored.get(key, missing) != self._metadata.get(key, missing)
        ]
        if diffs:
            raise IncompatibleCheckpointError(
                f"The checkpoints in {self._directory} (steps {steps}) belong to a different "
                "run:\n" + "\n".join(diffs) + "\n" + advice
            )

    def all_steps(self) -> list[int]:
        """The saved steps (including one still being written), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None if there is none."""
        return max(self.all_steps(), default=None)

    def save(
        self,
        step: int,
        arrays: Mapping[str, Any],
        extra: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving `arrays` and `extra` as `step` if it is due; returns whether it did.

        All processes must call this. The arrays are copied off the device before this returns,
        so they may be donated afterwards; the write finishes in the background.

        Args:
            step: the number of optimizer steps the arrays have taken.
            arrays: one pytree of arrays for each of the Checkpointer's `items`.
            extra: a JSON-serialisable dict restored alongside (e.g. the data position).
            force: save even if `step` is not a multiple of `save_every` (the final step).

        Returns:
            True if a save was started; False if `step` is not due, or was already saved by this
            run (a final save landing on a periodic one).

        Raises:
            ValueError: the directory holds a checkpoint at or after `step` from another run.
        """
        if self._metadata is None:
            raise ValueError(f"{self._directory} was opened for reading only (no metadata).")
        if set(arrays) != set(self._items):
            raise ValueError(f"save needs the items {self._items}; got {sorted(arrays)}.")
        if not force and step % self._save_every != 0:
            return False
        for bad in sorted(self._unreadable_steps & set(self.all_steps())):
            logger.warning("Deleting unreadable checkpoint step %d in %s.", bad, self._directory)
            self._manager.delete(bad)
        self._unreadable_steps.clear()
        if step in self._own_steps and step in self.all_steps():
            return False
        foreign = [s for s in self.all_steps() if s >= step and s not in self._own_steps]
        if foreign:
            raise ValueError(
                f"Cannot save step {step}: {self._directory} already holds steps {foreign} "
                "from another run, and mixing the two would resume the wrong one. Restore the "
                "latest step before training, or choose a new --workdir."
            )
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
                extra=ocp.args.JsonSave(json.loads(_to_json(dict(extra), "extra"))),
                checksums=ocp.args.JsonSave(checksums_of(arrays)),
            ),
            # Orbax's own policy would skip steps that are not after its latest one.
            force=True,
        )
        self._own_steps.add(step)
        return True

    def restore(
        self, abstract: Mapping[str, Any], step: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        """Restores the items named in `abstract`, placed and sharded as it asks.

        With `step=None`, tries the newest step first; an unreadable one (missing or truncated
        files, data that fails its checksum) is logged as a warning and the next older one is
        tried. All processes must call this.

        Args:
            abstract: for each item to read (any subset of `items`), its pytree of
                `jax.ShapeDtypeStruct`, each with the `sharding` the restored array should have
                (e.g. from `jax.eval_shape`); leaves without one go to the default device.
            step: the step to restore (no fallback), or None for the newest readable one.

        Returns:
            `(arrays, extra, step)`: the restored pytree of each item asked for, the `extra`
            dict saved with them, and their step.

        Raises:
            IncompatibleCheckpointError: the stored arrays' structure, shapes or dtypes differ
                from `abstract_state`.
            CheckpointReadError: there is no checkpoint, `step` does not exist or is
                unreadable, or no checkpoint is readable.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointReadError(f"There are no checkpoints in {self._directory}.")
        if step is not None and step not in steps:
            raise CheckpointReadError(
                f"There is no checkpoint at step {step} in {self._directory}; its steps are "
                f"{steps}."
            )
        candidates = [step] if step is not None else steps[::-1]
        failures, failed_steps = [], []
        for candidate in candidates:
            try:
                restored = self._restore_step(abstract, candidate)
            except IncompatibleCheckpointError:
                raise
            # Orbax and TensorStore report damage with many exception types (ValueError,
            # FileNotFoundError, KeyError, JSON errors...), so any failure here means unreadable.
            except Exception as e:
                reason = _short_reason(e)
                failures.append(f"step {candidate}: {reason}")
                failed_steps.append(candidate)
                if step is None:
                    logger.warning(
                        "Checkpoint step %d in %s is unreadable (%s); trying an older one.",
                        candidate,
                        self._directory,
                        reason,
                    )
                continue
            # Training resumes from `candidate`, so the unreadable newer steps are useless, and
            # would hide the new ones from `latest_step`; `save` deletes them.
            self._unreadable_steps = set(failed_steps)
            self._own_steps.add(candidate)
            return restored
        raise CheckpointReadError(
            f"No readable checkpoint in {self._directory}:\n  "
            + "\n  ".join(failures)
            + "\nDelete the damaged step directories to start over, or restore from a copy."
        )

    def _restore_step(self, abstract: Mapping[str, Any], step: int):
        unknown = set(abstract) - set(self._items)
        if unknown:
            raise ValueError(f"restore can read the items {self._items}; got {sorted(unknown)}.")
        item_metadata = self._manager.metadata(step).item_metadata
        stored = {}
        for name in abstract:
            stored[name] = None if item_metadata is None else item_metadata.get(name)
            if stored[name] is None:
                raise CheckpointReadError(f"the array metadata of {name!r} is missing")
        _check_shapes({k: v.tree for k, v in stored.items()}, abstract, self._directory, step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()},
                extra=ocp.args.JsonRestore(),
                checksums=ocp.args.JsonRestore(),
            ),
        )
        arrays = {name: restored[name] for name in abstract}
        actual = checksums_of(arrays)
        # Only the items read are checked; the others' sums stay in the file for their readers.
        stored_sums = {k: v for k, v in restored.checksums.items() if k.split("/")[0] in arrays}
        bad = sorted(
            k for k in actual.keys() | stored_sums.keys() if actual.get(k) != stored_sums.get(k)
        )
        if bad:
            raise CheckpointReadError(f"array data fails its checksum: {', '.join(bad)}")
        return arrays, dict(restored.extra), step

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_shapes(stored_items, abstract_items, directory: epath.Path, step: int):
    """Raises IncompatibleCheckpointError unless the stored arrays match `abstract_items`
    (`{item: pytree}` both), naming every array that does not fit.

    Orbax would refuse most shape mismatches too, but with a ValueError indistinguishable from
    damaged data, which `restore` would then skip over instead of reporting.
    """
    stored = ocp.tree.to_flat_dict(dict(stored_items))
    wanted = ocp.tree.to_flat_dict(dict(abstract_items))
    problems = [f"  {'.'.join(k)}: only in the checkpoint" for k in stored.keys() - wanted.keys()]
    problems += [f"  {'.'.join(k)}: not in the checkpoint" for k in wanted.keys() - stored.keys()]
    for key in stored.keys() & wanted.keys():
        have, want = stored[key], wanted[key]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            problems.append(
                f"  {'.'.join(key)}: stored {np.dtype(have.dtype).name}{list(have.shape)}, "
                f"expected {np.dtype(want.dtype).name}{list(want.shape)}"
            )
    if problems:
        raise IncompatibleCheckpointError(
            f"Checkpoint step {step} in {directory} does not fit the state being restored:\n"
            + "\n".join(sorted(problems))
            + "\nRestore with the configuration the run was started with, or choose a new "
            "--workdir."
        )


def _to_json(value: dict[str, Any], name: str = "value") -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(
            f"The checkpoint's {name} must be JSON-serialisable (str, int, float, bool, None, "
            f"lists and dicts): {e}. Convert arrays with .tolist() or int()."
        ) from e


def _write_atomically(path: epath.Path, text: str) -> None:
    """Writes via a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _short_reason(e: BaseException) -> str:
    """The exception's type and first line, cut short (TensorStore appends a long JSON spec)."""
    first_line = (str(e).strip().splitlines() or [""])[0]
    if len(first_line) > 300:
        first_line = first_line[:300] + "..."
    return f"{type(e).__name__}: {first_line}"
