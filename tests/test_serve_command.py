"""`python -m jaxlens.serve`: it serves what it says, and fails like a Unix tool before loading."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import run_command

from jaxlens.serve import command

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_bad_port_is_bad_usage():
    result = run_command(command, "--port=70000")
    assert result.status == 2 and result.stderr.startswith("error: ") and "70000" in result.stderr


def test_a_taken_port_fails_before_the_model_loads():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_command(command, f"--port={port}", "--model=/no/such/model")
    assert result.status == 2
    assert result.stderr.splitlines()[0].startswith(f"error: Cannot listen on 127.0.0.1:{port}")


def test_a_missing_lens_is_bad_input(tiny_lm):
    result = run_command(command, f"--model={tiny_lm}", "--lens=/no/such/lens", "--port=0")
    assert result.status == 2 and "No lens directory at /no/such/lens" in result.stderr


@pytest.mark.parametrize(
    "choice, backend, flags, expected",
    [
        ("auto", "cpu", {"avx2", "fma"}, "float32"),  # bfloat16 emulated: slower than float32
        ("auto", "cpu", {"avx512f", "avx512_bf16"}, "bfloat16"),
        ("auto", "cpu", {"amx_tile", "amx_bf16"}, "bfloat16"),
        ("auto", "gpu", set(), "bfloat16"),
        ("auto", "tpu", set(), "bfloat16"),
        ("float32", "gpu", set(), "float32"),  # an explicit choice is kept
        ("bfloat16", "cpu", set(), "bfloat16"),
    ],
)
def test_auto_unembedding_dtype_is_bfloat16_only_where_the_hardware_multiplies_it(
    choice, backend, flags, expected
):
    assert command.unembed_dtype_for(choice, backend, frozenset(flags)) == expected


def _serve(cwd, *flags):
    """Starts the command as a user would; returns the process and the address it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxlens.serve", "--port=0", *flags],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in process.stdout:  # the note on the lenses, then the address
        lines.append(line)
        if line.startswith("Serving the explorer at "):
            return process, line.split()[4], lines
    process.wait(timeout=60)
    pytest.fail(f"the server did not start: {process.stderr.read()}")


def test_serves_the_demo_workdirs_tuned_lens_by_default(tiny_lm, trained_workdir, tmp_path):
    (tmp_path / "workdirs").mkdir()
    (tmp_path / "workdirs" / "demo").symlink_to(trained_workdir)
    process, url, lines = _serve(tmp_path, f"--model={tiny_lm}")
    try:
        assert url.startswith("http://127.0.0.1:")
        assert "tuned from workdirs/demo" in lines[0]
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            assert json.load(response)["lenses"] == ["logit", "tuned", "difference"]
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, not an error
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "Stopped." in out, err
