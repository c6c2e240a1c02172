"""Per-person parameter tables: one flattened θⁱ row per person.

A training step only ever reads the rows of the persons in its batch, and the table produces
*sparse* gradients, so a sparse optimizer (``torch.optim.SparseAdam``) updates only those rows:
the cost of a step does not grow with the number of persons, and a person absent from the batch
keeps bit-identical parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

UNKNOWN = -1
"""Person index meaning "not seen in training": its θⁱ is the prior mean, zero."""


class Gathered(NamedTuple):
    """θⁱ rows of a batch, stored once per distinct person.

    Attributes:
        unique: ``(u, dim)`` one row per distinct person of the batch (zeros for unknown).
        inverse: ``(batch,) long`` index into ``unique`` of each item's person, or None when
            ``unique`` already has one row per item.
    """

    unique: torch.Tensor
    inverse: torch.Tensor | None

    def per_item(self) -> torch.Tensor:
        """``(batch, dim)`` the row of each item."""
        return self.unique if self.inverse is None else self.unique[self.inverse]


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

    def gather(self, persons: torch.Tensor) -> Gathered:
        """θⁱ rows of the distinct persons of a batch.

        Gathering each person once keeps the work (and the sparse gradient, which then has no
        duplicate rows for :class:`RowAdam` to merge) proportional to the persons present.

        Args:
            persons: ``(batch,) long`` person indices; ``UNKNOWN`` (-1) gives a zero row.
        """
        unique, inverse = torch.unique(persons, return_inverse=True)
        rows = F.embedding(unique.clamp(min=0), self.weight, sparse=True)  # (u, dim)
        if bool(unique[0] < 0):
            # Unknown persons only occur at inference; masking keeps their gradient zero.
            rows = rows * (unique >= 0).unsqueeze(-1).to(rows.dtype)
        return Gathered(rows, inverse)

    def forward(self, persons: torch.Tensor) -> torch.Tensor:
        """``persons: (batch,) long`` -> ``(batch, dim)`` rows (zeros for ``UNKNOWN``), with
        sparse gradients flowing back into ``weight``."""
        return self.gather(persons).per_item()

    def extra_repr(self) -> str:
        return f"n_persons={self.n_persons}, dim={self.dim}"


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for :class:`PersonTable` weights: a step touches only the rows in the gradient.

    Same update as ``torch.optim.SparseAdam`` (moments of absent rows are not decayed; bias
    correction uses the optimizer's step count), written with ``index_select``/``index_copy_``
    on the rows of the batch instead of generic sparse-tensor arithmetic, which is several
    times faster for wide rows. Rows absent from a step's gradient stay bit-identical.

    Args:
        params: parameters with sparse (COO) row gradients, e.g. ``[table.weight]``.
        lr, betas, eps: as in Adam.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not grad.is_sparse:
                    raise ValueError("RowAdam needs sparse row gradients (PersonTable)")
                idx = grad._indices()[0]  # (rows,)
                values = grad._values()  # (rows, dim)
                # PersonTable.gather emits strictly increasing rows; merge duplicates otherwise
                if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                    unique, inverse = torch.unique(idx, return_inverse=True)
                    values = values.new_zeros(unique.shape[0], values.shape[1]).index_add_(
                        0, inverse, values
                    )
                    idx = unique
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    # both moments of a row side by side: one gather and one scatter per step
                    state["moments"] = p.new_zeros(p.shape[0], 2, p.shape[1])
                state["step"] += 1
                t = state["step"]
                moments = state["moments"].index_select(0, idx)  # (rows, 2, dim)
                m, v = moments[:, 0], moments[:, 1]
                m.mul_(beta1).add_(values, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["moments"].index_copy_(0, idx, moments)
                denom = v.sqrt().div_(math.sqrt(1 - beta2**t)).add_(group["eps"])
                step_size = group["lr"] / (1 - beta1**t)
                rows = p.index_select(0, idx).addcdiv_(m, denom, value=-step_size)
                p.index_copy_(0, idx, rows)
