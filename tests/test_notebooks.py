"""The Colab notebooks run top to bottom (on a tiny model) and are stored with outputs cleared."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "trajectories", "export_to_pytorch"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_with_outputs_cleared(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def notebook_env(tiny_lm, text_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("notebooks") / "run"
    return {
        "JAXLENS_NOTEBOOK_MODEL": str(tiny_lm),
        "JAXLENS_NOTEBOOK_TEXT": str(text_dir),
        "JAXLENS_NOTEBOOK_WORKDIR": str(workdir),
    }


# The quickstart trains the lens that the other two then use, so it runs first.
@pytest.mark.parametrize("name", ["quickstart", "trajectories", "export_to_pytorch"])
def test_notebook_runs(name, notebook_env, monkeypatch, tmp_path):
    for key, value in notebook_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(REPO / "colab" / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors


def test_install_cells_and_colab_badges_name_the_published_repository():
    import re

    import tomllib

    url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    owner_name = url.removeprefix("https://github.com/")
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        install = nbformat.read(path, as_version=4).cells[1].source
        assert f'JAXLENS_PIP_SPEC = "git+{url}"' in install, path.name
        badge = f"colab.research.google.com/github/{owner_name}/blob/main/colab/{path.name}"
        assert badge in readme, path.name
    assert not re.findall(r"colab\.research\.google\.com/github/(?!" + owner_name + ")", readme)
