"""inspect_checkpoint rows (bytes from the header, sparsity, SQNR) and the analysis helpers."""

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import jaxcompress as jc
from jaxcompress.checkpoint import analysis, orbax_io, report, safetensors_io
from jaxcompress.checkpoint.inspection import inspect_checkpoint


def test_rows_match_file_and_source(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32), dtype=np.float32)
    src = tmp_path / "src.safetensors"
    save_file({"w": w, "b": np.ones(32, np.float32)}, str(src))
    mask = np.abs(w) > np.quantile(np.abs(w), 0.9)
    q = jc.quantize(jnp.where(mask, w, 0.0), bits=8, channel_axes=(1,))
    dst = tmp_path / "q.safetensors"
    size = safetensors_io.export_safetensors(dst, {"w": q, "b": jnp.ones(32)}, {"w": mask, "b": optax.MaskedNode()})
    table = inspect_checkpoint(dst, against=src)
    rows = {row.path: row for row in table.rows}
    assert rows["w"].encoding == "bitmap" and rows["w"].sparsity == pytest.approx(1 - mask.mean())
    assert rows["w"].bytes == 64 * 32 // 8 + int(mask.sum()) + 32 * 4  # bitmap + kept int8 + scales
    assert rows["w"].bytes_before == w.nbytes and rows["b"].sqnr_db == math.inf
    expected = jc.sqnr_db(w, q.dequantize())
    assert rows["w"].sqnr_db == pytest.approx(expected, rel=1e-5)
    assert table.file_bytes == size and table.ratio == pytest.approx(src.stat().st_size / size)
    data = json.loads(report.render_json(table))
    assert data["totals"]["file_bytes"] == size
    assert "w" in report.render_text(table) and report.render_markdown(table).count("\n|") >= 3


def test_orbax_checkpoint_rows(tmp_path):
    params = {"w": jc.quantize(jnp.ones((8, 8)), bits=4, channel_axes=(0,), group_size=4, group_axis=1)}
    orbax_io.save_checkpoint(tmp_path / "ckpt", params)
    row, = inspect_checkpoint(tmp_path / "ckpt").rows
    assert (row.format, row.bits, row.bytes) == ("int4", 4, params["w"].nbytes)
    assert "per-group" in row.granularity


def test_cost_analysis_counts_int8_dot():
    x = jnp.ones((4, 64), jnp.int8)
    w = jnp.ones((64, 16), jnp.int8)
    cost = analysis.cost_analysis(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.int32), x, w)
    assert cost.flops == 2 * 4 * 64 * 16
    assert cost.bytes_accessed >= x.nbytes + w.nbytes


def test_pareto_front_and_plot(tmp_path):
    points = [analysis.ParetoPoint("a", 10, 0.5), analysis.ParetoPoint("b", 5, 0.6), analysis.ParetoPoint("c", 20, 0.7)]
    assert [p.label for p in analysis.pareto_front(points)] == ["b", "c"]
    pytest.importorskip("matplotlib")
    out = analysis.pareto_plot(points, str(tmp_path / "p.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_pareto_figure_has_a_log_size_axis_a_step_front_and_labels_that_do_not_overlap():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    # crowded on purpose: two pairs of nearly identical variants and long labels
    points = [
        analysis.ParetoPoint("fp32", 4.0e6, 0.91), analysis.ParetoPoint("PTQ int8", 1.05e6, 0.905),
        analysis.ParetoPoint("pruned 80%", 1.1e6, 0.90), analysis.ParetoPoint("pruned 80% + QAT int8", 0.35e6, 0.902),
        analysis.ParetoPoint("w4-g128", 0.6e6, 0.88), analysis.ParetoPoint("w4-g128-bf16", 0.58e6, 0.881),
        analysis.ParetoPoint("sparse90-int8", 0.2e6, 0.7),
    ]
    fig = analysis.pareto_figure(points)
    try:
        ax, = fig.axes
        assert ax.get_xscale() == "log"
        front = analysis.pareto_front(points)
        steps = [line for line in ax.get_lines() if line.get_drawstyle() == "steps-post"]
        assert len(steps) == 1 and steps[0].get_marker() == "o"
        np.testing.assert_allclose(steps[0].get_xdata(), [p.size_bytes / 2**20 for p in front])
        np.testing.assert_allclose(steps[0].get_ydata(), [p.accuracy for p in front])
        off_front = ax.collections[0].get_offsets()  # the variants not on the front, marked too
        assert len(off_front) == len(points) - len(front)
        assert sorted(t.get_text() for t in ax.texts) == sorted(p.label for p in points)
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not a.overlaps(b), (a, b)
    finally:
        plt.close(fig)


def test_pareto_figure_rejects_sizes_a_log_axis_cannot_show():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="'empty'"):
        analysis.pareto_figure([analysis.ParetoPoint("empty", 0, 0.5)])


def test_pruned_and_rounding_zeros_are_counted_separately(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[:, 0] = 1e-4  # rounds to zero at int4 with a per-column scale set by the large values
    w[0, :] = 100.0
    q = jc.quantize(jnp.asarray(w), bits=4, symmetric=True, channel_axes=(1,))
    codes = np.asarray(q.dequantize(np.float32))
    expected_zeros = float(np.mean(codes == 0))  # symmetric: zero is code 0 (bitmap-encodable below)
    assert expected_zeros > 0.5  # the 100.0 row makes most int4 codes zero
    never_pruned = tmp_path / "int4.safetensors"
    safetensors_io.export_safetensors(never_pruned, {"w": q})
    row, = inspect_checkpoint(never_pruned).rows
    assert row.sparsity == 0.0 and row.zeros == pytest.approx(expected_zeros)

    mask = np.abs(w) > np.quantile(np.abs(w), 0.5)
    qm = jc.quantize(jnp.where(mask, w, 0.0), bits=4, symmetric=True, channel_axes=(1,))
    pruned = tmp_path / "pruned.safetensors"
    safetensors_io.export_safetensors(pruned, {"w": qm}, {"w": mask})
    row, = inspect_checkpoint(pruned).rows
    kept_zeros = np.asarray(qm.dequantize(np.float32))[mask] == 0
    assert row.encoding == "bitmap" and row.sparsity == pytest.approx(1 - mask.mean())
    assert row.zeros == pytest.approx(kept_zeros.sum() / mask.size)  # zeros among the kept values only


def test_int4_text_table_fits_in_100_columns_and_keeps_layer_numbers(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"encoder.layer.{i}.attention.self.{n}.weight" for i in (0, 11) for n in ("query", "key")]
    tensors = {n: rng.standard_normal((1536, 384)).astype(np.float32) for n in names}
    tensors["embeddings.word_embeddings.weight"] = rng.standard_normal((1000, 384)).astype(np.float32)
    src, dst = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    save_file(tensors, str(src))
    jc.compress_checkpoint(src, dst, "w4-g128")
    text = report.render_text(inspect_checkpoint(dst, against=src))
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert "pruned" in text and "zeros" in text and "g128@1" in text
    shown = [line.split()[0] for line in text.splitlines()[3:-1]]
    assert len(set(shown)) == len(shown)  # shortened paths stay distinct here
    assert any("/11/" in s and s.endswith("/key/weight") for s in shown), shown


@pytest.mark.parametrize("options", [
    dict(bits=4, channel_axes=(1,)),                    # symmetric: zeros read from the codes
    dict(bits=8, channel_axes=(1,), symmetric=False),   # zero point: zeros of the dequantized values
    dict(bits=8, qtype="float8_e4m3fn", channel_axes=(1,)),
])
def test_zeros_match_the_dequantized_values(options):
    from jaxcompress.checkpoint.inspection import leaf_row

    w = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    w[:, :3] = 0.0
    w[::4, 5] = 1e-6
    q = jc.quantize(jnp.asarray(w), **options)
    reference = float(np.mean(np.asarray(q.dequantize(np.float32), np.float64) == 0))
    row = leaf_row("w", q, None)
    assert reference >= 3 / 16 and row.zeros == pytest.approx(reference, abs=0) and row.sparsity == 0.0


@pytest.mark.parametrize("options", [dict(bits=4, channel_axes=(0,)), dict(bits=4, channel_axes=(-1,), group_size=3, group_axis=0),
                                     dict(bits=3, channel_axes=(0,), group_size=4, group_axis=1),
                                     dict(bits=8, symmetric=False, channel_axes=())])
@pytest.mark.parametrize("stored", [False, True])
def test_asymmetric_zeros_come_from_the_codes_and_match_the_dequantized_leaf(options, stored):
    """Asymmetric leaves (the int4 default): zero where the code equals its group's zero point,
    the same set the dequantized float leaf gives (no float copy is made to find it)."""
    from jaxcompress.checkpoint.inspection import _zeros

    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 10)).astype(np.float32)
    w[rng.random(w.shape) < 0.4] = 0.0
    w[2] = 0.0  # an all-zero row
    q = jc.quantize(jnp.asarray(w), **options)
    assert q.zero_point is not None
    if stored:
        q = q.with_layout((1, 0))
    want = np.asarray(q.dequantize(np.float32)) == 0
    np.testing.assert_array_equal(_zeros(q), want)
    assert want.sum() >= (w == 0).sum() > 0
