"""The fit loop: E-step epochs of Adam on the NME loss, M-steps, validation, early stopping.

It is task-agnostic: the caller supplies ``item_loss(idx)``, the downstream loss of a set of
training items (rows of a table, or whole sequences for the CRF) together with the θⁱ rows
used, so the MLP estimators and the sequence tagger share this loop.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import torch
from tqdm.auto import tqdm

from nme.distributed import Comm, check_injected_failure
from nme.estep import Posterior
from nme.objective import (
    M_STEPS,
    NLL_SIGMA2,
    SIGMA2_RULES,
    fisher_curvature,
    laplace_posterior,
    laplace_posterior_sums,
    m_step,
    nme_batch_loss,
)
from nme.personalize import PersonalizedModule
from nme.persons import Gathered, RowAdam

ItemLoss = Callable[..., tuple[torch.Tensor, torch.Tensor | Gathered]]
"""``item_loss(idx, effects=None)``: ``idx: (b,) long`` -> ``(losses (b,), rows)`` in the
module's current mode; rows are ``(b, dim)`` or a :class:`~nme.persons.Gathered` (see
``PersonalizedModule.forward``). With ``effects: (b, dim)`` the items use those θⁱ rows instead
of the table's (item b's loss must depend on row b only): the generic Laplace M-step gets every
item's own gradient from one backward pass this way."""

SquaredGrads = Callable[[], torch.Tensor]
"""Returns ``(n_persons, dim)``: the curvature Hᵢ of :func:`nme.objective.laplace_posterior`
(for squared error the exact Gauss–Newton Σⱼ (∂f(Xⁱⱼ)/∂θⁱ)²); without it the Laplace M-step
uses the empirical Fisher of ``item_loss``."""

AUTO_BATCH = (32, 512, 16)
"""``batch_size="auto"``: ``clip(n_items // 16, 32, 512)`` (see :func:`auto_batch_size`)."""


def auto_batch_size(n_items: int) -> int:
    """The batch size ``"auto"`` stands for: about 16 steps per epoch, within [32, 512].

    Small data get enough Adam steps per epoch for θ̄ to move (sleepstudy's 180 rows: 32 rows,
    6 steps, where 512 would be one step per epoch); large data keep the throughput of 512.
    """
    low, high, steps = AUTO_BATCH
    return int(min(high, max(low, n_items // steps)))


BATCHINGS = ("random", "person")
"""How an epoch cuts the items into batches (see :attr:`TrainConfig.batching`)."""

Validate = Callable[[], dict[str, float]]
"""Returns at least ``{"val_loss": …}`` (lower is better) and optionally ``"val_metric"``."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the fit loop."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    max_epochs: int = 100
    patience: int | None = 10
    anneal: float | None = None
    seed: int | None = None
    verbose: bool = False
    eval_batch_size: int = 8192
    m_step: str = "paper"
    """See :data:`nme.objective.M_STEPS`."""
    sigma2: str = "mean_loss"
    """See :data:`nme.objective.SIGMA2_RULES`."""
    batching: str = "random"
    """``"random"``: batches drawn from all items; ``"person"``: each batch holds whole runs of
    a few persons' items (persons in random order, items shuffled within person). Eq. 2's
    weights keep the objective the same; person batches touch far fewer θⁱ rows per step, which
    is what makes wide placements (``all``) cheap — at the price of batches that are less mixed
    for θ̄."""
    tol: float | None = None
    """Convergence test: training has converged once, for ``n_iter_no_change`` epochs in a row,
    the mean training loss, σ² and the mean of Σ each changed by at most ``tol`` relative to
    their previous value. None: no test (run until ``max_epochs`` or early stopping)."""
    n_iter_no_change: int = 10
    snapshot_max_bytes: int | None = 64 << 20
    """Early stopping keeps the best epoch's person table in memory only up to this size;
    a larger one goes to a temporary file (:class:`BestEpoch`), so keeping the best epoch
    does not double the memory of the largest tensor of the fit. None: the whole state in
    memory always (how it was before; the benchmark's baseline). Results are identical."""
    snapshot_dir: str | None = None
    """Directory of that temporary file (None: the system's temporary directory)."""


class BestEpoch:
    """The best epoch's module state, σ² and Σ for early stopping.

    θ̄ (small) is copied in memory. The person table ``(n_persons, d)`` — 1.8 GB at 100 000
    persons with ``placement="all"`` of a 64-64 MLP — is copied in memory only up to
    ``max_bytes``; above that it is streamed to an unnamed temporary file in chunks of
    ``chunk_bytes``, and read back into the table in place by :meth:`restore`, so neither
    saving nor restoring holds a second table in memory (the file lives in the page cache,
    which the kernel can drop, not in the process). Only rows changed since the last save
    would need rewriting, but every epoch visits every item, so every row of the table
    changes in every epoch: the whole table is written at every improving epoch.

    Args:
        max_bytes: see :attr:`TrainConfig.snapshot_max_bytes` (None: always in memory).
        directory: where the temporary file goes (None: the system default).
    """

    def __init__(self, max_bytes: int | None, directory: str | None = None,
                 chunk_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self.chunk_bytes = chunk_bytes
        self.state: dict | None = None  # in memory: everything; on disk: all but the table
        self.sigma2 = 0.0
        self.Sigma: torch.Tensor | None = None
        self._file: IO[bytes] | None = None

    @property
    def saved(self) -> bool:
        return self.state is not None

    def _table_key(self, module: PersonalizedModule) -> str:
        return next(k for k, v in module.state_dict(keep_vars=True).items()
                    if v is module.persons.weight)

    def save(self, module: PersonalizedModule, sigma2: float, Sigma: torch.Tensor) -> None:
        """Remember ``module``'s current state with σ² and Σ ``(d,)``."""
        self.sigma2, self.Sigma = sigma2, Sigma.clone()
        table = module.persons.weight.detach()
        size = table.numel() * table.element_size()
        if self.max_bytes is None or size <= self.max_bytes:
            self.state = copy.deepcopy(module.state_dict())
            return
        key = self._table_key(module)
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items() if k != key}
        if self._file is None:
            # kept open across epochs and closed by close(); unnamed, so nothing is left
            # behind even if the fit dies
            self._file = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115
        self._file.seek(0)
        for start, stop in self._chunks(table):
            self._file.write(table[start:stop].cpu().numpy().tobytes())
        self._file.flush()

    def restore(self, module: PersonalizedModule) -> tuple[float, torch.Tensor]:
        """Put the saved state back into ``module`` (the table in place); returns σ², Σ."""
        assert self.state is not None and self.Sigma is not None
        if self._file is None:
            module.load_state_dict(self.state)
            return self.sigma2, self.Sigma
        table = module.persons.weight.data
        self._file.seek(0)
        for start, stop in self._chunks(table):
            buf = torch.empty(stop - start, table.shape[1], dtype=table.dtype)  # (rows, d)
            got = self._file.readinto(memoryview(buf.numpy()).cast("B"))
            assert got == buf.numel() * buf.element_size(), "snapshot file shorter than table"
            table[start:stop].copy_(buf)
        missing, unexpected = module.load_state_dict(self.state, strict=False)
        assert missing == [self._table_key(module)] and not unexpected, (missing, unexpected)
        return self.sigma2, self.Sigma

    def close(self) -> None:
        """Delete the temporary file (if any)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _chunks(self, table: torch.Tensor) -> list[tuple[int, int]]:
        rows = max(1, self.chunk_bytes // max(table.shape[1] * table.element_size(), 1))
        return [(s, min(s + rows, table.shape[0])) for s in range(0, table.shape[0], rows)]


EStep = Callable[[float, torch.Tensor], Posterior]
"""``e_step(σ², Σ (dim,))`` sets every θⁱ row of the person table to its posterior mode under
σ², Σ and returns the :class:`~nme.estep.Posterior` (see ``_NMEEstimator._e_step``)."""

STOP_REASONS = ("converged", "validation", "max_epochs")
"""Why the loop ended: the convergence test on the training objective, early stopping on the
validation loss, or the epoch budget."""


@dataclass
class TrainResult:
    """What the loop learned besides the module's weights (those are updated in place)."""

    sigma2: float
    Sigma: torch.Tensor
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    n_iter: int = 0
    """Epochs run."""
    stop_reason: str = "max_epochs"
    """One of :data:`STOP_REASONS`."""

    @property
    def converged(self) -> bool:
        """The loop ended by a convergence test (objective or validation), not the budget."""
        return self.stop_reason != "max_epochs"


def _mean_loss(item_loss: ItemLoss, n_items: int, chunk: int, device: torch.device) -> float:
    total = 0.0
    for start in range(0, n_items, chunk):
        idx = torch.arange(start, min(start + chunk, n_items), device=device)
        losses, _ = item_loss(idx)
        total += float(losses.sum())
    return total / max(n_items, 1)


def empirical_fisher(
    module: PersonalizedModule,
    persons: torch.Tensor,
    item_loss: ItemLoss,
    chunk: int,
) -> torch.Tensor:
    """``(n_persons, dim)`` per person ½ Σⱼ (∂lⱼ/∂θⁱ)², the Fisher curvature of the Laplace M-step.

    Per-item gradients without vmap: every item gets its own copy of its person's row as a leaf
    (``effects=``); item b's loss depends on row b only, so one backward of the summed losses
    leaves each item's own gradient in its row.
    """
    table = module.persons.weight.detach()
    out = torch.zeros_like(table)
    n_items = persons.shape[0]
    with torch.enable_grad():
        for start in range(0, n_items, chunk):
            idx = torch.arange(start, min(start + chunk, n_items), device=persons.device)
            p = persons[idx]
            rows = table[p].clone().requires_grad_(True)  # (b, dim)
            losses, _ = item_loss(idx, rows)
            (grads,) = torch.autograd.grad(losses.sum(), rows)
            fisher_curvature(grads, p, out)
    return out


def _epoch_order(persons: torch.Tensor, batching: str, gen: torch.Generator) -> torch.Tensor:
    """``(n_items,) long`` the order in which an epoch visits the items."""
    shuffled = torch.randperm(persons.shape[0], generator=gen)
    if batching == "random" or persons.shape[0] == 0:
        return shuffled
    n_persons = int(persons.max()) + 1
    person_rank = torch.randperm(n_persons, generator=gen)
    # stable sort of the shuffled items by their person's random rank keeps items shuffled
    # within each person
    keys = person_rank[persons.cpu()[shuffled]]
    return shuffled[torch.sort(keys, stable=True).indices]


def _distributed_epoch(
    module: PersonalizedModule,
    comm: Comm,
    order: torch.Tensor,
    item_loss: ItemLoss,
    n_obs_items: torch.Tensor,
    step_items: list[int],
    bs: int,
    scale: float,
    sigma_inv: torch.Tensor | None,
    dense: torch.optim.Optimizer | None,
    sparse: RowAdam | None,
    generic: list[torch.nn.Parameter],
) -> tuple[float, int]:
    """One epoch's steps on this rank; returns the summed loss and items over all ranks.

    Step k's loss is Eq. 2 over the union of the ranks' k-th batches: each rank's
    ``nme_batch_loss`` (a mean over its b_r items) is weighted by b_r / Σ b_r, so the summed
    θ̄ gradients (one ``all_reduce``) are those of the one big batch, and each θⁱ row (owned by
    one rank) gets exactly its share. A rank out of items still joins every step with a zero
    gradient, so every rank takes ``len(step_items)`` steps.
    """
    running, seen = 0.0, 0
    for k, total in enumerate(step_items):
        idx = order[k * bs : (k + 1) * bs]
        if dense is not None:
            dense.zero_grad(set_to_none=True)
        if sparse is not None:
            sparse.zero_grad(set_to_none=True)
        if idx.shape[0]:
            losses, rows = item_loss(idx)
            loss = nme_batch_loss(losses, rows, n_obs_items[idx], scale, sigma_inv)
            (loss * (idx.shape[0] / total)).backward()
            running += float(losses.detach().sum())
            seen += idx.shape[0]
        if dense is not None:
            comm.sum_grads(generic)
            dense.step()
        if sparse is not None and module.persons.weight.grad is not None:
            sparse.step()
    running, seen_f = comm.sum_floats(running, seen)
    return running, int(seen_f)


def _reduce_posterior(post: Posterior, comm: Comm) -> Posterior:
    """This rank's E-step posterior with its sums (persons, loss, excess, variances) over
    every rank; modes and variances stay this rank's rows."""
    sums = comm.all_sum(torch.cat([
        post.variance_sum.to(torch.float64),
        torch.tensor([post.n_persons, post.loss_sum, post.excess], dtype=torch.float64,
                     device=post.variance_sum.device),
    ]))
    d = post.variance_sum.shape[0]
    return dataclasses.replace(
        post, variance_sum=sums[:d], n_persons=int(sums[d]), loss_sum=float(sums[d + 1]),
        excess=float(sums[d + 2]), newton_steps=comm.max_int(post.newton_steps),
    )


def _reduced_laplace(
    curvature: torch.Tensor, sigma2: float, Sigma: torch.Tensor, n_total: int, comm: Comm
) -> tuple[torch.Tensor, float]:
    """:func:`nme.objective.laplace_posterior` over every rank's persons (``curvature:
    (P_r, d)`` this rank's)."""
    v_sum, excess = laplace_posterior_sums(curvature, sigma2, Sigma)
    sums = comm.all_sum(torch.cat([v_sum.to(torch.float64), v_sum.new_tensor(
        [curvature.shape[0], excess], dtype=torch.float64)]))
    d = v_sum.shape[0]
    n = max(float(sums[d]), 1.0)
    return (sums[:d] / n).to(Sigma.dtype), float(sums[d + 1]) / max(n_total, 1)


def fit_loop(
    module: PersonalizedModule,
    persons: torch.Tensor,
    item_loss: ItemLoss,
    config: TrainConfig,
    validate: Validate | None = None,
    callback: Callable[[dict], None] | None = None,
    squared_grads: SquaredGrads | None = None,
    e_step: EStep | None = None,
    comm: Comm | None = None,
) -> TrainResult:
    """Train ``module`` in place.

    Args:
        module: the personalised network; its person table has one row per person.
        persons: ``(n_items,) long`` the person of each training item (all known, ≥ 0).
        item_loss: see :data:`ItemLoss`.
        config: hyper-parameters.
        validate: evaluates the current module on held-out data (eval mode is set for it);
            enables early stopping with ``config.patience`` and restores the best epoch.
        callback: called with each epoch's history record (progress reporting).
        squared_grads: the exact curvature for ``config.m_step == "laplace"`` (regression's
            Gauss–Newton); None uses the empirical Fisher of ``item_loss`` (see
            :func:`nme.objective.laplace_posterior`).
        e_step: with the penalised method, run after every epoch's Adam steps: θⁱ ← their
            posterior modes, then the mean θⁱ moves into θ̄
            (:meth:`~nme.personalize.PersonalizedModule.recentre`), and the M-step uses the
            E-step's exact loss at the modes and its posterior (for ``"laplace"``).
        comm: this rank's collectives in a distributed fit (:mod:`nme.distributed`), None for
            one process. ``persons``, ``item_loss``, ``squared_grads`` and ``e_step`` then see
            this rank's persons only; θ̄ must start equal on every rank (``validate`` must
            return values already reduced over the ranks). Every rank takes the same number
            of steps per epoch (``config.batch_size`` is per rank; ranks out of items take
            zero-loss steps), θ̄'s gradients are summed over the ranks, and the M-step, the
            recentring and the stopping decisions use sums over all ranks.

    Returns:
        σ², Σ (diagonal, ``(dim,)``), the per-epoch history, the best epoch, the epochs run
        and why the loop stopped.
    """
    if config.batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {config.batching!r}")
    if config.m_step not in M_STEPS:
        raise ValueError(f"m_step must be one of {M_STEPS}, got {config.m_step!r}")
    if config.sigma2 not in SIGMA2_RULES:
        raise ValueError(f"sigma2 must be one of {SIGMA2_RULES}, got {config.sigma2!r}")
    fixed_sigma2 = NLL_SIGMA2 if config.sigma2 == "nll" else None
    device = persons.device
    n_items = persons.shape[0]
    dim = module.effect_dim
    n_obs = torch.bincount(persons, minlength=module.persons.n_persons).to(torch.float32)
    n_obs_items = n_obs[persons]  # (n_items,)
    penalised = module.method == "nme"
    sigma2 = fixed_sigma2 if fixed_sigma2 is not None else 1.0
    Sigma = torch.ones(dim, device=device)

    generic = module.generic_parameters()
    dense = (
        torch.optim.AdamW(generic, lr=config.lr, weight_decay=config.weight_decay)
        if generic
        else None
    )
    # Lazy Adam: only the rows present in a batch's sparse gradient are touched.
    sparse = RowAdam([module.persons.weight], lr=config.lr) if dim else None

    bs = config.batch_size
    n_total = n_items  # items on every rank
    step_items: list[int] = []  # distributed: items of step k summed over the ranks
    if comm is not None:
        counts = comm.all_gather_ints(n_items)
        n_total = sum(counts)
        n_steps = max(-(-c // bs) for c in counts)
        step_items = [sum(min(max(c - k * bs, 0), bs) for c in counts) for k in range(n_steps)]
        check_injected_failure(comm, 0)

    gen = torch.Generator()
    if config.seed is not None:
        gen.manual_seed(config.seed + (comm.rank if comm is not None else 0))
    result = TrainResult(sigma2=sigma2, Sigma=Sigma)
    best_val = float("inf")
    best = BestEpoch(config.snapshot_max_bytes, config.snapshot_dir)
    stale = 0
    quiet = 0  # consecutive epochs whose monitored values changed by at most tol
    previous: tuple[float, ...] | None = None
    show = config.verbose and (comm is None or comm.rank == 0)
    epochs = tqdm(range(config.max_epochs), disable=not show, desc="epochs", unit="ep")
    for epoch in epochs:
        t0 = time.perf_counter()
        module.train()
        sigma_inv = (1.0 / Sigma) if penalised else None
        scale = sigma2 if penalised else 1.0
        running, seen = 0.0, 0
        order = _epoch_order(persons, config.batching, gen).to(device)
        if comm is None:
            for start in range(0, n_items, bs):
                idx = order[start : start + bs]
                losses, rows = item_loss(idx)
                loss = nme_batch_loss(losses, rows, n_obs_items[idx], scale, sigma_inv)
                if dense is not None:
                    dense.zero_grad(set_to_none=True)
                if sparse is not None:
                    sparse.zero_grad(set_to_none=True)
                loss.backward()
                if dense is not None:
                    dense.step()
                if sparse is not None and module.persons.weight.grad is not None:
                    sparse.step()
                running += float(losses.detach().sum())
                seen += idx.shape[0]
        else:
            running, seen = _distributed_epoch(
                module, comm, order, item_loss, n_obs_items, step_items, bs, scale,
                sigma_inv, dense, sparse, generic)

        module.eval()
        estep: Posterior | None = None
        if penalised and e_step is not None and dim:
            estep = e_step(sigma2, Sigma)
            if comm is not None:
                estep = _reduce_posterior(estep, comm)
            module.recentre(None if comm is None else comm.mean_row(module.persons.weight))
        with torch.no_grad():
            record: dict = {"epoch": epoch + 1, "max_epochs": config.max_epochs}
            record["train_loss"] = running / max(seen, 1)
            if estep is not None:
                # the E-step evaluated every item at the modes: the exact mean loss
                record["train_loss"] = estep.loss_sum / max(n_total, 1)
            if penalised:
                # σ² is the mean downstream loss over the training set (without an E-step
                # pass: as the epoch visited it, each item once; an exact second pass would
                # add a forward over every item to every epoch for a difference that
                # vanishes as training converges).
                mean = record["train_loss"]
                posterior = None
                if config.m_step == "laplace" and dim and estep is not None:
                    posterior = (estep.mean_variance, estep.excess / max(n_total, 1))
                elif config.m_step == "laplace" and dim:
                    curvature = (
                        squared_grads() if squared_grads is not None
                        else empirical_fisher(module, persons, item_loss, config.eval_batch_size)
                    )
                    if comm is None:
                        posterior = laplace_posterior(curvature, sigma2, Sigma, n_items)
                    else:
                        posterior = _reduced_laplace(curvature, sigma2, Sigma, n_total, comm)
                sigma2, Sigma = m_step(
                    mean, module.persons.weight, Sigma, config.anneal, posterior, fixed_sigma2,
                    fixed_point=estep is not None,
                    spread=None if comm is None else comm.spread(module.persons.weight),
                )
            record["sigma2"] = sigma2
            record["Sigma_mean"] = float(Sigma.mean()) if dim else 0.0
            if validate is not None:
                record.update(validate())
        record["seconds"] = time.perf_counter() - t0
        result.history.append(record)
        if show:
            shown = ("train_loss", "val_loss", "val_metric")
            epochs.set_postfix({k: f"{record[k]:.4g}" for k in shown if k in record})
        if callback is not None:
            callback(record)
        result.n_iter = epoch + 1
        if comm is not None:
            check_injected_failure(comm, epoch + 1)

        current = (record["train_loss"], record["sigma2"], record["Sigma_mean"])
        if previous is not None and config.tol is not None and all(
            abs(a - b) <= config.tol * max(abs(b), 1e-12)
            for a, b in zip(current, previous, strict=True)
        ):
            quiet += 1
        else:
            quiet = 0
        previous = current
        converged = config.tol is not None and quiet >= config.n_iter_no_change
        improved = validate is not None and record["val_loss"] < best_val
        if comm is not None:
            # every rank computed the same reduced values; rank 0's decision is taken anyway,
            # so a last-bit difference can never split the ranks
            decision = comm.agree(int(converged) | (int(improved) << 1))
            converged, improved = bool(decision & 1), bool(decision & 2)

        if validate is None:
            result.best_epoch = epoch + 1
            if converged:
                result.stop_reason = "converged"
                break
            continue
        if improved:
            best_val = record["val_loss"]
            best.save(module, sigma2, Sigma)
            result.best_epoch = epoch + 1
            stale = 0
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                result.stop_reason = "validation"
                break
        if converged:
            result.stop_reason = "converged"
            break

    if best.saved:
        sigma2, Sigma = best.restore(module)
    best.close()
    module.eval()
    if not penalised:
        # Not used by these variants' loss, but reported so they can be compared with NME.
        with torch.no_grad():
            mean = _mean_loss(item_loss, n_items, config.eval_batch_size, device)
            spread = None
            if comm is not None:
                mean = comm.sum_floats(mean * n_items)[0] / max(n_total, 1)
                spread = comm.spread(module.persons.weight)
            sigma2, Sigma = m_step(mean, module.persons.weight, Sigma, None, spread=spread)
    result.sigma2, result.Sigma = sigma2, Sigma
    return result
