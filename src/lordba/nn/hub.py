"""Adapters and the Hugging Face Hub: resolve an adapter id to a local directory, write the model
card that goes with a saved adapter, and upload an adapter directory.

``huggingface_hub`` (a dependency of transformers) is imported only when a Hub id is used, a card is
written or an upload happens. Nothing here knows what a ``LoRDBAModel`` is: the model's
``from_pretrained``/``load_adapter``/``save_pretrained``/``push_to_hub`` call these functions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lordba._util.jsonio import read_json_file, safe_repr
from lordba._version import __version__
from lordba.config import CONFIG_NAME, PEFT_TYPE, WEIGHTS_NAME, LoRDBAConfig
from lordba.config.locate import is_hub_id, is_repo_id, locate
from lordba.errors import AdapterFormatError, ConfigError
from lordba.format.atomic import atomic_write_bytes
from lordba.nn.model_card import update_card

CARD_NAME = "README.md"
CARD_MARK = "<!-- lordba model card: lordba rewrites this card on save while this line is in it -->"

# Methods of a transformers model that would save or upload the *base* model: a LoRDBAModel must
# never reach them through its attribute fall-through (``lm.push_to_hub`` would upload the base).
BASE_ONLY_ATTRIBUTES = frozenset(
    {
        "save_pretrained",
        "push_to_hub",
        "_upload_modified_files",
        "_create_repo",
        "_get_files_timestamps",
        "save_distributed_checkpoint",
        "gather_sharded_state_dict_for_save",
        "create_model_card",
    }
)


def refuse_base_attribute(name: str) -> None:
    """Raise ``AttributeError`` if ``name`` is a base-model method that saves or uploads the base.

    Args:
        name: the attribute looked up on a ``LoRDBAModel`` and not found on the wrapper itself.

    Raises:
        AttributeError: for the names in :data:`BASE_ONLY_ATTRIBUTES` (``hasattr`` stays usable).
    """
    if name in BASE_ONLY_ATTRIBUTES:
        raise AttributeError(
            f"LoRDBAModel does not forward {name!r} to the base model (it would save or upload the base, "
            "not the adapter): use LoRDBAModel.save_pretrained / push_to_hub, or get_base_model()."
        )


def resolve_adapter_dir(
    model_id: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    subfolder: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local directory of an adapter given as a path or as a Hugging Face Hub repo id.

    An existing local path (or any ``Path`` object) is used as it is (a ``revision`` given then warns). A
    string that is not a local path but is a valid repo id (``"user/repo"``) is fetched with
    ``huggingface_hub.snapshot_download`` (only the adapter's two files; the HF cache, ``HF_HUB_OFFLINE``
    and ``HF_TOKEN`` apply as usual).

    Args:
        model_id: a directory or a Hub repo id.
        revision: branch, tag or commit of the Hub repo (default: ``main``).
        token: Hub token (default: the one ``huggingface_hub`` finds).
        cache_dir: HF cache directory (default: ``HF_HUB_CACHE``).
        subfolder: the adapter's folder inside the directory or repo.
        local_files_only: use the HF cache only, never the network.

    Returns:
        The directory to read (it may not exist: the loader then reports it).

    Raises:
        AdapterFormatError: a Hub id that cannot be resolved (unknown repo or revision, offline and
            not cached, no access), or a snapshot in the cache without the weights, with the id named; a
            ``subfolder`` that is absolute or holds ``..`` (it would leave the directory or repo).
        ConfigError: a Hub repo holding another kind of PEFT adapter (a LoRA: how to convert it).
    """
    directory = locate(
        model_id,
        [CONFIG_NAME, WEIGHTS_NAME],
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        subfolder=subfolder,
        local_files_only=local_files_only,
        stacklevel=4,
    )
    if not is_hub_id(model_id):
        return directory
    where = f"Hub repo {model_id!r} (revision {revision or 'main'}{', subfolder ' + subfolder if subfolder else ''})"
    if not (directory / CONFIG_NAME).is_file():
        raise AdapterFormatError(f"{where} has no {CONFIG_NAME}: it is not a LoRDBA adapter")
    if not (directory / WEIGHTS_NAME).exists():  # only the config came: another kind of adapter, or a partial download
        _check_snapshot(directory, where)
    return directory


def _check_snapshot(directory: Path, where: str) -> None:
    """Name what a fetched adapter directory that has a config but no weights holds: an adapter of another
    PEFT type (:class:`ConfigError`, how to convert a LoRA), or a partial download (:class:`AdapterFormatError`)."""
    peft_type = read_json_file(directory / CONFIG_NAME).get("peft_type", PEFT_TYPE)
    if peft_type != PEFT_TYPE:
        raise ConfigError(
            f"{where} holds a PEFT {safe_repr(peft_type)} adapter, not a LoRDBA one: load it with PEFT, or convert a "
            "LoRA to LoRDBA (`hf download REPO --local-dir DIR`, then `lordba convert DIR OUT`, or lordba.convert_lora)"
        )
    raise AdapterFormatError(
        f"{where}: {WEIGHTS_NAME} is not in {directory}: a partial download in the HF cache, read offline or with "
        "local_files_only (download the adapter again with the network on), or a repo without the adapter's weights"
    )


def model_card(
    config: LoRDBAConfig, repo_id: str | None = None, subfolder: str | None = None, revision: str | None = None
) -> str:
    """The text of the adapter's ``README.md``: Hub card metadata (``library_name: lordba``,
    ``base_model``, tags) and how to load it. Deterministic for the same config.

    Args:
        config: the adapter's config (base model, rank, scale format, targets).
        repo_id: where it is (or will be) on the Hub, used in the example code.
        subfolder: the adapter's folder in that repo or directory (``save_pretrained`` puts each adapter
            but ``default`` in one), passed in the example code.
        revision: the repo's branch it is pushed to, passed in the example code (``main``: left out).

    Returns:
        The card's text.
    """
    base = config.base_model_name_or_path
    hub_base = base if isinstance(base, str) and base and is_repo_id(base) and not Path(base).exists() else None
    tags = ["lordba", "lora", "binary", "low-bit"]
    meta = ["---", "library_name: lordba"]
    if hub_base is not None:
        meta.append(f"base_model: {json.dumps(hub_base)}")
        tags.append(f"base_model:adapter:{hub_base}")
    meta += ["tags:", *(f"- {json.dumps(t)}" for t in tags), "---", ""]
    where = repo_id or "PATH_OR_REPO_ID"
    branch = revision if repo_id and revision and revision != "main" else None
    args = f'"{where}"' + (f", subfolder={json.dumps(subfolder)}" if subfolder else "")
    args += f", revision={json.dumps(branch)}" if branch else ""
    local = "DIR" + (f"/{subfolder}" if subfolder else "")  # export-lora reads a directory, not a Hub id
    download = f"hf download {repo_id}" + (f" --revision {branch}" if branch else "") + " --local-dir DIR"
    copy = f"a local copy of the repo: `{download}`" if repo_id else "the saved folder"
    targets = config.target_modules
    if targets is None:
        targets = "every linear layer but the output head"
    elif not isinstance(targets, str):
        targets = ", ".join(targets)
    body = f"""{CARD_MARK}

# LoRDBA adapter

A [LoRDBA](https://pypi.org/project/lordba/) adapter (LoRA with both factors stored as 1-bit sign
matrices and the magnitudes in three channel-wise scale vectors) for `{base or "unknown base model"}`.

- rank {config.r}, alpha {config.alpha:g}, scales stored as {config.scale_dtype}, training mode {config.mode}
- target modules: {targets}

## Use it

```python
from lordba import AutoLoRDBAModelForCausalLM

model = AutoLoRDBAModelForCausalLM.from_pretrained({args})
```

or onto a base model you already have: `LoRDBAModel.from_pretrained(base_model, {args})`.

transformers' `load_adapter`, PEFT's `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM`
cannot read this format (they fail with `KeyError: 'LORDBA'`). For PEFT, vLLM and other LoRA
runtimes, export a plain LoRA first: `lordba export-lora {local} OUT` (DIR: {copy}).
"""
    return "\n".join(meta) + body


def write_model_card(
    directory: str | Path,
    config: LoRDBAConfig,
    repo_id: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
) -> Path | None:
    """Write the model card beside a saved adapter, crash-safely (temp file + rename). A ``README.md`` that lordba
    did not write (a user's card) is updated, not replaced: as PEFT's ``create_or_update_model_card``, its metadata
    block gets lordba's ``library_name``, ``base_model`` and tags, its text is kept; one whose metadata cannot be
    read (no YAML mapping, not UTF-8) is kept as it is, with a warning. The card is not part of the adapter: failing
    to write it only warns.

    Args:
        directory: the adapter directory (already written).
        config: the adapter's config, as saved.
        repo_id: the Hub repo the card describes, if known.
        subfolder: the adapter's folder in that repo (or in the directory it was saved to), if any.
        revision: the repo's branch the card describes, if not ``main``.

    Returns:
        The card's path, or ``None`` when it was kept or could not be written.
    """
    path = Path(directory) / CARD_NAME
    card = model_card(config, repo_id, subfolder, revision)
    try:
        text = path.read_bytes().decode() if path.is_file() else CARD_MARK
        if CARD_MARK not in text:
            if path.is_symlink():  # (a shared card it links to: neither edited through it nor replaced)
                warnings.warn(f"{path}: kept as it is, a symbolic link; the adapter itself is saved", stacklevel=3)
                return None
            try:
                card = update_card(text, card)
            except Exception as err:  # yaml's errors, ValueError (no mapping): the user's card stays as it is
                reason = (str(err).strip().splitlines() or [""])[0]
                warnings.warn(
                    f"{path}: kept as it is, its metadata block cannot be read ({type(err).__name__}: {reason}); "
                    "the adapter itself is saved",
                    stacklevel=3,
                )
                return None
        atomic_write_bytes(path, card.encode())
    except (OSError, UnicodeDecodeError, AdapterFormatError) as err:
        warnings.warn(f"{path}: model card not written ({err}); the adapter itself is saved", stacklevel=3)
        return None
    return path


def upload_adapter_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload LoRDBA adapter",
    create_pr: bool = False,
) -> Any:
    """Create the Hub repo if needed and upload an adapter directory (hidden files left out; a model card
    where the repo has a ``README.md`` lordba did not write is left out too, the owner's card kept).

    Args:
        folder: the saved adapter directory.
        repo_id: ``"user/repo"``.
        token: Hub token (default: the one ``huggingface_hub`` finds).
        private: visibility of a newly created repo.
        revision: branch to commit to (created from ``main`` if the repo does not have it).
        commit_message: the commit's message.
        create_pr: open a pull request instead of committing.

    Returns:
        ``huggingface_hub``'s ``CommitInfo``.

    Raises:
        AdapterFormatError: ``repo_id`` is not a valid Hub repo id.
    """
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise AdapterFormatError(f"push_to_hub: {repo_id!r} is not a Hugging Face Hub repo id ('user/repo')")
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="lordba", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        _create_branch(api, repo_id, revision, create_pr)
    _keep_owners_cards(api, repo_id, Path(folder), revision)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=[".*", "**/.*"],
    )


def _create_branch(api: Any, repo_id: str, branch: str, create_pr: bool) -> None:
    """Create ``branch`` from ``main`` unless it exists (the Hub refuses a commit to a branch it does not have), as
    transformers' ``push_to_hub`` does; with ``create_pr``, a repo where the branch cannot be created (403: not
    ours) is left to the upload, which opens the pull request against the branch if it exists."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    except HfHubHTTPError as err:
        if not (create_pr and getattr(err.response, "status_code", None) == 403):
            raise


def _keep_owners_cards(api: Any, repo_id: str, folder: Path, revision: str | None) -> None:
    """Remove from ``folder`` (before its upload) each model card whose place in the repo holds a ``README.md``
    lordba did not write: as :func:`write_model_card` keeps a user's card in a directory, an upload keeps the
    repo owner's. A card that cannot be read is kept too (a warning), so lordba's is left out.

    Args:
        api: the ``huggingface_hub.HfApi`` of the upload.
        repo_id: the repo.
        folder: the directory to upload (lordba's cards in it are deleted where the repo's must stay).
        revision: the branch the upload goes to.
    """
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    for card in sorted(folder.rglob(CARD_NAME)):
        name = card.relative_to(folder).as_posix()
        try:
            text = Path(api.hf_hub_download(repo_id, name, revision=revision)).read_text("utf-8", errors="replace")
        except (EntryNotFoundError, RevisionNotFoundError):  # no card there yet (or a new branch)
            continue
        except Exception as err:  # huggingface_hub's HTTP, network and OS errors
            warnings.warn(
                f"push_to_hub: {repo_id}/{name}: the repo's card could not be read ({type(err).__name__}), so "
                "lordba's card is not uploaded over it",
                stacklevel=4,
            )
            text = ""
        if CARD_MARK not in text:
            card.unlink()
