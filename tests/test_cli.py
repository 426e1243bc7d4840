"""The `jaxcompress` command line: help, usage errors, and the quick demo end to end."""

import re
import subprocess
import sys

import pytest

from jaxcompress import cli


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "jaxcompress", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_exits_0_and_lists_demo():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "usage: jaxcompress" in proc.stdout


def test_bad_subcommand_exits_2():
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["demo", "--help"], 0),
        ([], 2),
        (["no-such-command"], 2),
        (["demo", "--no-such-flag"], 2),
        (["demo", "--steps", "zero"], 2),
        (["demo", "--steps", "0"], 2),
    ],
)
def test_exit_codes_in_process(argv, code, capsys):
    assert cli.main(argv) == code


def test_failure_while_running_exits_1(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("disk on fire")

    command = cli.COMMANDS[0]
    monkeypatch.setattr(cli, "COMMANDS", (cli.Command(command.name, command.help, command.description, command.add_arguments, broken),))
    assert cli.main(["demo"]) == 1
    assert "disk on fire" in capsys.readouterr().err


def test_import_is_cheap():
    # Importing the CLI adds nothing heavy beyond what `import jaxcompress` already loads.
    code = (
        "import sys, jaxcompress; before = set(sys.modules); import jaxcompress.cli; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "('flax', 'optax', 'tqdm', 'sklearn', 'numpy', 'jax')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_demo_quick_prints_the_table(tmp_path):
    proc = run_cli("demo", "--quick", "--no-progress", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "dataset: " in out
    rows = {}
    # variant, accuracy, bytes, ratio, then b1 median and IQR, b256 median and IQR, sparsity
    row_pattern = re.compile(
        r"^(fp32|PTQ int8|pruned 80%(?: \+ QAT int8)?)\s+([\d.]+)%\s+([\d,]+)\s+([\d.]+)x"
        r"\s+([\d.]+)\s+([\d.]+)-([\d.]+)\s+([\d.]+)\s+([\d.]+)-([\d.]+)\s+(\S+)$"
    )
    for line in out.splitlines():
        match = row_pattern.match(line)
        if match:
            rows[match[1]] = {"accuracy": float(match[2]), "bytes": int(match[3].replace(",", "")), "ratio": float(match[4])}
            for median, low, high in ((5, 6, 7), (8, 9, 10)):  # the median lies inside its IQR
                assert float(match[low]) <= float(match[median]) <= float(match[high]), line
    assert set(rows) == {"fp32", "PTQ int8", "pruned 80%", "pruned 80% + QAT int8"}, out
    assert rows["fp32"]["accuracy"] > 50  # 60 steps are enough to learn something
    assert abs(rows["PTQ int8"]["accuracy"] - rows["fp32"]["accuracy"]) < 3
    assert rows["PTQ int8"]["ratio"] > 3.5 and rows["pruned 80% + QAT int8"]["ratio"] > 8
    # The files the table measures exist, with the sizes it reports; the export reloads.
    for name in ("fp32", "PTQ_int8", "pruned_80pct", "pruned_80pct_and_QAT_int8"):
        assert (tmp_path / f"{name}.safetensors").exists()
    assert (tmp_path / "fp32.safetensors").stat().st_size == rows["fp32"]["bytes"]
    assert (tmp_path / "pruned_qat_int.jaxexport").exists() and "reloaded" in out
    assert "interleaved runs" in out and "no faster than the dense model" in out
    assert re.search(r"max \|difference\| 0\.0e\+00 against the same program", out), out


@pytest.mark.parametrize("command, args", [("demo", []), ("compress", ["a", "b", "-r", "w8a8"]), ("inspect", ["a"])])
def test_unknown_flag_shows_the_subcommand_usage(command, args, capsys):
    assert cli.main([command, *args, "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: jaxcompress {command} "), err
    assert f"jaxcompress {command}: error: unrecognized arguments: --no-such-flag" in err


def test_compress_help_lists_every_preset_and_alias(capsys):
    from jaxcompress.checkpoint.recipes import PRESET_ALIASES, list_presets, load_recipe

    assert cli.main(["compress", "--help"]) == 0
    out = capsys.readouterr().out
    presets = list_presets()
    assert len(presets) >= 6
    for name in presets:
        line = next((line for line in out.splitlines() if re.match(re.escape(name) + r"[ :]", line.strip())), None)
        assert line is not None, f"{name} missing from compress --help:\n{out}"
        assert load_recipe(name).description.split()[0] in line
    for alias, target in PRESET_ALIASES.items():
        assert any(line.strip().startswith(target) and alias in line for line in out.splitlines()), alias
    assert max(len(line) for line in out.splitlines()) <= 100


def test_demo_help_documents_out_keep_and_the_measured_time(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--out DIR" in out and "--keep" in out
    assert "2-3 minutes" not in out and re.search(r"\d+ s on", out), out


def test_exit_codes_are_one_table_keyed_by_type():
    # README: 0 ok, 1 failure, 2 usage or recipe error, 3 unreadable checkpoint, 130 interrupted
    from jaxcompress import _errors as errors

    cases = [
        (errors.RecipeError("r.toml: bits"), 2),
        (errors.ArgumentError("--encoding n:m"), 2),
        (errors.DestinationFolderMissingError(2, "out/c.safetensors"), 2),
        (errors.DestinationExistsError(17, "c.safetensors"), 2),
        (errors.CheckpointFormatError("m.safetensors: truncated"), 3),
        (errors.CheckpointNotFoundError(2, "m.safetensors"), 3),
        (errors.CheckpointWriteError(28, "c.safetensors: no space"), 1),
        (ValueError("anything else"), 1),
        (KeyboardInterrupt(), 130),
    ]
    for err, code in cases:
        assert errors.exit_code(err) == code, err
    # the message never matters: the same text under another type gets that type's code
    assert errors.exit_code(ValueError("m.safetensors: checkpoint truncated")) == 1
    # and existing `except` clauses keep catching them
    assert isinstance(errors.CheckpointFormatError("x"), ValueError)
    assert isinstance(errors.DestinationFolderMissingError(2, "x"), FileNotFoundError)
