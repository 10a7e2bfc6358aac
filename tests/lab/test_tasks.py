import pytest

from lordba import DataError
from lordba_lab.tasks import TASKS, get_task, list_match, number_match, word_match


@pytest.mark.parametrize("name", ["arithmetic", "chain_sum", "gsm", "sentiment", "reverse_words"])
def test_splits_are_disjoint_deterministic_and_scored_by_their_metric(name):
    task = get_task(name)
    train = task.examples("train", 40, seed=0)
    held = task.examples("eval", 40, seed=0)
    assert len(train) == 40 and len(held) == 40
    assert not {e.messages for e in train} & {e.messages for e in held}
    assert train == task.examples("train", 40, seed=0)
    assert all(task.score(e.answer, e.answer) for e in held)
    assert not all(task.score("nothing useful", e.answer) for e in held)


def test_sentiment_is_balanced():
    labels = [e.answer for e in get_task("sentiment").examples("train", 100)]
    assert labels.count("positive") == 50


def test_matchers():
    assert number_match("The answer is -12.", "-12") and number_match("1,234", "1234") and not number_match("12", "13")
    assert word_match(" Positive!", "positive") and not word_match("not positive", "positive")
    assert list_match(" Acute,go , hundred\nmore", "acute, go, hundred")
    assert not list_match("acute, go", "acute, go, hundred") and not list_match("", "a")
    assert not list_match("hundred, go, acute", "acute, go, hundred")


def test_the_corpus_task_holds_out_whole_addresses_and_has_no_answers():
    task = get_task("sotu")
    train, held = task.examples("train", 3000, seed=0), task.examples("eval", 500, seed=0)
    assert len(train) == 3000 and len(held) == 500 and task.score is None
    assert all(not e.messages and len(e.completion.split()) == 56 for e in train + held)
    assert not {e.completion for e in train} & {e.completion for e in held}
    assert held == task.examples("eval", 500, seed=0) and held != task.examples("eval", 500, seed=1)


def test_unknown_task_and_split():
    with pytest.raises(DataError, match="available"):
        get_task("glue")
    with pytest.raises(DataError, match="split"):
        TASKS["arithmetic"].examples("test", 2)
