"""The Colab notebooks run top to bottom (on a tiny model) and are stored with outputs cleared."""

import os
import pathlib
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {
        "quickstart",
        "trajectories",
        "export_to_pytorch",
        "explore",
        "causal_fidelity",
    } <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_with_outputs_cleared(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def notebook_env(tiny_lm, text_dir):
    """The tiny model and text; and no torch: only the export notebook, which checks its file
    with tuned-lens, needs PyTorch (it sets USE_TORCH back)."""
    return {
        "JAXLENS_NOTEBOOK_MODEL": str(tiny_lm),
        "JAXLENS_NOTEBOOK_TEXT": str(text_dir),
        "USE_TORCH": "0",
    }


def _run(name: str, env: dict, monkeypatch, tmp_path) -> nbformat.NotebookNode:
    """Executes a notebook; a failing cell raises CellExecutionError with its traceback."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(REPO / "colab" / f"{name}.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    return notebook


def _text(notebook) -> str:
    return "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )


def test_quickstart_trains_and_shows_the_evaluation(notebook_env, monkeypatch, tmp_path):
    env = {**notebook_env, "JAXLENS_NOTEBOOK_WORKDIR": str(tmp_path / "run")}
    notebook = _run("quickstart", env, monkeypatch, tmp_path)
    assert "mean KL to the model's output: tuned" in _text(notebook)
    assert (tmp_path / "run" / "eval.png").is_file()
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, "the evaluation plot is not shown"


def test_trajectories_draws_the_trained_lens(notebook_env, trained_workdir, monkeypatch, tmp_path):
    env = {**notebook_env, "JAXLENS_NOTEBOOK_LENS": str(trained_workdir)}
    notebook = _run("trajectories", env, monkeypatch, tmp_path)
    assert "TunedLens" in _text(notebook)  # not the logit lens it falls back to
    assert (tmp_path / "trajectory.png").is_file() and (tmp_path / "trajectory.html").is_file()


def test_explore_draws_the_heat_map_of_the_tuned_lens(
    notebook_env, trained_workdir, monkeypatch, tmp_path
):
    env = {**notebook_env, "JAXLENS_NOTEBOOK_LENS": str(trained_workdir)}
    notebook = _run("explore", env, monkeypatch, tmp_path)
    assert "('logit', 'tuned', 'difference')" in _text(notebook)
    pages = [
        o["data"]["text/html"]
        for c in notebook.cells
        for o in c.get("outputs", [])
        if "text/html" in o.get("data", {})
    ]
    assert len(pages) == 1 and "jaxlensHeatmap.render(" in pages[0]
    assert '"lens":"tuned","statistic":"entropy"' in pages[0]


def test_export_to_pytorch_agrees_with_tuned_lens(
    notebook_env, trained_workdir, monkeypatch, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    notebook = _run(
        "export_to_pytorch",
        {**notebook_env, "JAXLENS_NOTEBOOK_WORKDIR": str(workdir), "USE_TORCH": "1"},
        monkeypatch,
        tmp_path,
    )
    assert "largest relative difference over all layers" in _text(notebook)
    assert (workdir / "lens" / "params.pt").is_file()


def test_install_cells_and_colab_badges_name_the_published_repository():
    import re

    import tomllib

    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    owner_name = url.removeprefix("https://github.com/")
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        install = nbformat.read(path, as_version=4).cells[1].source
        assert f'JAXLENS_PIP_SPEC = "git+{url}"' in install, path.name
        assert 'f"jax=={jax.__version__}"' in install, path.name  # the runtime's jax is kept
        badge = f"colab.research.google.com/github/{owner_name}/blob/main/colab/{path.name}"
        assert badge in readme, path.name
    assert not re.findall(r"colab\.research\.google\.com/github/(?!" + owner_name + ")", readme)


def test_causal_fidelity_ablates_the_lens_basis_in_the_model(
    notebook_env, trained_workdir, monkeypatch, tmp_path
):
    env = {**notebook_env, "JAXLENS_NOTEBOOK_LENS": str(trained_workdir)}
    notebook = _run("causal_fidelity", env, monkeypatch, tmp_path)
    text = _text(notebook)
    assert "TunedLens" in text  # the trained lens, not the logit lens it falls back to
    assert "Spearman correlation of lens and model responses over 16 directions" in text
    assert (tmp_path / "causal_fidelity.png").is_file()
    # Its last cell asserts that the lens responses equal the energies (relative 1e-3), that the
    # rank correlation is finite and that causal directions move the model more than random
    # ones; a failed assertion fails the run above, and this line that the cell ran at all.
    assert "causal-fidelity checks passed" in text
