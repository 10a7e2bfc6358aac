"""``lordba cache``: lists the cache's folders and the quantized-base entries, and --clear-quantized removes them."""

from lordba.cli import main


def test_cache_lists_the_folders_and_clears_the_quantized_bases(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path))
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / ("a" * 20 + ".safetensors")).write_bytes(b"x" * 3 * 2**20)
    (quantized / ("b" * 20 + ".safetensors.tmp123")).write_bytes(b"x")  # a writer's temporary file: kept
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "lib.so").write_bytes(b"x" * 2**20)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "kernels/" in out and "1.0 MB" in out
    assert "quantized bases: 1 entry, 3.0 MB" in out
    assert (quantized / ("a" * 20 + ".safetensors")).exists()  # listing removes nothing
    assert main(["cache", "--clear-quantized"]) == 0
    assert "removed the quantized bases: 3.0 MB freed" in capsys.readouterr().out
    assert sorted(p.name for p in quantized.iterdir()) == ["b" * 20 + ".safetensors.tmp123"]
    assert (tmp_path / "kernels" / "lib.so").exists()


def test_cache_without_a_cache_folder_says_where_it_would_be(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORDBA_CACHE", str(tmp_path / "none"))
    assert main(["cache"]) == 0
    assert "quantized bases: 0 entries, 0.0 MB" in capsys.readouterr().out
