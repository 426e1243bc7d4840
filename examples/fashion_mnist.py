"""Fashion-MNIST, end to end: train -> PTQ -> gradual pruning -> QAT -> integer model on disk.

The full-length version of ``jaxcompress demo`` with every knob as a flag; writes the results as
JSON. The default is a full run on the 60k/10k Fashion-MNIST split (Debian package
``dataset-fashion-mnist``; scikit-learn digits otherwise) that takes several minutes on 2 cores.

    python examples/fashion_mnist.py --sparsity 0.9 --bits 8 --out results/fmnist_s90_int8.json
    python examples/fashion_mnist.py --bits 4 --group-size 32 --sparsity 0.0 ...
    python examples/fashion_mnist.py --quick          # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxcompress.demo.pipeline import QUICK_SUBSET, PipelineConfig, format_table, run_pipeline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on a subset with few steps")
    parser.add_argument("--fp32-steps", type=int, default=4000)
    parser.add_argument("--prune-steps", type=int, default=3000)
    parser.add_argument("--qat-steps", type=int, default=2000)
    parser.add_argument("--sparsity", type=float, default=0.9, help="final kernel sparsity (first conv stays dense)")
    parser.add_argument("--bits", type=int, default=8, help="weight bits for PTQ and QAT (2..8)")
    parser.add_argument("--group-size", type=int, default=None, help="per-group scales along the input axis")
    parser.add_argument("--activation", choices=("dynamic", "static", "weight_only"), default="dynamic",
                        help="how the integer model treats activations (dynamic: per-row int8)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/fashion_mnist.json", help="results JSON path")
    parser.add_argument("--artifacts", default=None, help="folder for the safetensors files and the export")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.activation == "static":
        print("--activation static needs calibrated activation scales; this example runs dynamic or weight_only",
              file=sys.stderr)
        return 2
    config = PipelineConfig(
        fp32_steps=60 if args.quick else args.fp32_steps,
        prune_steps=60 if args.quick else args.prune_steps,
        qat_steps=40 if args.quick else args.qat_steps,
        sparsity=args.sparsity,
        bits=args.bits,
        group_size=args.group_size,
        activation=args.activation,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        **(QUICK_SUBSET if args.quick else {}),
        out_dir=args.artifacts,
        progress=not args.no_progress,
    )
    result = run_pipeline(config)
    print(f"\n{result['dataset']}: {result['train_images']} train / {result['test_images']} test images")
    print(format_table(result))
    fp32 = result["rows"][0]["accuracy"]
    for row in result["rows"][1:]:
        print(f"  {row['variant']:<30} {100 * (row['accuracy'] - fp32):+.2f} pt vs fp32")
    print(f"export: {result['export']['path']} ({result['export']['bytes']:,} bytes, "
          f"reload max |diff| {result['export']['max_abs_difference']:.2e})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
