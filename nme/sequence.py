"""NME-CRF: sequence tagging with person-specific emissions and transitions.

An MLP scores every segment of a sequence for every state (the emissions); a linear-chain CRF
with transition matrix T = T̄ + Tⁱ scores whole state paths (:mod:`nme.crf`). The loss of one
sequence is its CRF negative log-likelihood, and a sequence is one item of
:func:`nme.train.fit_loop`, so nᵢ in the NME objective counts person i's sequences.

Placements (where θⁱ lives):

- ``"T"``: the transition matrix only;
- ``"last+T"`` (default): the emission MLP's last linear layer and T;
- ``"all+T"``: every emission parameter and T;
- ``"last"``, ``"all"``: emission parameters only (T is generic);
- ``"none"`` or a list of parameter names (``"layers.0.bias"``, ``"transitions"``).

Learned start/end scores (``learn_start_end=True``) are always generic: the CRF kernels take one
``(states,)`` vector for the whole batch.

Forbidden transitions (``allowed``) are excluded from the partition function, never decoded,
and get probability 0 in :meth:`NMESequenceTagger.transition_matrices`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn

from nme import crf
from nme.base import _Items, _NMEEstimator
from nme.data import ArrayLike, as_id_list, feature_matrix
from nme.mlp import MLP
from nme.objective import SIGMA2_RULES
from nme.personalize import PersonalizedModule, resolve_placement
from nme.train import TrainConfig

SEQUENCE_PLACEMENTS = ("T", "last+T", "all+T", "last", "all", "none")
"""Named placements of the tagger (besides explicit lists of parameter names)."""

TRANSITIONS = "transitions"

LabelledSequence = tuple[ArrayLike, Sequence[Hashable] | np.ndarray]
"""``(features (L, F), labels (L,))`` of one sequence."""


class EmissionCRF(MLP):
    """Emission MLP over segments plus the CRF's transition (and optional start/end) scores.

    Parameters are ``layers.0.weight`` … (as in :class:`~nme.mlp.MLP`), ``transitions``
    ``(states, states)`` and, with ``learn_start_end``, ``start`` and ``end`` ``(states,)``.

    Args:
        in_features: features F per segment.
        hidden: hidden layer widths of the emission MLP.
        n_states: number of states S.
        activation, dropout: see :class:`~nme.mlp.MLP`.
        learn_start_end: learn start/end scores; otherwise they are uniform (the paper's choice).
    """

    external_parameters: ClassVar[tuple[str, ...]] = (TRANSITIONS, "start", "end")
    """Parameters used outside :meth:`forward` (by the CRF); ``start``/``end`` may be None."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        n_states: int,
        activation: str = "relu",
        dropout: float = 0.0,
        learn_start_end: bool = False,
    ) -> None:
        super().__init__(in_features, hidden, n_states, activation, dropout)
        # Zero transitions start every state pair equal: the emissions decide until T is learned,
        # and "specific" rows (initialised from here) start at the same neutral point.
        self.transitions = nn.Parameter(torch.zeros(n_states, n_states))
        self.start: nn.Parameter | None
        self.end: nn.Parameter | None
        if learn_start_end:
            self.start = nn.Parameter(torch.zeros(n_states))
            self.end = nn.Parameter(torch.zeros(n_states))
        else:
            self.register_parameter("start", None)
            self.register_parameter("end", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (batch, length, F)`` -> emissions ``(batch, length, states)``."""
        return super().forward(x)


def sequence_placement(base: EmissionCRF, placement: str | Sequence[str]) -> list[str]:
    """Resolve a tagger placement to parameter names of ``base`` (in module order).

    Raises:
        ValueError: unknown placement, a pattern matching nothing, or start/end placed.
    """
    emission = [n for n, _ in base.named_parameters() if n.startswith("layers.")]
    if isinstance(placement, str):
        if placement not in SEQUENCE_PLACEMENTS:
            raise ValueError(
                f"placement must be one of {SEQUENCE_PLACEMENTS} or a list of parameter names, "
                f"got {placement!r}"
            )
        with_t = placement == "T" or placement.endswith("+T")
        part = placement.removesuffix("+T") if placement != "T" else "none"
        chosen = set(
            resolve_placement(base, "last") if part == "last"
            else emission if part == "all"
            else []
        )
        if with_t:
            chosen.add(TRANSITIONS)
        # module order (own parameters first, then layers), as PersonalizedModule lays them out
        return [n for n, _ in base.named_parameters() if n in chosen]
    names = resolve_placement(base, list(placement))
    shared = [n for n in names if n in ("start", "end")]
    if shared:
        raise ValueError(f"start/end scores cannot be person-specific, got {shared}")
    return names


def _normalise_allowed(allowed: Any) -> list | None:
    """JSON-able form of ``allowed``: a ``(S, S)`` bool matrix or a list of forbidden pairs."""
    if allowed is None:
        return None
    if isinstance(allowed, torch.Tensor):
        allowed = allowed.detach().cpu().numpy()
    arr = np.asarray(allowed, dtype=object)
    if arr.ndim == 2 and arr.size and all(isinstance(v, (bool, np.bool_)) for v in arr.ravel()):
        if arr.shape[0] != arr.shape[1]:
            raise ValueError(f"allowed must be a square (states, states) bool matrix, "
                             f"got shape {arr.shape}")
        return [[bool(v) for v in row] for row in arr]
    pairs = [as_id_list(list(p)) for p in allowed]
    bad = [p for p in pairs if len(p) != 2]
    if bad:
        raise ValueError(
            "allowed must be a (states, states) bool matrix or a list of forbidden "
            f"(from_state, to_state) pairs; got {bad[0]!r}"
        )
    return pairs


def _pad(arrays: Sequence[np.ndarray], fill: float | int = 0) -> np.ndarray:
    """Stack ``(Lₖ, ...)`` arrays into ``(n, max L, ...)``, padding at the end with ``fill``."""
    lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays)
    out = np.full((len(arrays), int(lengths.max()), *flat.shape[1:]), fill, dtype=flat.dtype)
    seq = np.repeat(np.arange(len(arrays)), lengths)
    pos = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[seq, pos] = flat
    return out


class NMESequenceTagger(_NMEEstimator):
    """NME-CRF estimator: per-segment emission MLP + linear-chain CRF with T = T̄ + Tⁱ.

    Args:
        hidden: hidden widths of the emission MLP (``()`` = linear emissions).
        placement: see the module docstring; default ``"last+T"``.
        method: ``"generic"``, ``"specific"``, ``"unme"`` or ``"nme"``.
        activation, dropout: of the emission MLP.
        lr, weight_decay: Adam(W) for θ̄; θⁱ uses SparseAdam with the same ``lr``.
        batch_size: sequences per mini-batch.
        max_epochs, patience: epochs, and early-stopping patience on the validation NLL.
        anneal: Σ annealing α (see :mod:`nme.base`), or None.
        m_step: ``"laplace"`` (default) or ``"paper"``, see below and
            :func:`nme.objective.laplace_posterior`.
        sigma2: ``"nll"`` (default: σ² = ½, the CRF NLL is a log-likelihood) or
            ``"mean_loss"`` (the paper's), see below and :data:`nme.objective.SIGMA2_RULES`.
        learn_start_end: learn (generic) start and end scores instead of uniform ones.
        allowed: forbidden transitions: an ``(S, S)`` bool matrix in the order of ``states_``
            (False = forbidden) or a list of forbidden ``(from_state, to_state)`` name pairs.
        states: the state names in a fixed order; default the sorted distinct training labels.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``…
        random_state: seeds initialisation and batch order.
        verbose: show a progress bar.

    Labels are state *names*: strings or ints (ints are names too, not indices).

    **E-step, M-step and σ² defaults** (``e_step="newton"``, ``m_step="laplace"``,
    ``sigma2="nll"``). Given the emissions the CRF NLL is convex in the transition scores, with
    Hessian the covariance of the transition counts; where θⁱ is short (d ≤
    :attr:`HESSIAN_MAX_DIM`: ``placement="T"``, or ``"last+T"`` of small linear emissions) every
    epoch ends with an exact E-step — batched Newton steps with that Hessian (closed form for
    T alone, double backward otherwise) to every person's posterior mode — and the M-step uses
    the exact Laplace posterior; ``fit_person`` (the service's per-user update) takes the same
    steps. Wider placements keep Adam epochs, L-BFGS in ``fit_person`` and the empirical
    Fisher.

    σ² = ½ because the CRF loss is a negative log-likelihood: (1/σ²) Σ l + θᵀΣ⁻¹θ is then
    exactly twice the negative log posterior of the mixed CRF, and Σ is the prior variance of
    θⁱ. There is no noise variance to estimate; the paper's σ² = mean loss (a per-sequence NLL
    of ~16 here) tempers every person's likelihood by 1/(2σ²) ≈ 1/30, as if 114 observed
    transitions were 4, so the between-person variance is not identifiable from them and
    the marginal-likelihood Σ goes to 0 (with exact E-steps Σ of Tⁱ fell from 0.33 to 0.000
    in 4 epochs on ``simulate_sequences``; with σ² = ½ it settles at 0.2–0.3, the simulated
    log-scale variance being 0.25). The measurements: ``docs/decisions.md``.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (64,),
        placement: str | Sequence[str] = "last+T",
        method: str = "nme",
        activation: str = "relu",
        dropout: float = 0.0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        max_epochs: int = 100,
        patience: int | None = 10,
        anneal: float | None = 0.8,
        m_step: str = "laplace",
        sigma2: str = "nll",
        learn_start_end: bool = False,
        allowed: Any = None,
        states: Sequence[Hashable] | None = None,
        device: str = "auto",
        random_state: int | None = None,
        verbose: bool = False,
        e_step: str = "newton",
        tol: float | None = 1e-4,
        n_iter_no_change: int = 10,
    ) -> None:
        super().__init__(
            hidden=hidden, placement=placement, method=method, activation=activation,
            dropout=dropout, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            max_epochs=max_epochs, patience=patience, anneal=anneal, m_step=m_step,
            device=device, random_state=random_state, verbose=verbose,
            e_step=e_step, tol=tol, n_iter_no_change=n_iter_no_change,
        )
        self.sigma2 = sigma2
        self.learn_start_end = learn_start_end
        self.allowed = allowed
        self.states = states

    def _validate_params(self) -> Self:
        """The base class's checks plus the tagger's placements, σ² rule, ``allowed`` and
        ``states`` (see :meth:`nme.base._NMEEstimator._validate_params`)."""
        super()._validate_params()
        if isinstance(self.placement, str) and self.placement not in SEQUENCE_PLACEMENTS:
            raise ValueError(
                f"placement must be one of {SEQUENCE_PLACEMENTS} or a list of parameter names, "
                f"got {self.placement!r}"
            )
        if self.sigma2 not in SIGMA2_RULES:
            raise ValueError(f"sigma2 must be one of {SIGMA2_RULES}, got {self.sigma2!r}")
        if not isinstance(self.learn_start_end, (bool, np.bool_)):
            raise ValueError(f"learn_start_end must be True or False, "
                             f"got {self.learn_start_end!r}")
        _normalise_allowed(self.allowed)  # raises on a malformed matrix or pair list
        if self.states is not None:
            states = as_id_list(list(self.states))
            if len(set(map(str, states))) != len(states):
                raise ValueError(f"states must be distinct, got {states}")
        return self

    def _artifact_params(self) -> dict[str, Any]:
        params = super()._artifact_params()
        params["allowed"] = _normalise_allowed(self.allowed)
        params["states"] = None if self.states is None else as_id_list(list(self.states))
        params["learn_start_end"] = bool(self.learn_start_end)
        return params

    # ----------------------------------------------------------------- hooks of the base class
    def _n_outputs(self) -> int:
        return len(self.states_)

    def _build(self, n_features: int, n_persons: int) -> PersonalizedModule:
        base = EmissionCRF(n_features, self.hidden, len(self.states_), self.activation,
                           self.dropout, bool(self.learn_start_end))
        names = sequence_placement(base, self.placement)
        return PersonalizedModule(base, names, n_persons, self.method)

    def _extra_config(self) -> dict:
        return {"states": list(self.states_), "allowed_matrix": self._allowed_matrix_json()}

    def _restore_extra(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.states_ = list(config["states"])
        matrix = config.get("allowed_matrix")
        self.allowed_ = (
            None if matrix is None
            else torch.tensor(matrix, dtype=torch.bool, device=self.device_)
        )

    def _allowed_matrix_json(self) -> list | None:
        return None if self.allowed_ is None else self.allowed_.cpu().tolist()

    # ----------------------------------------------------------------- input handling
    def _resolve_allowed(self) -> torch.Tensor | None:
        """``(S, S)`` bool of allowed transitions in ``states_`` order, or None (all allowed)."""
        allowed = _normalise_allowed(self.allowed)
        if allowed is None:
            return None
        n = len(self.states_)
        arr = np.asarray(allowed, dtype=object)
        if arr.ndim == 2 and all(isinstance(v, bool) for v in arr.ravel()):
            if arr.shape != (n, n):
                raise ValueError(f"allowed has shape {arr.shape}, expected ({n}, {n}) for the "
                                 f"states {self.states_}")
            mask = torch.tensor(arr.astype(bool))
        else:
            index = {s: k for k, s in enumerate(self.states_)}
            unknown = sorted({str(s) for pair in allowed for s in pair if s not in index})
            if unknown:
                raise ValueError(f"forbidden transitions name unknown states {unknown}; "
                                 f"states are {self.states_}")
            mask = torch.ones(n, n, dtype=torch.bool)
            for a, b in allowed:
                mask[index[a], index[b]] = False
        if not bool(mask.any(dim=1).all()):
            raise ValueError("allowed forbids every transition out of some state")
        return mask.to(self.device_)

    def _features(
        self, features: Sequence[ArrayLike], name: str, fitting: bool = False
    ) -> list[np.ndarray]:
        """Raw ``(Lₖ, F)`` float32 matrices, names checked against ``feature_names_``."""
        if len(features) == 0:
            raise ValueError(f"{name} is empty: pass at least one sequence")
        expected = None if fitting else (self.feature_names_ if self._names_from_frame else None)
        out = []
        for k, f in enumerate(features):
            x, names = feature_matrix(f, expected=expected, name=f"{name}[{k}]")
            if fitting and k == 0:
                self._names_from_frame = names is not None
                self.feature_names_ = names or [f"x{j}" for j in range(x.shape[1])]
                expected = names
            if x.shape[0] == 0:
                raise ValueError(f"{name}[{k}] has no segments; every sequence needs length >= 1")
            if x.shape[1] != len(self.feature_names_):
                raise ValueError(f"{name}[{k}] has {x.shape[1]} features, expected "
                                 f"{len(self.feature_names_)}")
            out.append(x)
        return out

    def _encode_labels(
        self, labels: Sequence[Sequence[Hashable]], lengths: Sequence[int], name: str
    ) -> list[np.ndarray]:
        index = {s: k for k, s in enumerate(self.states_)}
        out = []
        for k, (lab, n) in enumerate(zip(labels, lengths, strict=True)):
            ids = as_id_list(lab)
            if len(ids) != n:
                raise ValueError(f"{name}[{k}] has {len(ids)} labels for {n} segments")
            unknown = sorted({str(s) for s in ids if s not in index})
            if unknown:
                raise ValueError(f"{name}[{k}] has labels that are not states: {unknown[:10]} "
                                 f"(states: {self.states_})")
            out.append(np.fromiter((index[s] for s in ids), dtype=np.int64, count=n))
        return out

    def _tensors(
        self, x_list: list[np.ndarray], y_list: list[np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalised padded ``(n, L, F)`` features, ``(n, L)`` bool mask, ``(n, L)`` tags."""
        dev = self.device_
        lengths = torch.tensor([len(x) for x in x_list])
        mask = (torch.arange(int(lengths.max())) < lengths.unsqueeze(1)).to(dev)
        x = torch.from_numpy(self.x_scaler_.transform(_pad(x_list))).to(dev)
        y = None if y_list is None else torch.from_numpy(_pad(y_list)).to(dev)
        return x, mask, y

    @staticmethod
    def _unzip(sequences: Iterable[LabelledSequence], name: str) -> tuple[list, list]:
        feats, labels = [], []
        for k, item in enumerate(sequences):
            try:
                f, lab = item
            except (TypeError, ValueError):
                raise ValueError(f"{name}[{k}] must be a (features, labels) pair") from None
            feats.append(f)
            labels.append(lab)
        return feats, labels

    # ----------------------------------------------------------------- the CRF
    def _crf_scores(
        self, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Transitions ``(S, S)`` or ``(batch, S, S)`` = T̄ + Tⁱ, and the start/end scores.

        Args:
            rows: ``(batch, d)`` θⁱ rows (ignored when T is not placed).
        """
        base = self.module_.base
        transitions = base.transitions
        layout = self.module_.layout
        if TRANSITIONS in layout.names:
            # (batch, S, S): each sequence carries its person's matrix
            transitions = transitions + layout.split(rows)[TRANSITIONS]
        return transitions, base.start, base.end

    def _nll(
        self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """``(batch,)`` CRF negative log-likelihood of each sequence."""
        transitions, start, end = self._crf_scores(rows)
        return -crf.log_likelihood(emissions, tags, mask, transitions, start, end, self.allowed_)

    @torch.no_grad()
    def _infer(
        self, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, chunk: int = 512,
        want_marginals: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Viterbi paths ``(n, L)`` (-1 padded), scores ``(n,)``, marginals ``(n, L, S)``."""
        self.module_.eval()
        paths, scores, margs = [], [], []
        for s in range(0, x.shape[0], chunk):
            m = mask[s : s + chunk]
            longest = int(m.sum(1).max())
            m = m[:, :longest]
            r = rows[s : s + chunk]
            em, _ = self.module_(x[s : s + chunk, :longest], effects=r)
            transitions, start, end = self._crf_scores(r)
            p, sc = crf.viterbi_decode(em, m, transitions, start, end, self.allowed_)
            pad = x.shape[1] - longest
            paths.append(nn.functional.pad(p, (0, pad), value=-1))
            scores.append(sc)
            if want_marginals:
                mg = crf.marginals(em, m, transitions, start, end, self.allowed_)
                margs.append(nn.functional.pad(mg, (0, 0, 0, pad)))
        return (torch.cat(paths), torch.cat(scores),
                torch.cat(margs) if want_marginals else None)

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        sequences: Sequence[LabelledSequence],
        persons: Sequence[Hashable] | np.ndarray,
        sequences_val: Sequence[LabelledSequence] | None = None,
        persons_val: Sequence[Hashable] | np.ndarray | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> Self:
        """Fit on labelled sequences.

        Args:
            sequences: ``(features (L, F), labels (L,))`` pairs; lengths may differ.
            persons: ``(n_sequences,)`` the person of each sequence.
            sequences_val, persons_val: held-out sequences for early stopping (validation
                NLL, ``patience`` epochs) and the reported accuracy (``val_metric``).
            callback: receives each epoch's history record.
        """
        validation = None
        if sequences_val is not None:
            validation = partial(self._validation_sequences, sequences_val, persons_val)
        return self._fit(partial(self._training_sequences, sequences, persons), validation,
                         callback)

    def _training_sequences(
        self, sequences: Sequence[LabelledSequence], persons: Sequence[Hashable] | np.ndarray
    ) -> _Items:
        """Check the training sequences; learn the feature names, states and scaler."""
        feats, labels = self._unzip(sequences, "sequences")
        ids = as_id_list(persons)
        if len(ids) != len(feats):
            raise ValueError(f"persons has {len(ids)} entries for {len(feats)} sequences")
        own = self._own_rows(ids)  # a distributed fit keeps this rank's persons' sequences
        if own is not None:
            feats, labels = [feats[k] for k in own], [labels[k] for k in own]
            ids = [ids[k] for k in own]
        x_list = self._features(feats, "sequences", fitting=True)
        if self.states is not None:
            self.states_ = as_id_list(list(self.states))
        else:
            seen = self._all_labels({s for lab in labels for s in as_id_list(lab)})
            self.states_ = sorted(seen, key=lambda c: (str(type(c)), c))
        if len(self.states_) < 2:
            raise ValueError("sequence tagging needs at least two states")
        self.allowed_ = self._resolve_allowed()
        y_list = self._encode_labels(labels, [len(x) for x in x_list], "sequences")
        self._check_paths_allowed(y_list, "sequences")
        self.x_scaler_ = self._fit_scaler(np.concatenate(x_list))
        x, mask, y = self._tensors(x_list, y_list)
        assert y is not None
        return _Items(x=x, y=y, ids=ids, mask=mask)

    def _validation_sequences(
        self,
        sequences: Sequence[LabelledSequence],
        persons: Sequence[Hashable] | np.ndarray | None,
    ) -> _Items:
        if persons is None:
            raise ValueError("sequences_val needs persons_val")
        feats, labels = self._unzip(sequences, "sequences_val")
        ids = as_id_list(persons)
        if len(ids) != len(feats):
            raise ValueError(f"persons_val has {len(ids)} entries for {len(feats)} sequences")
        own = self._own_rows(ids)  # a distributed fit validates each rank's own persons
        if own is not None:
            feats, labels = [feats[k] for k in own], [labels[k] for k in own]
            ids = [ids[k] for k in own]
        x, mask, y = self._labelled_tensors(feats, labels, "sequences_val", "sequences_val")
        return _Items(x=x, y=y, ids=ids, mask=mask)

    def _labelled_tensors(
        self,
        features: Sequence[ArrayLike],
        labels: Sequence[Sequence[Hashable]],
        features_name: str,
        labels_name: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked labelled sequences of a fitted tagger as ``_tensors`` (x, mask, tags)."""
        x_list = self._features(features, features_name)
        y_list = self._encode_labels(labels, [len(x) for x in x_list], labels_name)
        self._check_paths_allowed(y_list, labels_name)
        x, mask, y = self._tensors(x_list, y_list)
        assert y is not None
        return x, mask, y

    def _train_config(self, n_items: int) -> TrainConfig:
        # Padded sequences are far bigger than table rows: smaller chunks for the passes over
        # the training set (the Fisher of the Laplace M-step).
        return replace(super()._train_config(n_items), eval_batch_size=512, sigma2=self.sigma2)

    def _train_losses(
        self,
        items: _Items,
        persons: torch.Tensor,
        idx: torch.Tensor,
        effects: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b,)`` CRF NLL of the sequences ``idx`` and their θⁱ rows ``(b, d)``."""
        assert items.mask is not None
        mask = items.mask[idx]  # (b, L)
        # Trim the batch to its own longest sequence: padding costs CRF time steps.
        longest = int(mask.sum(1).max())
        x = items.x[idx, :longest]
        if effects is not None:  # per-sequence rows (the Laplace M-step's Fisher)
            em, rows = self.module_(x, effects=effects)
        else:
            em, rows = self.module_(x, persons[idx])
        assert isinstance(rows, torch.Tensor)  # gathered=False: per-sequence rows
        return self._nll(em, items.y[idx, :longest], mask[:, :longest], rows), rows

    def _val_weights(self, items: _Items) -> dict[str, float]:
        # the accuracy is per segment: ranks combine by their segments
        assert items.mask is not None
        return {"val_loss": float(len(items.ids)), "val_metric": float(items.mask.sum())}

    def _val_scores(self, items: _Items, rows: torch.Tensor) -> dict[str, float]:
        """Mean CRF NLL per sequence and Viterbi accuracy per segment."""
        x, y, mask = items.x, items.y, items.mask
        assert mask is not None
        chunk = 512
        nll = torch.cat([
            self._nll(self.module_(x[s : s + chunk], effects=rows[s : s + chunk])[0],
                      y[s : s + chunk], mask[s : s + chunk], rows[s : s + chunk])
            for s in range(0, x.shape[0], chunk)
        ])
        paths, _, _ = self._infer(x, mask, rows)
        hits = (paths == y) & mask
        return {"val_loss": float(nll.mean()), "val_metric": float(hits.sum() / mask.sum())}

    def _check_paths_allowed(self, y_list: list[np.ndarray], name: str) -> None:
        """Labels must not use a forbidden transition: their likelihood would be 0."""
        if self.allowed_ is None:
            return
        allowed = self.allowed_.cpu().numpy()
        for k, y in enumerate(y_list):
            bad = ~allowed[y[:-1], y[1:]]
            if bad.any():
                t = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{name}[{k}] uses the forbidden transition {self.states_[y[t]]!r} -> "
                    f"{self.states_[y[t + 1]]!r} at position {t}"
                )

    # ----------------------------------------------------------------- inference
    def _rows(self, persons: Sequence[Hashable] | np.ndarray | None, n: int) -> torch.Tensor:
        if persons is None:
            return self.fallback_effect_.expand(n, -1)
        ids = as_id_list(persons)
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} persons for {n} sequences")
        return self._rows_for(ids)

    def _names(self, paths: torch.Tensor, mask: torch.Tensor) -> list[list]:
        names = np.asarray(self.states_, dtype=object)
        lengths = mask.sum(1).tolist()
        flat = names[paths[mask].cpu().numpy()]
        return [list(p) for p in np.split(flat, np.cumsum(lengths)[:-1])]

    def _marginal_list(self, margs: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
        lengths = mask.sum(1).tolist()
        return [margs[k, :n].cpu().numpy() for k, n in enumerate(lengths)]

    def predict(
        self,
        sequences_features: Sequence[ArrayLike],
        persons: Sequence[Hashable] | np.ndarray | None = None,
    ) -> list[list]:
        """Viterbi paths in state names, one list per sequence.

        Args:
            sequences_features: ``(Lₖ, F)`` feature matrices.
            persons: ``(n,)`` the person of each sequence; unknown persons (and None) decode
                with the generic T̄ and emission network.
        """
        self._check_fitted()
        x, mask, _ = self._tensors(self._features(sequences_features, "sequences_features"))
        paths, _, _ = self._infer(x, mask, self._rows(persons, x.shape[0]))
        return self._names(paths, mask)

    def predict_marginals(
        self,
        sequences_features: Sequence[ArrayLike],
        persons: Sequence[Hashable] | np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Posterior state probabilities: one ``(Lₖ, S)`` array per sequence (columns in the
        order of ``states_``).

        The CRF's marginals (forward–backward) at the plug-in parameters θ̄ + θ̂ⁱ, θ̂ⁱ the
        posterior mode of the person's effects (T̄ and the generic emissions for unknown
        persons): "posterior" over states given those parameters, not averaged over the
        posterior uncertainty of θⁱ, so a person with few sequences is not made less certain
        than their mode implies."""
        self._check_fitted()
        x, mask, _ = self._tensors(self._features(sequences_features, "sequences_features"))
        _, _, margs = self._infer(x, mask, self._rows(persons, x.shape[0]), want_marginals=True)
        assert margs is not None
        return self._marginal_list(margs, mask)

    def decode_with_effects(
        self,
        features_list: Sequence[ArrayLike],
        effects: np.ndarray,
        known: np.ndarray | None = None,
    ) -> list[tuple[list, float, np.ndarray]]:
        """Decode with explicit θⁱ rows (as the service fetches them from its database).

        Args:
            features_list: ``(Lₖ, F)`` feature matrices, one per sequence.
            effects: ``(n, d) float32`` θⁱ row of each sequence's person.
            known: ``(n,) bool``; False rows decode with the generic model.

        Returns:
            Per sequence ``(path in state names, Viterbi score, marginals (Lₖ, S))``; the score
            is the path's unnormalised log-score (emissions + transitions + start/end). Path
            and marginals are those of the given rows, plugged in (see
            :meth:`predict_marginals`).
        """
        self._check_fitted()
        x, mask, _ = self._tensors(self._features(features_list, "features_list"))
        rows = self._effects_tensor(effects, known)
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"got {rows.shape[0]} effect rows for {x.shape[0]} sequences")
        paths, scores, margs = self._infer(x, mask, rows, want_marginals=True)
        assert margs is not None
        return list(zip(self._names(paths, mask), scores.cpu().tolist(),
                        self._marginal_list(margs, mask), strict=True))

    # ----------------------------------------------------------------- interpretation
    def transition_scores(self, person: Hashable | None = None) -> np.ndarray:
        """``(S, S)`` raw transition scores T̄ + Tⁱ of ``person`` (T̄ if unknown or None)."""
        self._check_fitted()
        with torch.no_grad():
            transitions, _, _ = self._crf_scores(self._rows(None if person is None else [person],
                                                            1))
        return transitions.expand(1, -1, -1)[0].cpu().numpy().astype(np.float64)

    def transition_matrices(
        self,
        person: Hashable | Sequence[Hashable] | np.ndarray | None = None,
        reading: str = "chain",
    ) -> np.ndarray:
        """Transition probabilities of T̄ + Tⁱ for interpretation.

        Forbidden transitions get probability 0. Unknown persons (and None) get T̄.

        Args:
            person: one person id -> ``(S, S)``; a list/array of ids -> ``(n, S, S)``.
            reading: ``"chain"`` (default): the Markov chain of labels the transition scores
                define, exp T(i, j) v(j) / (λ v(i)) with v the Perron eigenvector of exp T
                (:func:`nme.crf.label_chain`); ``"softmax"``: the row-softmax of T̄ + Tⁱ
                (the reading before; a CRF's scores are not log-probabilities, and on
                ``simulate_sequences`` it shows about a quarter of the true group difference,
                the chain all of it — ``docs/decisions.md``).

        Returns:
            Rows = from-state, columns = to-state, in the order of ``states_``; rows sum to 1.
        """
        self._check_fitted()
        if reading not in ("chain", "softmax"):
            raise ValueError(f"reading must be 'chain' or 'softmax', got {reading!r}")
        many = isinstance(person, (list, np.ndarray))
        ids = as_id_list(person) if many else [person]
        with torch.no_grad():
            rows = self._rows(None if person is None else ids, len(ids))
            transitions, _, _ = self._crf_scores(rows)
            transitions = transitions.expand(len(ids), -1, -1)  # (n, S, S)
            if reading == "chain":
                probs = crf.label_chain(transitions, self.allowed_).cpu().numpy()
            else:
                if self.allowed_ is not None:
                    transitions = transitions.masked_fill(~self.allowed_, float("-inf"))
                probs = torch.softmax(transitions.double(), dim=-1).cpu().numpy()
        return probs if many else probs[0]

    # ----------------------------------------------------------------- per-person E-step
    HESSIAN_MAX_DIM: ClassVar[int] = 64
    """Largest θⁱ length d for which the E-step uses the exact Hessian of the sequence NLLs
    (d double-backward passes per chunk of sequences; ``placement="T"`` has d = S², linear
    emissions with ``"last+T"`` d = S(F + 1) + S²) and runs after every epoch. Above it θⁱ come
    from the epochs' Adam steps (``fit``) or L-BFGS (``fit_person``), and the posterior
    variance from the empirical Fisher."""

    def _exact_hessian(self) -> bool:
        return 0 < self.module_.effect_dim <= self.HESSIAN_MAX_DIM

    def _newton_e_step(self) -> bool:
        # Newton steps need the true curvature: with the empirical Fisher (a rank-one guess
        # per sequence) they overshoot or crawl, so wide placements keep Adam/L-BFGS.
        return self._exact_hessian()

    def _epoch_newton(self) -> bool:
        # With the exact Hessian the E-step is a few Newton steps over all persons at once —
        # cheaper than the Fisher pass of the Laplace M-step it replaces — so every epoch's
        # M-step sees posterior modes and exact posterior variances (EM, not one Adam epoch).
        return self._exact_hessian()

    def _item_curvature(
        self, items: _Items, idx: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence: NLL ``(b,)``, its gradient w.r.t. the sequence's θⁱ row ``(b, d)`` and
        a factor ``(b, d, d)`` of half its exact Hessian (see :data:`nme.estep.ItemCurvature`).

        The Hessian of log Z w.r.t. the transition scores is the covariance of the transition
        counts under the CRF (PSD: the NLL is convex in T and, for emissions linear in θⁱ, in
        θⁱ). It is taken by double backward: sequence b depends on row b only, so one backward
        of Σ_b ∂l_b/∂θ_k gives column k of every sequence's Hessian at once — d passes, a loop
        over parameters, never over sequences or persons. Half the Hessian ½H = FᵀF with
        F = diag(√(λ/2)) Vᵀ from its eigendecomposition; negative eigenvalues (round-off, or a
        non-convex placement such as hidden layers) are clipped to 0 so the Newton precision
        stays positive definite. Above :attr:`HESSIAN_MAX_DIM` the empirical Fisher.
        """
        if not self._exact_hessian():
            return super()._item_curvature(items, idx, rows)
        chunk = self.HESSIAN_CHUNK
        exact = (self._transition_curvature if self.module_.layout.names == (TRANSITIONS,)
                 else self._exact_curvature)
        parts = [exact(items, idx[s : s + chunk], rows[s : s + chunk])
                 for s in range(0, idx.shape[0], chunk)]
        losses, grads, factors = (torch.cat(p) for p in zip(*parts, strict=True))
        return losses, grads, factors

    NEWTON_TOL: ClassVar[float] = 1e-7
    """The sequence NLLs are float32 sums of ~10² per person: a predicted decrease below 10⁻⁷
    of Jᵢ is under their round-off, where a line search can no longer confirm a step and
    would only spend its halvings."""

    HESSIAN_CHUNK: ClassVar[int] = 256
    """Sequences per double-backward graph of :meth:`_item_curvature` (bounds its memory)."""

    def _transition_curvature(
        self, items: _Items, idx: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_item_curvature` for θⁱ = Tⁱ alone, in closed form: the NLL's gradient is
        E[n] − n(y) and its Hessian Cov[n], n the transition counts under the person's CRF
        (:func:`nme.crf.transition_count_moments`) — one forward–backward pass, no autograd.
        """
        assert items.mask is not None
        mask = items.mask[idx]  # (b, L)
        longest = int(mask.sum(1).max())
        mask = mask[:, :longest]
        tags = items.y[idx, :longest]  # (b, L)
        with torch.no_grad():
            emissions, _ = self.module_(items.x[idx, :longest], effects=rows)  # (b, L, S)
            transitions, start, end = self._crf_scores(rows)  # (b, S, S)
            losses = -crf.log_likelihood(emissions, tags, mask, transitions, start, end,
                                         self.allowed_)  # (b,)
            pairwise = crf.pairwise_marginals(emissions.double(), mask, transitions.double(),
                                              None if start is None else start.double(),
                                              None if end is None else end.double(),
                                              self.allowed_)  # (b, L - 1, S, S)
        mean, cov = crf.transition_count_moments(pairwise)  # (b, S²), (b, S², S²)
        n_states = transitions.shape[-1]
        pairs = tags[:, :-1] * n_states + tags[:, 1:]  # (b, L - 1) flat index of each step
        observed = mean.new_zeros(mean.shape).scatter_add_(
            1, pairs, mask[:, 1:].to(mean.dtype))  # (b, S²) counts of the labelled path
        grads = (mean - observed).to(rows.dtype)
        return losses, grads, self._half_factor(cov).to(rows.dtype)

    @staticmethod
    def _half_factor(hessian: torch.Tensor) -> torch.Tensor:
        """``(b, d, d)`` symmetric PSD H -> F with FᵀF = ½H (eigenvalues below 0, from
        round-off or a non-convex placement, clipped so the Newton precision stays PD)."""
        hessian = 0.5 * (hessian + hessian.mT).to(torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)  # (b, d), (b, d, d)
        return (eigenvalues.clamp_min(0.0) / 2).sqrt().unsqueeze(-1) * eigenvectors.mT

    def _exact_curvature(
        self, items: _Items, idx: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_item_curvature` with the exact Hessian for one chunk of sequences."""
        persons = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)  # unused
        leaf = rows.detach().clone().requires_grad_(True)  # (b, d)
        d = leaf.shape[1]
        with torch.enable_grad():
            losses, _ = self._train_losses(items, persons, idx, leaf)  # (b,)
            (grads,) = torch.autograd.grad(losses.sum(), leaf, create_graph=True)  # (b, d)
            columns = [
                torch.autograd.grad(grads[:, k].sum(), leaf, retain_graph=k < d - 1)[0]
                for k in range(d)
            ]
        hessian = torch.stack(columns, dim=-1).detach()  # (b, d, d)
        return losses.detach(), grads.detach(), self._half_factor(hessian).to(rows.dtype)

    def fit_person(
        self,
        features_list: Sequence[ArrayLike],
        labels_list: Sequence[Sequence[Hashable]],
        init: np.ndarray | None = None,
        max_iter: int = 100,
        return_variance: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """E-step for one person: θ̄, σ², Σ fixed, only this person's θⁱ optimised.

        Minimises (1/σ²) Σₖ NLL(sequence k; θ̄ + θ) + θᵀΣ⁻¹θ with L-BFGS (no penalty and
        σ² = 1 for ``unme``/``specific``), starting from ``init`` or the fallback row.

        Args:
            features_list: ``(Lₖ, F)`` the person's labelled sequences; ``labels_list`` their
                ``(Lₖ,)`` labels.
            init: ``(d,)`` starting θⁱ (e.g. the person's current row).
            max_iter: L-BFGS iterations at most.
            return_variance: also return the diagonal Laplace posterior variance of θⁱ
                (empirical Fisher of the sequence NLLs).

        Returns:
            ``(d,) float32`` the person's new θⁱ; with ``return_variance=True``
            ``(theta (d,), variance (d,))``.
        """
        self._check_fitted()
        if len(features_list) == 0 or self.n_effects_ == 0:
            return self._fit_person(None, init, max_iter, return_variance)
        x, mask, y = self._labelled_tensors(features_list, labels_list, "features_list",
                                            "labels_list")
        items = _Items(x=x, y=y, ids=[0] * x.shape[0], mask=mask)
        return self._fit_person(items, init, max_iter, return_variance)

    # ----------------------------------------------------------------- scoring
    def score_per_person(
        self,
        sequences: Sequence[LabelledSequence],
        persons: Sequence[Hashable] | np.ndarray,
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        """Segment accuracy computed per person, then averaged over persons (higher is better).

        With ``effects`` (``(n, d)``, one row per sequence) decodes like
        :meth:`decode_with_effects`, else with the persons' own rows.
        """
        feats, labels = self._unzip(sequences, "sequences")
        ids = [str(p) for p in as_id_list(persons)]
        if effects is not None:
            paths = [p for p, _, _ in self.decode_with_effects(feats, effects, known)]
        else:
            paths = self.predict(feats, as_id_list(persons))
        if len(ids) != len(paths):
            raise ValueError(f"got {len(ids)} persons for {len(paths)} sequences")
        hits: dict[str, list[int]] = {}
        for pid, path, lab in zip(ids, paths, labels, strict=True):
            truth = as_id_list(lab)
            if len(truth) != len(path):
                raise ValueError(f"a sequence has {len(truth)} labels for {len(path)} segments")
            h = hits.setdefault(pid, [0, 0])
            h[0] += sum(a == b for a, b in zip(path, truth, strict=True))
            h[1] += len(truth)
        return float(np.mean([a / n for a, n in hits.values()]))

    # ----------------------------------------------------------------- artifacts
    def save(self, path: str | os.PathLike, include_effects: bool = True) -> None:
        """Write the artifact directory (see :meth:`NMERegressor.save
        <nme.base._NMEEstimator.save>`); state names must be str or int."""
        self._check_fitted()
        bad = [s for s in self.states_ if not isinstance(s, (str, int))]
        if bad:
            raise ValueError(f"state names must be str or int to be saved, got e.g. {bad[0]!r}")
        super().save(path, include_effects=include_effects)
