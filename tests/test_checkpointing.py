"""Checkpointing with real Orbax on temporary directories and training's real state.

The state is jaxlens's `TrainState` with the default optimizer (tuned-lens's SGD recipe), for a
bank of 3 translators of width 8, with random values in the translators and in the optimizer's
momentum (so a mix-up between the two would show), saved as training saves it: the items
"translators" and "optim". Corruption tests damage files inside Orbax's step directory layout
(`<step>/translators/.../d/*` holds the arrays, `<step>/extra/metadata` the JSON item), the way
a full disk or an interrupted copy would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.checkpointing import (
    METADATA_FILENAME,
    Checkpointer,
    CheckpointReadError,
    IncompatibleCheckpointError,
)
from jaxlens.lens import Translators
from jaxlens.optim import make_optimizer
from jaxlens.step import TrainState

# When a read fails, Orbax closes its asyncio loop while TensorStore still completes the other
# reads, whose callbacks then report "Event loop is closed" from a background thread. It is noise
# (the failure itself is what `restore` handles), but pytest would warn about it in whichever test
# is running when the thread gets to it.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)

METADATA = {
    "model": "tiny-llama",
    "num_layers": 3,
    "d_model": 8,
    "vocab_size": 32,
    "bias": True,
    "lens_type": "linear_tuned_lens",
    "seq_len": 16,
    "num_steps": 100,
}


def make_state(seed: int, d: int = 8) -> dict:
    """A random `TrainState` as checkpoint items (what training saves)."""
    # numpy's generator, not jax.random: compiling jax.random for each shape costs seconds here.
    rng = np.random.default_rng(seed)

    def normal(x):
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

    optimizer, _ = make_optimizer(num_steps=100)
    state = TrainState.create(Translators.zeros(3, d), optimizer)
    state = TrainState(jnp.int32(seed), *jax.tree.map(normal, (state.translators, state.opt_state)))
    return state.checkpoint_items()


def abstract(state, shardings=None):
    """The `ShapeDtypeStruct` tree `restore` takes; shardings default to the arrays' own."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (x.dtype, x.shape) == (y.dtype, y.shape)
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def checkpointer(directory, metadata=METADATA, **kwargs) -> Checkpointer:
    kwargs = {"save_every": 2, "keep": 3, **kwargs}
    return Checkpointer(directory, metadata=metadata, **kwargs)


def save_steps(directory, steps, d: int = 8, **kwargs):
    with checkpointer(directory, **kwargs) as ckpt:
        for step in steps:
            assert ckpt.save(step, make_state(step, d), {"data": {"position": 10 * step}})


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        )
        for p in sorted(directory.rglob("*"))
    }


def test_round_trip_is_bitwise_exact(tmp_path):
    state = make_state(1)
    extra = {"data": {"position": 1234, "seed": 0, "num_chunks": 99}}
    with checkpointer(tmp_path, save_every=10) as ckpt:
        assert ckpt.save(10, state, extra)
    with checkpointer(tmp_path, save_every=10) as ckpt:
        assert ckpt.latest_step() == 10
        restored, restored_extra, step = ckpt.restore(abstract(state))
    assert step == 10
    assert restored_extra == extra
    assert isinstance(TrainState.from_checkpoint_items(restored), TrainState)
    assert isinstance(restored["translators"].kernel_ldd, jax.Array)
    assert_bitwise_equal(restored, state)
    assert json.loads((tmp_path / METADATA_FILENAME).read_text()) == METADATA


def test_the_lens_reads_back_without_the_optimizer(tmp_path):
    """A read-only Checkpointer restores the translators item alone: no optimizer, no metadata."""
    state = make_state(7)
    save_steps(tmp_path, [2])
    with checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state, {})
    with Checkpointer(tmp_path) as reader:
        arrays, _, step = reader.restore({"translators": abstract(state)["translators"]})
        with pytest.raises(ValueError, match="opened for reading only"):
            reader.save(6, state, {})
    assert step == 4 and list(arrays) == ["translators"]
    assert_bitwise_equal(arrays["translators"], state["translators"])


def test_reading_a_directory_that_is_not_there(tmp_path):
    with pytest.raises(CheckpointReadError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "missing")


def test_a_relative_directory_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_steps("checkpoints", [2])
    with checkpointer("checkpoints") as ckpt:
        assert ckpt.directory == tmp_path / "checkpoints"
        restored, _, _ = ckpt.restore(abstract(make_state(0)))
    assert_bitwise_equal(restored, make_state(2))


def test_saves_every_n_steps_and_keeps_the_last_k(tmp_path):
    with checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        saved = [s for s in range(1, 10) if ckpt.save(s, make_state(s), {"s": s})]
        assert saved == [2, 4, 6, 8]
        assert ckpt.save(9, make_state(9), {"s": 9}, force=True)  # the final step
        ckpt.wait()
        assert ckpt.all_steps() == [8, 9]
        assert ckpt.latest_step() == 9
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [8, 9]
    with checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        restored, extra, step = ckpt.restore(abstract(make_state(0)), step=8)
    assert (step, extra) == (8, {"s": 8})
    assert_bitwise_equal(restored, make_state(8))


def test_saving_a_step_twice_keeps_the_first(tmp_path):
    with checkpointer(tmp_path) as ckpt:
        assert ckpt.save(10, make_state(1), {"s": 1})
        # A final save landing on a periodic one.
        assert not ckpt.save(10, make_state(2), {"s": 2}, force=True)
    # A rerun of a finished run resumes at its last step and saves it again.
    with checkpointer(tmp_path) as ckpt:
        restored, extra, step = ckpt.restore(abstract(make_state(0)))
        assert not ckpt.save(step, restored, extra, force=True)
    assert (step, extra) == (10, {"s": 1})
    assert_bitwise_equal(restored, make_state(1))


def test_saving_behind_another_runs_checkpoints_is_refused(tmp_path):
    save_steps(tmp_path, [2, 4])
    with checkpointer(tmp_path) as ckpt:
        ckpt.restore(abstract(make_state(0)), step=2)
        with pytest.raises(ValueError, match=r"already holds steps \[4\] from another run"):
            ckpt.save(4, make_state(5), {})
        assert ckpt.all_steps() == [2, 4]


def test_incompatible_metadata_is_refused_and_the_directory_untouched(tmp_path):
    save_steps(tmp_path, [2])
    before = snapshot(tmp_path)
    assert issubclass(IncompatibleCheckpointError, ValueError)

    with pytest.raises(IncompatibleCheckpointError) as err:
        checkpointer(tmp_path, metadata={**METADATA, "d_model": 16, "num_layers": 4})
    message = str(err.value)
    assert "d_model: checkpoints have 8, this run has 16" in message
    assert "num_layers: checkpoints have 3, this run has 4" in message
    assert "--workdir" in message and str(tmp_path) in message
    assert "num_steps" not in message and "seq_len" not in message

    # A field that only one side has differs too.
    with pytest.raises(
        IncompatibleCheckpointError, match="rope_theta: checkpoints have '<absent>'"
    ):
        checkpointer(tmp_path, metadata={**METADATA, "rope_theta": 10000.0})
    # With an explicit key set, only those keys count.
    with pytest.raises(IncompatibleCheckpointError, match="bias: checkpoints have True"):
        checkpointer(tmp_path, metadata={**METADATA, "bias": False}, compare_keys={"bias"})
    assert snapshot(tmp_path) == before

    # Free keys may change: resuming to train longer is allowed, and keeps the stored metadata.
    with checkpointer(tmp_path, metadata={**METADATA, "num_steps": 500}) as ckpt:
        assert ckpt.latest_step() == 2
    with checkpointer(tmp_path, metadata={**METADATA, "seq_len": 32}, compare_keys={"d_model"}):
        pass
    assert snapshot(tmp_path) == before

    # Checkpoints without the run description cannot be checked, so they are refused too.
    (tmp_path / METADATA_FILENAME).unlink()
    before = snapshot(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match=METADATA_FILENAME):
        checkpointer(tmp_path)
    assert snapshot(tmp_path) == before


def test_shape_mismatch_is_reported_not_skipped(tmp_path, caplog):
    save_steps(tmp_path, [2, 4])
    with checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
        with pytest.raises(IncompatibleCheckpointError) as err:
            ckpt.restore(abstract(make_state(0, d=16)))
    assert "translators.kernel_ldd: stored float32[3, 8, 8], expected float32[3, 16, 16]" in (
        str(err.value)
    )
    assert "step 4" in str(err.value)
    assert not caplog.records  # an incompatible lens is not a damaged checkpoint


def corrupt(step_dir: pathlib.Path, how: str) -> None:
    array_files = sorted(p for p in (step_dir / "translators").rglob("d/*") if p.is_file())
    assert array_files, f"Orbax's layout changed: no array data files under {step_dir}"
    if how == "truncate_arrays":
        for path in array_files:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete_extra":
        (step_dir / "extra" / "metadata").unlink()
    elif how == "flip_array_bit":
        # Orbax stores large arrays' chunks without a checksum and restores a flipped bit
        # silently; only the Checkpointer's own checksum catches it.
        path = max(array_files, key=lambda p: p.stat().st_size)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate_arrays", "delete_extra", "flip_array_bit"])
def test_unreadable_latest_falls_back_to_the_previous(tmp_path, caplog, how):
    d = 64  # big enough that Orbax stores the arrays' data outside its checksummed index
    save_steps(tmp_path, [2, 4, 6], d=d)
    corrupt(tmp_path / "6", how)
    with checkpointer(tmp_path) as ckpt:
        with caplog.at_level(logging.WARNING, logger="jaxlens.checkpointing"):
            restored, extra, step = ckpt.restore(abstract(make_state(0, d)))
        assert (step, extra) == (4, {"data": {"position": 40}})
        assert_bitwise_equal(restored, make_state(4, d))
        [record] = [r for r in caplog.records if r.name == "jaxlens.checkpointing"]
        assert record.levelno == logging.WARNING
        assert "step 6" in record.getMessage() and "unreadable" in record.getMessage()
        if how == "flip_array_bit":
            assert "checksum" in record.getMessage()
        # Training goes on from step 4; reaching step 6 again replaces the damaged checkpoint.
        assert ckpt.save(6, make_state(66, d), {"s": 66})
    with checkpointer(tmp_path) as ckpt:
        restored, extra, step = ckpt.restore(abstract(make_state(0, d)))
    assert (step, extra) == (6, {"s": 66})
    assert_bitwise_equal(restored, make_state(66, d))


def test_no_readable_checkpoint_raises(tmp_path):
    with checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointReadError, match="no checkpoints"):
            ckpt.restore(abstract(make_state(0)))
    save_steps(tmp_path, [2, 4])
    corrupt(tmp_path / "4", "delete_extra")
    with checkpointer(tmp_path) as ckpt:
        # An explicitly requested step does not fall back.
        with pytest.raises(CheckpointReadError, match="step 4: FileNotFoundError"):
            ckpt.restore(abstract(make_state(0)), step=4)
        with pytest.raises(CheckpointReadError, match=r"its steps are \[2, 4\]"):
            ckpt.restore(abstract(make_state(0)), step=3)
    corrupt(tmp_path / "2", "truncate_arrays")
    with checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointReadError, match="No readable checkpoint") as err:
            ckpt.restore(abstract(make_state(0)))
    assert "step 4:" in str(err.value) and "step 2:" in str(err.value)


_SHARDED_SCRIPT = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, sys.argv[2])
import test_checkpointing as t

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("model",))

def shard(state, specs_by_ndim):
    return jax.tree.map(lambda x: NamedSharding(mesh, specs_by_ndim[x.ndim]), state)

state = t.make_state(3)
saved_specs = {0: P(), 2: P(None, "model"), 3: P(None, None, "model")}
saved = jax.device_put(state, shard(state, saved_specs))
with t.checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(2, saved, {"data": {"position": 7}})

# Restore with a different layout than the one saved.
wanted = shard(state, {0: P(), 2: P(), 3: P(None, "model", None)})
with t.checkpointer(sys.argv[1]) as ckpt:
    restored, extra, step = ckpt.restore(t.abstract(state, wanted))
assert (step, extra) == (2, {"data": {"position": 7}})
t.assert_bitwise_equal(restored, state)
for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(wanted), strict=True):
    assert x.sharding == s, (x.sharding, s)
kernel = restored["translators"].kernel_ldd
assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 2, 8)}
print("OK")
"""


def test_restore_places_arrays_on_a_4_device_mesh(tmp_path):
    # The device count is fixed when jax starts, so the 4-device mesh lives in its own process.
    repo = pathlib.Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path), str(pathlib.Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-5000:]
