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
