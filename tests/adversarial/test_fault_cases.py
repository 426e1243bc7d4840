"""Faults while writing: disk full, read-only destination, SIGINT / SIGKILL mid-write, bad
destinations. The error names the destination; nothing is left behind (stale scratch of a
killed writer is removed by the next write to that folder, never a live writer's)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxcompress as jc
from tests.adversarial import faults, tamper
from tests.adversarial.support import expect_clear, expect_ok, listing

try:
    from jaxcompress._errors import CheckpointWriteError, DestinationError
except ImportError:  # pragma: no cover
    CheckpointWriteError, DestinationError = OSError, OSError


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    save_file({"dense.weight": rng.standard_normal((64, 256), dtype=np.float32),
               "dense.bias": np.zeros(64, np.float32),
               "other.weight": rng.standard_normal((32, 256), dtype=np.float32)}, str(path))
    return path


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("budget", [0, 100, 20_000, 40_000])  # 40 kB: the data fits, the final copy does not
def test_disk_full_during_compress(source, out, monkeypatch, budget):
    faults.disk_full(monkeypatch, out, budget)
    err = expect_clear(lambda: jc.compress_checkpoint(source, out / "c.safetensors", "w8a8"), CheckpointWriteError, "c.safetensors", "no space left", folder=out)
    assert err.errno == errno.ENOSPC


@pytest.mark.parametrize("budget", [0, 50, 3000])
def test_disk_full_during_export(out, monkeypatch, budget):
    params, masks = tamper.compressed_tree()
    faults.disk_full(monkeypatch, out, budget)
    expect_clear(lambda: jc.export_safetensors(out / "m.safetensors", params, masks), CheckpointWriteError, "m.safetensors", "no space left", folder=out)


def test_read_only_destination_compress(source, out, monkeypatch):
    faults.read_only(monkeypatch, out)
    expect_clear(lambda: jc.compress_checkpoint(source, out / "c.safetensors", "w8a8"), CheckpointWriteError, "c.safetensors", "read-only", folder=out)


def test_read_only_destination_export(out, monkeypatch):
    faults.read_only(monkeypatch, out)
    expect_clear(lambda: jc.export_safetensors(out / "m.safetensors", {"w": np.ones(3, np.float32)}), CheckpointWriteError, "m.safetensors", "read-only", folder=out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_for_real(source, out):
    os.chmod(out, 0o555)
    try:
        expect_clear(lambda: jc.compress_checkpoint(source, out / "c.safetensors", "w8a8"), CheckpointWriteError, "c.safetensors", folder=out)
    finally:
        os.chmod(out, 0o755)


def test_destination_folder_missing(source, tmp_path):
    expect_clear(lambda: jc.compress_checkpoint(source, tmp_path / "nope" / "c.safetensors", "w8a8"), DestinationError, "nope", "does not exist")


def test_export_destination_folder_missing(tmp_path):
    expect_clear(lambda: jc.export_safetensors(tmp_path / "nope" / "m.safetensors", {"w": np.ones(2)}), DestinationError, "nope", "does not exist")


def test_destination_is_a_folder(source, out):
    expect_clear(lambda: jc.compress_checkpoint(source, out, "w8a8"), DestinationError, "out", "directory", folder=out)


def test_destination_exists(source, out):
    (out / "c.safetensors").write_bytes(b"keep me")
    expect_clear(lambda: jc.compress_checkpoint(source, out / "c.safetensors", "w8a8"), DestinationError, "c.safetensors", "overwrite", folder=out)
    assert (out / "c.safetensors").read_bytes() == b"keep me"


def test_destination_is_the_source(source):
    expect_clear(lambda: jc.compress_checkpoint(source, source, "w8a8", overwrite=True), DestinationError, "model.safetensors", "same")


def test_export_bad_leaf_midway_leaves_nothing(out):
    params = {"a": np.ones(3, np.float32), "b": "not an array", "c": np.ones(2, np.float32)}
    expect_clear(lambda: jc.export_safetensors(out / "m.safetensors", params), (TypeError, ValueError), "'b'", folder=out)


def test_export_masks_that_do_not_match(out):
    expect_clear(lambda: jc.export_safetensors(out / "m.safetensors", {"a": np.ones(2)}, {"z": np.ones(2, bool)}), ValueError, "m.safetensors", "masks", folder=out)


def test_export_names_that_collide(out):
    expect_clear(lambda: jc.export_safetensors(out / "m.safetensors", {"a.b": np.ones(2), "a": {"b": np.ones(2)}}), ValueError, "a.b", folder=out)


def test_failed_overwrite_keeps_the_old_file(source, out, monkeypatch):
    dst = out / "c.safetensors"
    dst.write_bytes(b"old")
    faults.disk_full(monkeypatch, out, 5000)
    expect_clear(lambda: jc.compress_checkpoint(source, dst, "w8a8", overwrite=True), CheckpointWriteError, "c.safetensors")
    assert dst.read_bytes() == b"old" and listing(out) == ["c.safetensors"]


# ---- signals in a real child process ---------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from jaxcompress.checkpoint.compress import compress_checkpoint
    def progress(done, total, path):
        if done == 1:
            print("MIDWAY", flush=True)
            time.sleep(120)
    compress_checkpoint(sys.argv[1], sys.argv[2], "w8a8", progress=progress)
    """
)


def _paused_writer(source, dst):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(source), str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "MIDWAY", proc.stderr.read()[-2000:]
    return proc


def test_killed_writer_scratch_is_removed_by_the_next_write(source, out):
    alive = _paused_writer(source, out / "alive.safetensors")
    alive_scratch = set(listing(out))
    killed = _paused_writer(source, out / "killed.safetensors")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        scratch = set(listing(out))
        assert scratch and not (out / "killed.safetensors").exists()
        expect_ok(lambda: jc.compress_checkpoint(source, out / "next.safetensors", "w8a8"))
        after = set(listing(out))
        assert "next.safetensors" in after
        left = after - {"next.safetensors"}
        # the killed writer's scratch is gone; the live writer's is untouched
        assert left and left <= alive_scratch, (sorted(scratch), sorted(after))
        assert len(left) < len(scratch)
    finally:
        alive.kill()
        killed.kill()
        alive.wait(timeout=60)


def test_sigint_mid_write_leaves_nothing(source, out):
    proc = _paused_writer(source, out / "c.safetensors")
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and listing(out) == []


# ---- odd leaves in a source checkpoint --------------------------------------------------------


def test_zero_size_leaf_in_a_source(out):
    path = out.parent / "empty.safetensors"
    save_file({"empty.weight": np.zeros((0, 256), np.float32), "dense.weight": np.ones((8, 256), np.float32)}, str(path))
    table = expect_ok(lambda: jc.compress_checkpoint(path, out / "c.safetensors", "w8a8"))
    rows = {row.path: row for row in table.rows}
    assert rows["empty/weight"].format == "float32" and rows["dense/weight"].format == "int8"


def test_nan_weight_in_a_source(out):
    path = out.parent / "nan.safetensors"
    w = np.ones((8, 256), np.float32)
    w[3, 7] = np.nan
    save_file({"dense.weight": w}, str(path))
    expect_clear(lambda: jc.compress_checkpoint(path, out / "c.safetensors", "w8a8"), ValueError, "dense", "nan", folder=out)


def test_channel_axes_as_an_int_in_a_recipe(source, out):
    recipe = out.parent / "r.toml"
    recipe.write_text("[[quantize]]\npattern = '.*weight'\nbits = 8\nchannel_axes = 0\n")
    table = expect_ok(lambda: jc.compress_checkpoint(source, out / "c.safetensors", recipe))
    assert {row.granularity for row in table.rows if row.format == "int8"} == {"per-channel(0,)"}
