"""What binds an adapter's two files together, checked before anything is trusted.

* ``weights_sha256`` in ``adapter_config.json``: the sha256 of ``lordba_model.safetensors``.
* ``config_sha256`` in the weights file's safetensors metadata: the sha256 of the config's canonical
  JSON (every key but ``weights_sha256`` and ``library_version``, sorted, compact, ASCII). A change
  of any config field (a bit flip in ``alpha``) is refused, ``base_model_name_or_path`` included: leaving it
  out would make every new file's digest differ from the one older lordba versions compute (they would refuse
  it as edited), and an old file's digest cannot tell an edit of it from one of another field; the error says
  how to load on a moved base or record another one. Files written before this key existed
  have no ``config_sha256`` and load with the checksum of the weights alone; a reader that does not
  know the key ignores it (the tensors and the other metadata mean the same), so it needs no new
  ``format_version``.
* Before the weights are hashed, the header must describe exactly the file's length
  (:func:`check_length`): the time to refuse a file is bounded by its header, not by its size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lordba._util.jsonio import safe_repr
from lordba.errors import AdapterFormatError

CONFIG_DIGEST_KEY = "config_sha256"
NOT_DIGESTED = ("weights_sha256", "library_version")


def config_digest(fields: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a config's ``fields`` (as written to or read from
    ``adapter_config.json``), leaving out :data:`NOT_DIGESTED`. Raises :class:`AdapterFormatError`
    if a value is not JSON (cannot happen for a parsed file)."""
    body = {k: v for k, v in fields.items() if k not in NOT_DIGESTED}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"config fields are not canonical JSON ({err})") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_config_digest(
    metadata: dict[str, str], fields: dict[str, Any], config_path: Path, weights_path: Path
) -> None:
    """Refuse a config whose fields differ from the digest the weights file stores (if it stores one).

    Takes the weights file's metadata, the config file's parsed fields and both paths (for the
    message); returns nothing; raises :class:`AdapterFormatError` naming both files."""
    stored = metadata.get(CONFIG_DIGEST_KEY)
    if stored is None:
        return  # written before config digests: the weights' checksum is all it has
    if stored != config_digest(fields):
        raise AdapterFormatError(
            f"{config_path}: its fields differ from the config digest stored in {weights_path.name} "
            f"({CONFIG_DIGEST_KEY}): the config is corrupt or was edited after saving (a changed value "
            "such as alpha or a pattern would change every output). base_model_name_or_path is in the digest "
            "too: if you changed only it (a moved base folder), put the saved value back and give the base where "
            "you load (LoRDBAModel.from_pretrained(base_model, directory), `--model`, export's `--base`); to "
            "record another base, load the adapter, set its peft_config[name].base_model_name_or_path and "
            "save_pretrained it again"
        )


def check_length(header: dict[str, Any], data_bytes: int, path: Path) -> None:
    """Check that the tensor byte ranges of a parsed safetensors ``header`` end exactly at the
    ``data_bytes`` that follow it, reading nothing more. Returns nothing; raises
    :class:`AdapterFormatError` naming ``path`` for a malformed range or a length that differs."""
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
        if not ok:
            raise AdapterFormatError(f"{path}: tensor {safe_repr(name)}: malformed data_offsets {safe_repr(offsets)}")
        end = max(end, offsets[1])
    if end != data_bytes:
        raise AdapterFormatError(
            f"{path}: the file holds {data_bytes} data bytes but its header describes {end} (truncated or padded)"
        )
