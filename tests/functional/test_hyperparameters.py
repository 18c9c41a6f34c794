from __future__ import annotations

import math

import pytest

from pml_margins.functional import cosface_margin_upper_bound, cosface_scale_lower_bound


def test_scale_lower_bound_formula() -> None:
    # CosFace Eq. (8): s >= (C-1)/C * log((C-1) P / (1-P))
    assert cosface_scale_lower_bound(10572, 0.9) == pytest.approx(
        10571 / 10572 * math.log(10571 * 0.9 / 0.1)
    )
    assert cosface_scale_lower_bound(10572, 0.9) == pytest.approx(11.462, abs=1e-3)
    assert cosface_scale_lower_bound(2, 0.5) == 0.0


def test_scale_lower_bound_grows_with_classes() -> None:
    bounds = [cosface_scale_lower_bound(c, 0.9) for c in (10, 100, 1000, 100000)]
    assert bounds == sorted(bounds)


def test_margin_upper_bound_cases() -> None:
    assert cosface_margin_upper_bound(4, 2) == pytest.approx(1.0)  # 1 - cos(pi/2)
    assert cosface_margin_upper_bound(3, 2) == pytest.approx(1.5)  # 1 - cos(2pi/3)
    assert cosface_margin_upper_bound(10, 512) == pytest.approx(10 / 9)  # simplex
    assert cosface_margin_upper_bound(2, 2) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cosface_scale_lower_bound(1, 0.9), "num_classes must be an integer >= 2"),
        (lambda: cosface_scale_lower_bound(10, 1.0), r"target_probability must lie in \(0, 1\)"),
        (lambda: cosface_margin_upper_bound(10, 1), "embedding_size must be an integer >= 2"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_bounds_take_numpy_and_tensor_integers_and_name_bad_probabilities() -> None:
    import numpy as np
    import torch

    expected = cosface_scale_lower_bound(10, 0.9)
    assert cosface_scale_lower_bound(np.int64(10), 0.9) == expected
    assert cosface_margin_upper_bound(torch.tensor(10), np.int32(2)) == (
        cosface_margin_upper_bound(10, 2)
    )
    with pytest.raises(TypeError, match="target_probability must be a real number"):
        cosface_scale_lower_bound(10, "0.9")
