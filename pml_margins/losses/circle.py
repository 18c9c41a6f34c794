r"""Circle loss, pair-based: any PML miner, ``ref_emb``, CrossBatchMemory, distributed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import AvgNonZeroReducer

from pml_margins.function_transforms import in_function_transform
from pml_margins.functional.autograd_switch import plain_autograd_needed
from pml_margins.functional.circle import (
    circle_loss_dense,
    circle_loss_dense_negatives,
    circle_loss_masked,
    circle_loss_pairs,
    circle_loss_whole,
)
from pml_margins.functional.margin_softmax import autocast_off, compute_dtype
from pml_margins.losses.checked_forward import CheckedForwardMixin, check_rows_and_reduced
from pml_margins.losses.hyperparameter import Hyperparameter, HyperparameterAttributes
from pml_margins.losses.pml_calls import runs_as_its_class
from pml_margins.validation import (
    CHECKED_BY_CALLER,
    ValueChecks,
    check_bool,
    check_circle_margin,
    check_compared_labels,
    check_embeddings,
    check_indices_tuple,
    check_logit_scale,
    check_reference,
)

__all__ = ["CircleLoss"]


def _choose_path(num_pos: int, num_neg: int, cells: int) -> str:
    """How the per-anchor loss is evaluated; all paths give the same values and gradients.

    ``"pairs"`` (gather the pairs, scatter log-sum-exp) when the pairs are a small
    part of the ``B x R`` matrix, ``"dense_negatives"`` when only the positives are
    (the usual batch), else ``"dense"``. Chosen from ``benchmarks/circle.py`` timings.
    """
    if 8 * (num_pos + num_neg) <= cells:
        return "pairs"
    if 4 * num_pos <= cells:
        return "dense_negatives"
    return "dense"


class _FromMargin:
    """One of PML's ``CircleLoss`` attributes derived from the margin ``m`` (the optima
    :math:`O_p, O_n` and margins :math:`\\Delta_p, \\Delta_n`): read from ``m``; an
    assignment is refused (the loss computes them from ``m``, the paper's relaxation)."""

    def __init__(self, formula: str, of_margin: Callable[[float], float]) -> None:
        self.formula, self.of_margin = formula, of_margin

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, loss: Any, owner: type | None = None) -> Any:
        return self if loss is None else self.of_margin(loss.m)

    def __set__(self, loss: Any, value: Any) -> None:
        raise AttributeError(
            f"CircleLoss's {self.name} is {self.formula}, derived from m (the paper's "
            "relaxation; PML's too): set m instead"
        )


class CircleLoss(HyperparameterAttributes, CheckedForwardMixin, BaseMetricLossFunction):
    r"""Circle loss (Sun et al., CVPR 2020, arXiv:2002.10857), pair-based, on cosine similarity.

    For each anchor with positive pairs :math:`s_p^i` and negative pairs
    :math:`s_n^j` (cosine similarities):

    .. math::
        L = \log\Big(1 + \sum_j e^{\gamma\alpha_n^j(s_n^j - \Delta_n)}
                         \sum_i e^{-\gamma\alpha_p^i(s_p^i - \Delta_p)}\Big),
        \quad \alpha_p^i = [O_p - s_p^i]_+,\ \alpha_n^j = [s_n^j - O_n]_+

    with :math:`O_p = 1+m`, :math:`O_n = -m`, :math:`\Delta_p = 1-m`,
    :math:`\Delta_n = m`; the :math:`\alpha` are detached (constants), as in the
    paper. Evaluated as a softplus of two log-sum-exps in at least float32, so it
    is stable for any :math:`\gamma` and under bf16/fp16 autocast.

    Recommended (paper, Sec. 4): face recognition ``m = 0.25, gamma = 256``;
    person re-identification ``m = 0.25, gamma = 128``; fine-grained retrieval
    (CUB, Cars, SOP) ``m = 0.4, gamma = 80``. ``m`` is a cosine (unitless, usually
    in [0, 0.5]; negative or larger values are taken, as PML takes them, up to 1000 in
    absolute value); ``gamma`` is a unitless scale (> 0).

    Pairs come from ``labels`` (every pair of the batch, or of batch x ``ref_emb``)
    or from any PML miner's ``indices_tuple``: pairs ``(a1, p, a2, n)`` or
    triplets ``(a, p, n)`` (read as pairs ``(a, p)`` and ``(a, n)``). Positives and
    negatives index ``ref_emb`` when given, so ``CrossBatchMemory(CircleLoss(...))``
    and ``DistributedLossWrapper`` work.

    Compatibility with PML's ``CircleLoss`` (values and gradients equal, same
    default reducer ``AvgNonZeroReducer``, one loss per anchor):

    * mined pairs are a *set*: a pair listed twice (e.g. one positive in several
      triplets) counts once;
    * an anchor with only positives or only negatives contributes a loss of 0
      (which ``AvgNonZeroReducer`` leaves out of the mean);
    * a pair that is both positive and negative is an error (``ValueError`` here,
      an ``AssertionError`` in PML);
    * labels only: an anchor is not paired with reference ``i`` of its own index when
      ``ref_labels`` is ``labels`` (PML's rule, also for another ``ref_emb``);
    * one difference: PML returns 0 whenever every index tensor has at most one
      element (e.g. one positive and one negative pair); here such a set gives
      its real loss;
    * another: the per-anchor losses are ``(B,)`` (PML's are ``(B, 1)``), so
      ``ClassWeightedReducer`` gives the class-weighted mean (PML broadcasts its
      weights against them into a ``B x B`` mean: 293.10 where the weighted mean is
      272.84) and ``DoNothingReducer`` returns ``(B,)``.

    Defaults are the paper's face-recognition setting (PML defaults to
    ``m = 0.4, gamma = 80``: pass them explicitly when comparing).

    ``per_anchor=False`` gives the whole-batch form (one log-sum over all
    positive and all negative pairs, a single scalar loss, returned as already
    reduced so the reducer does not apply): with labels only, each unordered pair
    of the batch is taken once when the batch is its own reference set, as in the
    seed code (another ``ref_emb``, a second view, gives every pair of the two sets);
    with a miner, its pair set. The weights :math:`\alpha` are detached, as in the paper
    and its official code (the seed snippet differentiates through them: same value,
    other gradients).

    No loop over anchors: the per-anchor form runs on the ``B x R`` matrix or on
    the pair lists, whichever is smaller (see ``_choose_path``); every path has the
    same values and gradients.

    Args:
        m: relaxation margin, any real number as in PML (recommended 0.25-0.4; beyond
            0.5 the margins cross, :math:`\Delta_p = 1 - m < \Delta_n = m`).
        gamma: scale, > 0.
        per_anchor: one loss per anchor (PML's form, default) or one for the whole set.
        **kwargs: PML options (``reducer``, ``embedding_regularizer``, ``distance`` --
            must be a ``CosineSimilarity``).
    """

    m = Hyperparameter(check_circle_margin)
    per_anchor = Hyperparameter(check_bool)
    gamma = Hyperparameter(check_logit_scale)

    def __init__(
        self, m: float = 0.25, gamma: float = 256.0, per_anchor: bool = True, **kwargs: Any
    ) -> None:
        self.m, self.gamma = m, gamma
        self.per_anchor = per_anchor
        super().__init__(**kwargs)
        self._check_distance()
        self.add_to_recordable_attributes(
            list_of_names=["m", "gamma", "op", "on", "delta_p", "delta_n"], is_stat=False
        )

    # PML's derived attributes, read from ``m`` (which may change, e.g. by a schedule)
    op = _FromMargin("1 + m", lambda m: 1 + m)
    on = _FromMargin("-m", lambda m: -m)
    delta_p = _FromMargin("1 - m", lambda m: 1 - m)
    delta_n = _FromMargin("m", lambda m: m)

    def _check_distance(self) -> None:
        """``TypeError`` unless the distance is a ``CosineSimilarity`` (at construction,
        and on every call: one assigned after construction is checked too)."""
        if not isinstance(self.distance, CosineSimilarity):
            raise TypeError(
                f"CircleLoss is defined on cosine similarity; distance must be a "
                f"CosineSimilarity, got {type(self.distance).__name__}"
            )

    def get_default_reducer(self) -> AvgNonZeroReducer:
        return AvgNonZeroReducer()

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def check_inputs(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> None:
        """Embeddings, labels or a miner's tuple, and an optional reference set."""
        self._check_distance()
        checks = ValueChecks()
        # no query rows against a reference set: no pairs, a loss of 0 (PML's
        # CrossBatchMemory with every row enqueued)
        check_embeddings(embeddings, checks=checks, rows_required=ref_emb is None)
        if labels is None and indices_tuple is None:
            raise ValueError("CircleLoss needs labels or an indices_tuple")
        if labels is not None:
            check_compared_labels(labels, embeddings.shape[0], checks=checks)
        check_reference(
            ref_emb,
            ref_labels,
            embeddings.shape[1],
            labels_required=indices_tuple is None,
            checks=checks,
            label_rows=None if labels is None else embeddings.shape[0],
            rows_required=False,  # an empty reference set: no pairs, 0 (as PML's)
        )
        ref_size = None if ref_emb is None else ref_emb.shape[0]
        check_indices_tuple(indices_tuple, embeddings.shape[0], ref_size, checks=checks)
        checks.run()

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: tuple[torch.Tensor, ...] | None,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        batch, ref_size = embeddings.shape[0], ref_emb.shape[0]
        # decided before the distance runs (a hook that removes itself: unchecked after)
        self.__dict__["_cosine_step"] = cosines = self._cosines()
        sim = self.similarity(embeddings, ref_emb)
        if batch == 0:  # no queries against a reference set: no pairs, 0 as PML's (for
            return self._whole_dict(sim.sum())  # every reducer: already reduced)
        if indices_tuple is None:
            if ref_labels is None:  # ref_emb's rows take the labels (PML's get_all_pairs_indices)
                ref_labels = labels
            if labels is None:
                raise ValueError("CircleLoss needs labels (and ref_labels with ref_emb)")
            pos_mask = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
            neg_mask = ~pos_mask
            if ref_labels is labels:  # PML's rule (get_matches_and_diffs): no self-pairs
                pos_mask.fill_diagonal_(False)
                if not self.per_anchor and ref_emb is embeddings:
                    # the reference set is the batch: each unordered pair once, as the seed
                    # code (another ref_emb, a second view, keeps every ordered pair)
                    upper = torch.ones_like(pos_mask).triu_(1)
                    pos_mask, neg_mask = pos_mask & upper, neg_mask & upper
            num_pos = num_neg = None
        else:
            pos_mask, neg_mask, num_pos, num_neg = _pair_masks(
                indices_tuple, batch, ref_size, sim.device
            )
        with CHECKED_BY_CALLER:  # the forward checked the inputs (hyper-parameters when set)
            loss_dict = self._loss_dict(sim, pos_mask, neg_mask, num_pos, num_neg)
        if not cosines:  # not bounded: see check_result
            self._hold_rows_for_check(loss_dict["loss"]["losses"])
        return loss_dict

    def _cosines(self) -> bool:
        """Whether the distance gives L2 cosines (PML's ``CosineSimilarity`` as built: a
        plain, normalizing similarity of power 1 and ``p = 2``, without hooks or methods
        replaced on it), in ``[-1, 1]``: the pair
        logits are then bounded by ``gamma``. Other settings (raw dot products, a
        ``power`` or ``p``, changed in place or given) can give NaN/Inf from finite input."""
        d = self.distance  # (is_inverted does not change the values the loss reads)
        return (
            type(d) is CosineSimilarity
            and runs_as_its_class(d)  # (a hook or a method replaced on it: any values)
            and bool(d.normalize_embeddings)
            and d.power == 1
            and d.p == 2
        )

    def check_result(self, loss: torch.Tensor) -> None:
        """Where the similarities are not L2 cosines (:meth:`_cosines`: raw dot products,
        as PML's loss takes them from a ``CosineSimilarity`` set not to normalize, or a
        ``power``/``p``), refuse the anchors' losses, then the reduced ``loss``, that came
        out NaN/Inf from finite embeddings (one read-back); cosines are bounded."""
        rows = self.__dict__.pop("_rows_finite", None)
        if self.__dict__.pop("_cosine_step", True):  # (compute_loss's decision)
            return
        d = self.distance
        shown = (
            f"normalize_embeddings={d.normalize_embeddings}, power={d.power}, p={d.p}, "
            f"is_inverted={d.is_inverted}"
        )

        def error() -> ValueError:
            return ValueError(
                f"CircleLoss gave non-finite losses from finite embeddings: its distance "
                f"({type(d).__name__}({shown})) does not give L2 cosines, and its "
                "similarities overflowed the pair logits or are not real (a fractional "
                "power of a negative one); use a plain CosineSimilarity, or scale the "
                "embeddings down"
            )

        check_rows_and_reduced(rows, loss, error, error)

    def _loss_dict(
        self,
        sim: torch.Tensor,
        pos_mask: torch.Tensor,
        neg_mask: torch.Tensor,
        num_pos: int | None,
        num_neg: int | None,
    ) -> dict[str, dict[str, Any]]:
        """The loss of the pairs in the masks (counted when ``num_pos`` is ``None``)."""
        batch, ref_size = sim.shape
        if in_function_transform():  # fixed shapes, no host read: what vmap can batch
            m, gamma = self.m, self.gamma
            losses = circle_loss_masked(sim, pos_mask, neg_mask, m, gamma, self.per_anchor)
            return self._per_anchor_dict(losses) if self.per_anchor else self._whole_dict(losses)
        if not self.per_anchor:
            loss = circle_loss_whole(sim[pos_mask], sim[neg_mask], self.m, self.gamma)
            return self._whole_dict(loss)
        if num_pos is None:
            num_pos = int(pos_mask.sum())
            num_neg = batch * ref_size - num_pos
        path = (
            "pairs" if plain_autograd_needed() else _choose_path(num_pos, num_neg, batch * ref_size)
        )
        if path == "dense":
            losses = circle_loss_dense(sim, pos_mask, neg_mask, self.m, self.gamma)
        elif path == "dense_negatives":
            pos_keys = pos_mask.view(-1).nonzero().squeeze(1)
            losses = circle_loss_dense_negatives(sim, neg_mask, pos_keys, self.m, self.gamma)
        else:
            pos_keys = pos_mask.view(-1).nonzero().squeeze(1)  # sorted, deduplicated
            neg_keys = neg_mask.view(-1).nonzero().squeeze(1)
            flat = sim.reshape(-1)
            losses = circle_loss_pairs(
                flat.index_select(0, pos_keys),
                torch.div(pos_keys, ref_size, rounding_mode="floor"),
                flat.index_select(0, neg_keys),
                torch.div(neg_keys, ref_size, rounding_mode="floor"),
                batch,
                self.m,
                self.gamma,
            )
        return self._per_anchor_dict(losses)

    def similarity(self, embeddings: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """``(B, R)`` cosine similarities, as ``self.distance(embeddings, ref_emb)``.

        For PML's plain ``CosineSimilarity`` (no stats, ``p = 2``, ``power = 1``, no hooks) the
        rows are scaled by their reciprocal norm (same eps as ``F.normalize``) and the
        batch is normalized once when it is its own reference: the same values to
        rounding, with a cheaper backward. Any other configuration calls the distance.
        Half-precision embeddings are compared in float32, outside autocast: with
        ``gamma = 256`` a bf16 cosine's rounding (~2^-9) would be half a logit.
        """
        dist = self.distance
        same = ref_emb is embeddings
        dtype = compute_dtype(torch.promote_types(embeddings.dtype, ref_emb.dtype))
        embeddings = embeddings.to(dtype)
        ref_emb = embeddings if same else ref_emb.to(dtype)
        with autocast_off(embeddings.device.type):
            # not plain L2 cosines (raw dot products, a power, a hook PML's call fires), or
            # statistics to record: the distance's own call
            if not self._cosines() or dist.collect_stats:
                return dist(embeddings, ref_emb)
            query = _unit_rows(embeddings)
            ref = query if same else _unit_rows(ref_emb)
            return query @ ref.t()

    @staticmethod
    def _per_anchor_dict(losses: torch.Tensor) -> dict[str, dict[str, Any]]:
        indices = torch.arange(losses.shape[0], device=losses.device)
        return {"loss": {"losses": losses, "indices": indices, "reduction_type": "element"}}

    @staticmethod
    def _whole_dict(loss: torch.Tensor) -> dict[str, dict[str, Any]]:
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

    def extra_repr(self) -> str:
        return f"m={self.m!r}, gamma={self.gamma!r}, per_anchor={self.per_anchor}"


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (norms clamped at 1e-12, as ``F.normalize``)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
    return x * norms.reciprocal()


def _pair_masks(
    indices_tuple: tuple[torch.Tensor, ...], batch: int, ref_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Boolean ``(B, R)`` sets of the positive and negative pairs, and how many of each
    were listed.

    Triplets ``(a, p, n)`` become pairs ``(a, p)`` and ``(a, n)`` (PML's
    ``convert_to_pairs``); a pair listed several times is set once, as PML's
    masks do. The masks are the deduplicated pair sets (one byte per pair, no
    sort). Raises ``ValueError`` if a pair is both positive and negative.
    """
    if len(indices_tuple) == 3:
        a1, p, n = indices_tuple
        a2 = a1
    else:
        a1, p, a2, n = indices_tuple
    a1, p, a2, n = (t.to(device=device, dtype=torch.long) for t in (a1, p, a2, n))
    pos = torch.zeros(batch, ref_size, dtype=torch.bool, device=device)
    neg = torch.zeros(batch, ref_size, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    if n.numel() and p.numel() and bool((pos & neg).any()):
        raise ValueError(
            "indices_tuple lists a pair both as positive and as negative; each pair must be "
            "either positive or negative"
        )
    return pos, neg, int(p.numel()), int(n.numel())
