"""The package's shape: the public API, light imports, no import cycles, modules of one size."""

import ast
import pathlib
import subprocess
import sys

import jaxlens

PACKAGE = pathlib.Path(jaxlens.__file__).parent
MAX_MODULE_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """The jaxlens modules `name` imports, at the top or inside functions alike."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of ideas.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    done, cycles = set(), []

    def visit(name, trail):
        if name in trail:
            cycles.append(trail[trail.index(name) :] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"split these by idea: {big}"


def test_library_modules_never_import_an_entry_point():
    entry_points = {"jaxlens.train", "jaxlens.evaluate", "jaxlens.export", "jaxlens.trajectory"}
    entry_points |= {"jaxlens.serve.command", "jaxlens.serve.__main__"}
    modules = _modules()
    for name, path in modules.items():
        if name not in entry_points:
            assert not _imports(name, path, modules) & entry_points, name


def test_the_public_api():
    for name in (
        "load_model",
        "LogitLens",
        "TunedLens",
        "Translators",
        "load_lens",
        "save_lens",
        "export_checkpoint",
        "PredictionTrajectory",
        "train_and_evaluate",
        "evaluate_lens",
    ):
        assert callable(getattr(jaxlens, name)), name
    assert set(jaxlens.__all__) <= set(dir(jaxlens))
    # No public name shadows a submodule (`from jaxlens import evaluate` is the command).
    assert not {name for name in jaxlens.__all__ if (PACKAGE / f"{name}.py").exists()}


def test_the_lens_classes_import_without_transformers_or_orbax():
    code = (
        "import sys, jaxlens, jaxlens.lens\n"
        "from jaxlens import LogitLens, TunedLens, Translators\n"
        "heavy = sorted(m for m in ('transformers', 'orbax', 'torch') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
