"""Hub lenses by name, offline: tuned-lens's Space layout, the community layout, float16, and the
not-found and gated errors, through huggingface_hub's real code.

Each scenario runs `jaxlens.load_lens` / `list_hub_lenses` in a fresh process whose environment
is what a user would set: `HF_HUB_OFFLINE=1` with `HF_HUB_CACHE` pointing at a cache laid out as
huggingface_hub writes it, or `HF_ENDPOINT` pointing at a hub stand-in on 127.0.0.1 (real HTTP
round trips: the errors are raised where huggingface_hub raises them). The lenses are made here
with `jaxlens.save_lens`, and what loads is compared with what was saved.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tiny_models
from hub_fakes import FakeHub, write_cached_repo

import jaxlens
from jaxlens import hub_lenses
from jaxlens.models import load_model

REPO = pathlib.Path(__file__).resolve().parents[1]
SPACE = ("space", "AlignmentResearch/tuned-lens")

_PROBE = r"""
import json, sys
import numpy as np
import jaxlens
spec = json.load(sys.stdin)
model = jaxlens.load_model(spec["model"])
out = {}
for name, case in spec["cases"].items():
    try:
        if case.get("list"):
            out[name] = {"lenses": jaxlens.list_hub_lenses()}
        else:
            lens = jaxlens.load_lens(case["source"], model, revision=case.get("revision"))
            out[name] = {"kernel": np.asarray(lens.translators.kernel_ldd).tolist()}
    except Exception as error:
        out[name] = {"error": str(error), "type": type(error).__name__}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny GPT-2 and its lens files, float32 and float16: {dtype: {file name: bytes}}."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = tiny_models.save(tiny_models.build("gpt2", seed=7), root / "model")
    model = load_model(model_dir)
    translators = tiny_models.random_translators(model.num_layers, model.d_model, seed=4)
    files = {}
    for dtype in ("float32", "float16"):
        out = jaxlens.save_lens(root / dtype, translators, model, dtype=dtype)
        files[dtype] = {name: (out / name).read_bytes() for name in ("config.json", "params.pt")}
    return model_dir, np.asarray(translators.kernel_ldd), files


def _probe(model_dir, cases, env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TUNED_LENS_"))}
    env.update(env_changes, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        input=json.dumps({"model": str(model_dir), "cases": cases}),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def offline(made, tmp_path_factory):
    model_dir, _, files = made
    cache = tmp_path_factory.mktemp("hf_cache")
    space_files = {f"lens/tiny-gpt2/{name}": data for name, data in files["float32"].items()}
    write_cached_repo(cache, SPACE[1], "space", space_files)
    write_cached_repo(cache, SPACE[1], "space", space_files, revision="v1")
    write_cached_repo(cache, "someone/tiny-gpt2-lens", "model", files["float32"])
    write_cached_repo(cache, "someone/tiny-gpt2-lens-fp16", "model", files["float16"])
    cases = {
        "space": {"source": "tiny-gpt2"},
        "space_v1": {"source": "tiny-gpt2", "revision": "v1"},
        "community": {"source": "someone/tiny-gpt2-lens"},
        "float16": {"source": "someone/tiny-gpt2-lens-fp16"},
        "missing": {"source": "someone/nothing-here"},
        "missing_revision": {"source": "tiny-gpt2", "revision": "v2"},
        "list": {"list": True},
    }
    home = tmp_path_factory.mktemp("hf_home")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(home)}
    return _probe(model_dir, cases, env), cache


def test_a_space_lens_loads_by_id_offline(made, offline):
    _, kernel, _ = made
    results, _ = offline
    np.testing.assert_array_equal(results["space"]["kernel"], kernel)
    np.testing.assert_array_equal(results["space_v1"]["kernel"], kernel)


def test_a_community_lens_loads_by_repository_id(made, offline):
    _, kernel, _ = made
    np.testing.assert_array_equal(offline[0]["community"]["kernel"], kernel)


def test_a_float16_lens_loads_as_its_float16_values(made, offline):
    _, kernel, _ = made
    got = np.asarray(offline[0]["float16"]["kernel"])
    np.testing.assert_array_equal(got, kernel.astype(np.float16).astype(np.float32))


def test_not_found_names_every_place_tried(offline):
    results, cache = offline
    error = results["missing"]
    assert error["type"] == "FileNotFoundError"
    lines = error["error"].splitlines()
    assert lines[0] == (
        "'someone/nothing-here' is not a local lens directory. No lens 'someone/nothing-here' "
        "found on the Hugging Face hub. Tried:"
    )
    reason = f"not in the local cache ({cache}), and HF_HUB_OFFLINE is set"
    assert lines[1:] == [
        "  - space AlignmentResearch/tuned-lens, lens/someone/nothing-here/ (revision main): "
        + reason,
        "  - model someone/nothing-here, its top folder (revision main): " + reason,
    ]
    assert "(revision v2): not in the local cache" in results["missing_revision"]["error"]


def test_listing_offline_reads_the_cache(offline):
    assert offline[0]["list"] == {"lenses": ["tiny-gpt2"]}


def test_online_the_same_code_downloads_and_maps_gated_and_missing(made, tmp_path):
    model_dir, kernel, files = made
    repos = {
        SPACE: {"files": {f"lens/tiny-gpt2/{n}": d for n, d in files["float32"].items()}},
        ("model", "someone/online-lens"): {"files": files["float16"]},
        ("model", "gated-org/gated-lens"): {"gated": True, "files": files["float32"]},
    }
    cases = {
        "community": {"source": "someone/online-lens"},
        "gated": {"source": "gated-org/gated-lens"},
        "missing": {"source": "nobody/missing"},
        "list": {"list": True},
    }
    with FakeHub(repos) as hub:
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(tmp_path / "cache"),
            "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        results = _probe(model_dir, cases, env)
    got = np.asarray(results["community"]["kernel"])
    np.testing.assert_array_equal(got, kernel.astype(np.float16).astype(np.float32))
    assert "GET /someone/online-lens/resolve/main/params.pt" in hub.requests
    gated = results["gated"]["error"].splitlines()
    assert gated[1].endswith(
        "the repository has no lens/gated-org/gated-lens/params.pt or config.json"
    )
    assert gated[2] == (
        "  - model gated-org/gated-lens, its top folder (revision main): the repository is gated: "
        f"accept its conditions at {hub.url}/gated-org/gated-lens, then log in "
        "(`hf auth login`, or set HF_TOKEN)"
    )
    missing = results["missing"]["error"].splitlines()
    assert missing[2].endswith("no such repository (or it is private: log in to reach it)")
    assert results["list"] == {"lenses": ["tiny-gpt2"]}


def test_the_lens_repository_follows_tuned_lens_environment(monkeypatch):
    monkeypatch.delenv("TUNED_LENS_REPO_ID", raising=False)
    monkeypatch.delenv("TUNED_LENS_REPO_TYPE", raising=False)
    assert hub_lenses.lens_repository() == ("AlignmentResearch/tuned-lens", "space")
    monkeypatch.setenv("TUNED_LENS_REPO_ID", "me/my-lenses")
    monkeypatch.setenv("TUNED_LENS_REPO_TYPE", "model")
    assert [(p.repo_id, p.repo_type, p.subfolder) for p in hub_lenses.locations("a/b")] == [
        ("me/my-lenses", "model", "lens/a/b"),
        ("a/b", "model", None),
    ]
    # tuned-lens itself resolves to the same place.
    from tuned_lens import load_artifacts

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return "x"

    monkeypatch.setattr(load_artifacts, "hf_hub_download", record)
    load_artifacts.load_lens_artifacts("a/b")
    assert (seen["repo_id"], seen["repo_type"], seen["subfolder"]) == (
        "me/my-lenses",
        "model",
        "lens/a/b",
    )
