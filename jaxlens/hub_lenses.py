"""Lenses on the Hugging Face hub, found by name as tuned-lens finds them, and listed.

A lens id (`"gpt2"`, `"meta-llama/Llama-2-7b-hf"`) is looked up, in order:

1. in tuned-lens's lens repository: `lens/<id>/config.json` and `lens/<id>/params.pt` in the
   Space `AlignmentResearch/tuned-lens`, or wherever `TUNED_LENS_REPO_ID` and
   `TUNED_LENS_REPO_TYPE` point (tuned-lens 0.2.0's `load_lens_artifacts` reads the same two
   variables, with the same defaults);
2. for an `owner/name` id, as a hub model repository holding `config.json` + `params.pt` at its
   top: the layout of the community lenses published in their own repositories.

Files come through `huggingface_hub.hf_hub_download`, so its cache, `HF_HUB_OFFLINE`,
`HF_HUB_CACHE`/`HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` apply as everywhere else; offline, a lens
already in the cache loads by the same code. When nothing is found, the error names every place
tried and why each failed (missing, gated, private, offline), in words a user can act on.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

DEFAULT_REPO_ID = "AlignmentResearch/tuned-lens"  # where tuned-lens publishes its lenses
DEFAULT_REPO_TYPE = "space"
LENS_FILES = ("params.pt", "config.json")  # params first: a model repository fails fast


@dataclasses.dataclass(frozen=True)
class LensLocation:
    """One place a lens id may live: a hub repository and the folder inside it."""

    repo_id: str
    repo_type: str
    subfolder: str | None

    def describe(self, revision: str | None) -> str:
        where = f"{self.subfolder}/" if self.subfolder else "its top folder"
        return f"{self.repo_type} {self.repo_id}, {where} (revision {revision or 'main'})"


def lens_repository(repo_id: str | None = None, repo_type: str | None = None) -> tuple[str, str]:
    """tuned-lens's lens repository: the arguments, else the environment, else its Space."""
    repo_id = repo_id or os.environ.get("TUNED_LENS_REPO_ID") or DEFAULT_REPO_ID
    return repo_id, repo_type or os.environ.get("TUNED_LENS_REPO_TYPE") or DEFAULT_REPO_TYPE


def locations(lens_id: str) -> list[LensLocation]:
    """Where `lens_id` is looked for, in order (see the module docstring)."""
    repo_id, repo_type = lens_repository()
    found = [LensLocation(repo_id, repo_type, f"lens/{lens_id}")]
    if "/" in lens_id:
        found.append(LensLocation(lens_id, "model", None))
    return found


def download_lens(lens_id: str, *, revision: str | None = None) -> pathlib.Path:
    """The local directory (in the hub cache) holding lens `lens_id`'s two files.

    Args:
      lens_id: a lens id of tuned-lens's repository, or a hub repository id (community layout).
      revision: branch, tag or commit of the repository (default: main).
    Returns:
      the directory with `config.json` and `params.pt`.
    Raises:
      FileNotFoundError: nowhere had it; the message lists each place and its reason.
    """
    from huggingface_hub import hf_hub_download

    tried = []
    for place in locations(lens_id):
        try:
            paths = [
                hf_hub_download(
                    place.repo_id,
                    name,
                    subfolder=place.subfolder,
                    repo_type=place.repo_type,
                    revision=revision,
                )
                for name in LENS_FILES
            ]
        except Exception as error:  # every hub failure is reported, with its reason
            tried.append(f"  - {place.describe(revision)}: {_reason(error, place, revision)}")
            continue
        return pathlib.Path(paths[0]).parent
    raise FileNotFoundError(
        f"No lens {lens_id!r} found on the Hugging Face hub. Tried:\n" + "\n".join(tried)
    )


def list_hub_lenses(
    repo_id: str | None = None, repo_type: str | None = None, *, revision: str | None = None
) -> list[str]:
    """The lens ids in tuned-lens's lens repository (`lens/<id>/params.pt`), sorted.

    Online this asks the hub; offline (or when the hub cannot be reached) it lists what the local
    cache holds of that repository.
    """
    from huggingface_hub import HfApi, snapshot_download

    repo_id, repo_type = lens_repository(repo_id, repo_type)
    try:
        files = HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=revision)
    except Exception as error:  # offline or unreachable: fall back to the cache
        try:
            snapshot = pathlib.Path(
                snapshot_download(
                    repo_id, repo_type=repo_type, revision=revision, local_files_only=True
                )
            )
        except Exception:
            place = LensLocation(repo_id, repo_type, "lens")
            raise FileNotFoundError(
                f"Cannot list the lenses of {place.describe(revision)}: "
                f"{_reason(error, place, revision)}; and the local cache holds none of it."
            ) from error
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("params.pt")]
    suffix = "/params.pt"
    return sorted(
        f[len("lens/") : -len(suffix)]
        for f in files
        if f.startswith("lens/") and f.endswith(suffix)
    )


def _reason(error: Exception, place: LensLocation, revision: str | None) -> str:
    """Why one place failed, in words a user can act on."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    page = f"{constants.ENDPOINT}/{'spaces/' if place.repo_type == 'space' else ''}{place.repo_id}"
    if isinstance(error, hub.GatedRepoError):  # before RepositoryNotFoundError: it is one
        return (
            f"the repository is gated: accept its conditions at {page}, then log in "
            "(`hf auth login`, or set HF_TOKEN)"
        )
    if isinstance(error, hub.RepositoryNotFoundError):
        return "no such repository (or it is private: log in to reach it)"
    if isinstance(error, hub.RevisionNotFoundError):
        return f"the repository has no revision {revision!r}"
    if isinstance(error, hub.LocalEntryNotFoundError):  # before EntryNotFoundError: it is one
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        return f"not in the local cache ({constants.HF_HUB_CACHE}), and {offline}"
    if isinstance(error, hub.EntryNotFoundError):
        folder = f"{place.subfolder}/" if place.subfolder else ""
        return f"the repository has no {folder}{' or '.join(LENS_FILES)}"
    if isinstance(error, hub.HFValidationError):
        return f"not a valid repository id ({error})"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"
