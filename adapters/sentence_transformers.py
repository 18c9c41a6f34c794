"""sentence-transformers: our losses (any PML loss) as ``SentenceTransformerTrainer`` losses.

Needs ``pip install 'pml-margins[sentence-transformers]'`` (sentence-transformers
with its ``train`` extra: ``datasets`` and ``accelerate``).

The dataset has one text column and a ``label`` column of integer classes
(``0 .. C-1`` for the class-weight losses), the same input format as
sentence-transformers' ``BatchAllTripletLoss``.

Example::

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    model = SentenceTransformer("all-MiniLM-L6-v2")
    train = Dataset.from_dict({"sentence": texts, "label": classes})
    loss = MetricLoss(model, ArcFaceLoss(num_classes=20, embedding_size=384, scale=32.0))
    args = Args(output_dir="out", learning_rate=2e-5,
                learning_rate_mapping={r"metric_loss\\.": 1e-2})  # class weights
    SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss).train()

For a pair loss with a miner (Circle + ``MultiSimilarityMiner``), ask for
batches holding several samples per class: ``Args(batch_sampler="group_by_label")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pml_margins.adapters._extras import require

require("sentence_transformers", extra="sentence-transformers")

__all__ = ["MetricLoss"]


class MetricLoss(torch.nn.Module):
    """Wrap a PML loss (and optionally a PML miner) as a sentence-transformers loss.

    ``forward(sentence_features, labels)`` embeds the single text column with
    ``model`` and returns ``loss(embeddings, labels, miner(embeddings, labels))``.
    The loss's own parameters (class weights ``W``) are trained with the model:
    the trainer optimizes the parameters of the loss module, which holds both;
    they are named ``metric_loss.*`` (e.g. ``metric_loss.W``) for
    ``learning_rate_mapping``. The loss runs in the model's mode: evaluation batches
    leave its state (buffers such as CurricularFace's ``t``) as it was.

    sentence-transformers' checkpoints hold the model (and the optimizer), not the
    loss: to resume a run, save ``loss.metric_loss.state_dict()`` beside each
    checkpoint (e.g. from a ``TrainerCallback.on_save``) and load it into the loss
    before ``trainer.train(resume_from_checkpoint=...)``; otherwise ``W`` restarts
    from its initialisation under the restored optimizer state.

    Losses that read the embeddings' norm (:class:`~pml_margins.losses.MagFaceLoss`,
    :class:`~pml_margins.losses.AdaFaceLoss`, SphereFace's norm scale) need a model
    without a final ``Normalize`` module (many pretrained ones end with it, e.g.
    all-MiniLM-L6-v2: ``Transformer, Pooling, Normalize``): its unit norms leave their
    norm-dependent margin, regularizer or statistics constant, with no error.

    Args:
        model: the ``SentenceTransformer`` being trained (stored as ``model``, where
            the trainer expects it and swaps in its DDP wrapper).
        loss: a PML loss, e.g. :class:`pml_margins.losses.ArcFaceLoss` with
            ``embedding_size`` equal to the model's embedding dimension.
        miner: a PML miner; ``None``: none.

    Raises:
        ValueError: (in ``forward``) not exactly one text column, or no labels.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: torch.nn.Module,
        miner: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model, self.metric_loss, self.miner = model, loss, miner

    def forward(
        self, sentence_features: Sequence[dict[str, torch.Tensor]], labels: torch.Tensor | None
    ) -> torch.Tensor:
        if len(sentence_features) != 1:
            raise ValueError(
                f"{type(self).__name__} expects one text column and a 'label' column of "
                f"classes, got {len(sentence_features)} text columns"
            )
        embeddings = self.model(sentence_features[0])["sentence_embedding"]
        return self.compute_loss_from_embeddings([embeddings], labels)

    def compute_loss_from_embeddings(
        self, embeddings: Sequence[torch.Tensor], labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss of already computed embeddings (sentence-transformers' loss protocol)."""
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs a 'label' column of integer classes")
        emb = embeddings[0]
        if isinstance(labels, torch.Tensor) and labels.ndim == 2:
            if labels.shape[1] != 1:  # (the miner, run first, would not name the shape)
                raise ValueError(
                    "labels must be (B,) or a (B, 1) column of integer classes, got shape "
                    f"{tuple(labels.shape)}"
                )
            labels = labels.reshape(-1)
        # the trainer switches the model only: the loss's state (CurricularFace's t, AdaFace's
        # statistics, Center's centres) must not move on evaluation batches
        training = bool(getattr(self.model, "training", True))
        self.metric_loss.train(training)
        if self.miner is not None:
            self.miner.train(training)
        indices_tuple = None if self.miner is None else self.miner(emb, labels)
        return self.metric_loss(emb, labels, indices_tuple)

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into the model card."""
        config: dict[str, Any] = {"loss": repr(self.metric_loss)}
        if self.miner is not None:
            config["miner"] = repr(self.miner)
        return config
