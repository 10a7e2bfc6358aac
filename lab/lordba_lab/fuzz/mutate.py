"""Structure-aware mutations of adapter directories (fuzz cases): ``MUTATORS`` and :func:`mutate`.

Each mutator takes a random generator and a case and returns a new case. They know the format:
the config's fields, the safetensors container (length, JSON header, data), the metadata and the
tensors' byte ranges, so that most mutations get past the outer checks and reach the inner ones
(the engines fix the checksum up afterwards for most cases, see :func:`mutate`). Byte-level
mutations (bit flips, truncation, splices) cover what the structured ones do not think of.

The mutators live in :mod:`.mutate_bytes`, :mod:`.mutate_header`, :mod:`.mutate_content` and
:mod:`.mutate_compact` (format version 3),
which share :mod:`.mutate_base`; this module only assembles them (imports go one way).
"""

from __future__ import annotations

import random

from lordba_lab.fuzz import mutate_bytes, mutate_compact, mutate_content, mutate_header
from lordba_lab.fuzz.corpus import Case, fix_checksum
from lordba_lab.fuzz.mutate_base import Mutator

MUTATORS: dict[str, Mutator] = {
    **mutate_bytes.MUTATORS,
    **mutate_header.MUTATORS,
    **mutate_content.MUTATORS,
    **mutate_compact.MUTATORS,
}


def mutate(rng: random.Random, case: Case, max_ops: int = 4, fix_probability: float = 0.75) -> tuple[Case, list[str]]:
    """Apply 1..``max_ops`` random mutators, then (usually) fix the checksum(s) up and (mostly) the
    config's digest in the weights' metadata."""
    names = []
    for _ in range(rng.randint(1, max_ops)):
        name = rng.choice(list(MUTATORS))
        case = MUTATORS[name](rng, case)
        names.append(name)
    if rng.random() < fix_probability:
        digest = rng.random() < 0.7  # else a changed config must be refused by its digest
        case = fix_checksum(case, backups=rng.random() < 0.5, digest=digest)
        names.append("fix_checksum" if digest else "fix_checksum_only")
    return case, names
