"""Sequential calibration in ONE pass: the flat program cut before each group of layers (`SegmentedCapture`)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
from jax.extend.core import Literal

from jaxcompress.execute.hooks import (
    flatten_call,
    retag,
    run_steps,
    tag_inputs,
    untag,
)
from jaxcompress.oneshot.programs import _BatchCapture, _Programs
from jaxcompress.oneshot.selection import _call, _float_paths, make_selector
from jaxcompress.oneshot.statistics import (
    LayerStatistics,
    _accumulate,
    _DenseRows,
    _Recorder,
    _statistics,
)


class _NotSegmentable(Exception):
    pass


class _SegmentPlan:
    """One batch signature's flat program, cut before each group's first site.

    Keys computed from params and constants alone ("static": a weight's transpose, cast, ...)
    are never carried across a cut: each segment replays the static steps it needs from the
    params it is given, so a weight compressed after a cut is seen compressed. Every other
    value is carried; it must not depend on a weight whose group starts after the step that
    computes it (it would go stale when that group is compressed), else `_NotSegmentable`.
    """

    def __init__(self, program, cuts, lasts, group_of_path: Callable[[str], int | None], params_argnum: int):
        self.program = program
        self.cuts = cuts  # step index of each group's first site
        self.lasts = lasts  # step index of each group's last site
        end = lasts[-1] + 1
        param_keys = program.param_keys(params_argnum)
        static = set(program.consts) | set(param_keys)
        groups_of: dict = {}  # key -> groups whose weights it depends on
        for key, path in param_keys.items():
            group = group_of_path(path)
            if group is not None:
                groups_of[key] = frozenset([group])
        self.static_steps: list[int] = []
        for index, (_, ins, outs) in enumerate(program.steps[:end]):
            refs = [ref for ref in ins if not isinstance(ref, Literal)]
            depends = frozenset().union(*(groups_of.get(ref, frozenset()) for ref in refs))
            if all(ref in static for ref in refs):
                static.update(outs)
                self.static_steps.append(index)
            else:
                late = [g for g in depends if cuts[g] > index]
                if late:
                    raise _NotSegmentable(f"step {index} uses a weight of group {late[0]} before that group's first site")
            if depends:
                groups_of.update((key, depends) for key in outs)
        self.static = static
        last_uses = program.last_uses(end)
        self.carried = [tuple(k for k in program.carried(cut, end, last_uses) if k not in static) for cut in cuts]
        self.tags: dict = {}  # carried key -> tag of a (transformed) weight crossing a cut

    def replay(self, start: int, stop: int) -> list[int]:
        """The static steps before ``start`` whose results the steps ``[start, stop)`` need."""
        steps = self.program.steps
        needed = {ref for _, ins, _ in steps[start:stop] for ref in ins if not isinstance(ref, Literal) and ref in self.static}
        chosen = []
        for index in reversed([i for i in self.static_steps if i < start]):
            _, ins, outs = steps[index]
            if needed.intersection(outs):
                chosen.append(index)
                needed.update(ref for ref in ins if not isinstance(ref, Literal))
        return chosen[::-1]


class SegmentedCapture(_BatchCapture):
    """`GroupCapture` that runs the function ONCE per batch over all groups, layer by layer.

    The traced function is flattened (`jaxcompress.execute.hooks.flatten_call`) and cut before
    each group's first site. Group ``i``'s statistics come from a program that starts from the
    values live at cut ``i`` (computed with the params of the previous call, i.e. with groups
    ``< i`` compressed) and runs to the group's last site; a second program advances those values
    to cut ``i + 1`` with the params of the NEXT call (group ``i`` compressed). The values live
    across a cut (e.g. a transformer's hidden state) are kept on the device between calls. So
    ``n`` groups cost one pass of the function instead of ``n / 2``, and each program is one
    segment (cheap to compile; all compiled ahead in background threads). Same statistics as
    `GroupCapture` up to float rounding.

    Groups must be called in order, ``0, 1, 2, ...``, each once, with params that differ from
    the previous call's only in already-captured groups. Raises `_NotSegmentable` (caught by
    `sequential_capture`) when the groups do not follow one another in program order (a group
    with a site after the next group's first site, e.g. a tied weight used again later).

    With ``dense_params`` (the params before any compression) the dense model's values are
    carried across the cuts as well (advanced by the same programs with ``dense_params``) and
    each group's statistics program runs the group's segment on both, recording the cross term
    ``sum_rows x x_d^T`` of each site (`LayerStatistics.cross`).
    """

    def __init__(
        self,
        fn: Callable,
        params: Any,
        groups: Sequence[Any],
        batches: Iterable[Any],
        *,
        params_argnum: int = 0,
        hessian: bool = True,
        row_mask: Callable[[Any], Any] | None = None,
        compile_ahead: bool = True,
        dense_params: Any = None,
    ):
        self.fn = fn
        self._dense = () if dense_params is None else (dense_params,)
        self.params_argnum = params_argnum
        self.hessian = hessian
        self._init_batches(batches, row_mask)
        self.shapes = _float_paths(params)
        self.groups = [make_selector(group) for group in groups]
        self.select = lambda path: path in self.shapes and any(group(path) for group in self.groups)
        self.sites: list[dict] = [{} for _ in self.groups]
        self.plans = {signature: self._plan(params, self.batches[index]) for signature, index in self.first.items()}
        self.jitted = {
            signature: (
                [jax.jit(self._segment(plan, k, stats=True)) for k in range(len(self.groups))],
                [jax.jit(self._segment(plan, k, stats=False)) for k in range(len(self.groups))],
            )
            for signature, plan in self.plans.items()
        }
        self._programs = _Programs(compile_ahead)
        self._carried: list = [None] * len(self.batches)
        self._dense_carried: list = [None] * len(self.batches)
        self._next = 0
        if compile_ahead:
            shapes: dict[Any, dict] = {signature: {} for signature in self.first}
            for k in range(len(self.groups)):
                for signature, index in self.first.items():
                    stats_fns, advance_fns = self.jitted[signature]
                    batch, mask = self.batches[index], self.masks[index]
                    lowered = self._programs.lower(("advance", k, signature), advance_fns[k], params, batch, shapes[signature])
                    shapes[signature] = lowered.out_info
                    dense = (*self._dense, shapes[signature]) if self._dense else ()
                    self._programs.lower(("stats", k, signature), stats_fns[k], params, batch, mask, shapes[signature],
                                         *dense)

    def _plan(self, params, batch) -> _SegmentPlan:
        program = flatten_call(self.fn, _call(self.fn, params, batch, self.params_argnum))
        found: dict[str, list[int]] = {}

        def dry(params, batch):
            env = dict(program.consts)
            env.update(tag_inputs(program, _call(self.fn, params, batch, self.params_argnum), None, select=self.select,
                                      params_argnum=self.params_argnum))

            def hook(index, site, x, weight):
                found.setdefault(site.path, []).append(index)
                return x

            run_steps(program, range(len(program.steps)), env, hook)

        jax.eval_shape(dry, params, batch)
        cuts, lasts = [], []
        for group in self.groups:
            steps = [index for path, indices in found.items() if group(path) for index in indices]
            if not steps:
                raise _NotSegmentable("a group reaches no dot / conv")
            cuts.append(min(steps))
            lasts.append(max(steps))
        for k in range(len(cuts) - 1):
            if not cuts[k] <= lasts[k] < cuts[k + 1]:
                raise _NotSegmentable(f"group {k}'s sites are not all before group {k + 1}'s first site")

        def group_of(path):
            return next((g for g, group in enumerate(self.groups) if group(path)), None)

        return _SegmentPlan(program, cuts, lasts, group_of, self.params_argnum)

    def _segment(self, plan: _SegmentPlan, k: int, *, stats: bool):
        """Group ``k``'s statistics program (``stats``: cut ``k`` to its last site) or its advance
        program (cut ``k - 1`` to cut ``k``; from the start for ``k == 0``)."""
        if stats:
            start, stop, carry_out = plan.cuts[k], plan.lasts[k] + 1, None
        else:
            start, stop, carry_out = (plan.cuts[k - 1] if k else 0), plan.cuts[k], plan.carried[k]
        group = self.groups[k]
        replay = plan.replay(start, stop)

        def environment(params, batch, carried):
            args = _call(self.fn, params, batch, self.params_argnum)
            env = dict(plan.program.consts)
            env.update(tag_inputs(plan.program, args, None, select=self.select, params_argnum=self.params_argnum))
            env.update((key, retag(value, plan.tags.get(key))) for key, value in carried.items())
            return env

        def segment(params, batch, *rest):
            mask, carried = rest[:2] if stats else (None, rest[0])
            dense = None
            if stats and len(rest) == 4:  # the dense model's segment first: its rows at the group's sites
                dense = _DenseRows(self.shapes, mask)
                dense_env = environment(rest[2], batch, rest[3])

                def dense_hook(index, site, x, weight, observe):
                    return dense.hook(site, x, weight) if group(site.path) else x

                run_steps(plan.program, replay, dense_env, dense_hook, observations=True)
                run_steps(plan.program, range(start, stop), dense_env, dense_hook, observations=True)
            env = environment(params, batch, carried)
            recorder = _Recorder(self.shapes, self.hessian, mask, dense) if stats else None

            def hook(index, site, x, weight, observe):
                return recorder.hook(site, x, weight, observe) if stats and group(site.path) else x

            run_steps(plan.program, replay, env, hook, observations=True)
            _, observations = run_steps(plan.program, range(start, stop), env, hook, observations=True)
            if stats:
                self.sites[k] = recorder.sites
                return recorder.results(observations)
            out = {}
            for key in carry_out:
                out[key], tag = untag(env[key])
                if tag is not None:
                    plan.tags[key] = tag
            return out

        return segment

    def close(self) -> None:
        """Cancel the compilations not started yet and drop the carried values."""
        super().close()
        self._carried = [None] * len(self.batches)
        self._dense_carried = [None] * len(self.batches)

    def __call__(self, index: int, params: Any) -> dict[str, "LayerStatistics"]:
        """The statistics of group ``index`` (the next in order) with ``params``."""
        if index != self._next:
            raise ValueError(f"SegmentedCapture captures its groups in order: expected group {self._next}, got {index}")
        totals: dict[str, list] = {}
        for b, (batch, mask, signature) in enumerate(zip(self.batches, self.masks, self.signatures)):
            stats_fns, advance_fns = self.jitted[signature]
            carried = {} if index == 0 else self._carried[b]
            carried = self._programs.call(("advance", index, signature), advance_fns[index], params, batch, carried)
            self._carried[b] = carried
            dense: tuple = ()
            if self._dense:  # the dense model advanced by the same program
                previous = {} if index == 0 else self._dense_carried[b]
                self._dense_carried[b] = self._programs.call(("advance", index, signature), advance_fns[index],
                                                             self._dense[0], batch, previous)
                dense = (self._dense[0], self._dense_carried[b])
            result = self._programs.call(("stats", index, signature), stats_fns[index], params, batch, mask, carried,
                                         *dense)
            _accumulate(totals, jax.device_get(result))
        self._next += 1
        if self._next == len(self.groups):
            self._carried = [None] * len(self.batches)
            self._dense_carried = [None] * len(self.batches)
        return _statistics(totals, self.sites[index])
