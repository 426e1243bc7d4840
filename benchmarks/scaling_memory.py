"""Per-device memory of a 7B LLaMA-like model's compressed weights, masks and optimizer state on a
sharded mesh: the table in docs/scaling.md.

Pure arithmetic on the shape list (no arrays are allocated), using the library's own layout
rules: a `QArray` has int8 (1 B) or int4 (0.5 B, packed) values of the param's shape and a float32
scale of the param's rank (per-channel: ``(1, out)``; per-group g128 along the input axis:
``(in / 128, out)``); a mask is a bool array of the param's shape (1 B per element in memory);
AdamW keeps two float32 moments per param. Each array is split over the mesh axes its sharding
names on the dims those axes divide (`jaxcompress.checkpoint.orbax_io.follow_sharding`: scales
and QAT ranges follow their param's sharding, a size-1 dim stays replicated).

Two layouts for N devices:

* ``fsdp``: every kernel split N ways along its OUTPUT axis (so per-channel scales split too;
  splitting the input axis would leave each device a full copy of every scale);
* ``tp8-fsdp``: Megatron tensor parallelism over 8 devices ('model': q/k/v/gate/up/lm_head
  split along the output axis, o/down along the input axis) x FSDP over N / 8 ('data', the other
  axis). The embedding table is split along the vocabulary over all devices in both layouts.

    python benchmarks/scaling_memory.py            # 8 / 64 / 256 devices, markdown table + JSON
    python benchmarks/scaling_memory.py --quick    # the same numbers (it is arithmetic), 8 devices
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, environment, write_json  # noqa: E402

MIB = 1024**2


def llama_shapes(layers=32, width=4096, ffn=11008, vocab=32000):
    """``(name, shape, role)`` of a LLaMA-like decoder (7B: 6.74e9 params). ``role`` says how
    tensor parallelism splits it: "column" (output axis), "row" (input axis), "embed", "norm"."""
    shapes = [("embed", (vocab, width), "embed")]
    for i in range(layers):
        for name in ("q", "k", "v"):
            shapes.append((f"layers_{i}/attn/{name}", (width, width), "column"))
        shapes.append((f"layers_{i}/attn/o", (width, width), "row"))
        shapes.append((f"layers_{i}/mlp/gate", (width, ffn), "column"))
        shapes.append((f"layers_{i}/mlp/up", (width, ffn), "column"))
        shapes.append((f"layers_{i}/mlp/down", (ffn, width), "row"))
        shapes.append((f"layers_{i}/attn_norm", (width,), "norm"))
        shapes.append((f"layers_{i}/mlp_norm", (width,), "norm"))
    shapes.append(("final_norm", (width,), "norm"))
    shapes.append(("lm_head", (width, vocab), "column"))
    return shapes


def axis_split(role: str, layout: str, devices: int) -> tuple[int, ...]:
    """How many ways each axis of a param is split (before the divisibility check)."""
    if role == "norm":
        return (1,)
    if role == "embed":
        return (devices, 1)
    if layout == "fsdp":
        return (1, devices)
    tp, fsdp = min(8, devices), max(1, devices // 8)
    return (fsdp, tp) if role == "column" else (tp, fsdp)


def per_device(shape, split, bytes_per_element: float) -> float:
    """Bytes on one device of an array of ``shape`` split ``split`` ways per axis (an axis the
    split does not divide stays whole, as `follow_sharding` does)."""
    parts = [d / s if d % s == 0 and d > 1 else d for d, s in zip(shape, split)]
    return math.prod(parts) * bytes_per_element


def memory_row(devices: int, layout: str, shapes=None) -> dict:
    shapes = llama_shapes() if shapes is None else shapes
    total = sum(math.prod(shape) for _, shape, _ in shapes)
    row = {"devices": devices, "layout": layout, "params": total}
    acc = dict.fromkeys(
        ["bf16_weights", "int8_values", "int8_scales", "int4_values", "int4_g128_scales", "masks_bool",
         "masks_bits", "adamw_moments_f32", "f32_params", "qat_ranges_int8"], 0.0)
    for _, shape, role in shapes:
        split = axis_split(role, layout, devices)
        acc["bf16_weights"] += per_device(shape, split, 2)
        acc["f32_params"] += per_device(shape, split, 4)
        acc["adamw_moments_f32"] += per_device(shape, split, 8)
        if role in ("column", "row"):  # quantized and pruned: every linear kernel (embedding kept bf16)
            channel_scale = (1, shape[1])
            group_scale = (shape[0] // 128, shape[1])
            acc["int8_values"] += per_device(shape, split, 1)
            acc["int8_scales"] += per_device(channel_scale, split, 4)
            acc["int4_values"] += per_device(shape, split, 0.5)
            acc["int4_g128_scales"] += per_device(group_scale, split, 4)
            acc["masks_bool"] += per_device(shape, split, 1)
            acc["masks_bits"] += per_device(shape, split, 1 / 8)
            acc["qat_ranges_int8"] += per_device(channel_scale, split, 2 * 4)  # (lo, hi)
        else:  # embedding and norms stay bf16 in the compressed model
            acc["int8_values"] += per_device(shape, split, 2)
            acc["int4_values"] += per_device(shape, split, 2)
    row.update({key: value / MIB for key, value in acc.items()})
    row["train_state"] = (
        row["f32_params"] + row["adamw_moments_f32"] + row["masks_bool"] + row["qat_ranges_int8"]
    )
    row["int8_model"] = row["int8_values"] + row["int8_scales"]
    row["int4_model"] = row["int4_values"] + row["int4_g128_scales"]
    return row


COLUMNS = [
    ("devices", "devices", "d"),
    ("layout", "layout", "s"),
    ("bf16_weights", "bf16 weights", ".0f"),
    ("int8_values", "int8 values*", ".0f"),
    ("int8_scales", "int8 scales", ".2f"),
    ("int4_values", "int4 values*", ".0f"),
    ("int4_g128_scales", "int4 g128 scales", ".1f"),
    ("masks_bool", "masks (bool)", ".0f"),
    ("masks_bits", "masks (1 bit)", ".1f"),
    ("adamw_moments_f32", "AdamW moments (f32)", ".0f"),
    ("qat_ranges_int8", "QAT ranges", ".2f"),
    ("train_state", "train state**", ".0f"),
]


def markdown(rows) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" if spec != "s" else "---" for _, _, spec in COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], spec) for key, _, spec in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 devices only")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--out", default=str(RESULTS_DIR / "scaling_memory.json"))
    args = parser.parse_args(argv)
    devices = [8] if args.quick else args.devices
    rows = [memory_row(n, layout) for n in devices for layout in ("fsdp", "tp8-fsdp")]
    print(f"LLaMA-7B-like: {rows[0]['params'] / 1e9:.2f}e9 params; MiB per device")
    print(markdown(rows))
    print("* the embedding table stays bf16 (counted here); ** f32 params + AdamW moments + bool masks + QAT ranges")
    write_json(args.out, {"quick": args.quick, "environment": environment(), "unit": "MiB per device", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
