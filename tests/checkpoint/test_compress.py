"""compress_checkpoint: same result as the in-memory transforms, atomic, clear errors."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

import jaxcompress as jc
from jaxcompress.checkpoint import compress, recipes, safetensors_io
from jaxcompress.checkpoint.compress import compress_checkpoint
from jaxcompress.checkpoint.safetensors_format import HeaderError
from jaxcompress._errors import CheckpointFormatError
from jaxcompress.pruning import prune_params
from jaxcompress.qarray import QArray


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embeddings.word_embeddings.weight": rng.standard_normal((40, 256), dtype=np.float32),
        "encoder.layer.0.dense.weight": rng.standard_normal((16, 256), dtype=np.float32),
        "encoder.layer.0.dense.bias": rng.standard_normal(16, dtype=np.float32),
        "encoder.layer.0.LayerNorm.weight": np.ones(16, np.float32),
        "embeddings.position_ids": np.arange(8, dtype=np.int64)[None],
    }


def _nested(flat):
    tree = {}
    for name, value in flat.items():
        node = tree
        parts = name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_weights(), str(path))
    return path


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))


def _assert_same(a, b):
    fa, fb = _leaves(a), _leaves(b)
    assert [jax.tree_util.keystr(p) for p, _ in fa] == [jax.tree_util.keystr(p) for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert type(x) is type(y) or not isinstance(x, QArray), path
        if isinstance(x, QArray):
            assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y), path
        for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            assert np.asarray(u).dtype == np.asarray(v).dtype, path
            np.testing.assert_array_equal(np.asarray(u).astype(np.float32), np.asarray(v).astype(np.float32), err_msg=str(path))


@pytest.mark.parametrize("preset", ["w8a8", "w4-g128", "2of4-int8", "sparse90-int8"])
def test_matches_in_memory_transforms(model, tmp_path, preset, monkeypatch):
    monkeypatch.setattr(compress, "CHUNK_BYTES", 4096)  # force the sliced quantization path
    monkeypatch.setattr(compress, "SLICE_MIN_BYTES", 1024)
    recipe = recipes.load_recipe(preset)
    dst = tmp_path / "out.safetensors"
    table = compress_checkpoint(model, dst, recipe)
    restored, masks = safetensors_io.import_safetensors(dst)
    # 64-bit integer leaves (position ids) come back exact, as NumPy, not truncated by jnp.asarray
    params = jax.tree_util.tree_map(lambda x: x if x.dtype == np.int64 else jnp.asarray(x), _nested(_weights()))
    expected_masks = None
    if recipe.prune:
        params, expected_masks = prune_params(params, recipe.prune, key=jax.random.PRNGKey(0), on_unused="ignore")
    expected, _ = jc.quantize_params(params, recipe.quantize, on_unused="ignore")
    _assert_same(expected, restored)
    if expected_masks is not None:
        got = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(masks)}
        for path, mask in jax.tree_util.tree_leaves_with_path(expected_masks):
            np.testing.assert_array_equal(np.asarray(got[jax.tree_util.keystr(path)]), np.asarray(mask))
    assert table.file_bytes == os.path.getsize(dst)
    assert table.ratio > 1.5


@pytest.mark.parametrize("shape", [(50, 256), (256, 50)])
def test_sliced_quantization_equals_whole(tmp_path, monkeypatch, shape):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape, dtype=np.float32)
    rules = [
        jc.QuantRule(pattern=".*", bits=4, channel_axes=(0,), group_size=128, group_axis=-1) if shape[1] == 256 else
        jc.QuantRule(pattern=".*", bits=4, channel_axes=(-1,), group_size=128, group_axis=-2),
        jc.QuantRule(pattern=".*", bits=8, channel_axes=(0,)),
        jc.QuantRule(pattern=".*", bits=8, channel_axes=(-1,), symmetric=False),
        jc.QuantRule(pattern=".*", qtype="float8_e4m3fn", channel_axes=(1,)),
    ]
    quantize_module = sys.modules["jaxcompress.quant.arrays"]

    calls = []
    original = quantize_module.quantize
    monkeypatch.setattr(quantize_module, "quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    for rule in rules:
        recipe = recipes.Recipe("t", "", (rule,), (), "t")
        monkeypatch.setattr(compress, "SLICE_MIN_BYTES", 0)
        calls.clear()
        sliced, _ = compress.compress_leaf([["key", "weight"]], w, recipe, chunk_bytes=3000)
        assert len(calls) > 1  # really sliced
        monkeypatch.setattr(compress, "SLICE_MIN_BYTES", 1 << 40)
        whole, _ = compress.compress_leaf([["key", "weight"]], w, recipe)
        _assert_same({"w": whole}, {"w": sliced})


def test_orbax_source(tmp_path):
    tree = _nested({k: v for k, v in _weights().items() if v.dtype == np.float32})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", tree)
    checkpointer.wait_until_finished()
    compress_checkpoint(tmp_path / "orbax", tmp_path / "out.safetensors", "w8a8")
    restored, _ = safetensors_io.import_safetensors(tmp_path / "out.safetensors")
    assert restored["encoder"]["layer"]["0"]["dense"]["weight"].values.dtype == jnp.int8
    assert restored["encoder"]["layer"]["0"]["LayerNorm"]["weight"].dtype == jnp.float32


def _listing(folder):
    return sorted(os.listdir(folder))


def test_bad_sources_write_nothing(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "c.safetensors"
    data = model.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-10])
    with pytest.raises(HeaderError, match="truncated"):
        compress_checkpoint(tmp_path / "truncated.safetensors", dst, "w8a8")
    (tmp_path / "foreign.bin").write_bytes(b"PK\x03\x04 not a checkpoint at all")
    with pytest.raises(HeaderError, match="foreign.bin"):
        compress_checkpoint(tmp_path / "foreign.bin", dst, "w8a8")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        compress_checkpoint(tmp_path / "dir", dst, "w8a8")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        compress_checkpoint(tmp_path / "missing", dst, "w8a8")
    assert _listing(out) == []
    compress_checkpoint(model, dst, "w8a8")
    with pytest.raises(ValueError, match="already a jaxcompress-compressed file"):
        compress_checkpoint(dst, out / "again.safetensors", "w8a8")
    with pytest.raises(FileExistsError, match="overwrite"):
        compress_checkpoint(model, dst, "w8a8")
    compress_checkpoint(model, dst, "w4-g128", overwrite=True)
    assert _listing(out) == ["c.safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600


def test_recipe_errors_name_the_key(model, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[prune]]\npattern = ".*weight"\nsparsity = 0.5\nscope = "global"\n')
    with pytest.raises(recipes.RecipeError, match=r"r.toml: prune\[0\].scope"):
        compress_checkpoint(model, tmp_path / "o.safetensors", path)
    path.write_text('[[quantize]]\npattern = ".*nothing"\nbits = 8\n')
    with pytest.raises(recipes.RecipeError, match=r"quantize\[0\] \(pattern '.\*nothing'\)"):
        compress_checkpoint(model, tmp_path / "o.safetensors", path, on_unused="error")
    with pytest.warns(UserWarning, match="matched no leaf"), pytest.warns(compress.NoLeafCompressedWarning, match="no leaf compressed"):
        compress_checkpoint(model, tmp_path / "o.safetensors", path)
    path.write_text('[[quantize]]\npattern = ".*weight"\nbits = 4\nchannel_axes = [5]\n')  # (ragged groups fit any width now)
    with pytest.raises(recipes.RecipeError, match="weight.*channel axis 5 is out of range"):
        compress_checkpoint(model, tmp_path / "o2.safetensors", path)
    assert not (tmp_path / "o2.safetensors").exists()


_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    # A child started from a background job inherits SIGINT ignored (then Python installs no
    # KeyboardInterrupt handler); restore what an interactive Ctrl-C gives.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from jaxcompress.checkpoint.compress import compress_checkpoint
    def progress(done, total, path):
        if done == 2:
            print("MIDWAY", flush=True)
            time.sleep(60)
    compress_checkpoint(sys.argv[1], sys.argv[2], "w8a8", progress=progress)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_midway_leaves_no_destination(model, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "c.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(model), str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not dst.exists()
    if sig == signal.SIGINT:  # an interrupt cleans its scratch files up too
        assert _listing(out) == []


def _orbax_model(path):
    tree = _nested({k: v for k, v in _weights().items() if v.dtype == np.float32})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def test_corrupt_orbax_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _orbax_model(tmp_path / "meta")
    (tmp_path / "meta" / "_METADATA").write_text("{ not json")
    with pytest.raises(ValueError, match="meta"):
        compress_checkpoint(tmp_path / "meta", out / "c.safetensors", "w8a8")
    _orbax_model(tmp_path / "data")
    for root, _, files in os.walk(tmp_path / "data"):  # truncate every data file of the kvstore
        for name in files:
            if os.path.basename(root) == "d":
                file = os.path.join(root, name)
                with open(file, "r+b") as f:
                    f.truncate(max(os.path.getsize(file) // 2, 1))
    with pytest.raises(ValueError, match=r"data: .*(corrupt|truncated)"):
        compress_checkpoint(tmp_path / "data", out / "c.safetensors", "w8a8")
    assert _listing(out) == []


def test_progress_bar_and_callback(model, tmp_path, capsys):
    pytest.importorskip("tqdm")
    compress_checkpoint(model, tmp_path / "a.safetensors", "w8a8", progress=True)
    assert "compress" in capsys.readouterr().err  # tqdm's bar, on stderr
    seen = []
    compress_checkpoint(model, tmp_path / "b.safetensors", "w8a8", progress=lambda done, total, path: seen.append((done, total, path)))
    assert [s[0] for s in seen] == list(range(1, 6)) and seen[-1][1] == 5


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_half_precision_sources(tmp_path, dtype, monkeypatch):
    import ml_dtypes

    from jaxcompress.checkpoint.safetensors_format import SafetensorsWriter

    monkeypatch.setattr(compress, "SLICE_MIN_BYTES", 1024)
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(dtype)
    with SafetensorsWriter(tmp_path / "m.safetensors") as writer:
        writer.add("dense.weight", w)
    for preset in ("w4-g128", "sparse90-int8"):
        compress_checkpoint(tmp_path / "m.safetensors", tmp_path / f"{preset}.safetensors", preset)
        params, masks = safetensors_io.import_safetensors(tmp_path / f"{preset}.safetensors")
        q = params["dense"]["weight"]
        assert q.dtype == dtype and q.dequantize().dtype == dtype
        expected = jc.quantize(jnp.asarray(w) if masks is None else jnp.where(masks["dense"]["weight"], jnp.asarray(w), 0),
                               recipes.load_recipe(preset).quantize[2].spec)
        _assert_same({"w": expected}, {"w": q})


def test_float_tree_from_export_safetensors_is_a_source(tmp_path):
    # a float tree jc.export_safetensors wrote is a plain source (issue 19); compressed ones are refused
    rng = np.random.default_rng(0)
    tree = {"dense": {"kernel": rng.standard_normal((16, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
            "blocks": [{"kernel": rng.standard_normal((8, 8)).astype(np.float32)}]}
    jc.export_safetensors(tmp_path / "float.safetensors", tree)
    table = compress_checkpoint(tmp_path / "float.safetensors", tmp_path / "w8.safetensors", "w8a8")
    assert {row.path: row.format for row in table.rows} == {"blocks/0/kernel": "int8", "dense/bias": "float32", "dense/kernel": "int8"}
    params, _ = safetensors_io.import_safetensors(tmp_path / "w8.safetensors")
    assert isinstance(params["blocks"], list)  # the records' path tokens (an index) survive
    _assert_same({"w": jc.quantize(jnp.asarray(tree["dense"]["kernel"]), recipes.load_recipe("w8a8").quantize[3].spec)},
                 {"w": params["dense"]["kernel"]})
    jc.export_safetensors(tmp_path / "q.safetensors", {"w": jc.quantize(jnp.ones((4, 4)), bits=8), "b": jnp.zeros(4)})
    with pytest.raises(CheckpointFormatError, match="already a jaxcompress-compressed file.*'w'"):
        compress_checkpoint(tmp_path / "q.safetensors", tmp_path / "o.safetensors", "w8a8")
    jc.export_safetensors(tmp_path / "m.safetensors", {"w": jnp.ones((4, 4))}, {"w": jnp.eye(4, dtype=bool)})
    with pytest.raises(CheckpointFormatError, match="already a jaxcompress-compressed file"):
        compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "w8a8")
    assert not (tmp_path / "o.safetensors").exists()


def test_leaf_with_fewer_rows_than_one_slice_keeps_its_shape(tmp_path):
    # a regression since 449c57a (checkpoint/sliced.py): the only, padded slice kept its padded length
    w = np.random.default_rng(0).standard_normal((192, 128)).astype(np.float32)  # 96 KiB: quantized in slices
    save_file({"mlp.up.weight": w}, str(tmp_path / "m.safetensors"))
    compress_checkpoint(tmp_path / "m.safetensors", tmp_path / "w8.safetensors", "w8a8")
    params, _ = safetensors_io.import_safetensors(tmp_path / "w8.safetensors")
    assert params["mlp"]["up"]["weight"].shape == (192, 128)
