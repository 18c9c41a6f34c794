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


def _perturb(model: nn.Module) -> None:
    """Move every parameter and BatchNorm statistic away from its initial value."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.1)


ROUND_TRIP_CONFIGS = [
    (models.model_config("mlp", 16, in_features=64, hidden=[32]), (3, 1, 8, 8)),
    (models.model_config("glyph-cnn", 12, image_size=16, widths=[4, 8]), (3, 1, 16, 16)),
    (models.model_config("glyph-cnn", 5, image_size=16, widths=[3], unshuffle=2), (3, 1, 16, 16)),
    (models.model_config("small-cnn", 6, channels=1), (3, 1, 12, 12)),
]


@pytest.mark.parametrize(("config", "shape"), ROUND_TRIP_CONFIGS, ids=lambda c: str(c)[:20])
def test_build_model_round_trip(tmp_path, config: dict, shape: tuple[int, ...]) -> None:
    """A saved state dict, loaded into a model rebuilt from its config, gives the same outputs."""
    model, description = models.build_model(config)
    assert description
    _perturb(model)  # a trained model differs from a fresh one, BatchNorm statistics included
    model.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    torch.save({"config": config, "state": model.state_dict()}, tmp_path / "m.pt")

    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    again, _ = models.build_model(saved["config"])
    again.eval()
    assert not torch.allclose(again(x), expected)  # the rebuilt model starts elsewhere
    again.load_state_dict(saved["state"])
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_build_model_keeps_the_configured_architecture() -> None:
    mlp, _ = models.build_model(models.model_config("mlp", 16, in_features=64, hidden=[32]))
    assert isinstance(mlp, models.MLPEmbedder) and mlp.hidden == (32,)
    cnn, text = models.build_model(models.model_config("glyph-cnn", 8, image_size=24, widths=[4]))
    assert isinstance(cnn, models.GlyphCNN) and (cnn.widths, cnn.image_size) == ((4,), 24)
    assert "24px" in text
    cnn, text = models.build_model(
        models.model_config("glyph-cnn", 8, image_size=32, widths=[4, 8], unshuffle=2)
    )
    assert cnn.unshuffle == 2 and "pixel unshuffle 2" in text
    assert isinstance(cnn.features[0], nn.PixelUnshuffle)
    assert cnn.features[1].in_channels == 4  # each 2 x 2 patch folded into 4 channels


@pytest.mark.parametrize(
    ("size", "widths", "unshuffle", "match"),
    [(24, (4, 8, 16), 2, "divisible by 2 \\* 2\\*\\*3"), (32, (4,), 0, "unshuffle must be >= 1"),
     (31, (4,), 1, "divisible by 1 \\* 2\\*\\*1"), (32, (), 1, "divisible")],
)  # fmt: skip
def test_glyph_cnn_rejects_sizes_it_cannot_halve(size, widths, unshuffle, match) -> None:
    with pytest.raises(ValueError, match=match):
        models.GlyphCNN(8, size, widths, unshuffle)


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


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path, cached: bool) -> list:
    """A stand-in ``torchvision.models`` recording the ``weights`` it is asked for."""
    import sys
    import types

    calls: list = []

    class Weights:
        url = "https://download.example/resnet_fake-1234.pth"

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 12))
            self.fc = nn.Linear(12, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x))

    def get_model(name: str, weights: object = None) -> nn.Module:
        calls.append(weights)
        return Net()

    tv_models = types.SimpleNamespace(
        list_models=lambda: ["resnet_fake"],
        get_model=get_model,
        get_model_weights=lambda name: types.SimpleNamespace(DEFAULT=Weights),
    )
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=tv_models))
    monkeypatch.setitem(sys.modules, "torchvision.models", tv_models)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    if cached:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "resnet_fake-1234.pth").write_bytes(b"")
    return calls


@pytest.mark.parametrize("cached", [False, True])
def test_torchvision_pretrained_only_from_the_local_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path, cached: bool
) -> None:
    calls = _fake_torchvision(monkeypatch, tmp_path, cached)
    model, description = models.build_backbone("resnet_fake", 5)
    assert isinstance(model, models.BackboneEmbedder)
    assert model(torch.rand(2, 3, 2, 2)).shape == (2, 5)  # classifier replaced by the head
    assert (calls[0] is not None) == cached  # weights requested only when on disk
    assert ("pretrained" in description) == cached
    assert ("random init" in description) == (not cached)


def test_local_weights_file_is_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = _fake_torchvision(monkeypatch, tmp_path, cached=True)
    state = {"body.1.weight": torch.zeros(12, 12), "fc.weight": torch.zeros(1000, 12)}
    torch.save(state, tmp_path / "w.pt")  # the classifier's key is left out
    _, description = models.build_backbone("resnet_fake", 5, weights_path=str(tmp_path / "w.pt"))
    assert calls == [None]  # the cache is not consulted when a file is given
    assert "weights from" in description


def test_unknown_backbone_with_torchvision_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    _fake_torchvision(monkeypatch, tmp_path, cached=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: name == "torchvision")
    with pytest.raises(ValueError, match="unknown backbone 'vit_nope'"):
        models.build_backbone("vit_nope", 5)


def test_weights_that_load_nothing_or_cannot_be_read_are_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    _fake_torchvision(monkeypatch, tmp_path, cached=False)
    body = {"body.1.weight": torch.zeros(12, 12), "body.1.bias": torch.zeros(12)}
    torch.save({"state_dict": body, "epoch": 3}, tmp_path / "nested.pt")  # unwrapped: loads
    _, description = models.build_backbone("resnet_fake", 5, str(tmp_path / "nested.pt"))
    assert "0 missing keys" in description
    torch.save({"backbone.body.1.weight": torch.zeros(12, 12)}, tmp_path / "prefixed.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"body.1.weight": torch.zeros(3, 3)}, tmp_path / "shape.pt")
    cases = {
        "prefixed.pt": "none of its 1 keys is a key of the resnet_fake backbone",
        "text.pt": r"cannot read it \(not written by torch.save: it starts with b'not '",
        "shape.pt": "size mismatch",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=f"--weights .*{name}: .*{message}"):
            models.build_backbone("resnet_fake", 5, str(tmp_path / name))


def test_torchvision_is_preferred_when_its_weights_are_on_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """With timm installed too (the [vision] extra), cached torchvision weights are used."""
    import sys
    import types

    calls = _fake_torchvision(monkeypatch, tmp_path, cached=True)
    timm = types.SimpleNamespace(list_models=lambda: ["resnet_fake"], create_model=None)
    monkeypatch.setitem(sys.modules, "timm", timm)
    _, description = models.build_backbone("resnet_fake", 5)
    assert "torchvision (pretrained" in description and calls[0] is not None


def _fake_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``timm`` whose ``resnet_fake`` has other key names than torchvision's."""
    import sys
    import types

    class TimmNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
            self.num_features = 7

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stem(x)

    timm = types.SimpleNamespace(
        list_models=lambda: ["resnet_fake"], create_model=lambda *a, **k: TimmNet()
    )
    monkeypatch.setitem(sys.modules, "timm", timm)


def test_a_checkpoint_rebuilds_with_the_library_that_trained_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Trained with --weights (timm first), re-evaluated while torchvision's file is cached:
    the recorded library, not the cache, decides (the same name, another network)."""
    _fake_torchvision(monkeypatch, tmp_path, cached=True)
    _fake_timm(monkeypatch)
    torch.save({"stem.1.weight": torch.zeros(7, 12)}, tmp_path / "timm_w.pt")
    trained, _ = models.build_backbone("resnet_fake", 5, str(tmp_path / "timm_w.pt"))
    assert trained.library == "timm"
    config = {"kind": "resnet_fake", "embedding_size": 5, "library": trained.library}
    rebuilt, description = models.build_model({**config, "weights_path": None})
    assert "via timm" in description
    rebuilt.load_state_dict(trained.state_dict())  # the same network
    other, description = models.build_model({**config, "library": "torchvision"})
    assert "via torchvision" in description and other.library == "torchvision"
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ValueError, match="built with timm, which is not installed"):
        models.build_model(config)
