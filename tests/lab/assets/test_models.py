"""lordba_lab.assets.models.load_model_and_tokenizer: what a name that is no local folder and no embedded model
is taken for (a Hub id, or nothing), decided before transformers retries the Hub."""

import pytest
import transformers

from lordba.errors import ConfigError
from lordba_lab.assets import models


@pytest.fixture
def loads(monkeypatch):
    """transformers' loaders replaced: the keywords each call was given (a call means the Hub or a folder is read)."""
    calls = []

    class Loaded:
        pad_token = "<pad>"
        config = type("Config", (), {})()

    def from_pretrained(path, **kwargs):
        calls.append((path, {k: v for k, v in kwargs.items() if k != "dtype"}))
        return Loaded()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return calls


def _hub(monkeypatch, answer=None, cached=None):
    """The Hub's answer to ``model_info`` (an exception to raise; ``None``: the repo is there) and what the local
    Hugging Face cache holds of the repo's config.json (a path, or ``None``)."""
    import huggingface_hub

    def model_info(self, repo_id, **kwargs):
        if answer is not None:
            raise answer

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, name, **kw: cached)


def test_a_name_the_hub_cannot_be_asked_about_fails_at_once_naming_it(monkeypatch, loads, tmp_path):
    """``load_model_and_tokenizer("typo/path")`` on a machine without the Hub retried it for about a minute
    (transformers' five retries) before an OSError about the internet connection; it is a ConfigError naming the
    name, the embedded models and why, and transformers is not called."""
    monkeypatch.chdir(tmp_path)
    _hub(monkeypatch, ConnectionError("[Errno -2] Name or service not known"))
    with pytest.raises(ConfigError, match=r"model 'typo/path': no such local folder \(nor an embedded model: gemma"):
        models.load_model_and_tokenizer("typo/path")
    with pytest.raises(ConfigError, match=r"not in the local cache and the Hub cannot be reached \(ConnectionError"):
        models.load_model_and_tokenizer("typo")
    assert loads == []


def test_a_hub_id_with_no_repo_is_refused_and_one_with_a_repo_is_loaded(monkeypatch, loads, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # (its __init__ wants an HTTP response)
    Exception.__init__(not_found, "404 Client Error: Repository Not Found")
    _hub(monkeypatch, not_found)
    with pytest.raises(ConfigError, match="no Hugging Face Hub repo of that name"):
        models.load_model_and_tokenizer("user/no-such-model")
    _hub(monkeypatch)  # online, the repo is there: transformers reads it as before
    models.load_model_and_tokenizer("user/model")
    assert loads == [("user/model", {}), ("user/model", {})]


def test_a_hub_model_in_the_local_cache_loads_from_it_without_the_hub(monkeypatch, loads, tmp_path):
    """Offline with the model in the HF cache, transformers retried the Hub for a minute before taking the cache."""
    monkeypatch.chdir(tmp_path)
    _hub(monkeypatch, ConnectionError("offline"), cached=str(tmp_path / "config.json"))
    models.load_model_and_tokenizer("user/model")
    assert loads == [("user/model", {"local_files_only": True})] * 2


@pytest.mark.parametrize("name", ["./typo", "/no/such/folder", "a/b/c", "~/no-such-folder-here"])
def test_a_path_that_is_not_there_and_no_hub_id_is_refused_naming_it(monkeypatch, loads, tmp_path, name):
    """transformers took it for a Hub id and failed on its form ("Repo id must be in the form ..."), an OSError."""
    monkeypatch.chdir(tmp_path)
    _hub(monkeypatch, AssertionError("the Hub is not asked"))
    with pytest.raises(ConfigError, match=rf"model '{name}': no such local folder .*, and not a Hub id"):
        models.load_model_and_tokenizer(name)
    assert loads == []


def test_a_local_folder_is_loaded_without_asking_the_hub(monkeypatch, loads, tmp_path):
    _hub(monkeypatch, AssertionError("the Hub is not asked"))
    (tmp_path / "model").mkdir()
    models.load_model_and_tokenizer(str(tmp_path / "model"))
    assert loads == [(str(tmp_path / "model"), {})] * 2
