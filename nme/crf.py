"""Linear-chain CRF kernels: forward algorithm, Viterbi, marginals.

Pure functions over padded batches. Shapes used throughout:

- ``emissions``: ``(batch, length, states)`` float32 or float64, the per-position state scores;
- ``tags``: ``(batch, length)`` long, a state path (values at padded positions are ignored);
- ``mask``: ``(batch, length)`` bool, True at real positions; left-aligned (padding only at the
  end) and ``mask[:, 0]`` all True, i.e. every sequence has length >= 1;
- ``transitions``: ``(states, states)`` shared by the batch, or ``(batch, states, states)`` one
  matrix per sequence (e.g. each person's T̄ + Tⁱ); ``transitions[i, j]`` scores going from state
  ``i`` to state ``j``;
- ``start``, ``end``: ``(states,)`` scores of the first and last state, or None for uniform
  (zero scores, the paper's choice);
- ``allowed``: ``(states, states)`` bool or None; ``allowed[i, j] = False`` forbids the
  transition ``i -> j`` in every sequence.

Everything is computed in log space and vectorised over batch and states; the only Python loops
run over time steps. All tensors stay on the device of ``emissions``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "label_chain",
    "log_likelihood",
    "log_partition",
    "marginals",
    "pairwise_marginals",
    "path_score",
    "transition_count_moments",
    "viterbi_decode",
]

# Forbidden transitions get this score instead of -inf: softmax-style gradients of a logsumexp
# whose inputs are all -inf are NaN, while exp(-1e30 - x) is an exact 0 in float32 and float64.
# It stays far below any real path score yet leaves float32 room for ~1e8 such terms in a sum.
_FORBIDDEN = -1e30
# A log-score below this can only come from forbidden transitions; such results become -inf.
_IMPOSSIBLE = _FORBIDDEN / 2

_FLOAT_DTYPES = (torch.float32, torch.float64)
# Largest spread of transition scores into one state for which the exp-space forward step is
# exact: exp(-spread) must stay far above the smallest normal number (1e-38 resp. 1e-308).
_MAX_SPREAD = {torch.float32: 60.0, torch.float64: 600.0}


class _Checked(NamedTuple):
    """Validated inputs, prepared for the kernels."""

    emissions: Tensor  # (batch, length, states), zero at padded positions
    mask: Tensor  # (batch, length) bool, trimmed to the longest sequence
    transitions: Tensor  # (states, states) or (batch, states, states), forbidden filled
    start: Tensor | None  # (states,)
    end: Tensor | None  # (states,)
    allowed: Tensor | None  # (states, states) bool
    last: Tensor  # (batch,) long, index of each sequence's last position


def _check_inputs(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None,
    end: Tensor | None,
    allowed: Tensor | None,
) -> _Checked:
    """Validate the public arguments and bring them into the form the kernels expect."""
    if not isinstance(emissions, Tensor) or emissions.dim() != 3:
        shape = tuple(emissions.shape) if isinstance(emissions, Tensor) else type(emissions)
        raise ValueError(f"emissions must be a (batch, length, states) tensor, got {shape}")
    if emissions.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"emissions must be float32 or float64, got {emissions.dtype}; cast with "
            "emissions.float() (half precision is too coarse for the forward algorithm)"
        )
    batch, length, states = emissions.shape
    if batch < 1 or length < 1 or states < 1:
        raise ValueError(
            f"emissions must have batch, length and states >= 1, got {tuple(emissions.shape)}"
        )
    device, dtype = emissions.device, emissions.dtype

    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask)
        raise ValueError(f"mask must be a bool tensor, got {got}; convert with mask.bool()")
    if mask.shape != (batch, length):
        raise ValueError(
            f"mask must have shape (batch, length) = {(batch, length)} like emissions, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but emissions are on {device}")
    if not bool(mask[:, 0].all()):
        raise ValueError(
            "every sequence needs length >= 1: mask[:, 0] must be True for all sequences"
        )
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "mask must be left-aligned: True for the real positions, then only False padding"
        )

    _check_float(transitions, "transitions", dtype, device)
    if transitions.shape not in ((states, states), (batch, states, states)):
        raise ValueError(
            f"transitions must have shape (states, states) = {(states, states)} or "
            f"(batch, states, states) = {(batch, states, states)}, got {tuple(transitions.shape)}"
        )
    for name, vector in (("start", start), ("end", end)):
        if vector is None:
            continue
        _check_float(vector, name, dtype, device)
        if vector.shape != (states,):
            raise ValueError(
                f"{name} must have shape (states,) = {(states,)}, got {tuple(vector.shape)}"
            )
    if allowed is not None:
        if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
            got = allowed.dtype if isinstance(allowed, Tensor) else type(allowed)
            raise ValueError(f"allowed must be a bool tensor, got {got}")
        if allowed.shape != (states, states):
            raise ValueError(
                f"allowed must have shape (states, states) = {(states, states)}, "
                f"got {tuple(allowed.shape)}"
            )
        if allowed.device != device:
            raise ValueError(f"allowed is on {allowed.device} but emissions are on {device}")
        transitions = transitions.masked_fill(~allowed, _FORBIDDEN)

    lengths = mask.sum(dim=1)  # (batch,)
    # Positions past the longest sequence carry no information; skipping them saves time steps
    # and makes extra padding provably irrelevant.
    longest = int(lengths.max())
    mask = mask[:, :longest]
    # Padded emissions may hold anything (even NaN); zeroing them keeps the unused arithmetic
    # beyond each sequence's end finite, so no NaN can leak into gradients.
    emissions = emissions[:, :longest].masked_fill(~mask.unsqueeze(-1), 0.0)
    return _Checked(emissions, mask, transitions, start, end, allowed, lengths - 1)


def _check_float(tensor: object, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor)}")
    if tensor.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {tensor.dtype} but emissions have {dtype}; use the same dtype"
        )
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but emissions are on {device}")


def _check_tags(tags: Tensor, mask: Tensor, states: int) -> Tensor:
    """Validate ``tags`` against the original ``mask``; return them with padding set to 0."""
    if not isinstance(tags, Tensor) or tags.dtype != torch.long:
        got = tags.dtype if isinstance(tags, Tensor) else type(tags)
        raise ValueError(f"tags must be a long (int64) tensor, got {got}; use tags.long()")
    if tags.shape != mask.shape:
        raise ValueError(
            f"tags must have shape (batch, length) = {tuple(mask.shape)}, got {tuple(tags.shape)}"
        )
    if tags.device != mask.device:
        raise ValueError(f"tags are on {tags.device} but emissions are on {mask.device}")
    real = tags[mask]
    if bool(((real < 0) | (real >= states)).any()):
        raise ValueError(f"tags at unmasked positions must lie in [0, {states}) (the states)")
    # Any valid state works as a placeholder at padded positions; 0 keeps gathers in range.
    return tags.masked_fill(~mask, 0)


# ----------------------------------------------------------------------------------------------
# Kernels. They assume checked inputs (see _check_inputs) and trimmed, left-aligned masks.


def _at_last(values: Tensor, last: Tensor) -> Tensor:
    """``values[b, last[b]]`` for every b: (batch, length, states) -> (batch, states)."""
    index = last.view(-1, 1, 1).expand(-1, 1, values.size(-1))  # (batch, 1, states)
    return values.gather(1, index).squeeze(1)


class _LogMatmul:
    """``x -> y`` with ``y[b, j] = logsumexp_i(x[b, i] + weights[(b,) i, j]) - offset[(b,) j]``.

    One step of the forward algorithm, for ``x`` already shifted so that its maximum is 0 (the
    callers keep the shifts, see ``_forward_scores``). The fast path works in exp space: with the
    column maxima ``offset[j] = max_i weights[i, j]``, ``y = log(exp(x) @ exp(weights - offset))``
    is one (batched) matmul on ``(batch, states)`` instead of a logsumexp over a ``(batch,
    states, states)`` tensor. It is exact up to rounding: the term of the best source state is at
    least ``exp(-spread)``, so while every column's spread (max minus min over allowed entries)
    stays below ``_MAX_SPREAD`` nothing that matters can underflow. Wider columns fall back to the
    plain logsumexp.
    """

    def __init__(self, weights: Tensor, allowed: Tensor | None) -> None:
        self.weights = weights  # (states, states) or (batch, states, states)
        self.factors: Tensor | None = None
        # The offset is a constant shift of the result, so it needs no gradient of its own.
        top = weights.detach().amax(dim=-2, keepdim=True)  # (..., 1, states)
        low = weights.detach()
        if allowed is not None:
            low = low.masked_fill(~allowed, float("inf"))
        spread = top - low.amin(dim=-2, keepdim=True)  # (..., 1, states)
        if bool(spread.max() <= _MAX_SPREAD[weights.dtype]):
            factors = torch.exp(weights - top)  # (..., states, states), in [0, 1]
            if allowed is not None:
                # A fully forbidden column has top = _FORBIDDEN and exp(0) = 1 there: zero it.
                factors = factors.masked_fill(~allowed, 0.0)
            self.factors = factors
        self.offset = top.squeeze(-2)  # (states,) or (batch, states)
        self.tiny = torch.finfo(weights.dtype).tiny

    def __call__(self, x: Tensor) -> Tensor:
        """``(batch, states) -> (batch, states)``; ``x`` must have maximum 0 in each row."""
        if self.factors is None:
            # (batch, states_from, states_to)
            scores = x.unsqueeze(-1) + self.weights
            return torch.logsumexp(scores, dim=1) - self.offset
        probs = torch.exp(x)  # (batch, states)
        if self.factors.dim() == 2:
            sums = probs @ self.factors  # (batch, states)
        else:
            sums = torch.bmm(probs.unsqueeze(1), self.factors).squeeze(1)  # (batch, states)
        # Only a state that no allowed transition reaches sums to 0; clamping keeps log finite and
        # its gradient zero (the state then sits near _FORBIDDEN through its offset).
        return torch.log(sums.clamp_min(self.tiny))


class _Scores(NamedTuple):
    """Log-scores ``normalised + offsets[..., None]``, split to keep float32 precise.

    Over long sequences log-scores grow into the thousands, where float32 resolves only ~1e-4;
    probabilities computed from them would inherit that error. Each step is therefore shifted
    back to a maximum of 0, and the shifts are summed separately in float64.
    """

    normalised: Tensor  # (batch, length, states), the emissions' dtype, maximum about 0
    offsets: Tensor  # (batch, length) float64, no gradient


def _forward_scores(c: _Checked) -> _Scores:
    """Forward algorithm: log-sum of the scores of all path prefixes ending in each state.

    Values past a sequence's end are finite but meaningless; callers read each sequence at
    ``c.last``, which avoids a masked update at every step.
    """
    step = _LogMatmul(c.transitions, c.allowed)
    # Adding the step's offset to all emissions at once saves one operation per time step.
    emissions = c.emissions + step.offset.unsqueeze(-2)  # (batch, length, states)
    alpha = c.emissions[:, 0] if c.start is None else c.emissions[:, 0] + c.start  # (batch, states)
    alphas = [alpha]
    shifts = [torch.zeros_like(alpha[:, :1])]
    for t in range(1, emissions.size(1)):
        # Any constant shift is exact (logsumexp is shift-equivariant), so it needs no gradient.
        shift = alpha.detach().amax(dim=-1, keepdim=True)  # (batch, 1)
        alpha = step(alpha - shift) + emissions[:, t]  # (batch, states)
        alphas.append(alpha)
        shifts.append(shift)
    offsets = torch.cat(shifts, dim=1).double().cumsum(dim=1)  # (batch, length)
    return _Scores(torch.stack(alphas, dim=1), offsets)


def _backward_scores(c: _Checked) -> _Scores:
    """Backward algorithm: log-sum of the scores of all path suffixes after each state.

    At a sequence's last position (and beyond) this is ``end``.
    """
    emissions, mask = c.emissions, c.mask
    batch, length, states = emissions.shape
    allowed = None if c.allowed is None else c.allowed.transpose(0, 1)
    # Summing over the next state j of transitions[i, j] is a forward step on the transpose.
    step = _LogMatmul(c.transitions.transpose(-1, -2), allowed)
    end = emissions.new_zeros(states) if c.end is None else c.end  # (states,)
    beta = end.expand(batch, states)  # (batch, states)
    betas = [beta]
    shifts = [torch.zeros_like(beta[:, :1])]
    for t in range(length - 2, -1, -1):
        ahead = emissions[:, t + 1] + beta  # (batch, states)
        shift = ahead.detach().amax(dim=-1, keepdim=True)  # (batch, 1)
        following = step(ahead - shift) + step.offset  # (batch, states)
        # A sequence that ends at t has nothing after it but the end score.
        running = mask[:, t + 1].unsqueeze(1)  # (batch, 1)
        beta = torch.where(running, following, end)  # (batch, states)
        betas.append(beta)
        shifts.append(torch.where(running, shift, 0.0))
    betas.reverse()
    shifts.reverse()
    # Left-aligned masks: once a sequence has ended every later shift is 0, so a suffix sum works.
    offsets = torch.cat(shifts, dim=1).double().flip(1).cumsum(dim=1).flip(1)  # (batch, length)
    return _Scores(torch.stack(betas, dim=1), offsets)


def _log_partition(c: _Checked, alphas: _Scores) -> Tensor:
    """``(batch,)`` log Z in float64 (see ``_Scores``)."""
    final = _at_last(alphas.normalised, c.last)  # (batch, states)
    if c.end is not None:
        final = final + c.end
    offset = alphas.offsets.gather(1, c.last.unsqueeze(1)).squeeze(1)  # (batch,)
    return torch.logsumexp(final, dim=-1).double() + offset


def _path_score(c: _Checked, tags: Tensor) -> Tensor:
    """``(batch,)`` float64 score of ``tags`` (padding already replaced by a valid state)."""
    emissions, mask, transitions = c.emissions, c.mask, c.transitions
    tags = tags[:, : mask.size(1)]
    states = emissions.size(-1)
    # Sums run in float64 so that, like log Z, long paths keep their small differences.
    # Padded emissions are zero, so summing over every position adds nothing for padding.
    unary = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # (batch, length)
    score = unary.sum(dim=1, dtype=torch.float64)  # (batch,)
    if c.start is not None:
        score = score + c.start[tags[:, 0]]
    if c.end is not None:
        score = score + c.end[tags.gather(1, c.last.unsqueeze(1)).squeeze(1)]
    # Index of each transition in the flattened (states * states) matrix.
    pair = tags[:, :-1] * states + tags[:, 1:]  # (batch, length - 1)
    if transitions.dim() == 2:
        steps = transitions.reshape(-1)[pair]  # (batch, length - 1)
    else:
        steps = transitions.reshape(transitions.size(0), -1).gather(1, pair)
    score = score + steps.masked_fill(~mask[:, 1:], 0.0).sum(dim=1, dtype=torch.float64)
    if c.allowed is not None:
        forbidden = ~c.allowed.reshape(-1)[pair] & mask[:, 1:]  # (batch, length - 1)
        score = score.masked_fill(forbidden.any(dim=1), float("-inf"))
    return score


# ----------------------------------------------------------------------------------------------
# Public API.


def path_score(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None = None,
    end: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Unnormalised log-score of the state path ``tags``: start + emissions + transitions + end.

    Args:
        emissions: ``(batch, length, states)``.
        tags: ``(batch, length)`` long; values at padded positions are ignored.
        mask: ``(batch, length)`` bool, left-aligned, ``mask[:, 0]`` all True.
        transitions: ``(states, states)`` or ``(batch, states, states)``.
        start, end: ``(states,)`` or None (zero scores).
        allowed: ``(states, states)`` bool or None; a path using a forbidden transition scores
            ``-inf``.

    Returns:
        ``(batch,)`` path scores.
    """
    c = _check_inputs(emissions, mask, transitions, start, end, allowed)
    return _path_score(c, _check_tags(tags, mask, emissions.size(-1))).to(emissions.dtype)


def log_partition(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None = None,
    end: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Log partition function log Z: the logsumexp of the scores of all allowed paths.

    Args:
        emissions: ``(batch, length, states)``.
        mask: ``(batch, length)`` bool, left-aligned, ``mask[:, 0]`` all True.
        transitions: ``(states, states)`` or ``(batch, states, states)``.
        start, end: ``(states,)`` or None (zero scores).
        allowed: ``(states, states)`` bool or None; paths with a forbidden transition are
            excluded.

    Returns:
        ``(batch,)`` log Z per sequence; ``-inf`` if a sequence has no allowed path.
    """
    c = _check_inputs(emissions, mask, transitions, start, end, allowed)
    log_z = _log_partition(c, _forward_scores(c)).to(emissions.dtype)
    if c.allowed is not None:
        log_z = log_z.masked_fill(log_z < _IMPOSSIBLE, float("-inf"))
    return log_z


def log_likelihood(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None = None,
    end: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Log-likelihood log p(tags | emissions) of each sequence under the CRF.

    The negative of this, reduced as the caller sees fit (sum or mean), is the CRF loss.

    Args:
        emissions: ``(batch, length, states)``.
        tags: ``(batch, length)`` long; values at padded positions are ignored (may be -1).
        mask: ``(batch, length)`` bool, left-aligned, ``mask[:, 0]`` all True.
        transitions: ``(states, states)`` or ``(batch, states, states)``.
        start, end: ``(states,)`` or None (zero scores).
        allowed: ``(states, states)`` bool or None; a path using a forbidden transition has
            log-likelihood ``-inf`` (with zero gradient), and the normaliser excludes them.

    Returns:
        ``(batch,)`` log-likelihoods (no reduction).
    """
    c = _check_inputs(emissions, mask, transitions, start, end, allowed)
    tags = _check_tags(tags, mask, emissions.size(-1))
    # path_score already yields -inf for forbidden paths; masking the difference as well gives
    # those sequences a zero gradient instead of the (meaningless) -d log Z.
    score = _path_score(c, tags)
    result = (score - _log_partition(c, _forward_scores(c))).to(emissions.dtype)
    return result.masked_fill(torch.isneginf(score), float("-inf"))


def viterbi_decode(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None = None,
    end: Tensor | None = None,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Most likely state path of each sequence (Viterbi), never using a forbidden transition.

    Args:
        emissions: ``(batch, length, states)``.
        mask: ``(batch, length)`` bool, left-aligned, ``mask[:, 0]`` all True.
        transitions: ``(states, states)`` or ``(batch, states, states)``.
        start, end: ``(states,)`` or None (zero scores).
        allowed: ``(states, states)`` bool or None.

    Returns:
        ``paths``: ``(batch, length)`` long, padded with -1;
        ``scores``: ``(batch,)`` the paths' scores (``-inf`` if no allowed path exists).
    """
    c = _check_inputs(emissions, mask, transitions, start, end, allowed)
    with torch.no_grad():
        paths, scores = _viterbi(c)
    pad = mask.size(1) - paths.size(1)
    if pad:
        paths = torch.nn.functional.pad(paths, (0, pad), value=-1)
    # The score is recomputed differentiably from the path: cheap, and it makes the score usable
    # in a loss (e.g. structured perceptron) without tracking the argmax loop.
    if torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (emissions, transitions, start, end)
    ):
        scores = _path_score(c, paths[:, : c.mask.size(1)].clamp_min(0)).to(emissions.dtype)
    return paths, scores


def _viterbi(c: _Checked) -> tuple[Tensor, Tensor]:
    emissions, transitions = c.emissions, c.transitions
    batch, length, states = emissions.shape
    score = emissions[:, 0] if c.start is None else emissions[:, 0] + c.start  # (batch, states)
    scores = [score]
    for t in range(1, length):
        # (batch, states_from, states_to)
        candidates = score.unsqueeze(-1) + transitions
        # Only the maxima here; argmax with indices over a (batch, states, states) tensor costs
        # far more than recomputing the one needed column per step while tracing back.
        score = candidates.amax(dim=1) + emissions[:, t]  # (batch, states)
        scores.append(score)
    history = torch.stack(scores, dim=1)  # (batch, length, states)
    final = _at_last(history, c.last)  # (batch, states)
    if c.end is not None:
        final = final + c.end
    best_score, state = final.max(dim=-1)  # (batch,) each

    # Trace back from each sequence's own end: position t holds the state that best reaches the
    # state chosen at t + 1, recomputed exactly as in the forward pass.
    # Row (b * states + j) holds the scores of every transition into state j for sequence b.
    columns = transitions.transpose(-1, -2).expand(batch, states, states)
    columns = columns.reshape(batch * states, states)  # (batch * states_to, states_from)
    row = torch.arange(batch, device=emissions.device) * states  # (batch,)
    path = torch.empty(batch, length, dtype=torch.long, device=emissions.device)
    path[:, -1] = state
    for t in range(length - 1, 0, -1):
        into = columns[row + state]  # (batch, states_from)
        previous = (history[:, t - 1] + into).argmax(dim=-1)  # (batch,)
        # Sequences that end before t keep their state until the trace reaches their end.
        state = torch.where(c.last >= t, previous, state)  # (batch,)
        path[:, t - 1] = state
    path = path.masked_fill(~c.mask, -1)
    if c.allowed is not None:
        best_score = best_score.masked_fill(best_score < _IMPOSSIBLE, float("-inf"))
    return path, best_score


def marginals(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None = None,
    end: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Posterior probability of each state at each position (forward-backward).

    Args:
        emissions: ``(batch, length, states)``.
        mask: ``(batch, length)`` bool, left-aligned, ``mask[:, 0]`` all True.
        transitions: ``(states, states)`` or ``(batch, states, states)``.
        start, end: ``(states,)`` or None (zero scores).
        allowed: ``(states, states)`` bool or None.

    Returns:
        ``(batch, length, states)``: sums to 1 over states at real positions, 0 at padding.
    """
    c = _check_inputs(emissions, mask, transitions, start, end, allowed)
    alphas = _forward_scores(c)
    betas = _backward_scores(c)
    log_z = _log_partition(c, alphas)  # (batch,) float64
    # The large parts cancel in float64; only O(1) numbers meet in the emissions' dtype.
    offset = (alphas.offsets + betas.offsets - log_z.unsqueeze(1)).to(emissions.dtype)
    # (batch, length, states)
    probs = torch.exp(alphas.normalised + betas.normalised + offset.unsqueeze(-1))
    probs = probs.masked_fill(~c.mask.unsqueeze(-1), 0.0)
    pad = mask.size(1) - probs.size(1)
    if pad:
        probs = torch.nn.functional.pad(probs, (0, 0, 0, pad))
    return probs


def pairwise_marginals(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start: Tensor | None = None,
    end: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Posterior probability of each transition at each step (forward-backward).

    Args: as :func:`marginals`.

    Returns:
        ``(batch, length - 1, states, states)``: entry ``[b, t - 1, i, j]`` is
        p(y_{t-1} = i, y_t = j | x) of sequence b; each real step sums to 1, steps past a
        sequence's end are 0.
    """
    c = _check_inputs(emissions, mask, transitions, start, end, allowed)
    batch, length, states = c.emissions.shape
    out_steps = mask.size(1) - 1
    if length < 2:
        return emissions.new_zeros(batch, max(out_steps, 0), states, states)
    alphas = _forward_scores(c)
    betas = _backward_scores(c)
    log_z = _log_partition(c, alphas)  # (batch,) float64
    # the large parts cancel in float64; only O(1) numbers meet in the emissions' dtype
    offset = (alphas.offsets[:, :-1] + betas.offsets[:, 1:]
              - log_z.unsqueeze(1)).to(emissions.dtype)  # (batch, length - 1)
    trans = c.transitions if c.transitions.dim() == 3 else c.transitions.unsqueeze(0)
    ahead = c.emissions[:, 1:] + betas.normalised[:, 1:]  # (batch, length - 1, states)
    scores = (alphas.normalised[:, :-1].unsqueeze(-1) + trans.unsqueeze(1)
              + ahead.unsqueeze(-2) + offset[..., None, None])  # (batch, length - 1, S, S)
    probs = torch.exp(scores).masked_fill(~c.mask[:, 1:, None, None], 0.0)
    pad = out_steps - probs.size(1)
    if pad:
        probs = torch.nn.functional.pad(probs, (0, 0, 0, 0, 0, pad))
    return probs


def transition_count_moments(pairwise: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the transition counts nᵢⱼ = Σₜ [y_{t-1} = i, y_t = j] under a
    linear-chain CRF, from its pairwise marginals.

    These are the gradient and Hessian of log Z w.r.t. the transition scores (a CRF is an
    exponential family with the counts as sufficient statistics), so the NLL's Hessian in T
    is this covariance. The posterior over paths is a Markov chain with step matrices
    Mₜ(i, j) = Pₜ(i, j) / qₜ₋₁(i), so for s < t
    E[zₛ zₜᵀ](ab, cd) = Pₛ(a, b) (Mₛ₊₁ ⋯ Mₜ₋₁)(b, c) Mₜ(c, d); the sum over all s < t is
    accumulated in one pass over t (zₜ the one-hot pair of step t).

    Args:
        pairwise: ``(batch, steps, S, S)`` from :func:`pairwise_marginals` (0 past the end).

    Returns:
        ``(mean (batch, S²), covariance (batch, S², S²))``, pairs flattened row-major (i, j).
    """
    batch, steps, states, _ = pairwise.shape
    flat = pairwise.reshape(batch, steps, states * states)  # (batch, steps, S²)
    mean = flat.sum(1)  # (batch, S²)
    source = pairwise.sum(-1, keepdim=True)  # (batch, steps, S, 1) q of the step's source
    # rows of unreachable source states are never weighted: any finite value will do
    chain = pairwise / source.clamp_min(torch.finfo(pairwise.dtype).tiny)  # (batch, steps, S, S)
    eye = torch.eye(states, dtype=pairwise.dtype, device=pairwise.device)
    # U[a, b, c] = Σ_{s < t} Pₛ(a, b) P(y_{t-1} = c | yₛ = b): mass of earlier pairs reaching c
    reach = [pairwise.new_zeros(batch, states * states, states)]  # Uₜ (batch, ab, c)
    for t in range(steps - 1):
        # pair t reaches its own target; earlier pairs move one step along the chain
        own = (pairwise[:, t].unsqueeze(-1) * eye).reshape(batch, -1, states)
        reach.append(torch.bmm(reach[-1], chain[:, t]) + own)
    # Σₜ Uₜ(ab, c) Mₜ(c, d) lands in (ab, cd), summed over every step at once
    left = torch.stack(reach, dim=2)  # (batch, ab, steps, c)
    cross = (left.unsqueeze(-1) * chain.unsqueeze(1)).sum(2)  # (batch, ab, c, d)
    cross = cross.reshape(batch, states * states, states * states)
    cov = torch.diag_embed(mean) + cross + cross.mT - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return mean, cov


def label_chain(transitions: Tensor, allowed: Tensor | None = None) -> Tensor:
    """The Markov chain of the labels that transition scores alone define.

    Without emissions a linear-chain CRF is p(y) ∝ exp Σₜ T(y_{t-1}, y_t); away from the
    sequence ends this is the Markov chain

        P(i, j) = exp T(i, j) · v(j) / (λ v(i)),

    v the Perron (right) eigenvector of exp T and λ its eigenvalue. This, not a row-softmax of
    T, is the transition matrix T implies: a CRF's transition scores are not log-probabilities
    (a score added to a whole row changes how often the row's state is *entered*, which the
    softmax ignores). The two agree only when v is constant.

    Args:
        transitions: ``(S, S)`` or ``(batch, S, S)`` scores.
        allowed: ``(S, S)`` bool or None; forbidden transitions get probability 0.

    Returns:
        ``(S, S)`` or ``(batch, S, S)`` float64 row-stochastic matrices.
    """
    scores = transitions.detach().double()
    many = scores.dim() == 3
    scores = scores if many else scores.unsqueeze(0)  # (batch, S, S)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=(-2, -1), keepdim=True))  # (batch, S, S)
    values, vectors = torch.linalg.eig(weights)  # (batch, S), (batch, S, S) complex
    # the Perron root is real and has the largest real part (irreducible non-negative matrix)
    top = values.real.argmax(dim=-1)  # (batch,)
    v = vectors.real.gather(-1, top[:, None, None].expand(-1, weights.shape[-1], 1))
    v = v.squeeze(-1).abs().clamp_min(torch.finfo(torch.float64).tiny)  # (batch, S)
    probs = weights * v.unsqueeze(-2)  # exp T(i, j) v(j)
    probs = probs / probs.sum(-1, keepdim=True)
    return probs if many else probs[0]
