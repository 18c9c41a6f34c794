"""Defects found by this session's review of the adapters, each test failing on the code
before its fix."""

from __future__ import annotations

import pytest
import torch

from pml_margins.adapters import retrieval_calculator
from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.losses import ArcFaceLoss
from tests.adapters.conftest import require_extra


def test_a_string_include_is_refused_as_the_calculator_refuses_it() -> None:
    """tuple("precision_at_1") split it into letters: a ValueError listing the allowed
    metrics, the name given among them."""
    with pytest.raises(TypeError, match="include must be a tuple or list"):
        retrieval_calculator(include="precision_at_1")
    assert retrieval_calculator(include=["precision_at_1"]).original_function_dict.keys() == {
        "precision_at_1"
    }


def _lightning():
    require_extra("lightning", "'pml-margins[lightning]'")
    import lightning.pytorch as pl

    from pml_margins.adapters import MetricLearningModule, RetrievalMetricsCallback

    return pl, MetricLearningModule, RetrievalMetricsCallback


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_string_class_names_are_refused_by_name() -> None:
    """The default collate gives string labels as a tuple: AttributeError: 'tuple' object
    has no attribute 'detach'."""
    pl, module_type, callback_type = _lightning()
    from torch.utils.data import DataLoader

    data = [(torch.randn(8), ["cat", "dog", "emu"][i % 3]) for i in range(30)]
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback_type()],
    )
    module = module_type(torch.nn.Linear(8, 4), ArcFaceLoss(3, 4))
    with pytest.raises(TypeError, match="labels of each batch as a tensor of class numbers"):
        trainer.validate(module, DataLoader(data, batch_size=10), verbose=False)


def test_a_per_class_calculator_is_refused_at_construction() -> None:
    """return_per_class=True was taken, then float() of a list failed after an epoch."""
    _, _, callback_type = _lightning()
    calculator = RetrievalAccuracyCalculator(include=("precision_at_1",), return_per_class=True)
    with pytest.raises(ValueError, match="return_per_class=False"):
        callback_type(accuracy_calculator=calculator)
    with pytest.raises(TypeError, match="accuracy_calculator must be a PML AccuracyCalculator"):
        callback_type(accuracy_calculator="calc")


def test_module_arguments_that_cannot_be_called_are_refused_by_name() -> None:
    """optimizer="adam", a str loss or backbone were taken and failed at fit time; None
    stays allowed where it was (no loss for evaluation alone, a backbone set after
    super().__init__, no miner or scheduler)."""
    _, module_type, _ = _lightning()
    net, loss = torch.nn.Linear(8, 4), ArcFaceLoss(3, 4)
    for kwargs, name in (
        ({"optimizer": "adam"}, "optimizer must be callable, got str"),
        ({"scheduler": 3}, "scheduler must be callable, got int"),
        ({"miner": "ms"}, "miner must be callable, got str"),
        ({"optimizer": None}, "optimizer must be callable, got NoneType"),
    ):
        with pytest.raises(TypeError, match=name):
            module_type(net, loss, **kwargs)
    with pytest.raises(TypeError, match="loss must be callable, got str"):
        module_type(net, "arcface")
    with pytest.raises(TypeError, match="backbone must be callable, got str"):
        module_type("resnet", loss)
    module = module_type(net, loss, miner=None, scheduler=None)
    assert module.configure_optimizers() is not None
    assert module_type(None, loss).backbone is None and module_type(net, None).loss is None
