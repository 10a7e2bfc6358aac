"""Where an adapter's files are: a local directory, or a Hugging Face Hub repo id fetched into the HF cache (one
place for every reader: the model's ``from_pretrained`` / ``load_adapter`` / ``hotswap_adapter``, the Auto class,
:meth:`lordba.config.LoRDBAConfig.from_pretrained`). ``huggingface_hub`` is imported only when a Hub id is used."""

from __future__ import annotations

import glob
import re
import warnings
from pathlib import Path

from lordba._util.files import check_path
from lordba._util.models import registered_names
from lordba._version import __version__
from lordba.errors import AdapterFormatError, LoRDBAError


def is_repo_id(model_id: str) -> bool:
    """Whether ``model_id`` is a valid Hub repo id (``"user/repo"``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def is_local(model_id: str) -> bool:
    """Whether ``model_id`` names something on the local file system; a name the file system refuses (too
    long) is taken as local too, so that the loader reports it (a Hub id is never that long)."""
    try:
        return Path(model_id).exists()
    except OSError:
        return True


def is_hub_id(model_id: str | Path) -> bool:
    """Whether ``model_id`` is read from the Hub: a string that names nothing local and is a valid repo id."""
    return not isinstance(model_id, Path) and not is_local(model_id) and is_repo_id(model_id)


def subfolder_path(subfolder: str | None) -> Path:
    """``subfolder`` as a relative path (empty where none is given), refused where it would leave the adapter's
    directory or repo: an absolute path (joined to the directory it replaces it) or a ``..`` (a Hub id's other
    revision in the cache, a folder beside a local one): another adapter than the one named, loaded silently."""
    if not subfolder:
        return Path()
    check_path(subfolder, "subfolder")
    sub = Path(subfolder)
    if sub.is_absolute() or ".." in sub.parts:
        raise AdapterFormatError(
            f"subfolder {str(subfolder)!r}: must be a relative path inside the adapter directory or Hub repo "
            "(no '..', not absolute)"
        )
    return sub


def locate(
    model_id: str | Path,
    names: list[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    subfolder: str | None = None,
    local_files_only: bool = False,
    error: type[LoRDBAError] = AdapterFormatError,
    stacklevel: int = 1,
) -> Path:
    """The local directory holding an adapter's files ``names``: ``model_id / subfolder`` for an existing local
    path (or any ``Path``; a ``revision`` given then warns), else a Hub repo id's snapshot (``names`` only, with
    ``huggingface_hub.snapshot_download``: the HF cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply as usual).
    The directory may lack the files (the caller names what is missing). ``stacklevel``: the revision warning's, as
    seen from the caller.

    Raises:
        error: a Hub id that cannot be resolved (unknown repo or revision, offline and not cached, no access), with
            the id named. AdapterFormatError: a ``subfolder`` that is absolute or holds ``..``; a ``model_id`` that
            is no path.
    """
    check_path(model_id, "the adapter directory (a path or a Hub id)")
    sub = subfolder_path(subfolder)
    if not is_hub_id(model_id):
        if revision is not None:  # a local copy named like the repo wins: say which adapter that is
            warnings.warn(
                f"{str(model_id)!r} is a local directory, loaded as it is: the Hub revision {revision!r} is not used "
                "(rename or move the local folder to load the Hub repo's revision)",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
        return Path(model_id) / sub
    prefix = glob.escape(f"{sub.as_posix()}/") if subfolder else ""  # allow_patterns are fnmatch patterns
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(
            model_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=[prefix + name for name in names],
            library_name="lordba",
            library_version=__version__,
        )
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, validation, OS)
        reason = (str(err).strip().splitlines() or [""])[0]
        raise error(
            f"{model_id!r}: no local directory of that name, and the Hugging Face Hub repo could not be read "
            f"(revision {revision or 'main'}): {type(err).__name__}: {reason}"
        ) from None
    return Path(snapshot) / sub


_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$")  # a Hub id's HF cache folder


def base_key(name: str) -> str:
    """What two records of one base model's name share: the last component of a Hub id or folder (the Hub id of an HF
    cache snapshot folder, ``.../models--org--name/snapshots/<commit>``), lowercased (Hub ids ignore case), trailing
    slashes left out: ``org/Model``, ``/models/model/`` and the snapshot of ``org/Model`` all give ``model``."""
    text = name.strip().rstrip("/\\")
    snapshot = _SNAPSHOT.search(text)
    if snapshot:
        text = f"{snapshot[1]}/{snapshot[2]}"
    return re.split(r"[/\\]", text)[-1].lower()


def other_base(recorded: str | None, current: str | None) -> bool:
    """Whether an adapter recording ``recorded`` as its ``base_model_name_or_path`` is loaded onto another model
    than ``current`` (the model's ``name_or_path``) by their :func:`base_key`: ``False`` where either is unknown
    (empty, a model built from a config) or ``recorded`` is a name registered in ``lordba.models`` (the lab's
    ``default``: its folder is not looked up here)."""
    if not recorded or not current:
        return False
    ours, theirs = base_key(recorded), base_key(current)
    return bool(ours and theirs and ours != theirs) and recorded not in registered_names()
