"""Tests of the CRF kernels: brute force, pytorch-crf, gradcheck and properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchcrf
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from nme import crf

STATES = 3
LENGTHS = [4, 1, 3, 2]  # variable lengths, including a single position
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Helpers


def make_mask(lengths: list[int], length: int | None = None) -> Tensor:
    length = max(lengths) if length is None else length
    return torch.arange(length) < torch.tensor(lengths).unsqueeze(1)


def random_inputs(
    lengths: list[int],
    states: int,
    *,
    per_sequence: bool,
    with_start_end: bool,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    shape = (batch, states, states) if per_sequence else (states, states)
    return {
        "emissions": torch.randn(batch, length, states, generator=gen, dtype=dtype),
        "mask": make_mask(lengths),
        "transitions": scale * torch.randn(*shape, generator=gen, dtype=dtype),
        "start": torch.randn(states, generator=gen, dtype=dtype) if with_start_end else None,
        "end": torch.randn(states, generator=gen, dtype=dtype) if with_start_end else None,
    }


def no_self_loops(states: int) -> Tensor:
    """The onset-annotation constraint: a state never follows itself."""
    return ~torch.eye(states, dtype=torch.bool)


def all_paths(
    inputs: dict[str, Tensor | None], allowed: Tensor | None, b: int
) -> dict[tuple[int, ...], float]:
    """Score of every allowed path of sequence b, straight from the definition."""
    emissions = inputs["emissions"][b]
    n = int(inputs["mask"][b].sum())
    trans = inputs["transitions"]
    trans = trans[b] if trans.dim() == 3 else trans
    start, end = inputs["start"], inputs["end"]
    scores = {}
    for path in itertools.product(range(emissions.size(-1)), repeat=n):
        if allowed is not None and not all(allowed[i, j] for i, j in itertools.pairwise(path)):
            continue
        score = sum(float(emissions[t, s]) for t, s in enumerate(path))
        score += sum(float(trans[i, j]) for i, j in itertools.pairwise(path))
        if start is not None:
            score += float(start[path[0]]) + float(end[path[-1]])
        scores[path] = score
    return scores


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


CASES = [
    pytest.param(per_sequence, with_start_end, forbid, id=f"{name}-{se}-{fb}")
    for per_sequence, name in ((False, "shared"), (True, "per_sequence"))
    for with_start_end, se in ((False, "uniform"), (True, "start_end"))
    for forbid, fb in ((False, "free"), (True, "forbidden"))
]
# Scale 500 makes the transition spread exceed the float64 exp-space limit (600): exercises
# the logsumexp fallback.
SCALES = [pytest.param(1.0, id="fast"), pytest.param(500.0, id="wide")]


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_scales_select_both_forward_paths(per_sequence: bool, scale: float) -> None:
    inputs = random_inputs(
        LENGTHS, STATES, per_sequence=per_sequence, with_start_end=False, scale=scale
    )
    for weights in (inputs["transitions"], inputs["transitions"].transpose(-1, -2)):
        step = crf._LogMatmul(weights, None)
        assert (step.factors is None) == (scale > 1), "the wide case must use the fallback"


# ----------------------------------------------------------------------------------------------
# Brute force


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("per_sequence", "with_start_end", "forbid"), CASES)
def test_log_partition_matches_brute_force(
    per_sequence: bool, with_start_end: bool, forbid: bool, scale: float
) -> None:
    inputs = random_inputs(
        LENGTHS, STATES, per_sequence=per_sequence, with_start_end=with_start_end, scale=scale
    )
    allowed = no_self_loops(STATES) if forbid else None
    log_z = crf.log_partition(**inputs, allowed=allowed)
    expected = [logsumexp(list(all_paths(inputs, allowed, b).values())) for b in range(4)]
    torch.testing.assert_close(log_z, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("per_sequence", "with_start_end", "forbid"), CASES)
def test_log_likelihood_matches_brute_force(
    per_sequence: bool, with_start_end: bool, forbid: bool, scale: float
) -> None:
    inputs = random_inputs(
        LENGTHS, STATES, per_sequence=per_sequence, with_start_end=with_start_end, scale=scale
    )
    allowed = no_self_loops(STATES) if forbid else None
    # Allowed under both settings, and -1 at padded positions, which must be ignored.
    tags = torch.tensor([[0, 1, 0, 2], [2, -1, -1, -1], [1, 2, 1, -1], [0, 2, -1, -1]])
    result = crf.log_likelihood(inputs["emissions"], tags, **_no_emissions(inputs), allowed=allowed)
    expected = []
    for b in range(4):
        paths = all_paths(inputs, allowed, b)
        path = tuple(tags[b, : LENGTHS[b]].tolist())
        expected.append(paths[path] - logsumexp(list(paths.values())))
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))
    # The probabilities of all paths of a sequence sum to one.
    batch_paths = list(all_paths(inputs, allowed, 0))
    many = torch.tensor(batch_paths)
    repeated = {k: _repeat(v, len(batch_paths)) for k, v in _no_emissions(inputs).items()}
    repeated["mask"] = torch.ones(len(batch_paths), 4, dtype=torch.bool)
    emissions = inputs["emissions"][:1].expand(len(batch_paths), -1, -1)
    total = crf.log_likelihood(emissions, many, **repeated, allowed=allowed).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))


def _no_emissions(inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    return {k: v for k, v in inputs.items() if k != "emissions"}


def _repeat(value: Tensor | None, batch: int) -> Tensor | None:
    """Repeat sequence 0's per-sequence tensor; shared ones stay as they are."""
    if value is None or value.dim() != 3:
        return value
    return value[:1].expand(batch, -1, -1)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("per_sequence", "with_start_end", "forbid"), CASES)
def test_viterbi_matches_brute_force(
    per_sequence: bool, with_start_end: bool, forbid: bool, scale: float
) -> None:
    inputs = random_inputs(
        LENGTHS, STATES, per_sequence=per_sequence, with_start_end=with_start_end, scale=scale
    )
    allowed = no_self_loops(STATES) if forbid else None
    paths, scores = crf.viterbi_decode(**inputs, allowed=allowed)
    assert paths.dtype == torch.long and paths.shape == (4, 4)
    for b, n in enumerate(LENGTHS):
        candidates = all_paths(inputs, allowed, b)
        best = max(candidates, key=candidates.__getitem__)
        assert tuple(paths[b, :n].tolist()) == best
        assert (paths[b, n:] == -1).all()
        assert scores[b].item() == pytest.approx(candidates[best], abs=1e-9)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("per_sequence", "with_start_end", "forbid"), CASES)
def test_marginals_match_brute_force(
    per_sequence: bool, with_start_end: bool, forbid: bool, scale: float
) -> None:
    inputs = random_inputs(
        LENGTHS, STATES, per_sequence=per_sequence, with_start_end=with_start_end, scale=scale
    )
    allowed = no_self_loops(STATES) if forbid else None
    probs = crf.marginals(**inputs, allowed=allowed)
    expected = torch.zeros(4, 4, STATES, dtype=torch.float64)
    for b in range(4):
        candidates = all_paths(inputs, allowed, b)
        log_z = logsumexp(list(candidates.values()))
        for path, score in candidates.items():
            for t, s in enumerate(path):
                expected[b, t, s] += math.exp(score - log_z)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), inputs["mask"].double())


def test_path_score_matches_definition() -> None:
    inputs = random_inputs(LENGTHS, STATES, per_sequence=True, with_start_end=True)
    tags = torch.tensor([[0, 1, 0, 2], [2, 0, 0, 0], [1, 2, 1, 0], [0, 2, 1, 1]])
    result = crf.path_score(inputs["emissions"], tags, **_no_emissions(inputs))
    for b, n in enumerate(LENGTHS):
        path = tuple(tags[b, :n].tolist())
        assert result[b].item() == pytest.approx(all_paths(inputs, None, b)[path])


# ----------------------------------------------------------------------------------------------
# Forbidden transitions


def test_forbidden_path_has_minus_inf_likelihood_and_finite_gradients() -> None:
    inputs = random_inputs(LENGTHS, STATES, per_sequence=True, with_start_end=True)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    allowed = no_self_loops(STATES)
    # Sequence 0 repeats state 1 (forbidden); the others are allowed.
    tags = torch.tensor([[0, 1, 1, 2], [2, -1, -1, -1], [1, 2, 1, -1], [0, 2, -1, -1]])
    result = crf.log_likelihood(leaves["emissions"], tags, **_no_emissions(leaves), allowed=allowed)
    assert result[0].item() == NEG_INF
    assert torch.isfinite(result[1:]).all()
    result[1:].sum().backward(retain_graph=True)
    for name in ("emissions", "transitions", "start", "end"):
        grad = leaves[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
    # A forbidden transition can never matter, so its score gets no gradient.
    assert (leaves["transitions"].grad[:, ~allowed] == 0).all()
    # The -inf sequence itself contributes nothing: a constant has zero gradient.
    leaves["emissions"].grad = None
    result[0].backward()
    assert (leaves["emissions"].grad == 0).all()


def test_unreachable_state_and_impossible_sequences() -> None:
    emissions = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = make_mask([3, 1])
    transitions = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[:, 2] = False  # state 2 can only be the first state
    tags = torch.tensor([[2, 0, 1], [2, -1, -1]])
    result = crf.log_likelihood(emissions, tags, mask, transitions, allowed=allowed)
    result.sum().backward()
    assert torch.isfinite(result).all()
    assert torch.isfinite(emissions.grad).all() and torch.isfinite(transitions.grad).all()
    probs = crf.marginals(emissions, mask, transitions, allowed=allowed)
    assert (probs[0, 1:, 2] == 0).all()
    paths, _ = crf.viterbi_decode(emissions, mask, transitions, allowed=allowed)
    assert (paths[0, 1:] != 2).all()
    # With every transition forbidden, only single-position sequences have a path.
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    log_z = crf.log_partition(emissions, mask, transitions, allowed=nothing)
    assert log_z[0].item() == NEG_INF and torch.isfinite(log_z[1])
    _, scores = crf.viterbi_decode(emissions.detach(), mask, transitions.detach(), allowed=nothing)
    assert scores[0].item() == NEG_INF and torch.isfinite(scores[1])


# ----------------------------------------------------------------------------------------------
# Agreement with pytorch-crf


@pytest.mark.parametrize("states", [2, 5, 12])
def test_agrees_with_pytorch_crf(states: int) -> None:
    torch.manual_seed(states)
    lengths = torch.randint(1, 30, (16,)).tolist()
    lengths[0] = 30
    mask = make_mask(lengths)
    emissions = 3 * torch.randn(16, 30, states)
    tags = torch.randint(states, (16, 30))
    reference = torchcrf.CRF(states, batch_first=True)
    with torch.no_grad():  # pytorch-crf initialises small; make the test bite
        for parameter in reference.parameters():
            parameter.mul_(20)
    params = {
        "transitions": reference.transitions.detach(),
        "start": reference.start_transitions.detach(),
        "end": reference.end_transitions.detach(),
    }
    expected = reference(emissions, tags, mask, reduction="none")
    result = crf.log_likelihood(emissions, tags, mask, **params)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-3)

    paths, _ = crf.viterbi_decode(emissions, mask, **params)
    decoded = reference.decode(emissions, mask)
    assert [paths[b, :n].tolist() for b, n in enumerate(lengths)] == decoded


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("per_sequence", "with_start_end", "forbid"), CASES)
def test_log_likelihood_gradcheck(
    per_sequence: bool, with_start_end: bool, forbid: bool, scale: float
) -> None:
    inputs = random_inputs(
        LENGTHS, STATES, per_sequence=per_sequence, with_start_end=with_start_end, scale=scale
    )
    allowed = no_self_loops(STATES) if forbid else None
    tags = torch.tensor([[0, 1, 0, 2], [2, -1, -1, -1], [1, 2, 1, -1], [0, 2, -1, -1]])
    names = ["emissions", "transitions"] + (["start", "end"] if with_start_end else [])
    leaves = tuple(inputs[name].clone().requires_grad_() for name in names)

    def func(*values: Tensor) -> Tensor:
        kwargs = {**inputs, **dict(zip(names, values, strict=True))}
        return crf.log_likelihood(kwargs.pop("emissions"), tags, **kwargs, allowed=allowed)

    assert torch.autograd.gradcheck(func, leaves)


def test_viterbi_score_is_differentiable_path_score() -> None:
    inputs = random_inputs(LENGTHS, STATES, per_sequence=False, with_start_end=True)
    transitions = inputs["transitions"].clone().requires_grad_()
    paths, scores = crf.viterbi_decode(**{**inputs, "transitions": transitions})
    assert scores.requires_grad
    expected = crf.path_score(inputs["emissions"], paths, **_no_emissions(inputs))
    torch.testing.assert_close(scores.detach(), expected)


# ----------------------------------------------------------------------------------------------
# Long sequences


def test_length_1000_is_stable_in_float32() -> None:
    torch.manual_seed(0)
    lengths = [1000, 731, 1]
    mask = make_mask(lengths)
    emissions = 3 * torch.randn(3, 1000, 6, dtype=torch.float64)
    transitions = 2 * torch.randn(3, 6, 6, dtype=torch.float64)
    tags = torch.randint(6, (3, 1000))
    allowed = no_self_loops(6)
    results = {}
    for dtype in (torch.float32, torch.float64):
        em = emissions.to(dtype).requires_grad_()
        trans = transitions.to(dtype)
        ll = crf.log_likelihood(em, tags, mask, trans)
        ll.sum().backward()
        results[dtype] = {
            "log_z": crf.log_partition(em, mask, trans, allowed=allowed),
            "ll": ll,
            "grad": em.grad,
            "marginals": crf.marginals(em, mask, trans, allowed=allowed),
            "viterbi": crf.viterbi_decode(em.detach(), mask, trans, allowed=allowed),
        }
    single, double = results[torch.float32], results[torch.float64]
    # Log-scores reach ~5000 here, where float32 resolves ~5e-4; probabilities must not inherit
    # that error (the kernels renormalise every step).
    for name, rtol, atol in (
        ("log_z", 1e-6, 1e-3),
        ("ll", 1e-6, 1e-3),
        ("grad", 0, 5e-5),
        ("marginals", 0, 5e-5),
    ):
        assert torch.isfinite(single[name]).all(), name
        torch.testing.assert_close(single[name].double(), double[name], rtol=rtol, atol=atol)
    assert (single["viterbi"][0] == double["viterbi"][0]).all()
    torch.testing.assert_close(
        single["viterbi"][1].double(), double["viterbi"][1], rtol=1e-5, atol=1e-3
    )


# ----------------------------------------------------------------------------------------------
# Properties


@st.composite
def crf_problems(draw: st.DrawFn) -> dict[str, object]:
    batch = draw(st.integers(1, 5))
    states = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(1, 7), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**16))
    inputs = random_inputs(
        lengths,
        states,
        per_sequence=draw(st.booleans()),
        with_start_end=draw(st.booleans()),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0, 500.0])),
        dtype=torch.float64,
        seed=seed,
    )
    allowed = None
    if states > 1 and draw(st.booleans()):
        allowed = no_self_loops(states)
    return {"inputs": inputs, "allowed": allowed, "lengths": lengths}


@settings(max_examples=60, deadline=None)
@given(crf_problems())
def test_log_partition_bounds_viterbi_score(problem: dict) -> None:
    inputs, allowed = problem["inputs"], problem["allowed"]
    log_z = crf.log_partition(**inputs, allowed=allowed)
    paths, scores = crf.viterbi_decode(**inputs, allowed=allowed)
    assert (log_z >= scores - 1e-9).all()
    if allowed is not None:
        for b, n in enumerate(problem["lengths"]):
            steps = paths[b, :n]
            assert allowed[steps[:-1], steps[1:]].all(), "decoded a forbidden transition"
    # The decoded path's own score, and likelihood, agree with what Viterbi reports.
    emissions = inputs["emissions"]
    torch.testing.assert_close(
        crf.path_score(emissions, paths, **_no_emissions(inputs), allowed=allowed), scores
    )
    ll = crf.log_likelihood(emissions, paths, **_no_emissions(inputs), allowed=allowed)
    assert (ll <= 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(crf_problems(), st.integers(1, 4), st.sampled_from([0.0, 1e6, float("nan")]))
def test_padding_beyond_the_mask_changes_nothing(problem: dict, extra: int, fill: float) -> None:
    inputs, allowed = problem["inputs"], problem["allowed"]
    batch, length, states = inputs["emissions"].shape
    tags = torch.randint(states, (batch, length))
    padded = {
        **inputs,
        "emissions": torch.cat(
            [inputs["emissions"], torch.full((batch, extra, states), fill, dtype=torch.float64)],
            dim=1,
        ),
        "mask": torch.cat([inputs["mask"], torch.zeros(batch, extra, dtype=torch.bool)], dim=1),
    }
    padded_tags = torch.cat([tags, torch.full((batch, extra), -1)], dim=1)
    assert torch.equal(
        crf.log_partition(**inputs, allowed=allowed), crf.log_partition(**padded, allowed=allowed)
    )
    assert torch.equal(
        crf.log_likelihood(inputs["emissions"], tags, **_no_emissions(inputs), allowed=allowed),
        crf.log_likelihood(
            padded["emissions"], padded_tags, **_no_emissions(padded), allowed=allowed
        ),
    )
    paths, scores = crf.viterbi_decode(**inputs, allowed=allowed)
    padded_paths, padded_scores = crf.viterbi_decode(**padded, allowed=allowed)
    assert torch.equal(padded_paths[:, :length], paths) and (padded_paths[:, length:] == -1).all()
    assert torch.equal(scores, padded_scores)
    probs = crf.marginals(**padded, allowed=allowed)
    assert torch.equal(probs[:, :length], crf.marginals(**inputs, allowed=allowed))
    assert (probs[:, length:] == 0).all()


@settings(max_examples=40, deadline=None)
@given(crf_problems(), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_outputs(problem: dict, rng: object) -> None:
    inputs, allowed = problem["inputs"], problem["allowed"]
    batch, length, states = inputs["emissions"].shape
    order = list(range(batch))
    rng.shuffle(order)
    perm = torch.tensor(order)
    tags = torch.randint(states, (batch, length))

    def permuted(key: str, value: Tensor | None) -> Tensor | None:
        # shared parameters stay; per-sequence ones follow the batch (decided by name: a
        # (batch, length) mask can have the shape of a (states, states) matrix)
        if value is None or key in ("start", "end") or (key == "transitions" and value.dim() == 2):
            return value
        return value[perm]

    shuffled = {k: permuted(k, v) for k, v in inputs.items()}
    torch.testing.assert_close(
        crf.log_partition(**shuffled, allowed=allowed),
        crf.log_partition(**inputs, allowed=allowed)[perm],
    )
    torch.testing.assert_close(
        crf.log_likelihood(
            shuffled["emissions"], tags[perm], **_no_emissions(shuffled), allowed=allowed
        ),
        crf.log_likelihood(inputs["emissions"], tags, **_no_emissions(inputs), allowed=allowed)[
            perm
        ],
    )
    paths, scores = crf.viterbi_decode(**inputs, allowed=allowed)
    shuffled_paths, shuffled_scores = crf.viterbi_decode(**shuffled, allowed=allowed)
    torch.testing.assert_close(shuffled_scores, scores[perm])
    torch.testing.assert_close(
        crf.marginals(**shuffled, allowed=allowed), crf.marginals(**inputs, allowed=allowed)[perm]
    )


# ----------------------------------------------------------------------------------------------
# Validation


def _valid() -> dict[str, Tensor]:
    return {
        "emissions": torch.randn(2, 3, 4),
        "mask": make_mask([3, 2]),
        "transitions": torch.randn(4, 4),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"emissions": torch.randn(3, 4)}, "emissions must be a"),
        ({"emissions": torch.randn(2, 3, 4).half()}, "float32 or float64"),
        ({"emissions": torch.randn(2, 0, 4), "mask": torch.ones(2, 0, dtype=torch.bool)}, ">= 1"),
        ({"mask": make_mask([3, 2]).to(torch.uint8)}, "mask.bool()"),
        ({"mask": make_mask([3, 2, 1])}, "mask must have shape"),
        ({"mask": torch.tensor([[True, True, True], [False, True, True]])}, r"mask\[:, 0\]"),
        ({"mask": torch.tensor([[True, True, True], [True, False, True]])}, "left-aligned"),
        ({"transitions": torch.randn(4, 5)}, "transitions must have shape"),
        ({"transitions": torch.randn(3, 4, 4)}, "transitions must have shape"),
        ({"transitions": torch.randn(4, 4).double()}, "same dtype"),
        ({"start": torch.randn(3)}, "start must have shape"),
        ({"end": torch.randn(4, 1)}, "end must have shape"),
        ({"allowed": torch.ones(4, 4)}, "allowed must be a bool"),
        ({"allowed": torch.ones(3, 3, dtype=torch.bool)}, "allowed must have shape"),
    ],
)
def test_invalid_inputs_raise(change: dict, message: str) -> None:
    kwargs = {**_valid(), **change}
    for func in (crf.log_partition, crf.viterbi_decode, crf.marginals):
        with pytest.raises(ValueError, match=message):
            func(**kwargs)
    with pytest.raises(ValueError, match=message):
        crf.log_likelihood(kwargs.pop("emissions"), torch.zeros(2, 3, dtype=torch.long), **kwargs)


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (torch.zeros(2, 3, dtype=torch.int32), "long"),
        (torch.zeros(2, 2, dtype=torch.long), "tags must have shape"),
        (torch.tensor([[0, 1, 4], [0, 1, -1]]), r"\[0, 4\)"),
        (torch.tensor([[0, 1, 2], [-1, 1, 0]]), r"\[0, 4\)"),
    ],
)
def test_invalid_tags_raise(tags: Tensor, message: str) -> None:
    kwargs = _valid()
    with pytest.raises(ValueError, match=message):
        crf.log_likelihood(kwargs.pop("emissions"), tags, **kwargs)


def test_garbage_in_padding_leaves_gradients_finite() -> None:
    inputs = random_inputs(LENGTHS, STATES, per_sequence=True, with_start_end=True)
    emissions = inputs["emissions"].masked_fill(~inputs["mask"].unsqueeze(-1), float("nan"))
    emissions.requires_grad_()
    tags = torch.tensor([[0, 1, 0, 2], [2, -1, -1, -1], [1, 2, 1, -1], [0, 2, -1, -1]])
    crf.log_likelihood(emissions, tags, **_no_emissions(inputs)).sum().backward()
    assert torch.isfinite(emissions.grad).all()
    assert (emissions.grad[~inputs["mask"]] == 0).all()
