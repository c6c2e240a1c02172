"""Per-person parameter tables: one flattened θⁱ row per person.

A training step only ever reads the rows of the persons in its batch, and the table produces
*sparse* gradients, so a sparse optimizer (``torch.optim.SparseAdam``) updates only those rows:
the cost of a step does not grow with the number of persons, and a person absent from the batch
keeps bit-identical parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNKNOWN = -1
"""Person index meaning "not seen in training": its θⁱ is the prior mean, zero."""


class PersonTable(nn.Module):
    """A ``(n_persons, dim)`` table of flattened person-specific parameters.

    Args:
        n_persons: number of known persons (rows).
        dim: length of one person's flattened θⁱ vector.
    """

    def __init__(self, n_persons: int, dim: int) -> None:
        super().__init__()
        self.n_persons = n_persons
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(n_persons, dim))

    def forward(self, persons: torch.Tensor) -> torch.Tensor:
        """Gather θⁱ rows.

        Args:
            persons: ``(batch,) long`` person indices; ``UNKNOWN`` (-1) gives a zero row.

        Returns:
            ``(batch, dim)`` the rows, with sparse gradients flowing back into ``weight``.
        """
        known = persons >= 0
        rows = F.embedding(persons.clamp(min=0), self.weight, sparse=True)  # (batch, dim)
        if bool(known.all()):
            return rows
        # Unknown persons only occur at inference; masking keeps their gradient exactly zero.
        return rows * known.unsqueeze(-1).to(rows.dtype)

    def extra_repr(self) -> str:
        return f"n_persons={self.n_persons}, dim={self.dim}"
