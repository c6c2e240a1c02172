"""The kinds of model the service trains and serves, by ``model.task``.

``kind_of(model)`` is how the rest of the service asks what differs between regression,
classification and sequence models; see ``base.ModelKind`` for what a kind provides.
"""

from __future__ import annotations

from service.learning.kinds.base import Estimator, ModelKind, TrainingData
from service.learning.kinds.sequence import SequenceKind
from service.learning.kinds.tabular import ClassificationKind, RegressionKind
from service.storage.tables import Model

KINDS: dict[str, ModelKind] = {
    kind.task: kind for kind in (RegressionKind(), ClassificationKind(), SequenceKind())
}
"""One (stateless) instance per task."""


def kind_for(task: str) -> ModelKind:
    """The kind that handles ``task`` (``KeyError`` for an unknown task)."""
    return KINDS[task]


def kind_of(model: Model) -> ModelKind:
    """The kind of a stored model."""
    return KINDS[model.task]


__all__ = ["KINDS", "Estimator", "ModelKind", "TrainingData", "kind_for", "kind_of"]
