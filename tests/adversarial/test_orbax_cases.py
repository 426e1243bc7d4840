"""Tampered and corrupt Orbax checkpoints: `load_checkpoint`, `inspect_checkpoint` and
`compress_checkpoint`'s source detection give a clear error naming the directory (and leaf)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxcompress as jc
from jaxcompress.checkpoint import inspect_checkpoint
from tests.adversarial import tamper
from tests.adversarial.support import FORMAT_ERROR, expect_clear, expect_ok


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orbax")
    compressed = tamper.write_orbax(folder / "ckpt")
    plain = folder / "plain"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(plain, {"dense": {"kernel": np.ones((16, 256), np.float32), "bias": np.zeros(16, np.float32)}})
    checkpointer.wait_until_finished()
    return compressed, str(plain)


@pytest.fixture
def ckpt(template, tmp_path):
    return tamper.orbax_copy(template[0], tmp_path / "ckpt")


@pytest.fixture
def plain(template, tmp_path):
    return tamper.orbax_copy(template[1], tmp_path / "plain")


def _static(name, /, **changes):
    return lambda meta: tamper.orbax_record(meta, name)["qarray"]["static"].update(changes)


def _arrays(name, arrays):
    return lambda meta: tamper.orbax_record(meta, name)["qarray"].update(arrays=arrays)


METADATA = {
    "bits-99": (_static("dense/kernel", bits=99), "dense/kernel"),
    "bits-4-on-int8": (_static("dense/kernel", bits=4), "dense/kernel"),
    "channel-axes-contradict-scale": (_static("dense/kernel", channel_axes=[0]), "dense/kernel"),
    # group size 3 on the 16-long group axis: a valid ragged layout (6 groups) that contradicts the 4-group scale
    "group-size-ragged-contradicts-scale": (_static("grouped/kernel", group_size=3), "grouped/kernel"),
    "qtype-nf4-on-int8": (_static("dense/kernel", qtype="nf4"), "dense/kernel"),
    "group-size-contradicts-scale": (_static("grouped/kernel", group_size=8), "grouped/kernel"),
    "qtype-unknown": (_static("dense/kernel", qtype="int7"), "dense/kernel"),
    "unknown-static-field": (_static("dense/kernel", foo=3), "dense/kernel"),
    "dtype-nonsense": (_static("dense/kernel", dtype={"dtype": "nonsense"}), "dense/kernel"),
    "scale-array-missing": (_arrays("dense/kernel", ["values"]), "dense/kernel"),
    "unknown-array-field": (_arrays("dense/kernel", ["values", "scale", "bogus"]), "dense/kernel"),
    "kind-unknown": (lambda m: tamper.orbax_record(m, "dense/bias").update(kind="weird"), "dense/bias"),
    "format-version": (lambda m: m.update(format_version=9), "format"),
    "params-not-a-list": (lambda m: m.update(params="junk"), "params"),
    "record-path-junk": (lambda m: tamper.orbax_record(m, "dense/bias").update(path="dense"), "path"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_tampered_metadata_load(ckpt, case):
    change, needle = METADATA[case]
    tamper.tamper_orbax_metadata(ckpt, change)
    expect_clear(lambda: jc.load_checkpoint(ckpt), FORMAT_ERROR, "ckpt", needle)


@pytest.mark.parametrize("case", ["bits-99", "channel-axes-contradict-scale", "group-size-ragged-contradicts-scale"])
def test_tampered_metadata_inspect(ckpt, case):
    change, needle = METADATA[case]
    tamper.tamper_orbax_metadata(ckpt, change)
    expect_clear(lambda: inspect_checkpoint(ckpt), FORMAT_ERROR, "ckpt", needle)


def _damage(kind, path):
    if kind == "checkpoint-metadata-not-json":
        open(os.path.join(path, "_CHECKPOINT_METADATA"), "w").write("{ not json")
    elif kind == "tree-metadata-not-json":
        open(os.path.join(path, "_METADATA"), "w").write("{ not json")
    elif kind == "tree-metadata-missing":
        os.remove(os.path.join(path, "_METADATA"))
    elif kind == "data-truncated":
        for root, _, files in os.walk(path):
            if os.path.basename(root) == "d":
                for name in files:
                    file = os.path.join(root, name)
                    with open(file, "r+b") as f:
                        f.truncate(max(os.path.getsize(file) // 2, 1))
    elif kind == "data-garbage":
        for root, _, files in os.walk(path):
            if os.path.basename(root) == "d":
                for name in files:
                    file = os.path.join(root, name)
                    size = os.path.getsize(file)
                    open(file, "wb").write(np.random.default_rng(0).bytes(size))
    elif kind == "manifest-removed":
        os.remove(os.path.join(path, "manifest.ocdbt"))
    else:
        raise AssertionError(kind)


DAMAGE = ["checkpoint-metadata-not-json", "tree-metadata-not-json", "tree-metadata-missing", "data-truncated", "data-garbage", "manifest-removed"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_corrupt_compressed_checkpoint(ckpt, kind):
    _damage(kind, ckpt)
    expect_clear(lambda: jc.load_checkpoint(ckpt), FORMAT_ERROR, "ckpt")


@pytest.mark.parametrize("kind", DAMAGE)
def test_corrupt_source_for_compress(plain, tmp_path, kind):
    _damage(kind, plain)
    out = tmp_path / "out"
    out.mkdir()
    expect_clear(lambda: jc.compress_checkpoint(plain, out / "c.safetensors", "w8a8"), FORMAT_ERROR, "plain", folder=out)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    expect_clear(lambda: jc.load_checkpoint(tmp_path / "junk"), FORMAT_ERROR, "junk", "Orbax")


def test_file_given_as_orbax_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    expect_clear(lambda: jc.load_checkpoint(tmp_path / "file"), FORMAT_ERROR, "file", "Orbax")


def test_missing_checkpoint(tmp_path):
    expect_clear(lambda: jc.load_checkpoint(tmp_path / "nothing"), (FORMAT_ERROR, FileNotFoundError), "nothing")


def test_untampered_checkpoint_loads(ckpt):
    params, masks = expect_ok(lambda: jc.load_checkpoint(ckpt))
    assert params["grouped"]["kernel"].scale.shape == (4, 8) and masks["dense"]["kernel"] == ()


_EVENT_LOOP = textwrap.dedent(
    """
    import sys
    from jaxcompress.checkpoint import cli
    sys.exit(cli.main(["inspect", sys.argv[1], "--no-progress"]))
    """
)


def test_no_event_loop_traceback_after_a_clean_error(ckpt):
    # issue 18: "RuntimeError: Event loop is closed" from an Orbax thread after the error line
    _damage("data-garbage", ckpt)
    for _ in range(3):  # it was 1 run in 3
        proc = subprocess.run([sys.executable, "-c", _EVENT_LOOP, ckpt], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


def test_unretrieved_tensorstore_read_error_is_not_logged(caplog):
    # the rarer report of the same race: a second failed read's task is collected unretrieved
    import asyncio
    import gc

    from jaxcompress.checkpoint import orbax_guard

    with orbax_guard.translate("unused"):
        pass  # installs the filters

    async def fail(message):
        raise ValueError(message)

    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(fail(m)) for m in ("DATA_LOSS: bad node [tensorstore_spec='{}']", "some other failure")]
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    with caplog.at_level("ERROR", logger="asyncio"):
        del tasks
        gc.collect()
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(messages) == 1 and "some other failure" in messages[0], messages
