r"""Schedules for loss hyper-parameters, in the style of ``torch.optim.lr_scheduler``.

Call ``step()`` once per iteration (or epoch) after ``optimizer.step()``; save and
restore with ``state_dict()`` / ``load_state_dict()`` next to the optimizer's: the
scheduled value is in the scheduler's state, not in the loss's ``state_dict()`` (which
holds tensors), and ``load_state_dict`` sets it back on the loss. Two schedulers on
bounds that must stay ordered (MagFace's ``l_m <= u_m``) each check their ramp against
the other's current value: drive one bound at a time.

Examples:
    >>> from pml_margins.losses import ArcFaceLoss
    >>> loss = ArcFaceLoss(10, 64)
    >>> sched = MarginScheduler(loss, start=0.1, end=0.5, total_steps=4)
    >>> [round(sched.step(), 2) for _ in range(5)]
    [0.2, 0.3, 0.4, 0.5, 0.5]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from pml_margins.validation import (
    check_count,
    check_non_negative,
    check_non_negative_int,
    check_real,
)

__all__ = ["MarginScheduler", "SphereFaceLambdaScheduler"]

#: most steps of a ramp whose values are checked when a scheduler is built
RAMP_PROBES = 100_000
#: a loss's sizes and layout (the sharded loss's shard and seed too): numbers, but what
#: its parameters' shapes and sampling are built from
_STRUCTURE = (
    "num_classes",
    "embedding_size",
    "sub_centers",
    "class_start",
    "class_end",
    "num_local",
    "rank",
    "world_size",
    "seed",
)
#: PML's module and function slots, which may hold None
_SLOTS = (
    "reducer",
    "distance",
    "embedding_regularizer",
    "weight_regularizer",
    "weight_init_func",
    "miner",
)


class _AttributeScheduler:
    """Sets ``loss.<attr>`` to ``value_at(step)``; the loss validates every value set."""

    def __init__(
        self, loss: torch.nn.Module, attr: str, probes: Iterable[tuple[int, float]] = ()
    ) -> None:
        if not hasattr(loss, attr):
            inner = getattr(loss, "loss", None)  # ShardedMarginSoftmaxLoss holds the loss
            hint = f" (its .loss, a {type(inner).__name__}, has it)" if hasattr(inner, attr) else ""
            raise ValueError(f"{type(loss).__name__} has no hyper-parameter {attr!r}{hint}")
        value = getattr(loss, attr)
        if (
            attr in _STRUCTURE
            or attr in _SLOTS
            or isinstance(value, (bool, np.bool_, str, torch.nn.Module))
            or callable(value)
        ):
            why = ", one of the sizes its parameters are built from" if attr in _STRUCTURE else ""
            raise ValueError(
                f"{type(loss).__name__}.{attr} is not a numeric hyper-parameter a scheduler "
                f"can drive (a {type(value).__name__}{why})"
            )
        if isinstance(value, torch.Tensor):
            what = (
                "a learned parameter"
                if isinstance(value, torch.nn.Parameter)
                else "a buffer the loss sets itself, as AdaCos's scale"
            )
            raise ValueError(
                f"{type(loss).__name__}.{attr} is a tensor ({what}), not a hyper-parameter "
                "a scheduler can drive"
            )
        self.loss, self.attr = loss, attr
        self.last_step = 0
        before = getattr(loss, attr)
        try:  # the loss's own checks, on the values the schedule will set, at once
            for step, value in probes:
                try:
                    setattr(self.loss, self.attr, value)
                except (TypeError, ValueError) as error:
                    raise type(error)(
                        f"{type(self).__name__} would set {attr} to {value!r} at step {step}: "
                        f"{error}"
                    ) from None
        finally:
            setattr(self.loss, self.attr, before)
        setattr(self.loss, self.attr, self.value_at(0))

    def value_at(self, step: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        """Advance one step, set the loss's attribute and return the new value (a value
        the loss refuses changes nothing: neither the attribute nor the step count)."""
        value = self.value_at(self.last_step + 1)
        setattr(self.loss, self.attr, value)
        self.last_step += 1
        return value

    def get_last_value(self) -> float:
        return float(getattr(self.loss, self.attr))

    def state_dict(self) -> dict[str, Any]:
        """Everything but the loss itself (as ``lr_scheduler`` leaves out the optimizer)."""
        return {k: v for k, v in self.__dict__.items() if k != "loss"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` of a scheduler of the same kind and attribute;
        ``ValueError`` otherwise (another attribute, missing or unknown keys), and for a
        state that building this scheduler would refuse (every value of its ramp is
        checked against the loss, as on construction). A refused state changes nothing."""
        mine = self.state_dict()
        if set(state_dict) != set(mine) or state_dict.get("attr") != self.attr:
            raise ValueError(
                f"this {type(self).__name__} drives {self.attr!r} with keys {sorted(mine)}; "
                f"the state drives {state_dict.get('attr')!r} with keys {sorted(state_dict)}"
            )
        try:
            last_step = check_non_negative_int(state_dict["last_step"], "last_step")
        except (TypeError, ValueError):
            got = state_dict["last_step"]
            raise ValueError(f"the state's last_step must be an int >= 0, got {got!r}") from None
        arguments = inspect.signature(type(self).__init__).parameters
        before = getattr(self.loss, self.attr)
        try:  # a scheduler built from the state runs every check of a new one
            fresh = type(self)(self.loss, **{k: v for k, v in state_dict.items() if k in arguments})
            setattr(self.loss, self.attr, fresh.value_at(last_step))
        except (TypeError, ValueError) as error:
            setattr(self.loss, self.attr, before)
            raise ValueError(f"the state cannot be loaded: {error}") from error
        except Exception:
            setattr(self.loss, self.attr, before)
            raise
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "loss"})
        self.last_step = last_step


class MarginScheduler(_AttributeScheduler):
    r"""Moves a margin from ``start`` to ``end`` over ``total_steps``, then holds it.

    The "dynamic margin" of the seed articles: start easy (e.g. ArcFace m = 0.1 rad)
    so that a randomly initialised network can fit, end strict (e.g. 0.5 or 0.8).

    .. math::
        m_t = m_0 + (m_1 - m_0)\,f(\min(t/T, 1)),\quad
        f(u) = u \;(\text{linear}) \text{ or } \tfrac{1 - \cos\pi u}{2} \;(\text{cosine})

    Args:
        loss: any loss with the attribute ``attr`` (``margin``; ``m2``/``m3`` for
            :class:`~pml_margins.losses.CombinedMarginLoss`; ``scale`` works too). Ours
            read every hyper-parameter at each call; some of PML's losses derive others
            from one in their constructor (PML's ``CircleLoss`` its optima from ``m``,
            ``LargeMarginSoftmaxLoss`` its polynomial from ``margin``), which a scheduler
            on that attribute does not update: check such a loss's source first.
        start: value at step 0 (set on construction).
        end: value from ``total_steps`` on.
        total_steps: length of the ramp, in calls to :meth:`step`.
        attr: attribute to drive.
        mode: ``"linear"`` or ``"cosine"``.
        warmup_steps: steps held at ``start`` before the ramp begins.

    Raises:
        ValueError: unknown ``mode``/``attr``, non-positive ``total_steps``; the
            loss's own validation rejects invalid margins (e.g. a negative one).
    """

    def __init__(
        self,
        loss: torch.nn.Module,
        start: float,
        end: float,
        total_steps: int,
        attr: str = "margin",
        mode: str = "linear",
        warmup_steps: int = 0,
    ) -> None:
        if mode not in ("linear", "cosine"):
            raise ValueError(f"mode must be 'linear' or 'cosine', got {mode!r}")
        self.start, self.end, self.mode = check_real(start, "start"), check_real(end, "end"), mode
        self.total_steps = check_count(total_steps, "total_steps")
        self.warmup_steps = check_non_negative_int(warmup_steps, "warmup_steps")
        # every step of the ramp (at most RAMP_PROBES of them, evenly spaced, both ends
        # included): a margin that must be an integer fails here, not in mid-training
        count = min(self.total_steps, RAMP_PROBES)
        steps = sorted({round(i * self.total_steps / count) for i in range(count + 1)})
        probes = [(self.warmup_steps + t, self.value_at(self.warmup_steps + t)) for t in steps]
        super().__init__(loss, attr, probes)

    def value_at(self, step: int) -> float:
        t = min(max(step - self.warmup_steps, 0), self.total_steps)
        if t in (0, self.total_steps):  # exactly the ends (the formula missed end by an
            return self.start if t == 0 else self.end  # ulp for 16% of two-decimal pairs)
        if self.mode == "linear":  # (end - start) t / T: exact where the steps are whole
            return self.start + (self.end - self.start) * t / self.total_steps
        u = (1 - math.cos(math.pi * t / self.total_steps)) / 2
        return self.start + (self.end - self.start) * u


class SphereFaceLambdaScheduler(_AttributeScheduler):
    r"""SphereFace's annealing of :math:`\lambda` (Liu et al., 2017, Sec. 3.4 / official code).

    .. math::
        \lambda_t = \max\left(\lambda_{\min},\; \lambda_0 (1 + \gamma t)^{-p}\right)

    Defaults are those of the official SphereFace training (``base=1000,
    gamma=0.12, power=1, lambda_min=5``), stepped once per iteration, and ``t`` counts
    the iterations as the official layer does, which adds one before it computes
    :math:`\lambda`: the first iteration uses ``t = 1`` (892.86 with the defaults), the
    scheduler's step ``n`` sets ``t = n + 1``. Drives
    :class:`~pml_margins.losses.SphereFaceLoss`'s ``lambda_``.
    """

    def __init__(
        self,
        loss: torch.nn.Module,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        self.base = check_non_negative(base, "base")
        self.gamma = check_non_negative(gamma, "gamma")
        self.power = check_non_negative(power, "power")
        self.lambda_min = check_non_negative(lambda_min, "lambda_min")
        super().__init__(loss, "lambda_")

    def value_at(self, step: int) -> float:
        t = step + 1  # the official layer counts this iteration before computing lambda
        return max(self.lambda_min, self.base * (1 + self.gamma * t) ** (-self.power))
