"""Train-step time of ``jaxcompress.prune(adamw)`` vs plain ``adamw`` (and JaxPruner), MLP and CNN.

    python benchmarks/prune_step.py            # full: 6 rounds x variants x 100 steps per model
    python benchmarks/prune_step.py --quick    # CI-sized: 2 rounds of 25 steps

Models (step time does not depend on the data: a fixed random batch):

* ``mlp``: 784-2048-1792-10 ReLU MLP (5,297,418 params), batch 128; both hidden kernels pruned;
* ``cnn``: three 3x3 convs (1->32, 32->64 stride 2, 64->128 stride 2) and a 6272-256-10 head on
  28x28x1 images (1.7M params), batch 64; the last two convs and the first dense kernel pruned.

The pruned optimizer is gradual magnitude pruning (polynomial schedule to 90%), masks recomputed
every ``update_every`` steps inside the jitted update (`lax.switch`), so each timed block of
``update_every`` steps contains exactly one mask update. JaxPruner's ``MagnitudePruning`` with
the same schedule shape runs side by side when ``jaxpruner`` is importable, and so does the
``masking floor``: ``adamw`` keeping FIXED bool masks applied (no schedule, no mask updates), what
masking alone costs on this machine (`fixed_mask_adamw`). It is not on PyPI and
its published source targets older jax: ``benchmarks/envs/jaxpruner.sh`` builds a venv with a
documented source port (``jax.tree_map`` -> ``jax.tree.map``, ...), and the benchmark run with that
venv's python records the ported commit and the port in its JSON (``"jaxpruner"``). Without it the
benchmark says "jaxpruner not installed: skipped".

Every variant is compiled first, then timed SIDE BY SIDE: a round is ``update_every`` steps of
each variant, run in chunks of 10 steps that alternate between the variants (order rotating),
so load from other processes hits all alike; ratios are per round (total and median).
Reported per model: the ratio of total times, the median of the per-round ratios, one ordinary
and one mask-update step on their own, minor page faults per step and the XLA temporary-buffer
size of each compiled step (XLA:CPU allocates that buffer per execution: above glibc's 32 MB
mmap ceiling it is fresh pages, i.e. page faults, on every step; `prune` adds only the masks
packed to bits, 1/8 byte per pruned weight, see `jaxcompress.pruning.bitmask`). The goal is
<= 1.05x.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import resource
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import jaxcompress.pruning as jp  # noqa: E402
from benchmarks._common import RESULTS_DIR, cpu_model, environment, format_table, write_json  # noqa: E402

MLP_SIZES = (784, 2048, 1792, 10)
FINAL_SPARSITY = 0.9
SCHEDULE_UPDATES = 100  # the schedule reaches its final sparsity after this many mask updates
CHUNK_STEPS = 10  # steps per variant before switching to the next one (interleaving grain)


# ---- models ------------------------------------------------------------------------------------


def _normal(rng, shape, fan_in):
    return jnp.asarray(rng.standard_normal(shape) * np.sqrt(2 / fan_in), jnp.float32)


def mlp_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        f"dense_{i}": {"kernel": _normal(rng, (fan_in, fan_out), fan_in), "bias": jnp.zeros(fan_out, jnp.float32)}
        for i, (fan_in, fan_out) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:]))
    }


def mlp_logits(params, x):
    h = x
    for i in range(len(MLP_SIZES) - 1):
        h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < len(MLP_SIZES) - 2:
            h = jax.nn.relu(h)
    return h


CNN_CONVS = ((1, 32, 1), (32, 64, 2), (64, 128, 2))  # (in, out, stride), 3x3 kernels, SAME
CNN_DENSE = ((7 * 7 * 128, 256), (256, 10))


def cnn_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (cin, cout, _) in enumerate(CNN_CONVS):
        params[f"conv_{i}"] = {"kernel": _normal(rng, (3, 3, cin, cout), 9 * cin), "bias": jnp.zeros(cout, jnp.float32)}
    for i, (fan_in, fan_out) in enumerate(CNN_DENSE):
        params[f"dense_{i}"] = {"kernel": _normal(rng, (fan_in, fan_out), fan_in), "bias": jnp.zeros(fan_out, jnp.float32)}
    return params


def cnn_logits(params, x):
    h = x
    for i, (_, _, stride) in enumerate(CNN_CONVS):
        layer = params[f"conv_{i}"]
        h = lax.conv_general_dilated(h, layer["kernel"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + layer["bias"])
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


MODELS = {
    # name: (params, logits, input shape, batch, pruned leaves (regex over "layer/kernel"))
    "mlp": (mlp_params, mlp_logits, (MLP_SIZES[0],), 128, ("dense_0", "dense_1")),
    "cnn": (cnn_params, cnn_logits, (28, 28, 1), 64, ("conv_1", "conv_2", "dense_0")),
}


def loss_for(logits_fn):
    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()

    return loss_fn


# ---- variants ----------------------------------------------------------------------------------


def _plain_step(opt, loss_fn):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _jaxpruner_step(pruner, opt, loss_fn):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return pruner.post_gradient_update(params, state), state

    return step


def adamw():
    return optax.adamw(1e-3, weight_decay=1e-4)


class FixedMaskState(NamedTuple):
    inner: Any
    masks: Any  # {layer: {"kernel": bool mask}} for the pruned kernels, None elsewhere


def fixed_mask_adamw(pruned) -> optax.GradientTransformation:
    """The floor of what masking costs: ``adamw`` whose updates keep FIXED masks (the 90%
    magnitude masks of the initial kernels, bool, no schedule, never recomputed) applied, one
    fused ``(p + u) * m - p`` per pruned kernel; what ``prune`` does on an ordinary step, minus
    its schedule and mask updates."""
    inner = adamw()

    def mask_of(path, p):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] in pruned and keys[-1] == "kernel":
            magnitude = jnp.abs(p)
            return magnitude >= jnp.quantile(magnitude, FINAL_SPARSITY)
        return None

    def init(params):
        return FixedMaskState(inner.init(params), jax.tree_util.tree_map_with_path(mask_of, params))

    def update(updates, state, params):
        updates, inner_state = inner.update(updates, state.inner, params)
        updates = jax.tree.map(
            lambda m, u, p: u if m is None else (p + u) * m.astype(p.dtype) - p,
            state.masks, updates, params, is_leaf=lambda m: m is None,
        )
        return updates, FixedMaskState(inner_state, state.masks)

    return optax.GradientTransformation(init, update)


def build_variants(pruned, update_every):
    """``{name: (optimizer, step function builder, masks of a state)}`` for one model."""
    pattern = "(" + "|".join(pruned) + ")/kernel"
    rule = jp.PruneRule(
        pattern=pattern,
        sparsity=jp.polynomial(
            FINAL_SPARSITY, begin_step=0, end_step=SCHEDULE_UPDATES * update_every, frequency=update_every
        ),
    )
    variants = {
        "adamw": (adamw(), _plain_step, None),
        "prune(adamw)": (jp.prune(adamw(), rule, update_every=update_every), _plain_step, jp.prune_masks),
        "masking floor": (fixed_mask_adamw(pruned), _plain_step, lambda state: state.masks),
    }
    try:
        import jaxpruner
    except ImportError:
        return variants, "jaxpruner not installed: skipped"
    pruner = jaxpruner.MagnitudePruning(
        sparsity_distribution_fn=functools.partial(
            jaxpruner.sparsity_distributions.uniform,
            sparsity=FINAL_SPARSITY,
            filter_fn=lambda key, param: key[0] in pruned and key[-1] == "kernel",
        ),
        scheduler=jaxpruner.sparsity_schedules.PolynomialSchedule(
            update_freq=update_every, update_start_step=0, update_end_step=SCHEDULE_UPDATES * update_every
        ),
    )
    wrapped = pruner.wrap_optax(adamw())
    try:  # the published source targets older jax (e.g. it calls jax.tree_map, gone in jax 0.10)
        jax.eval_shape(wrapped.init, {"probe": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}})
    except AttributeError as error:
        return variants, f"jaxpruner is installed but does not run on jax {jax.__version__} ({error}): skipped"
    variants["jaxpruner"] = (
        wrapped,
        functools.partial(_jaxpruner_step, pruner),
        lambda state: jax.tree.map(lambda m: m if m is None else m.astype(bool), state.masks),
    )
    return variants, f"jaxpruner {_jaxpruner_version()}" + (f"; {port}" if (port := jaxpruner_port()) else "")


def _jaxpruner_version() -> str:
    try:
        return importlib.metadata.version("jaxpruner")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def jaxpruner_port() -> str | None:
    """What `benchmarks/envs/jaxpruner.sh` recorded next to the interpreter: which commit of
    JaxPruner's source was ported to this jax, and how (None when it was installed otherwise)."""
    path = Path(sys.prefix) / "PORT.txt"
    return " ".join(path.read_text().split()) if path.is_file() else None


# ---- timing ------------------------------------------------------------------------------------


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_block(step, params, state, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        params, state = step(params, state, x, y)
    jax.block_until_ready((params, state))
    return time.perf_counter() - start, params, state


def measure_model(name, variants, rounds, update_every):
    init, logits_fn, input_shape, batch, _ = MODELS[name]
    loss_fn = loss_for(logits_fn)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, *input_shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    n_params = sum(int(p.size) for p in jax.tree.leaves(init()))
    n_pruned = sum(int(init()[layer]["kernel"].size) for layer in MODELS[name][4])

    steps, states, temp_mb = {}, {}, {}
    t0 = time.perf_counter()
    for variant, (opt, builder, _) in variants.items():
        params = init()
        state = opt.init(params)
        compiled = jax.jit(builder(opt, loss_fn), donate_argnums=(0, 1)).lower(params, state, x, y).compile()
        temp_mb[variant] = compiled.memory_analysis().temp_size_in_bytes / 1e6
        steps[variant] = compiled
        params, state = compiled(params, state, x, y)  # step 0: a mask update
        jax.block_until_ready(params)
        states[variant] = (params, state)
    compile_s = time.perf_counter() - t0

    # One ordinary step and one mask-update step on their own, for each pruning variant.
    single = {}
    for variant in variants:
        if variant == "adamw":
            continue
        params, state = states[variant]
        _, params, state = run_block(steps[variant], params, state, x, y, update_every - 2)
        ordinary, params, state = run_block(steps[variant], params, state, x, y, 1)
        update, params, state = run_block(steps[variant], params, state, x, y, 1)
        single[variant] = {"ordinary_s": ordinary, "mask_update_s": update}
        states[variant] = (params, state)

    names = list(variants)
    per_round, faults = [], {v: 0 for v in names}
    chunks = max(1, update_every // CHUNK_STEPS)
    for r in range(rounds):
        # A round is `update_every` steps per variant (one mask update each), run in chunks of
        # CHUNK_STEPS steps that alternate between the variants (order rotating), so that a
        # change in machine load hits every variant within seconds.
        times = {v: 0.0 for v in names}
        for c in range(chunks):
            shift = (r * chunks + c) % len(names)
            order = names[shift:] + names[:shift]
            for variant in order:
                params, state = states[variant]
                steps_here = update_every // chunks + (1 if c < update_every % chunks else 0)
                before = minor_faults()
                elapsed, params, state = run_block(steps[variant], params, state, x, y, steps_here)
                faults[variant] += minor_faults() - before
                times[variant] += elapsed
                states[variant] = (params, state)
        per_round.append(times)
        print(f"{name} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v / update_every * 1e3:.1f} ms/step" for k, v in times.items()), flush=True)

    totals = {v: sum(t[v] for t in per_round) for v in names}
    ratios = {v: [t[v] / t["adamw"] for t in per_round] for v in names}
    sparsity = {
        v: jp.mask_sparsity(jax.tree.map(lambda m: optax.MaskedNode() if m is None else m, get(states[v][1]),
                                          is_leaf=lambda m: m is None))["total"]
        for v, (_, _, get) in variants.items()
        if get is not None
    }
    rows = [
        {
            "variant": v,
            "ms_per_step": totals[v] / (rounds * update_every) * 1e3,
            "ratio_total": totals[v] / totals["adamw"],
            "ratio_median": float(np.median(ratios[v])),
            "minor_page_faults_per_step": faults[v] / (rounds * update_every),
            "xla_temp_mb": temp_mb[v],
            "mask_update_step_ms": single[v]["mask_update_s"] * 1e3 if v in single else None,
            "final_sparsity": sparsity.get(v),
        }
        for v in names
    ]
    ratio_total = totals["prune(adamw)"] / totals["adamw"]
    return {
        "params": n_params,
        "pruned_weights": n_pruned,
        "batch": batch,
        "input_shape": input_shape,
        "compile_and_first_step_s": compile_s,
        "per_round_s": per_round,
        "per_round_ratio": ratios["prune(adamw)"],
        "ratio_total": ratio_total,
        "ratio_median": float(np.median(ratios["prune(adamw)"])),
        "goal_met": ratio_total <= 1.05,
        "ratio_to_floor": totals["prune(adamw)"] / totals["masking floor"],
        "single_step_s": single,
        "results": rows,
    }


def main(argv=None, extra_variants=None):
    """``extra_variants(pruned, update_every) -> {name: (opt, step builder, masks getter)}`` adds
    variants to every model (e.g. another version of jaxcompress, for a before/after table)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 25 steps (CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prune_step.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 6)
    update_every = 25 if args.quick else 100
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")

    results, jaxpruner_note = {}, None
    for name in models:
        variants, jaxpruner_note = build_variants(MODELS[name][4], update_every)
        if extra_variants is not None:
            variants.update(extra_variants(MODELS[name][4], update_every))
        results[name] = measure_model(name, variants, rounds, update_every)
    result = {
        "benchmark": "prune_step",
        "quick": args.quick,
        "cpu_model": cpu_model(),
        "update_every": update_every,
        "rounds": rounds,
        "steps_per_round": update_every,
        "goal_ratio": 1.05,
        "jaxpruner": jaxpruner_note,
        "models": results,
        "environment": environment(),
    }
    path = write_json(args.out, result)
    print()
    print(f"CPU: {result['cpu_model']} ({result['environment']['cpu_count']} CPUs, load average "
          f"{result['environment']['load_average_1_5_15_min']}); timings on a shared machine move: compare ratios")
    print(jaxpruner_note)
    for name, res in results.items():
        print()
        print(f"{name}: {res['params']:,} params, batch {res['batch']}; masks updated every {update_every} steps, "
              f"{rounds} interleaved rounds")
        print(format_table(res["results"], [
            ("variant", "variant", ""), ("ms_per_step", "ms/step", ".2f"), ("ratio_total", "ratio", ".3f"),
            ("ratio_median", "median ratio", ".3f"), ("minor_page_faults_per_step", "page faults/step", ".0f"),
            ("xla_temp_mb", "XLA temp MB", ".1f"), ("mask_update_step_ms", "mask-update step ms", ".1f"),
            ("final_sparsity", "sparsity", ".3f"),
        ]))
        print(f"prune(adamw) / adamw: total {res['ratio_total']:.3f}, median per round {res['ratio_median']:.3f} "
              f"(goal <= 1.05: {'met' if res['goal_met'] else 'NOT met'}); prune(adamw) / masking floor: "
              f"total {res['ratio_to_floor']:.3f}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
