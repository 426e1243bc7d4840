"""`prune` follows optax's wrapper conventions (extra args, eval_shape, nesting) and refuses misuse
at run time: bad schedules (naming the rule) and transformations chained after it (naming the leaf).
Also: the compiled step needs no temporary buffer beyond the inner optimizer's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress.pruning as jp
from jaxcompress.rules import QuantRule
from jaxcompress.training import qat, qat_ranges
from tests.pruning import reference
from tests.pruning.helpers import data, loss, make_step, mlp_params

GRADUAL = jp.PruneRule(pattern=".*kernel", sparsity=jp.polynomial(0.6, begin_step=0, end_step=40, frequency=10))


def test_extra_update_args_reach_the_inner_optimizer():
    # reduce_on_plateau needs value=; prune forwards it (it failed with "unexpected keyword").
    inner = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1, factor=0.5))
    opt = jp.prune(inner, {".*kernel": 0.5}, update_every=5)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params, value=value + 10.0 * state.count)  # never improves
        return optax.apply_updates(params, updates), state

    for _ in range(6):
        params, state = step(params, state)
    plateau = state.inner_state[1]
    assert float(plateau.scale) < 1.0  # the plateau was seen: the value arrived
    assert np.all(np.asarray(params["l1"]["kernel"])[~np.asarray(jp.prune_masks(state)["l1"]["kernel"])] == 0.0)


def test_init_under_eval_shape_matches_the_real_init():
    # an orbax abstract-restore target: this raised ConcretizationTypeError with a schedule
    opt = jp.prune(optax.adamw(1e-3), [GRADUAL], update_every=10)
    params = mlp_params()
    abstract = jax.eval_shape(opt.init, params)
    real = opt.init(params)
    is_node = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    assert jax.tree.structure(abstract, is_leaf=is_node) == jax.tree.structure(real, is_leaf=is_node)
    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
        assert a.shape == r.shape and a.dtype == r.dtype


@pytest.mark.parametrize("nesting", ["multisteps", "inject", "chain"])
def test_prune_masks_and_qat_ranges_from_nested_states(nesting):
    params, (x, y) = mlp_params(), data()
    quant = [QuantRule(pattern=".*kernel", bits=8, channel_axes=(-1,))]
    core = qat(jp.prune(optax.adam(1e-2), {".*kernel": 0.5}, update_every=4), quant)
    opt = {
        "multisteps": optax.MultiSteps(core, every_k_schedule=2),
        "inject": optax.inject_hyperparams(lambda learning_rate: optax.chain(core, optax.scale(1.0)))(learning_rate=1.0),
        "chain": optax.chain(optax.clip_by_global_norm(1.0), core),
    }[nesting]
    state = opt.init(params)
    step, _ = make_step(opt)
    for _ in range(8):
        params, state, _ = step(params, state, x, y)
    masks = jp.prune_masks(state)
    assert isinstance(masks["l1"]["bias"], optax.MaskedNode)
    for layer in ("l1", "l2"):
        mask = np.asarray(masks[layer]["kernel"])
        assert mask.size - mask.sum() == reference.n_pruned(0.5, mask.size)
        assert np.all(np.asarray(params[layer]["kernel"])[~mask] == 0.0)
    assert set(qat_ranges(state)) == {"l1/kernel", "l2/kernel"}
    with pytest.raises(ValueError, match="exactly one PruneState"):
        jp.prune_masks(optax.adam(1e-3).init(params))


# A failed check inside a jitted step surfaces when its results are used: as a JaxRuntimeError,
# or, when the next (donating) call receives them, a ValueError; the message is the check's.
RUN_TIME_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def _run(opt, steps, params=None):
    params = mlp_params() if params is None else params
    x, y = data()
    state = opt.init(params)
    step, _ = make_step(opt)
    for _ in range(steps):
        params, state, _ = step(params, state, x, y)
    jax.block_until_ready(params)
    return params, state


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25])
def test_schedule_out_of_range_inside_jit_raises_naming_the_rule(bad):
    # valid at step 0 (checked at init), bad from the second mask update on
    rule = jp.PruneRule(pattern=r"l\d/kernel", sparsity=lambda step: jnp.where(step >= 10, bad, 0.5))
    opt = jp.prune(optax.sgd(0.1), rule, update_every=10, checks="raise")
    with pytest.raises(
        RUN_TIME_ERRORS,
        match=r"params\['l1'\]\['kernel'\] \(PruneRule\(pattern='l\\\\d/kernel'\)\), .*: its sparsity schedule",
    ):
        _run(opt, 12)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25])
def test_schedule_out_of_range_is_recorded_in_the_state(bad):
    # checks="state" (the default): the step runs on, the failure is kept in the state, the
    # failing mask update keeps every weight, and prune_masks raises naming the leaves.
    rule = jp.PruneRule(pattern=r"l\d/kernel", sparsity=lambda step: jnp.where(step >= 10, bad, 0.5))
    _, state = _run(jp.prune(optax.sgd(0.1), rule, update_every=10), 13)
    errors = jp.prune_errors(state)
    assert len(errors) == 1
    assert errors[0].startswith("params['l1']['kernel'], params['l2']['kernel']: its sparsity schedule")
    assert errors[0].endswith("(first failed at step 10)")
    assert np.asarray(state.faults.bad_sparsity).tolist() == [True, True]
    assert not np.asarray(state.faults.not_zero).any()
    with pytest.raises(ValueError, match=r"params\['l1'\]\['kernel'\].*its sparsity schedule"):
        jp.prune_masks(state)
    masks = jp.prune_masks(state, check=False)
    assert all(np.asarray(m).all() for m in jax.tree.leaves(masks))


def test_schedule_in_range_never_raises():
    _, state = _run(jp.prune(optax.sgd(0.1), [GRADUAL], update_every=10), 45)
    mask = np.asarray(state.masks["l1"]["kernel"])
    assert mask.size - mask.sum() == reference.n_pruned(0.6, mask.size)


@pytest.mark.parametrize("after", [optax.scale(0.5), optax.add_decayed_weights(0.1)], ids=["scale", "weight_decay"])
def test_prune_not_outermost_raises_naming_the_leaf(after):
    opt = optax.chain(jp.prune(optax.adam(1e-2), {"l2/kernel": 0.5}, update_every=5, checks="raise"), after)
    with pytest.raises(RUN_TIME_ERRORS, match=r"params\['l2'\]\['kernel'\]: non-zero params at pruned positions"):
        _run(opt, 7)


@pytest.mark.parametrize("after", [optax.scale(0.5), optax.add_decayed_weights(0.1)], ids=["scale", "weight_decay"])
def test_prune_not_outermost_is_recorded_in_the_state(after):
    opt = optax.chain(jp.prune(optax.adam(1e-2), {"l2/kernel": 0.5}, update_every=5), after)
    _, state = _run(opt, 7)  # step 1 checks the params step 0 pruned
    (error,) = jp.prune_errors(state)
    assert error.startswith("params['l2']['kernel']: non-zero params at pruned positions")
    assert error.endswith("(first failed at step 1)")
    with pytest.raises(ValueError, match="prune must be the outermost transformation"):
        jp.prune_masks(state)


def test_checks_argument_is_validated_and_clean_runs_record_nothing():
    with pytest.raises(ValueError, match="checks must be 'state' or 'raise', got 'eager'"):
        jp.prune(optax.sgd(0.1), {"l2/kernel": 0.5}, checks="eager")
    _, state = _run(jp.prune(optax.adam(1e-2), [GRADUAL], update_every=5), 12)
    assert jp.prune_errors(state) == []
    assert int(state.faults.first_step) == -1
    with pytest.raises(TypeError, match="call it outside jit"):
        jax.jit(jp.prune_errors)(state)
    # an abstract state (a checkpoint-restore target) has masks to find and nothing to check
    abstract = jax.eval_shape(jp.prune(optax.adam(1e-2), [GRADUAL]).init, mlp_params())
    assert jp.prune_masks(abstract)["l1"]["kernel"].shape == mlp_params()["l1"]["kernel"].shape
    with pytest.raises(TypeError, match="not one from jax.eval_shape"):
        jp.prune_errors(abstract)


def test_step_holds_no_host_callback_by_default():
    # checks="state": nothing in the compiled step calls the host (XLA:CPU would run it
    # synchronously); checks="raise" holds the callback of `_checks.checked`.
    params, (x, y) = mlp_params(), data()

    def hlo(opt):
        def step(params, state):
            updates, state = opt.update(jax.grad(loss)(params, x, y), state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step).lower(params, opt.init(params)).as_text()

    assert "callback" not in hlo(jp.prune(optax.adam(1e-2), [GRADUAL], update_every=5))
    assert "callback" in hlo(jp.prune(optax.adam(1e-2), [GRADUAL], update_every=5, checks="raise"))


def test_given_masks_on_dense_params_are_not_a_false_alarm():
    # masks from elsewhere, params not yet masked: the first update zeros them, no error after
    params = mlp_params()
    _, masks = jp.prune_params(params, {".*kernel": 0.5})
    params, state = _run(jp.prune(optax.adam(1e-2), masks=masks, update_every=3), 10, params)
    assert np.all(np.asarray(params["l1"]["kernel"])[~np.asarray(masks["l1"]["kernel"])] == 0.0)


def test_prune_params_with_a_schedule_needs_a_step():
    params = mlp_params()
    with pytest.raises(ValueError, match=r"PruneRule\(pattern='\.\*kernel'\): its sparsity is a schedule"):
        jp.prune_params(params, GRADUAL)
    pruned, masks = jp.prune_params(params, GRADUAL, step=40)
    kernel = np.asarray(masks["l1"]["kernel"])
    assert kernel.size - kernel.sum() == reference.n_pruned(0.6, kernel.size)
    with pytest.raises(ValueError, match=r"schedule gives sparsity nan at step 3"):
        jp.prune_params(params, jp.PruneRule(pattern=".*kernel", sparsity=lambda s: jnp.float32(jnp.nan)), step=3)


def _temp_bytes(opt, params, x, y):
    def step(params, state):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_step_needs_no_temporary_beyond_the_inner_optimizer():
    # The mask update (under lax.switch) is sized into every step's temporary buffer: it must not
    # materialise param-sized scores, keys or counts, nor copy the donated masks.
    rng = np.random.default_rng(0)
    params = {
        "l1": {"kernel": jnp.asarray(rng.standard_normal((8, 512)), jnp.float32), "bias": jnp.zeros(512)},
        "l2": {"kernel": jnp.asarray(rng.standard_normal((512, 4)), jnp.float32), "bias": jnp.zeros(4)},
    }
    x, y = data()
    dense = _temp_bytes(optax.adamw(1e-3), params, x, y)
    pruned = _temp_bytes(jp.prune(optax.adamw(1e-3), [GRADUAL], update_every=10), params, x, y)
    assert pruned <= dense + 4096, (pruned, dense)
