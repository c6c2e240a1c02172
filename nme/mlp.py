"""The multi-layer perceptron f(x; θ) used by the regression and classification estimators."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    """``in_features -> hidden... -> out_features``; ``hidden=()`` is a linear model.

    Linear layers are ``layers.0``, ``layers.1``, … so placements can name them
    (``"layers.0.weight"``); activations and dropout hold no parameters.

    Args:
        in_features: input width F.
        hidden: widths of the hidden layers.
        out_features: output width (1 for regression, number of classes/states otherwise).
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout probability after each hidden activation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        out_features: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (batch, in_features)`` -> ``(batch, out_features)``."""
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < last:
                x = self.drop(self.act(x))
        return x
