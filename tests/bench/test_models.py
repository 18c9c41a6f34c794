"""Embedding networks and the optional-backbone fallback."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from pml_margins.bench import models

HAS_VISION = any(importlib.util.find_spec(m) for m in ("torchvision", "timm"))


def test_mlp_and_cnn_shapes() -> None:
    mlp = models.MLPEmbedder(64, 3)
    assert mlp(torch.rand(5, 1, 8, 8)).shape == (5, 3)
    cnn = models.ConvEmbedder(7, channels=3, width=4)
    assert cnn(torch.rand(2, 3, 13, 17)).shape == (2, 7)


def test_build_model_round_trip() -> None:
    config = models.model_config("mlp", 16, in_features=64, hidden=[32])
    model, description = models.build_model(config)
    assert isinstance(model, models.MLPEmbedder) and model.hidden == (32,)
    assert "MLP" in description
    again, _ = models.build_model(config)
    again.load_state_dict(model.state_dict())


@pytest.mark.skipif(HAS_VISION, reason="torchvision or timm is installed")
def test_backbone_falls_back_to_small_cnn_with_a_hint() -> None:
    with pytest.warns(UserWarning, match=r"pml-margins\[vision\]"):
        model, description = models.build_backbone("resnet50", 8)
    assert isinstance(model, models.ConvEmbedder)
    assert "no torchvision/timm" in description


def test_small_cnn_backbone_by_name() -> None:
    model, description = models.build_backbone("small-cnn", 8)
    assert isinstance(model, models.ConvEmbedder) and description.startswith("small-cnn")


def test_strip_classifier_replaces_the_last_linear() -> None:
    net = nn.Sequential()
    net.features = nn.Linear(4, 6)
    net.fc = nn.Linear(6, 10)
    assert models._strip_classifier(net) == 6
    assert isinstance(net.fc, nn.Identity)
    seq = nn.Module()
    seq.classifier = nn.Sequential(nn.Dropout(), nn.Linear(5, 3))
    assert models._strip_classifier(seq) == 5
    with pytest.raises(ValueError, match="classifier"):
        models._strip_classifier(nn.Module())
