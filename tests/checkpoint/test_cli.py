"""`jaxcompress compress` / `inspect`: output, formats and exit codes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxcompress.checkpoint import cli


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    save_file({"dense.weight": rng.standard_normal((16, 128), dtype=np.float32), "dense.bias": np.zeros(16, np.float32)}, str(path))
    return path


def test_compress_then_inspect(model, tmp_path, capsys):
    dst = tmp_path / "q.safetensors"
    assert cli.main(["compress", str(model), str(dst), "--recipe", "w4-g128", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dense/weight" in out and "int4" in out and "ratio" in out
    assert cli.main(["inspect", str(dst), "--against", str(model), "--format", "json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["path"]: row for row in report["leaves"]}
    assert rows["dense/weight"]["format"] == "int4" and rows["dense/weight"]["sqnr_db"] > 15
    assert rows["dense/bias"]["sqnr_db"] == "inf"
    assert report["totals"]["ratio"] > 3
    out_md = tmp_path / "table.md"
    assert cli.main(["inspect", str(dst), "--format", "markdown", "-o", str(out_md), "--sort", "bytes", "--no-progress"]) == 0
    assert out_md.read_text().startswith("### q.safetensors")


def test_exit_codes(model, tmp_path, capsys):
    dst = tmp_path / "q.safetensors"
    assert cli.main(["compress", str(model), str(dst), "--recipe", "no-such-recipe"]) == cli.EXIT_USAGE
    assert "no-such-recipe" in capsys.readouterr().err
    assert cli.main(["compress", str(model), str(dst)]) == cli.EXIT_USAGE  # --recipe is required
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert cli.main(["compress", str(tmp_path / "junk.safetensors"), str(dst), "-r", "w8a8"]) == cli.EXIT_BAD_INPUT
    assert "junk.safetensors" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == cli.EXIT_BAD_INPUT
    assert not dst.exists()
    assert cli.main(["compress", str(model), str(dst), "-r", "w8a8", "--report", "none"]) == 0
    assert cli.main(["compress", str(model), str(dst), "-r", "w8a8"]) == cli.EXIT_USAGE  # exists
    assert cli.main(["compress", str(model), str(dst), "-r", "w8a8", "--overwrite", "--report", "none"]) == 0


def test_help_reads_well_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "jaxcompress.checkpoint.cli", "compress", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--recipe" in result.stdout and "exit codes" in result.stdout and "w4-g128" in result.stdout


def test_inspect_plain_file(model, capsys):
    assert cli.main(["inspect", str(model), "--no-progress", "--sort", "path"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("dense/bias") and "float32" in lines[3]
    assert "2 leaves" in lines[-1]


def test_registered_in_the_jaxcompress_command(model, tmp_path):
    import jaxcompress.cli as main_cli

    names = [command.name for command in main_cli.COMMANDS]
    if "compress" not in names:
        pytest.skip("compress / inspect are not registered in jaxcompress/cli.py yet")
    assert {"compress", "inspect"} <= set(names)
    result = subprocess.run([sys.executable, "-m", "jaxcompress", "compress", str(model), str(tmp_path / "q.safetensors"),
                             "-r", "w8a8", "--report", "none"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert main_cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == cli.EXIT_BAD_INPUT
