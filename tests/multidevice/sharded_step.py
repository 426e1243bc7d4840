"""One sharded ``qat(prune(adamw))`` training run on a 2x4 mesh of virtual CPU devices (a script,
run in a fresh process by tests/multidevice/stress.py and tests/test_multidevice.py).

The setting of issue 21: a small decoder-style stack with kernels sharded FSDP x TP (the
attention-out and MLP-down kernels ``P("model", "data")``, the others ``P("data", "model")``),
gradual magnitude pruning to 50% (masks recomputed under prune's ``lax.switch`` every
``--update-every`` steps), int8 per-channel fake-quant with qat's tracked ranges (``lax.cond``
until ``freeze_step``), a quantize NaN check and a schedule check (host callbacks, called when a
check fails, through `jaxcompress._checks.checked`) inside the jitted step. Prints ``OK <steps> <loss>`` on
success; XLA aborts the process if a collective never completes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice/sharded_step.py --steps 40
"""

from __future__ import annotations

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxcompress as jc  # noqa: E402
from jaxcompress._checks import checked  # noqa: E402

D, F, LAYERS, B, T = 64, 128, 2, 8, 16
ROW, COLUMN = P("model", "data"), P("data", "model")  # (in, out) kernels: row- / column-parallel


def specs():
    layer = {"query": COLUMN, "key": COLUMN, "value": COLUMN, "out": ROW, "up": COLUMN, "down": ROW}
    return {f"layer_{i}": {name: {"kernel": spec} for name, spec in layer.items()} for i in range(LAYERS)}


def host_params(seed):
    rng = np.random.default_rng(seed)
    shapes = {"query": (D, D), "key": (D, D), "value": (D, D), "out": (D, D), "up": (D, F), "down": (F, D)}
    return {
        f"layer_{i}": {
            name: {"kernel": (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)}
            for name, shape in shapes.items()
        }
        for i in range(LAYERS)
    }


def model(params, x):
    for i in range(LAYERS):
        p = params[f"layer_{i}"]
        q, k, v = (x @ p[name]["kernel"] for name in ("query", "key", "value"))
        logits = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -1e9)
        x = x + jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits, -1), v) @ p["out"]["kernel"]
        x = x + jax.nn.gelu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]
    return x


def build(mesh, steps, update_every, checks=True):
    """(step function, params, state, batch) of the run; ``step`` is jitted, not yet compiled."""
    put = lambda tree, spec_tree: jax.tree.map(  # noqa: E731
        lambda x, spec: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec)), tree, spec_tree
    )
    params = put(host_params(0), specs())
    quant_rules = [jc.QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,))]
    schedule = jc.polynomial(0.5, begin_step=0, end_step=max(1, steps // 2), frequency=update_every)
    prune_rules = [jc.PruneRule(pattern=r".*kernel", sparsity=schedule)]
    opt = jc.qat(
        jc.prune(optax.adamw(1e-3), prune_rules, update_every=update_every, end_step=max(1, steps // 2)),
        quant_rules,
        freeze_step=max(1, (3 * steps) // 4),
    )
    state = opt.init(params)
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)
    rng = np.random.default_rng(1)
    batch_sharding = NamedSharding(mesh, P("data", None, None))
    x = jax.device_put(rng.standard_normal((B, T, D)).astype(np.float32), batch_sharding)
    y = jax.device_put(rng.standard_normal((B, T, D)).astype(np.float32), batch_sharding)

    def loss(params, ranges):
        return jnp.mean((model(jc.fake_quant(params, quant_rules, ranges=ranges), x) - y) ** 2)

    def train_step(params, state):
        value, grads = jax.value_and_grad(loss)(params, jc.qat_ranges(state))
        updates, state = opt.update(grads, state, params)
        if checks:  # run-time checks inside the SPMD step, as the library's own checks are
            # Each check rides on the returned loss (a check whose value is unused is dead code).
            value = checked(value, jnp.isfinite(value), "loss is not finite")
            sparsity = schedule(jax.tree.leaves(state)[0])
            value = checked(value, (sparsity >= 0) & (sparsity <= 1), "sparsity schedule left [0, 1]")
            q = jc.quantize(params["layer_0"]["out"]["kernel"], bits=8, channel_axes=(-1,), name="out")
            value = value + 0.0 * jnp.sum(q.scale)  # float x * 0 is not folded: the NaN check stays
        return optax.apply_updates(params, updates), state, value

    placement = jax.tree.map(lambda a: a.sharding, (params, state))
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(*placement, replicated))
    return step, params, state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--update-every", type=int, default=2)
    parser.add_argument("--no-checks", action="store_true", help="leave the run-time checks out of the step")
    parser.add_argument("--hlo", default=None, help="write the compiled step's HLO text here")
    parser.add_argument("--progress", action="store_true", help="print a line after each dispatched step")
    args = parser.parse_args(argv)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    step, params, state = build(mesh, args.steps, args.update_every, checks=not args.no_checks)
    compiled = step.lower(params, state).compile()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
    value = None
    for i in range(args.steps):
        params, state, value = compiled(params, state)
        if args.progress:
            print(f"step {i}", flush=True)
    value = float(value)
    masks = jax.tree.leaves(state.inner_state.masks)
    sparsity = 1.0 - sum(int(np.asarray(m).sum()) for m in masks) / sum(m.size for m in masks)
    print(f"OK {args.steps} {value:.6f} sparsity {sparsity:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
