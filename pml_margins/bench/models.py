"""Embedding networks: an MLP (digits), small CNNs (glyphs, fallback), optional big backbones.

torchvision and timm stay optional: :func:`build_backbone` imports them lazily and
falls back to :class:`ConvEmbedder` when neither is installed. Pretrained weights
are used only when they are already on disk; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch
from torch import nn

from pml_margins.torch_files import not_written_by_torch_save

__all__ = [
    "BackboneEmbedder",
    "ConvEmbedder",
    "GlyphCNN",
    "MLPEmbedder",
    "build_backbone",
    "build_model",
    "model_config",
]


class MLPEmbedder(nn.Module):
    """Flatten -> ``[Linear, BatchNorm, ReLU] x len(hidden)`` -> Linear to ``embedding_size``.

    The last layer is linear with no normalization, so the losses see raw features
    (softmax and SphereFace use the feature norm; the others normalize themselves).
    """

    def __init__(
        self, in_features: int, embedding_size: int, hidden: tuple[int, ...] = (256, 256)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, embedding_size))
        self.net = nn.Sequential(*layers)
        self.in_features, self.embedding_size, self.hidden = in_features, embedding_size, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvEmbedder(nn.Module):
    """A four-block CNN with global average pooling; any input size, ``channels`` inputs.

    The fallback image backbone when torchvision/timm are missing (and the model used
    by the tests on tiny fake CUB/SOP images).
    """

    def __init__(self, embedding_size: int, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = channels
        for c_out in (width, 2 * width, 4 * width, 8 * width):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, embedding_size)
        self.embedding_size = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class GlyphCNN(nn.Module):
    """Small CNN for ``1 x size x size`` glyphs: ``[Conv3x3, BatchNorm, ReLU, MaxPool2]`` blocks.

    ``unshuffle = r > 1`` first folds each ``r x r`` pixel patch into ``r * r``
    channels (``nn.PixelUnshuffle``): the blocks then run at ``size / r`` with every
    input pixel kept, about ``r * r`` times cheaper than at full size. The last
    feature map is flattened (not averaged), so the head sees where the strokes
    are, then a linear layer maps it to the embedding. ``size`` must be divisible
    by ``unshuffle * 2 ** len(widths)``.
    """

    def __init__(
        self,
        embedding_size: int,
        image_size: int = 32,
        widths: tuple[int, ...] = (16, 32, 64),
        unshuffle: int = 1,
    ) -> None:
        super().__init__()
        if unshuffle < 1:
            raise ValueError(f"unshuffle must be >= 1, got {unshuffle}")
        if not widths or image_size % (unshuffle * 2 ** len(widths)):
            raise ValueError(
                f"image_size {image_size} must be divisible by {unshuffle} * 2**{len(widths)} "
                f"(unshuffle {unshuffle}, one halving per block of widths {widths})"
            )
        blocks: list[nn.Module] = [nn.PixelUnshuffle(unshuffle)] if unshuffle > 1 else []
        c_in = unshuffle * unshuffle
        for c_out in widths:
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        side = image_size // (unshuffle * 2 ** len(widths))
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(c_in * side * side, embedding_size)
        self.embedding_size, self.image_size, self.widths = embedding_size, image_size, widths
        self.unshuffle = unshuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BackboneEmbedder(nn.Module):
    """A feature extractor returning ``(B, F)`` followed by a linear head to the embedding."""

    def __init__(
        self, backbone: nn.Module, feature_size: int, embedding_size: int, library: str = ""
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_size, embedding_size)
        self.embedding_size = embedding_size
        self.library = library  # "timm" or "torchvision": what a checkpoint rebuilds with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _torchvision_weights_on_disk(arch: str) -> Any | None:
    """torchvision's ``weights`` enum for ``arch`` if its file is already in the hub cache."""
    from torchvision import models as tv_models

    try:
        weights = tv_models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        return None
    filename = os.path.basename(weights.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    return weights if os.path.isfile(path) else None


def build_backbone(
    name: str, embedding_size: int, weights_path: str | None = None, library: str | None = None
) -> tuple[nn.Module, str]:
    """An image embedder ``name`` (e.g. ``"resnet50"``) and a line saying what was built.

    ``library`` (``"timm"`` or ``"torchvision"``, as a checkpoint records it: the same
    name may be another network in the other library) builds with that one only;
    ``None`` tries torchvision when its pretrained file is in the hub cache, then timm,
    then torchvision; it falls back to :class:`ConvEmbedder` with a warning
    when neither is installed (``name == "small-cnn"`` asks for it directly).
    Pretrained weights come from ``weights_path`` (a state dict of the backbone) or,
    for torchvision, from the torch hub cache when the file is already there;
    otherwise the backbone is randomly initialized. Nothing is downloaded (timm is
    always created with ``pretrained=False``).

    Raises:
        ValueError: timm/torchvision are installed but know no model ``name``, or
            ``weights_path`` is given while neither is installed.
    """
    if name == "small-cnn":
        return ConvEmbedder(embedding_size), "small-cnn (random init)"
    use_cache = weights_path is None
    if library is not None:
        if library not in ("timm", "torchvision"):
            raise ValueError(f"library must be 'timm' or 'torchvision', got {library!r}")
        built = _from_timm(name) if library == "timm" else _from_torchvision(name, use_cache)
        if built is None:
            raise ValueError(
                f"{name} was built with {library}, which is not installed or has no {name!r} "
                "(pip install 'pml-margins[vision]')"
            )
    else:  # torchvision first when its pretrained file is on disk (timm has none here)
        built = (
            (_from_torchvision(name, True) if use_cache and _torchvision_cached(name) else None)
            or _from_timm(name)
            or _from_torchvision(name, use_cache)
        )
    if built is None:
        if importlib.util.find_spec("timm") or importlib.util.find_spec("torchvision"):
            raise ValueError(f"unknown backbone {name!r}: neither timm nor torchvision has it")
        if weights_path:
            raise ValueError(
                f"weights {weights_path} are for a timm/torchvision {name!r}, but neither is "
                "installed (pip install 'pml-margins[vision]'); the small CNN has no such weights"
            )
        warnings.warn(
            f"neither timm nor torchvision is installed (pip install 'pml-margins[vision]'); "
            f"using the small CNN instead of {name!r}",
            stacklevel=2,
        )
        return ConvEmbedder(embedding_size), "small-cnn (no torchvision/timm)"
    backbone, feature_size, source = built
    if weights_path:
        missing = _load_weights(backbone, weights_path, name)
        source += f" (weights from {weights_path}; {len(missing)} missing keys)"
    elif "pretrained" not in source:
        source += " (random init: no weights on disk)"
    library = source.split(" ")[0]  # "timm" or "torchvision"
    embedder = BackboneEmbedder(backbone, feature_size, embedding_size, library)
    return embedder, f"{name} via {source}"


def _load_weights(backbone: nn.Module, path: str, name: str) -> list[str]:
    """Load a state dict file into ``backbone`` (non-strict: a classifier may be left out);
    its keys not loaded. ``ValueError`` naming the file when it cannot be read, holds no
    state dict, has a tensor of another shape, or none of its keys is the backbone's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a text file, a truncated zip, a pickle of objects: one line
        reason = (str(err).splitlines() or [""])[0]
        why = not_written_by_torch_save(path) or f"{type(err).__name__}: {reason}"
        raise ValueError(f"--weights {path}: cannot read it ({why})") from None

    def tensors_only(value: object) -> bool:
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())

    if isinstance(state, dict) and not tensors_only(state):  # a training checkpoint
        state = next((state[k] for k in ("state_dict", "model") if k in state), state)
    if not tensors_only(state):
        raise ValueError(f"--weights {path}: not a state dict of tensors")
    try:
        missing, _ = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise ValueError(f"--weights {path}: {str(err).splitlines()[-1].strip()}") from None
    own = backbone.state_dict()
    if own and not set(state) & set(own):  # strict=False loaded nothing: random weights
        raise ValueError(
            f"--weights {path}: none of its {len(state)} keys is a key of the {name} backbone "
            f"(e.g. {next(iter(state), '-')!r} against {next(iter(own))!r})"
        )
    return list(missing)


def _torchvision_cached(name: str) -> bool:
    try:
        return _torchvision_weights_on_disk(name) is not None
    except ImportError:
        return False


def _from_timm(name: str) -> tuple[nn.Module, int, str] | None:
    try:
        import timm
    except ImportError:
        return None
    if name not in timm.list_models():
        return None
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    return backbone, int(backbone.num_features), "timm"


def _from_torchvision(name: str, use_cache: bool) -> tuple[nn.Module, int, str] | None:
    try:
        from torchvision import models as tv_models
    except ImportError:
        return None
    if name not in tv_models.list_models():
        return None
    weights = _torchvision_weights_on_disk(name) if use_cache else None
    backbone = tv_models.get_model(name, weights=weights)
    source = "torchvision" + (" (pretrained, from the hub cache)" if weights else "")
    return backbone, _strip_classifier(backbone), source


def _strip_classifier(model: nn.Module) -> int:
    """Replace a torchvision model's final classifier by the identity; return its input size."""
    for attr in ("fc", "classifier", "head", "heads"):
        layer = getattr(model, attr, None)
        if layer is None:
            continue
        last = layer[-1] if isinstance(layer, nn.Sequential) else layer
        if isinstance(last, nn.Linear):
            if isinstance(layer, nn.Sequential):
                layer[-1] = nn.Identity()
            else:
                setattr(model, attr, nn.Identity())
            return int(last.in_features)
    raise ValueError(f"cannot find the classifier of {type(model).__name__} to remove")


def model_config(kind: str, embedding_size: int, **kwargs: Any) -> dict[str, Any]:
    """The dict saved with a checkpoint, from which :func:`build_model` rebuilds the model."""
    return {"kind": kind, "embedding_size": embedding_size, **kwargs}


def build_model(config: dict[str, Any]) -> tuple[nn.Module, str]:
    """Build the model a :func:`model_config` dict describes; returns it and a description."""
    kind = config["kind"]
    size = int(config["embedding_size"])
    if kind == "mlp":
        hidden = tuple(config.get("hidden", (256, 256)))
        return MLPEmbedder(int(config["in_features"]), size, hidden), f"MLP {hidden}"
    if kind == "glyph-cnn":
        widths = tuple(int(w) for w in config.get("widths", (16, 32, 64)))
        image_size = int(config.get("image_size", 32))
        unshuffle = int(config.get("unshuffle", 1))
        text = f"glyph CNN {widths} on {image_size}px" + (
            f" (pixel unshuffle {unshuffle})" if unshuffle > 1 else ""
        )
        return GlyphCNN(size, image_size, widths, unshuffle), text
    if kind == "small-cnn":
        return ConvEmbedder(size, channels=int(config.get("channels", 3))), "small-cnn"
    return build_backbone(kind, size, config.get("weights_path"), config.get("library"))
