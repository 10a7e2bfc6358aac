"""The conversion report's files: written whole or not at all."""

import json
import subprocess
import sys
import textwrap

WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    from lordba.convert.report import ConversionReport, LayerReport
    from lordba.format.sizes import size_report

    dims = {f"model.layers.{i}.q_proj": (64, 64, 4) for i in range(40)}
    layers = [LayerReport(p, 64, 64, 4, 4, 2.0, 1.0, 0.5, 0.5, 0.6, None, 0.5, 0.5, 0.5, 0.5, "svd", 3, 100, 1.5, 0.2)
              for p in dims]
    report = ConversionReport("lora", "int8", {}, layers, size_report(dims, "int8"), 1.5, 5000)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file past the limit: EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        getattr(report, sys.argv[2])(sys.argv[1])
    except OSError as err:
        print("OSError", err.errno)
    """
)


def test_a_report_that_cannot_be_written_whole_leaves_the_previous_file(tmp_path):
    """``--report FILE`` over an earlier report on a full disk: the earlier file stays as it was (the
    write truncated it and left the first 4 KiB of the new JSON, which no JSON reader takes)."""
    for method, name in (("write_json", "report.json"), ("write_markdown", "report.md")):
        path = tmp_path / name
        path.write_text(json.dumps({"earlier": "report"}))
        before = path.read_bytes()
        out = subprocess.run([sys.executable, "-c", WRITER, str(path), method], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("OSError"), out.stdout
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"report.json", name})  # no temp left


def test_written_reports_are_whole(tmp_path):
    from lordba.convert.report import ConversionReport, LayerReport
    from lordba.format.sizes import size_report

    dims = {"m.q_proj": (64, 64, 4)}
    layer = LayerReport(
        "m.q_proj", 64, 64, 4, 4, 2.0, 1.0, 0.5, 0.5, 0.6, None, 0.5, 0.5, 0.5, 0.5, "svd", 3, 100, 1.5, 0.2
    )
    report = ConversionReport("lora", "int8", {}, [layer], size_report(dims, "int8"), 1.5, 5000)
    assert json.loads(report.write_json(tmp_path / "r.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert report.write_markdown(tmp_path / "r.md").read_text() == report.to_markdown()
