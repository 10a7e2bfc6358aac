import pytest

from lordba import DataError
from lordba_lab.tasks import TASKS, get_task, number_match, word_match


@pytest.mark.parametrize("name", ["arithmetic", "chain_sum", "gsm", "sentiment"])
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


def test_unknown_task_and_split():
    with pytest.raises(DataError, match="available"):
        get_task("glue")
    with pytest.raises(DataError, match="split"):
        TASKS["arithmetic"].examples("test", 2)
