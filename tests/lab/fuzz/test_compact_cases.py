"""The fuzz harness covers format version 3: its seeds (int4 scales, padding nibbles, folded runs)
load, and its version 3 mutators give cases the loader judges cleanly (refused naming the file, or
loaded with exactly the file's content, read by the oracle's independent version 3 reader)."""

import json
import random
import tempfile
from pathlib import Path

import pytest

from lordba.config import WEIGHTS_NAME
from lordba_lab.fuzz.corpus import compact_seed_cases, fix_checksum
from lordba_lab.fuzz.mutate import MUTATORS, mutate
from lordba_lab.fuzz.mutate_base import split_weights
from lordba_lab.fuzz.mutate_compact import MUTATORS as COMPACT
from lordba_lab.fuzz.oracle import LOADED, REFUSED, run_case

SEEDS = compact_seed_cases()
WORK = Path(tempfile.mkdtemp(prefix="lordba-fuzz-v3-"))


def _metadata(case):
    header, _ = split_weights(case[WEIGHTS_NAME])
    return header["__metadata__"]


def test_compact_seeds_are_version_3_cover_int4_and_folded_runs_and_load():
    metas = [_metadata(c) for c in SEEDS]
    assert {m["format_version"] for m in metas} == {"3"}
    assert "int4" in {m["scale_dtype"] for m in metas}
    assert any("{0.." in m["modules"] for m in metas)
    for case in SEEDS:
        result = run_case(case, WORK)
        assert result.outcome == LOADED, f"{result.kind}: {result.detail}"


@pytest.mark.parametrize("name", sorted(COMPACT))
def test_version_3_mutators_are_judged_clean(name):
    rng = random.Random(name)
    outcomes = set()
    for i in range(40):
        case = fix_checksum(MUTATORS[name](rng, SEEDS[i % len(SEEDS)]))
        result = run_case(case, WORK)
        assert result.outcome in (REFUSED, LOADED), f"{name}: {result.kind}: {result.detail}"
        outcomes.add(result.outcome)
    assert REFUSED in outcomes  # each reaches a check of the loader


def test_random_mutation_chains_on_version_3_seeds_are_judged_clean():
    rng = random.Random(17)
    for i in range(150):
        case, names = mutate(rng, SEEDS[i % len(SEEDS)])
        result = run_case(case, WORK)
        assert result.outcome in (REFUSED, LOADED), f"{names}: {result.kind}: {result.detail}"


def test_the_oracle_reads_version_3_independently():
    """A folded list the library would accept only in another form is not taken on trust: the
    oracle's own fold says what the canonical form is."""
    from lordba_lab.fuzz.oracle_compact import fold, unfold

    dims = {f"a.{i}.b": [1, 2, 3] for i in (0, 1, 2, 5)} | {"c": [1, 1, 1]}
    assert fold(dims) == {"a.5.b": [1, 2, 3], "a.{0..2}.b": [1, 2, 3], "c": [1, 1, 1]}
    assert unfold(json.loads(json.dumps(fold(dims)))) == dims
