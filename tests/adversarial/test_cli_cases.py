"""The command line: exit codes as the README documents them (0 ok, 1 failure, 2 usage or
recipe error, 3 unreadable checkpoint, 130 interrupted), chosen by the error's type, with one
line on stderr naming the file / leaf / option."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxcompress import cli as main_cli
from jaxcompress.checkpoint import cli
from tests.adversarial import faults, tamper
from tests.adversarial.support import listing

CASES = []


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    save_file({"dense.weight": rng.standard_normal((16, 256), dtype=np.float32), "dense.bias": np.zeros(16, np.float32)}, str(path))
    return path


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _run(capsys, argv, code, *needles, folder=None):
    before = listing(folder) if folder is not None else None
    got = main_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    if got != code:
        pytest.fail(f"VAGUE: exit {got}, expected {code}; stderr: {err[-600:]}")
    missing = [n for n in needles if n.lower() not in err.lower()]
    if missing:
        pytest.fail(f"VAGUE: stderr does not name {missing}: {err[-600:]}")
    if "Traceback" in err:
        pytest.fail(f"VAGUE: a traceback on stderr: {err[-600:]}")
    if before is not None and listing(folder) != before:
        pytest.fail(f"LEFT: {sorted(set(listing(folder)) - set(before))}")
    return err


def _recipe(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_group_axis_that_does_not_fit_is_a_recipe_error(capsys, tmp_path, model, out):
    # (a group size that does not divide its axis is a ragged last group now, not an error)
    recipe = _recipe(tmp_path, """
        [[quantize]]
        pattern = ".*weight"
        bits = 4
        group_size = 7
        group_axis = 5
        """)
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", recipe, "--no-progress"], 2, "dense/weight", "group axis 5", "r.toml", folder=out)


def test_encoding_n_m_on_a_leaf_that_is_not_n_m(capsys, model, out):
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", "sparse90-int8", "--encoding", "n:m", "--no-progress"], 2, "dense", "n:m", folder=out)


def test_missing_destination_folder(capsys, model, tmp_path):
    _run(capsys, ["compress", model, tmp_path / "nope" / "c.safetensors", "-r", "w8a8", "--no-progress"], 2, "nope", "does not exist")


def test_destination_is_a_folder(capsys, model, out):
    _run(capsys, ["compress", model, out, "-r", "w8a8", "--no-progress"], 2, "out", folder=out)


def test_recipe_that_matches_no_leaf(capsys, tmp_path, model, out):
    recipe = _recipe(tmp_path, """
        [[quantize]]
        pattern = "decoder/.*"
        bits = 8
        """)
    err = _run(capsys, ["compress", model, out / "c.safetensors", "-r", recipe, "--no-progress", "--report", "none"], 0, "no leaf compressed")
    assert "warning" in err.lower()


@pytest.mark.parametrize("text,needle", [
    ("[[quantize]\npattern = 'x'", "toml"),
    ("[[quantize]]\npattern = '.*'\nbitz = 4", "bitz"),
    ("[[quantize]]\npattern = '.*'\nbits = 99", "bits"),
    ("[[prune]]\npattern = '.*'\nsparsity = 1.5", "sparsity"),
    ("[[prune]]\npattern = '.*'\nsparsity = 0.5\nscope = 'global'", "scope"),
    ("name = 3\n[[quantize]]\npattern = '.*'", "name"),
])
def test_bad_recipe_file(capsys, tmp_path, model, out, text, needle):
    recipe = _recipe(tmp_path, text)
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", recipe, "--no-progress"], 2, "r.toml", needle, folder=out)


def test_unknown_preset(capsys, model, out):
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", "w3-magic", "--no-progress"], 2, "w3-magic", folder=out)


def test_unused_rule_as_error(capsys, tmp_path, model, out):
    recipe = _recipe(tmp_path, "[[quantize]]\npattern = '.*weight'\n[[quantize]]\npattern = 'nothing'\n")
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", recipe, "--on-unused", "error", "--no-progress"], 2, "nothing", folder=out)


@pytest.mark.parametrize("damage", ["header-deeply-nested", "truncated", "pickle", "random-bytes"])
def test_damaged_source(capsys, model, out, damage):
    from tests.adversarial.test_safetensors_cases import _container

    _container(damage, str(model))
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", "w8a8", "--no-progress"], 3, "model.safetensors", folder=out)
    _run(capsys, ["inspect", model, "--no-progress"], 3, "model.safetensors")


@pytest.mark.parametrize("change,leaf", [
    (lambda m: tamper.record(m, "dense.kernel")["qarray"]["static"].update(bits=99), "dense.kernel"),
    (lambda m: tamper.record(m, "grouped.kernel")["qarray"]["static"].update(group_size=3), "grouped.kernel"),
    (lambda m: tamper.record(m, "dense.kernel")["qarray"]["static"].update(channel_axes=[0]), "dense.kernel"),
])
def test_tampered_compressed_file(capsys, tmp_path, change, leaf):
    path = tamper.write_safetensors(tmp_path / "q.safetensors")
    tamper.tamper_records(path, change)
    _run(capsys, ["inspect", path, "--no-progress"], 3, "q.safetensors", leaf)


def test_missing_source(capsys, tmp_path, out):
    _run(capsys, ["compress", tmp_path / "gone.safetensors", out / "c.safetensors", "-r", "w8a8", "--no-progress"], 3, "gone.safetensors", folder=out)


def test_inspect_against_missing(capsys, model):
    _run(capsys, ["inspect", model, "--against", model.parent / "gone.safetensors", "--no-progress"], 3, "gone.safetensors")


def test_inspect_output_into_missing_folder(capsys, model, tmp_path):
    _run(capsys, ["inspect", model, "-o", tmp_path / "nope" / "t.txt", "--no-progress"], 2, "nope")


def test_disk_full(capsys, model, out, monkeypatch):
    faults.disk_full(monkeypatch, out, 2000)
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", "w8a8", "--no-progress"], 1, "c.safetensors", "no space", folder=out)


def test_read_only_destination(capsys, model, out, monkeypatch):
    faults.read_only(monkeypatch, out)
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", "w8a8", "--no-progress"], 1, "c.safetensors", "read-only", folder=out)


def test_bad_option_value(capsys, model, out):
    _run(capsys, ["compress", model, out / "c.safetensors", "-r", "w8a8", "--encoding", "zip"], 2, "encoding", folder=out)


def test_checkpoint_cli_alone_uses_the_same_codes(capsys, tmp_path, model, out):
    assert cli.main(["compress", str(model), str(tmp_path / "nope" / "c.safetensors"), "-r", "w8a8", "--no-progress"]) == 2
    assert cli.main(["inspect", str(tmp_path / "gone.safetensors"), "--no-progress"]) == 3


_SIGINT = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from jaxcompress.checkpoint import compress
    real = compress._compress_streamed
    def slow(*args, **kwargs):
        print("MIDWAY", flush=True)
        time.sleep(120)
    compress._compress_streamed = slow
    from jaxcompress.cli import main
    sys.exit(main(["compress", sys.argv[1], sys.argv[2], "-r", "w8a8", "--no-progress"]))
    """
)


def test_interrupt_exits_130_and_leaves_nothing(model, out):
    proc = subprocess.Popen([sys.executable, "-c", _SIGINT, str(model), str(out / "c.safetensors")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert listing(out) == []


def test_no_import_cycle_between_the_clis():
    code = "import sys, jaxcompress.checkpoint.cli; assert 'jaxcompress.cli' not in sys.modules, 'checkpoint.cli imports jaxcompress.cli'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
