"""JAX's persistent compilation cache in the jaxlens cache directory.

XLA compiles every jitted program once per process; on a small CPU most of a short job's time
(and of the test suite's) is that compilation. The persistent cache keeps compiled executables on
disk, keyed by the program, its shardings, the devices, the XLA flags and the jax/jaxlib versions,
so an identical program in a later process loads instead of compiling. A stale entry cannot be
used: any change of program or environment changes the key.

`environment(directory)` gives the settings as environment variables, which JAX reads when it is
imported and which child processes inherit; `enable(directory)` also applies them to this
process's JAX. JAX's own size bound is left off: with it, every write lists and stats the whole
directory under a file lock (a suite's 3,000 entries cost a minute of system time). `prune` keeps
the directory bounded instead, oldest entries first, when no job is compiling. Without the lock, a
process can find an entry another is still writing; JAX then fails to decompress it, warns, and
compiles the program itself.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

MAX_BYTES = 2**30  # what `prune` keeps by default


def _settings(directory: os.PathLike | str) -> dict[str, str | int | float]:
    """JAX's option names and values. Every program is cached, however fast it compiled or small
    it is: the many small programs of a short job add up."""
    return {
        "jax_compilation_cache_dir": str(pathlib.Path(directory)),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
    }


def environment(directory: os.PathLike | str) -> dict[str, str]:
    """The environment variables that turn the cache on at `directory`."""
    return {name.upper(): str(value) for name, value in _settings(directory).items()}


def enable(directory: os.PathLike | str) -> None:
    """Caches compiled programs at `directory`, in this process and in the processes it starts.

    Call it before the first compilation.
    """
    import jax

    os.environ.update(environment(directory))
    for name, value in _settings(directory).items():
        jax.config.update(name, value)


def prune(directory: os.PathLike | str, max_bytes: int = MAX_BYTES) -> int:
    """Deletes the oldest entries of the cache at `directory` until it holds at most `max_bytes`.

    Returns:
      the number of files deleted.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return 0
    entries = []
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = 0
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        deleted += 1
    return deleted
