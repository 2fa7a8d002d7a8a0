"""jaxlens.compile_cache: a program compiled by one process loads from disk in the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jaxlens import compile_cache

# Compiles one program, prints its value and how many programs came from the persistent cache.
_CHILD = """
import json, jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(event) if event.endswith("cache_hits") else None)
value = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(12.0).reshape(3, 4))
print(json.dumps({"value": value.tolist(), "hits": len(hits)}))
"""


def _child(env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = dict(os.environ, **compile_cache.environment(tmp_path / "xla"))
    first = _child(env)
    entries = sorted(p.name for p in (tmp_path / "xla").iterdir())
    second = _child(env)
    assert first["hits"] == 0 and entries
    assert second["hits"] >= 1
    assert second["value"] == first["value"]
    assert sorted(p.name for p in (tmp_path / "xla").iterdir()) == entries


def test_prune_deletes_the_oldest_entries_first(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (1e9 - age, 1e9 - age))
    assert compile_cache.prune(tmp_path, max_bytes=150) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["newest"]
    assert compile_cache.prune(tmp_path, max_bytes=150) == 0
    assert compile_cache.prune(tmp_path / "missing") == 0
