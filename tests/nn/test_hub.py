"""Adapters and the Hugging Face Hub: Hub ids resolved offline from a populated HF cache, push_to_hub
uploading the adapter (never the base), and the model card written with the adapter."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import huggingface_hub
import pytest
import torch

from lordba import (
    AdapterFormatError,
    AutoLoRDBAModelForCausalLM,
    ConfigError,
    LoRDBAConfig,
    LoRDBAModel,
    get_lordba_model,
)
from lordba.nn.hub import CARD_NAME

from conftest import tiny_llama

REPO = "someone/tiny-lordba"
FILES = ("adapter_config.json", "lordba_model.safetensors")
IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def save_adapter(directory, seed=0, base_name=None):
    base = tiny_llama(0)
    if base_name is not None:
        base.config._name_or_path = base_name
    torch.manual_seed(seed)
    lm = get_lordba_model(base, LoRDBAConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    lm.save_pretrained(directory)
    return lm


def add_to_cache(cache, repo_id, source, commit, refs=("main",), subfolder=""):
    """Lay out ``source``'s adapter files in the HF cache as ``snapshot_download`` leaves them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit / subfolder
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in FILES:
        data = (Path(source) / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache in tmp, offline (what HF_HUB_CACHE / HF_HUB_OFFLINE=1 set at import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_from_pretrained_and_load_adapter_resolve_a_hub_id_from_the_cache(tmp_path, offline_cache):
    lm_main = save_adapter(tmp_path / "v-main", seed=1)
    lm_v1 = save_adapter(tmp_path / "v-1", seed=2)
    add_to_cache(offline_cache, REPO, tmp_path / "v-main", "a" * 40)
    add_to_cache(offline_cache, REPO, tmp_path / "v-1", "b" * 40, refs=("v1",))

    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), REPO)
    torch.testing.assert_close(logits(loaded), logits(lm_main), rtol=0, atol=1e-5)
    tagged = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, revision="v1")
    torch.testing.assert_close(logits(tagged), logits(lm_v1), rtol=0, atol=1e-5)
    by_commit = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, revision="b" * 40)
    torch.testing.assert_close(logits(by_commit), logits(lm_v1), rtol=0, atol=1e-5)

    loaded.load_adapter(REPO, "other", revision="v1", token=False)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), logits(lm_v1), rtol=0, atol=1e-5)


def test_cache_dir_and_subfolder_keywords(tmp_path, offline_cache):
    lm = save_adapter(tmp_path / "src", seed=4)
    elsewhere = tmp_path / "other-cache"
    add_to_cache(elsewhere, REPO, tmp_path / "src", "c" * 40, subfolder="adapters/chat")
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, cache_dir=elsewhere, subfolder="adapters/chat")
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)


def test_a_subfolder_with_glob_characters_is_downloaded(tmp_path, monkeypatch):
    # The subfolder went unescaped into snapshot_download's allow_patterns (fnmatch): "run[2]/..." matched
    # "run2/..." only, nothing was downloaded, and the adapter was said not to be a LoRDBA adapter.
    lm = save_adapter(tmp_path / "repo" / "run[2]", seed=6)
    repo_files = sorted(
        p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*") if p.is_file()
    )

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        snapshot = tmp_path / "snapshot"
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):  # what the Hub client keeps
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "repo" / name, snapshot / name)
        snapshot.mkdir(exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, subfolder="run[2]")
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)


def test_a_subfolder_leaving_the_adapter_directory_or_repo_is_refused(tmp_path, offline_cache):
    # An absolute subfolder replaced the directory it was joined to, and a ".." climbed out of it: a Hub id's
    # subfolder="/some/dir" loaded that local folder, "../<commit>" another revision's snapshot in the cache,
    # and a local folder's "../x" the folder beside it, each silently in place of the adapter named
    save_adapter(tmp_path / "main", seed=1)
    save_adapter(tmp_path / "other" / "chat", seed=2)
    add_to_cache(offline_cache, REPO, tmp_path / "main", "a" * 40)
    add_to_cache(offline_cache, REPO, tmp_path / "other" / "chat", "b" * 40, refs=("v1",))
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj"]))
    for model_id, subfolder in [
        (REPO, str(tmp_path / "other" / "chat")),
        (REPO, "../" + "b" * 40),
        (REPO, "adapters/../../" + "b" * 40),
        (str(tmp_path / "main"), "../other/chat"),
        (str(tmp_path / "main"), str(tmp_path / "other" / "chat")),
    ]:
        with pytest.raises(AdapterFormatError, match=rf"subfolder '{re.escape(subfolder)}'.*no '\.\.', not absolute"):
            LoRDBAModel.from_pretrained(tiny_llama(0), model_id, subfolder=subfolder)
        with pytest.raises(AdapterFormatError, match="subfolder"):
            lm.load_adapter(model_id, "other", subfolder=subfolder)
        with pytest.raises(AdapterFormatError, match="subfolder"):
            lm.hotswap_adapter(model_id, subfolder=subfolder)
        with pytest.raises(AdapterFormatError, match="subfolder"):
            AutoLoRDBAModelForCausalLM.from_pretrained(model_id, subfolder=subfolder)
    assert list(lm.peft_config) == ["default"]
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), str(tmp_path / "other"), subfolder="./chat/")  # inside: fine
    assert loaded.peft_config["default"].r == 2


def test_hotswap_adapter_takes_the_hub_keywords(tmp_path, offline_cache):
    # PEFT's hotswap_adapter passes revision / subfolder / token on to the loading: an adapter pushed to a
    # repo's subfolder (push_to_hub's layout for every adapter but "default") could not be swapped in.
    first = save_adapter(tmp_path / "first", seed=1)
    chat = save_adapter(tmp_path / "chat", seed=2)
    tagged = save_adapter(tmp_path / "tagged", seed=3)
    add_to_cache(offline_cache, REPO, tmp_path / "first", "a" * 40)
    add_to_cache(offline_cache, REPO, tmp_path / "chat", "a" * 40, subfolder="chat")
    add_to_cache(offline_cache, REPO, tmp_path / "tagged", "b" * 40, refs=("v2",))
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), REPO)
    torch.testing.assert_close(logits(lm), logits(first), rtol=0, atol=1e-5)
    lm.hotswap_adapter(REPO, subfolder="chat", local_files_only=True)
    torch.testing.assert_close(logits(lm), logits(chat), rtol=0, atol=1e-5)
    lm.hotswap_adapter(REPO, "default", revision="v2", token=False, cache_dir=offline_cache)
    torch.testing.assert_close(logits(lm), logits(tagged), rtol=0, atol=1e-5)


def test_a_hub_id_resolves_with_the_real_environment_variables(tmp_path):
    """No monkeypatching: HF_HUB_CACHE and HF_HUB_OFFLINE=1 as a user sets them, in a fresh process."""
    save_adapter(tmp_path / "src", seed=5)
    cache = tmp_path / "cache"
    add_to_cache(cache, REPO, tmp_path / "src", "d" * 40)
    code = (
        "import sys; sys.path.insert(0, 'tests'); from conftest import tiny_llama; from lordba import LoRDBAModel;"
        f"lm = LoRDBAModel.from_pretrained(tiny_llama(0), {REPO!r});"
        "print('modules', len(lm.adapter_modules('default')))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "modules 4" in done.stdout


def test_an_unknown_hub_id_is_a_clear_error_naming_it(offline_cache):
    with pytest.raises(AdapterFormatError, match=r"'someone/missing'.*Hugging Face Hub") as err:
        LoRDBAModel.from_pretrained(tiny_llama(0), "someone/missing")
    assert "\n" not in str(err.value)


def test_an_unknown_revision_is_a_clear_error(tmp_path, offline_cache):
    save_adapter(tmp_path / "src")
    add_to_cache(offline_cache, REPO, tmp_path / "src", "e" * 40)
    with pytest.raises(AdapterFormatError, match=f"'{REPO}'.*revision nope"):
        LoRDBAModel.from_pretrained(tiny_llama(0), REPO, revision="nope")


def test_a_hub_repo_without_an_adapter_config_is_named(tmp_path, offline_cache):
    save_adapter(tmp_path / "src")
    add_to_cache(offline_cache, REPO, tmp_path / "src", "f" * 40, subfolder="elsewhere")
    with pytest.raises(AdapterFormatError, match=f"Hub repo '{REPO}'.*no adapter_config.json"):
        LoRDBAModel.from_pretrained(tiny_llama(0), REPO)


def test_a_missing_local_path_still_says_not_a_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match="not a directory"):
        LoRDBAModel.from_pretrained(tiny_llama(0), str(tmp_path / "nope" / "adapter"))


def test_a_path_with_a_name_too_long_for_the_file_system_is_named(tmp_path):
    # Path.exists() raised OSError (ENAMETOOLONG) before the loader could name the path
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj"]))
    for too_long in ("x" * 300, str(tmp_path / ("y" * 300) / "adapter")):
        with pytest.raises(AdapterFormatError, match="too long"):
            lm.load_adapter(too_long, "other")
        with pytest.raises(AdapterFormatError, match="too long"):
            lm.hotswap_adapter(too_long)
        with pytest.raises(AdapterFormatError, match="too long"):
            AutoLoRDBAModelForCausalLM.from_pretrained(too_long)
    assert list(lm.peft_config) == ["default"]


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    calls: ClassVar[list] = []
    remote: ClassVar[dict] = {}  # the repo's files as they are on the Hub: path -> text
    downloads: ClassVar[list] = []
    branches: ClassVar[set] = {"main"}  # as the Hub: a commit to a branch that does not exist is refused

    def __init__(self, token=None, **kwargs):
        self.token = token

    def hf_hub_download(self, repo_id, filename, revision=None, **kwargs):
        import tempfile

        from huggingface_hub.errors import EntryNotFoundError

        FakeApi.downloads.append((repo_id, filename, revision))
        if filename not in FakeApi.remote:
            raise EntryNotFoundError(f"{filename} not found")
        path = Path(tempfile.mkdtemp()) / Path(filename).name
        path.write_text(FakeApi.remote[filename])
        return str(path)

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, branch, revision=None, exist_ok=False, **kwargs):
        FakeApi.calls.append(("create_branch", repo_id, branch, exist_ok))
        FakeApi.branches.add(branch)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), revision=None, create_pr=False, **kwargs):
        from huggingface_hub.errors import RevisionNotFoundError
        from huggingface_hub.utils import filter_repo_objects

        if revision is not None and not revision.startswith("refs/pr/") and revision not in FakeApi.branches:
            response = SimpleNamespace(status_code=404, headers={}, request=None)  # what the error reads of it
            raise RevisionNotFoundError(f"404 Client Error. Invalid rev id: {revision}", response=response)
        kwargs.update(revision=revision, create_pr=create_pr)
        root = Path(folder_path)
        everything = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        kept = list(filter_repo_objects(everything, ignore_patterns=ignore_patterns))
        FakeApi.calls.append(("upload_folder", repo_id, {n: (root / n).read_bytes() for n in kept}, kwargs))
        return "commit-info"


def test_push_to_hub_uploads_the_adapter_directory_only(tmp_path, monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = save_adapter(tmp_path / "saved", base_name="HuggingFaceTB/SmolLM2-135M")
    assert lm.push_to_hub(REPO, private=True, commit_message="first") == "commit-info"
    (_, repo, private, exist_ok), (_, repo2, files, kwargs) = FakeApi.calls
    assert (repo, private, exist_ok, repo2) == (REPO, True, True, REPO)
    assert sorted(files) == [CARD_NAME, *FILES]  # no base weights, no config.json, no hidden files
    for name in FILES:
        assert files[name] == (tmp_path / "saved" / name).read_bytes()
    card = files[CARD_NAME].decode()
    assert "library_name: lordba" in card and f'from_pretrained("{REPO}")' in card
    assert kwargs["commit_message"] == "first"


def test_push_to_hub_cards_of_other_adapters_load_them_from_their_subfolder(tmp_path, monkeypatch, offline_cache):
    # Each adapter but "default" is uploaded to its subfolder: its card's code loaded the repo's top
    # folder (the default adapter: another one, silently) and told to export a Hub id as a directory.
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = save_adapter(tmp_path / "saved", seed=1)
    torch.manual_seed(2)
    lm.add_adapter("chat", LoRDBAConfig(r=2, target_modules=["k_proj"], init="random"))
    lm.push_to_hub(REPO)
    files = FakeApi.calls[-1][2]
    top, chat = files[CARD_NAME].decode(), files[f"chat/{CARD_NAME}"].decode()
    assert f'from_pretrained("{REPO}")' in top and "subfolder" not in top
    assert f'AutoLoRDBAModelForCausalLM.from_pretrained("{REPO}", subfolder="chat")' in chat
    assert f'LoRDBAModel.from_pretrained(base_model, "{REPO}", subfolder="chat")' in chat
    assert f"lordba export-lora {REPO}" not in top + chat  # export-lora reads a local directory
    for name in FILES:  # the card's call loads the chat adapter
        (tmp_path / "hub" / "chat").mkdir(parents=True, exist_ok=True)
        (tmp_path / "hub" / "chat" / name).write_bytes(files[f"chat/{name}"])
    add_to_cache(offline_cache, REPO, tmp_path / "hub" / "chat", "e" * 40, subfolder="chat")
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, subfolder="chat")
    lm.set_adapter("chat")
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)


def test_push_to_hub_to_a_new_branch_creates_it(tmp_path, monkeypatch):
    # The Hub refuses a commit to a branch that does not exist (RevisionNotFoundError): push_to_hub(revision="v2")
    # failed unless the branch had been made by hand; transformers' and PEFT's push_to_hub create it first
    FakeApi.calls, FakeApi.branches = [], {"main"}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = save_adapter(tmp_path / "saved", seed=3)
    assert lm.push_to_hub(REPO, revision="v2") == "commit-info"
    assert ("create_branch", REPO, "v2", True) in FakeApi.calls
    assert FakeApi.calls[-1][0] == "upload_folder" and FakeApi.calls[-1][3]["revision"] == "v2"
    assert lm.push_to_hub(REPO, revision="v2") == "commit-info"  # the branch exists now: pushed again
    FakeApi.calls = []
    lm.push_to_hub(REPO, revision="refs/pr/1")  # a pull request's ref is not a branch to create
    lm.push_to_hub(REPO)
    assert [c[0] for c in FakeApi.calls] == ["create_repo", "upload_folder"] * 2

    def not_ours(self, repo_id, branch, **kwargs):  # a pull request to another's repo: no right to make branches
        from huggingface_hub.errors import HfHubHTTPError

        raise HfHubHTTPError("403 Forbidden", response=SimpleNamespace(status_code=403, headers={}, request=None))

    monkeypatch.setattr(FakeApi, "create_branch", not_ours)
    assert lm.push_to_hub(REPO, revision="v2", create_pr=True) == "commit-info"
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="403"):
        lm.push_to_hub(REPO, revision="v2")


def test_push_to_hub_refuses_a_bad_repo_id(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    with pytest.raises(AdapterFormatError, match="'not a/repo id'"):
        lm.push_to_hub("not a/repo id")
    assert FakeApi.calls == []


def test_base_model_save_and_upload_methods_are_not_reached_through_the_wrapper():
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2))
    assert lm.push_to_hub.__func__ is LoRDBAModel.push_to_hub  # the wrapper's own, not the base's
    assert lm.save_pretrained.__func__ is LoRDBAModel.save_pretrained
    base = lm.get_base_model()
    for name in ("_upload_modified_files", "save_distributed_checkpoint"):
        assert hasattr(base, name)
        assert not hasattr(lm, name)
        with pytest.raises(AttributeError, match="would save or upload the base"):
            getattr(lm, name)
    assert lm.config is base.config  # other attributes still fall through


def test_save_pretrained_writes_a_model_card_and_keeps_the_adapter_bytes(tmp_path):
    lm = save_adapter(tmp_path / "a", base_name="HuggingFaceTB/SmolLM2-135M")
    card = huggingface_hub.ModelCard.load(tmp_path / "a" / CARD_NAME)
    assert card.data.library_name == "lordba"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert {"lordba", "base_model:adapter:HuggingFaceTB/SmolLM2-135M"} <= set(card.data.tags)
    lm.adapter_state().save_pretrained(tmp_path / "bare")  # the adapter alone, no card
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == sorted(FILES)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "bare" / name).read_bytes()
    lm.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / CARD_NAME).read_bytes() == (tmp_path / "b" / CARD_NAME).read_bytes()  # deterministic
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)


def test_a_local_base_path_is_not_written_as_hub_metadata(tmp_path, monkeypatch):
    save_adapter(tmp_path / "a", base_name=str(tmp_path / "my-base"))
    card = huggingface_hub.ModelCard.load(tmp_path / "a" / CARD_NAME)
    assert card.data.base_model is None and card.data.library_name == "lordba"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)  # a relative local path that looks like a repo id
    save_adapter(tmp_path / "b", base_name="models/base")
    assert huggingface_hub.ModelCard.load(tmp_path / "b" / CARD_NAME).data.base_model is None


def test_a_users_own_card_is_kept_and_its_metadata_updated(tmp_path):
    """As PEFT's save_pretrained (create_or_update_model_card), a user's README keeps its text and metadata and gets
    lordba's library_name, base_model and tags in its metadata block; lordba left it without them."""
    (tmp_path / "a").mkdir()
    text = "---\nlicense: mit\ntags:\n- mine\nlibrary_name: other\n---\n\n# my notes\n\nno ---\n"
    (tmp_path / "a" / CARD_NAME).write_text(text)
    save_adapter(tmp_path / "a", base_name="someone/base")
    card = huggingface_hub.ModelCard.load(tmp_path / "a" / CARD_NAME)
    assert card.text == "\n# my notes\n\nno ---\n" and card.data.license == "mit"
    assert card.data.library_name == "lordba" and card.data.base_model == "someone/base"
    assert (
        card.data.tags[0] == "mine"
        and "lordba" in card.data.tags
        and "base_model:adapter:someone/base" in card.data.tags
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CARD_NAME).write_text("# my notes\n")  # no metadata block: one is made
    save_adapter(tmp_path / "b")
    card = huggingface_hub.ModelCard.load(tmp_path / "b" / CARD_NAME)
    assert card.text == "# my notes\n" and card.data.library_name == "lordba"
    save_adapter(tmp_path / "b")  # saved again: the same card
    assert huggingface_hub.ModelCard.load(tmp_path / "b" / CARD_NAME).content == card.content


def test_a_users_card_saved_with_a_byte_order_mark_gets_one_metadata_block(tmp_path):
    """A README.md saved by a Windows editor starts with a UTF-8 byte order mark: its metadata block was not found
    behind it, so a second block (lordba's) was put before it and the user's (its license) became text."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CARD_NAME).write_bytes("\ufeff---\nlicense: mit\ntags:\n- mine\n---\n# my notes\n".encode())
    save_adapter(tmp_path / "a", base_name="someone/base")
    text = (tmp_path / "a" / CARD_NAME).read_text(encoding="utf-8")
    assert text.count("---\n") == 2 and "\ufeff" not in text
    card = huggingface_hub.ModelCard.load(tmp_path / "a" / CARD_NAME)
    assert card.data.license == "mit" and card.data.library_name == "lordba" and card.text == "# my notes\n"
    assert card.data.tags[0] == "mine" and "lordba" in card.data.tags


def test_a_users_card_that_is_a_symbolic_link_is_left_as_it_is(tmp_path):
    """A README.md linking to a shared card (a monorepo's) was replaced by a file on every save, where before this
    stop's card update it was kept: it is kept, link and target, with a warning."""
    shared = tmp_path / "SHARED.md"
    shared.write_text("---\nlicense: mit\n---\n# shared\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CARD_NAME).symlink_to(shared)
    with pytest.warns(UserWarning, match="symbolic link"):
        save_adapter(tmp_path / "a")
    assert (tmp_path / "a" / CARD_NAME).is_symlink()
    assert shared.read_text() == "---\nlicense: mit\n---\n# shared\n"


@pytest.mark.parametrize(
    "text", [b"---\nfoo: [bar\n---\n# notes\n", b"---\n- a list\n---\n# notes\n", b"\xff\xfe notes"]
)
def test_a_users_card_whose_metadata_cannot_be_read_is_kept_and_the_adapter_saved(tmp_path, text):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CARD_NAME).write_bytes(text)
    with pytest.warns(UserWarning, match="README.md"):
        lm = save_adapter(tmp_path / "a")
    assert (tmp_path / "a" / CARD_NAME).read_bytes() == text
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)


def test_a_card_that_cannot_be_written_only_warns(tmp_path):
    (tmp_path / "a" / CARD_NAME).mkdir(parents=True)  # a directory where the card goes
    with pytest.warns(UserWarning, match="model card not written"):
        lm = save_adapter(tmp_path / "a")
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)
    shutil.rmtree(tmp_path / "a")


def test_push_to_hub_cards_describe_the_uploaded_adapters_while_another_thread_changes_them(tmp_path, monkeypatch):
    # The cards were written after the adapters were saved, outside the model's lock, from the model's
    # config at that moment: an adapter replaced by another thread in between got a card describing
    # the new one (rank 4) beside the uploaded files of the old one (rank 2); one deleted in between
    # ended the push with a bare KeyError.
    import threading

    import lordba.nn.model_files as model_files

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = save_adapter(tmp_path / "saved", seed=1)
    lm.add_adapter("chat", LoRDBAConfig(r=2, target_modules=["k_proj"], init="random"))
    workers = []

    def replace_chat():
        lm.delete_adapter("chat")
        lm.add_adapter("chat", LoRDBAConfig(r=4, target_modules=["k_proj"], init="random"))

    real = model_files.write_model_card

    def write_model_card(directory, config, *args, **kwargs):
        if not workers:  # another thread changes "chat" while the push is under way
            workers.append(threading.Thread(target=replace_chat))
            workers[0].start()
            workers[0].join(timeout=2)
        return real(directory, config, *args, **kwargs)

    monkeypatch.setattr(model_files, "write_model_card", write_model_card)
    lm.push_to_hub(REPO)
    workers[0].join(timeout=30)
    files = FakeApi.calls[-1][2]
    import json

    assert json.loads(files["chat/adapter_config.json"])["r"] == 2
    assert "- rank 2," in files[f"chat/{CARD_NAME}"].decode()
    assert lm.peft_config["chat"].r == 4  # the other thread's change happened, after the save


def test_push_to_hub_to_a_branch_writes_cards_that_load_that_branch(tmp_path, monkeypatch, offline_cache):
    # The card of an adapter pushed with revision="v2" loaded the repo's main branch (another adapter,
    # or none) and told to download main for export-lora
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = save_adapter(tmp_path / "saved", seed=3)
    lm.add_adapter("chat", LoRDBAConfig(r=2, target_modules=["k_proj"], init="random"))
    lm.push_to_hub(REPO, revision="v2")
    files = FakeApi.calls[-1][2]
    assert FakeApi.calls[-1][3]["revision"] == "v2"
    top, chat = files[CARD_NAME].decode(), files[f"chat/{CARD_NAME}"].decode()
    assert f'AutoLoRDBAModelForCausalLM.from_pretrained("{REPO}", revision="v2")' in top
    assert f'from_pretrained("{REPO}", subfolder="chat", revision="v2")' in chat
    assert f"hf download {REPO} --revision v2 --local-dir DIR" in top + chat
    for name in FILES:
        (tmp_path / "hub").mkdir(exist_ok=True)
        (tmp_path / "hub" / name).write_bytes(files[name])
    add_to_cache(offline_cache, REPO, tmp_path / "hub", "f" * 40, refs=("v2",))
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, revision="v2")  # the card's call
    torch.testing.assert_close(logits(loaded), logits(lm), rtol=0, atol=1e-5)
    lm.push_to_hub(REPO)  # main: no revision in the card
    assert "revision" not in FakeApi.calls[-1][2][CARD_NAME].decode()


def test_a_partly_downloaded_snapshot_names_the_repo_and_the_missing_file(tmp_path, offline_cache):
    # A cached snapshot with adapter_config.json but not the weights (a download cut short, or the
    # config fetched alone) was reported as "<cache path>/lordba_model.safetensors: missing", naming
    # neither the repo nor what to do
    save_adapter(tmp_path / "src")
    (tmp_path / "half").mkdir()
    shutil.copy(tmp_path / "src" / FILES[0], tmp_path / "half" / FILES[0])
    (tmp_path / "half" / FILES[1]).write_bytes(b"")  # add_to_cache lays out both names
    add_to_cache(offline_cache, REPO, tmp_path / "half", "9" * 40)
    (offline_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("9" * 40) / FILES[1]).unlink()
    for load in (
        lambda: LoRDBAModel.from_pretrained(tiny_llama(0), REPO),
        lambda: AutoLoRDBAModelForCausalLM.from_pretrained(REPO, local_files_only=True),
    ):
        with pytest.raises(
            AdapterFormatError,
            match=rf"Hub repo '{REPO}' \(revision main\).*lordba_model\.safetensors.*partial download",
        ):
            load()


def test_a_hub_repo_holding_a_peft_lora_says_so_and_how_to_convert_it(tmp_path, offline_cache):
    # A PEFT LoRA repo: only its adapter_config.json is fetched, and the error was the config's
    # "<cache path>: peft_type is 'LORA', not 'LORDBA'", without the repo or what to do with it
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "peft")
    repo = offline_cache / f"models--{REPO.replace('/', '--')}"
    (repo / "snapshots" / ("8" * 40)).mkdir(parents=True)
    shutil.copy(tmp_path / "peft" / "adapter_config.json", repo / "snapshots" / ("8" * 40) / "adapter_config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("8" * 40)
    with pytest.raises(ConfigError, match=rf"Hub repo '{REPO}'.*a PEFT 'LORA' adapter.*lordba convert"):
        LoRDBAModel.from_pretrained(tiny_llama(0), REPO)


def test_push_to_hub_keeps_a_card_written_on_the_hub_by_its_owner(tmp_path, monkeypatch):
    # save_pretrained never replaces a README.md lordba did not write, but push_to_hub uploaded its card
    # over the repo's own README.md (the owner's card on the Hub, lost); a card lordba wrote is updated
    from lordba.nn.hub import CARD_MARK

    FakeApi.calls, FakeApi.downloads = [], []
    FakeApi.remote = {CARD_NAME: "# my own card\n", f"chat/{CARD_NAME}": f"{CARD_MARK}\n# an older lordba card\n"}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    lm = save_adapter(tmp_path / "saved", seed=1)
    lm.add_adapter("chat", LoRDBAConfig(r=2, target_modules=["k_proj"], init="random"))
    try:
        lm.push_to_hub(REPO, revision="v3")
    finally:
        FakeApi.remote = {}
    files = FakeApi.calls[-1][2]
    assert CARD_NAME not in files  # the owner's card stays
    assert "rank 2" in files[f"chat/{CARD_NAME}"].decode()  # lordba's own card is rewritten
    assert sorted(FakeApi.downloads) == [(REPO, CARD_NAME, "v3"), (REPO, f"chat/{CARD_NAME}", "v3")]
    assert sorted(files) == sorted([*FILES, *(f"chat/{n}" for n in FILES), f"chat/{CARD_NAME}"])


def test_a_revision_asked_of_a_repo_id_that_is_also_a_local_folder_is_not_ignored_silently(
    tmp_path, offline_cache, monkeypatch
):
    # A local folder named like the repo (`hf download user/repo --local-dir user/repo`: main) wins, as
    # documented; a revision asked for then loaded that folder's adapter without a word
    monkeypatch.chdir(tmp_path)
    local = save_adapter(tmp_path / REPO, seed=1)
    save_adapter(tmp_path / "v2", seed=2)
    add_to_cache(offline_cache, REPO, tmp_path / "v2", "7" * 40, refs=("v2",))
    with pytest.warns(UserWarning, match=rf"'{REPO}' is a local directory.*revision 'v2' is not used"):
        loaded = LoRDBAModel.from_pretrained(tiny_llama(0), REPO, revision="v2")
    torch.testing.assert_close(logits(loaded), logits(local), rtol=0, atol=1e-5)


def test_create_or_update_model_card_is_the_models_as_in_peft(tmp_path):
    """PeftModel.create_or_update_model_card(output_dir); a LoRDBAModel had none (AttributeError from the base)."""
    lm = save_adapter(tmp_path / "saved", base_name="someone/base")
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / CARD_NAME).write_text("# mine\n")
    lm.create_or_update_model_card(tmp_path / "card")
    card = huggingface_hub.ModelCard.load(tmp_path / "card" / CARD_NAME)
    assert card.text == "# mine\n" and card.data.library_name == "lordba" and card.data.base_model == "someone/base"
    lm.create_or_update_model_card(tmp_path / "new")  # a folder that is none yet: made, as ModelCard.save makes it
    assert huggingface_hub.ModelCard.load(tmp_path / "new" / CARD_NAME).data.library_name == "lordba"
