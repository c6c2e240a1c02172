"""From a model row to an ``nme`` estimator: which class, and with which settings.

Defaults are not repeated here: whatever a client leaves out is read from the estimator class's
signature when the model is created, and the resolved settings are stored with the model.
"""

from __future__ import annotations

import inspect
from typing import Any

from nme import NMEClassifier, NMERegressor, NMESequenceTagger
from service.errors import InvalidInput, invalid
from service.tables import Model

ARCHITECTURE_KEYS = ("hidden", "placement", "method", "activation", "dropout")
SEQUENCE_ARCHITECTURE_KEYS = ("learn_start_end", "forbidden_transitions")
TRAINING_KEYS = (
    "max_epochs",
    "lr",
    "weight_decay",
    "batch_size",
    "patience",
    "anneal",
    "random_state",
)
SERVICE_DEFAULTS = {"random_state": 0}
"""Where the service deliberately differs from the estimators: refits are reproducible."""

Estimator = NMERegressor | NMEClassifier | NMESequenceTagger


def estimator_class(task: str) -> type[Estimator]:
    """The estimator class of a task."""
    return {
        "regression": NMERegressor,
        "classification": NMEClassifier,
        "sequence": NMESequenceTagger,
    }[task]


def resolve_settings(
    task: str, architecture: dict[str, Any], training: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill the settings a client left out (None) with the estimator's defaults.

    Returns ``(architecture, training)`` with every key set, and checks that the estimator
    accepts them (422 naming the problem otherwise).
    """
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(estimator_class(task).__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    defaults.update(SERVICE_DEFAULTS)
    defaults["forbidden_transitions"] = None

    def fill(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        out = {}
        for key in keys:
            value = values.get(key)
            out[key] = defaults[key] if value is None else value
            if isinstance(out[key], tuple):
                out[key] = list(out[key])  # JSON-friendly
        return out

    arch_keys = ARCHITECTURE_KEYS + (SEQUENCE_ARCHITECTURE_KEYS if task == "sequence" else ())
    resolved = fill(architecture, arch_keys), fill(training, TRAINING_KEYS)
    try:
        estimator_class(task)(**_estimator_kwargs(task, *resolved, states=None))
    except (TypeError, ValueError) as err:
        raise InvalidInput([invalid(["body", "architecture"], str(err))]) from err
    return resolved


def _estimator_kwargs(
    task: str,
    architecture: dict[str, Any],
    training: dict[str, Any],
    states: list[str] | None,
) -> dict[str, Any]:
    kwargs = {**architecture, **training}
    kwargs["hidden"] = tuple(kwargs["hidden"])
    if task == "sequence":
        forbidden = kwargs.pop("forbidden_transitions")
        kwargs["allowed"] = [tuple(pair) for pair in forbidden] if forbidden else None
        kwargs["states"] = states
    return kwargs


def build_estimator(model: Model, *, device: str) -> Estimator:
    """An unfitted estimator configured from the model's stored settings."""
    kwargs = _estimator_kwargs(model.task, model.architecture, model.training, model.states)
    return estimator_class(model.task)(**kwargs, device=device, verbose=False)
