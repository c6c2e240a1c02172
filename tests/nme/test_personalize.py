"""Person-specific parameters on arbitrary modules, and the sparse-update property."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nme.mlp import MLP
from nme.personalize import PersonalizedModule, resolve_placement
from nme.train import TrainConfig, fit_loop


class TwoBranch(nn.Module):
    """Not an MLP: two parallel linear maps and a scale parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(self.a(x)) + self.b(x)


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("last", ["layers.2.weight", "layers.2.bias"]),
        (["layers.0.weight"], ["layers.0.weight"]),
        (["0.bias"], ["layers.0.bias"]),
        ([r"layers\.[01]\.bias"], ["layers.0.bias", "layers.1.bias"]),
    ],
)
def test_resolve_placement(placement: object, expected: list[str]) -> None:
    assert resolve_placement(MLP(3, (4, 4), 1), placement) == expected  # type: ignore[arg-type]


def test_resolve_placement_all_and_unmatched() -> None:
    mlp = MLP(3, (4,), 1)
    assert resolve_placement(mlp, "all") == [n for n, _ in mlp.named_parameters()]
    with pytest.raises(ValueError, match="nope"):
        resolve_placement(mlp, ["nope"])


@pytest.mark.parametrize("placement", ["last", "all", ["scale", "a.weight"]])
def test_per_sample_forward_equals_loop_over_samples(placement: object) -> None:
    torch.manual_seed(0)
    module = PersonalizedModule(TwoBranch(), placement, n_persons=4, method="nme")  # type: ignore[arg-type]
    with torch.no_grad():
        module.persons.weight.normal_()
    x = torch.randn(7, 3)
    persons = torch.tensor([0, 1, 2, 3, 1, -1, 0])
    out, rows = module(x, persons)
    # brute force: one functional call per sample with θ̄ + θⁱ
    for b in range(7):
        params = dict(module.base.named_parameters())
        delta = module.layout.split(rows[b])
        full = {n: params[n] + delta[n] if n in delta else params[n] for n in params}
        ref = torch.func.functional_call(module.base, full, (x[b : b + 1],))[0]
        torch.testing.assert_close(out[b], ref)
    assert torch.all(rows[5] == 0), "unknown person must get θⁱ = 0"


def test_specific_has_no_generic_part_on_placed_parameters() -> None:
    module = PersonalizedModule(MLP(3, (4,), 1), "last", n_persons=3, method="specific")
    last = module.base.layers[1]
    assert torch.all(last.weight == 0) and not last.weight.requires_grad
    # each person starts from the base's initial values, so rows are equal and non-zero
    w = module.persons.weight
    assert torch.equal(w[0], w[1]) and w.abs().sum() > 0


def test_generic_has_no_person_table_columns() -> None:
    module = PersonalizedModule(MLP(3, (4,), 1), "all", n_persons=3, method="generic")
    assert module.effect_dim == 0


def test_gradients_are_sparse_and_absent_rows_bit_identical() -> None:
    torch.manual_seed(0)
    module = PersonalizedModule(MLP(3, (8,), 1), "all", n_persons=50, method="nme")
    with torch.no_grad():
        module.persons.weight.normal_()
    before = module.persons.weight.detach().clone()
    # only persons 0..4 have data; 5..49 never appear in a batch
    persons = torch.arange(5).repeat(8)
    x = torch.randn(40, 3)
    y = torch.randn(40)

    def item_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, rows = module(x[idx], persons[idx])
        return (out.squeeze(-1) - y[idx]) ** 2, rows

    out, rows = module(x[:4], persons[:4])
    out.sum().backward()
    assert module.persons.weight.grad is not None and module.persons.weight.grad.is_sparse
    module.zero_grad()

    fit_loop(module, persons, item_loss, TrainConfig(max_epochs=2, batch_size=16, seed=0))
    after = module.persons.weight.detach()
    assert torch.equal(after[5:], before[5:]), "rows without data must be bit-identical"
    assert not torch.equal(after[:5], before[:5]), "rows with data must have moved"


def test_grouped_and_per_item_linear_paths_agree() -> None:
    """A batch of few persons with many rows each takes the grouped-matmul path."""
    torch.manual_seed(0)
    module = PersonalizedModule(MLP(3, (8,), 2), "all", n_persons=6, method="nme")
    with torch.no_grad():
        module.persons.weight.normal_()
    x = torch.randn(40, 3, requires_grad=True)
    persons = torch.tensor([0, 3, 3, 5] * 10)  # 3 persons, 40 rows: grouped
    out, _ = module(x, persons)
    out.sum().backward()
    grad_x, grad_table = x.grad.clone(), module.persons.weight.grad.to_dense().clone()
    x.grad = None
    module.zero_grad()
    # the same rows one person per item (per-item path): identical values and gradients
    rows = module.persons.weight[persons].detach().requires_grad_(True)
    ref, _ = module(x, effects=rows)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad_x, x.grad)
    expected = torch.zeros_like(grad_table).index_add_(0, persons, rows.grad)
    torch.testing.assert_close(grad_table, expected)


def test_row_adam_matches_sparse_adam_with_and_without_duplicate_rows() -> None:
    from nme.persons import PersonTable, RowAdam

    torch.manual_seed(0)
    ours, ref = PersonTable(10, 4), PersonTable(10, 4)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    opt_ours = RowAdam([ours.weight], lr=0.01)
    opt_ref = torch.optim.SparseAdam([ref.weight], lr=0.01)
    for _ in range(5):
        persons, target = torch.randint(0, 6, (7,)), torch.randn(7, 4)
        for table, opt in ((ours, opt_ours), (ref, opt_ref)):
            for gather in (table, lambda p, t=table: F.embedding(p, t.weight, sparse=True)):
                opt.zero_grad()
                ((gather(persons) - target) ** 2).sum().backward()  # type: ignore[operator]
                opt.step()
    torch.testing.assert_close(ours.weight, ref.weight)
    assert torch.equal(ours.weight[6:], ref.weight[6:])
