"""Person-sharded training on ``torch.distributed``: one fit across processes and machines.

Every rank (process) owns a disjoint set of persons — their items, θⁱ rows and the lazy-Adam
moments of those rows — chosen by :func:`owner_of`, a stable hash of the person id modulo the
world size, so any process can tell who owns a person without asking anyone. θ̄ is replicated:
it starts from the same values on every rank (broadcast from rank 0) and its gradients are
summed over the ranks with one ``all_reduce`` per optimiser step, so every rank takes the same
AdamW step. Everything the fit decides on is reduced over the ranks the same way: the
normalisation statistics, the classes or states, the M-step's sums (σ², Σ), the mean θⁱ moved
into θ̄, the validation loss and metric, hence early stopping and the convergence test.
Ranks with fewer items take zero-loss steps (their θ̄ gradient is zero but they join the
``all_reduce``), so every rank takes the same number of steps per epoch. θⁱ never cross ranks
during training; at the end they are gathered on rank 0, which holds the complete estimator
and is the only rank that may save it.

The estimators' ``fit`` does this by itself inside an initialised process group, or in a
process started by ``torchrun`` (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` set; the group is then initialised here: NCCL when the
estimator trains on CUDA, gloo otherwise). Each rank may pass all rows or only its own
persons' rows (:func:`shard_mask`): rows of persons another rank owns are dropped. With one
process nothing here runs and the fit is exactly the single-process one.

:func:`launch` starts ``nproc`` local ranks through torch's elastic launcher (what
``torchrun`` uses): a failed rank fails the whole run (:class:`RankFailed` names it), and a
parent stopped by SIGTERM/SIGINT stops its ranks. :func:`fit_distributed` fits an estimator
that way and returns rank 0's complete estimator.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import uuid
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nme.data import Standardizer, as_id_list

FAIL_RANK_ENV = "NME_FAIL_RANK"
"""Test hook: ``NME_FAIL_RANK=r`` makes rank r raise as soon as its fit starts;
``NME_FAIL_RANK=r:e`` after its e-th epoch (while the other ranks wait in a collective)."""

TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables ``torchrun`` and the elastic launcher set in every rank."""


class RankFailed(RuntimeError):
    """A rank of a distributed run failed; ``rank`` is the first one that did (the root
    cause) and ``message`` its error."""

    def __init__(self, rank: int, message: str, exitcode: int | None = None) -> None:
        self.rank, self.message, self.exitcode = rank, message, exitcode
        super().__init__(f"rank {rank} failed: {message}")


@dataclass(frozen=True)
class Comm:
    """The collectives the fit needs, over the default process group.

    Attributes:
        rank: this process's global rank; world_size: the number of ranks.
        device: where tensors must be for the backend's collectives (CUDA for NCCL, else CPU).
    """

    rank: int
    world_size: int
    device: torch.device

    # ----------------------------------------------------------------- reductions
    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor: ``tensor`` summed over the ranks (any shape, same on every rank)."""
        buf = tensor.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def sum_floats(self, *values: float) -> list[float]:
        """Scalars summed over the ranks in float64 (one collective for all of them)."""
        return self.all_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def max_int(self, value: int) -> int:
        buf = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return int(buf.item())

    def all_gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order."""
        out = [torch.zeros(1, dtype=torch.int64, device=self.device)
               for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([int(value)], dtype=torch.int64, device=self.device))
        return [int(t.item()) for t in out]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (person ids, class labels)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s values."""
        buf = tensor.detach().to(self.device, copy=True).contiguous()
        dist.broadcast(buf, src=src)
        with torch.no_grad():
            tensor.copy_(buf.to(tensor.device))
        return tensor

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank: decisions (stop, keep the epoch) taken once."""
        buf = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.broadcast(buf, src=0)
        return int(buf.item())

    # ----------------------------------------------------------------- training
    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the dense gradients of replicated parameters over the ranks, in place, with one
        flat ``all_reduce``; a parameter without a gradient (a rank without items in this
        step) contributes zeros and receives the sum."""
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.all_sum(torch.cat([g.reshape(-1) for g in grads]))  # (Σ numel,)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)  # views of one buffer
            offset += n

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Every parameter and buffer of ``module`` set to rank 0's (replicated θ̄)."""
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                self.broadcast_(t)

    def spread(self, table: torch.Tensor) -> tuple[int, torch.Tensor]:
        """``table: (P_r, d)`` this rank's θⁱ -> ``(P, var (d,))``: the number of persons on all
        ranks and the sample variance (ddof 1) of their rows, in two passes (mean first) in
        float64, as ``torch.var`` over the concatenated tables would give."""
        t = table.detach().to(torch.float64)
        sums = self.all_sum(torch.cat([t.sum(0), t.new_tensor([t.shape[0]])]))  # (d + 1,)
        n = int(sums[-1].item())
        mean = sums[:-1] / max(n, 1)
        squares = self.all_sum(((t - mean) ** 2).sum(0))  # (d,)
        return n, (squares / max(n - 1, 1)).to(table.dtype)

    def mean_row(self, table: torch.Tensor) -> torch.Tensor:
        """``(d,)`` the mean θⁱ row over every rank's persons (zeros without persons)."""
        t = table.detach().to(torch.float64)
        sums = self.all_sum(torch.cat([t.sum(0), t.new_tensor([t.shape[0]])]))
        return (sums[:-1] / max(float(sums[-1]), 1.0)).to(table.dtype)


_comm: Comm | None = None


def _backend_device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True in a rank started by ``torchrun`` / the elastic launcher with more than one rank."""
    return all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def current_comm(device: torch.device | None = None) -> Comm | None:
    """The collectives of this process's distributed fit, or None when it runs alone.

    Uses an initialised default process group with more than one rank; otherwise, under
    ``torchrun`` (see :func:`launched_by_torchrun`), initialises one: NCCL when ``device`` is
    CUDA, gloo otherwise. None for a single process (the fit then has no distributed code
    path at all).
    """
    global _comm
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return None
        cuda = device is not None and device.type == "cuda"
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_device(device))  # type: ignore[arg-type]
        dist.init_process_group(backend=backend)
    if dist.get_world_size() < 2:
        return None
    if _comm is None or _comm.world_size != dist.get_world_size():
        _comm = Comm(dist.get_rank(), dist.get_world_size(),
                     _backend_device(str(dist.get_backend())))
    return _comm


# ----------------------------------------------------------------- sharding
def _id_key(person: Hashable) -> bytes:
    """Bytes a person id hashes by: the same for an id on every rank and machine."""
    if isinstance(person, (int, np.integer)) and not isinstance(person, bool):
        return b"i:" + str(int(person)).encode()
    return b"s:" + str(person).encode()


def owner_of(persons: Sequence[Hashable] | np.ndarray, world_size: int) -> np.ndarray:
    """``(n,) int64`` the rank that owns each person: crc32 of the id modulo ``world_size``.

    Stable across processes, machines and runs (unlike Python's salted ``hash``), so a rank
    can read only its own persons' rows. Hashes each distinct id once.
    """
    ids = as_id_list(persons)
    owners: dict[Hashable, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for k, p in enumerate(ids):
        r = owners.get(p)
        if r is None:
            r = owners[p] = zlib.crc32(_id_key(p)) % world_size
        out[k] = r
    return out


def shard_mask(persons: Sequence[Hashable] | np.ndarray, comm: Comm | None) -> np.ndarray:
    """``(n,) bool`` the rows whose person this rank owns (all rows without ``comm``)."""
    if comm is None:
        return np.ones(len(as_id_list(persons)), dtype=bool)
    return owner_of(persons, comm.world_size) == comm.rank


def fit_standardizer(values: np.ndarray, comm: Comm | None) -> Standardizer:
    """:meth:`Standardizer.fit` over the rows of every rank (``values: (n_r, F)`` or
    ``(n_r,)`` this rank's), two passes in float64."""
    if comm is None:
        return Standardizer.fit(values)
    v = np.asarray(values, dtype=np.float64)
    width = v.shape[1:]
    flat = v.reshape(v.shape[0], -1)
    sums = comm.all_sum(torch.from_numpy(np.concatenate([flat.sum(0), [flat.shape[0]]])))
    n = max(float(sums[-1]), 1.0)
    mean = sums[:-1].numpy() / n
    squares = comm.all_sum(torch.from_numpy(((flat - mean) ** 2).sum(0))).numpy()
    std = np.sqrt(squares / n)
    std = np.where(std > 0, std, 1.0)
    return Standardizer(mean.reshape(width).astype(np.float32),
                        std.reshape(width).astype(np.float32))


def union_labels(labels: set, comm: Comm | None) -> set:
    """The labels seen on any rank (classes, states)."""
    if comm is None:
        return labels
    out: set = set()
    for part in comm.all_gather_objects(sorted(labels, key=lambda c: (str(type(c)), c))):
        out.update(part)
    return out


def gather_rows(tensor: torch.Tensor, comm: Comm) -> torch.Tensor | None:
    """``(P_r, *shape)`` on every rank -> ``(Σ P_r, *shape)`` on rank 0 in rank order (None
    elsewhere): rows padded to the largest rank's and ``dist.gather``-ed."""
    counts = comm.all_gather_ints(tensor.shape[0])
    rows = max(counts)
    padded = tensor.new_zeros(rows, *tensor.shape[1:], device=comm.device)
    padded[: tensor.shape[0]] = tensor.detach().to(comm.device)
    parts = ([torch.zeros_like(padded) for _ in range(comm.world_size)]
             if comm.rank == 0 else None)
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(tensor.device)


def check_injected_failure(comm: Comm | None, epoch: int) -> None:
    """The failure hook of the tests (:data:`FAIL_RANK_ENV`); ``epoch`` 0 is the fit's start."""
    spec = os.environ.get(FAIL_RANK_ENV)
    if comm is None or not spec:
        return
    rank, _, at = spec.partition(":")
    if int(rank) == comm.rank and int(at or 0) == epoch:
        raise RuntimeError(f"injected failure in rank {comm.rank} at epoch {epoch} "
                           f"({FAIL_RANK_ENV}={spec})")


# ----------------------------------------------------------------- launching
def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the launcher) dies, even by SIGKILL,
    so no rank outlives a killed launcher."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # no libc: the launcher's own shutdown still stops the ranks
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the launcher died before the signal was armed


def _rank_entry(fn: Callable[..., Any], args: tuple) -> Any:
    """What every launched rank runs: a process group over the launcher's rendezvous, then
    ``fn(*args)``; the group is destroyed afterwards."""
    _die_with_parent()
    if "OMP_NUM_THREADS" not in os.environ:
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        return fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], args: tuple, nproc: int, log_dir: str | None = None
           ) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local ranks started by torch's elastic launcher.

    ``fn`` must be importable (a module-level function); inside it, :func:`current_comm`
    joins the process group. A c10d rendezvous on a free local port connects the ranks.

    Returns:
        ``{rank: fn's return value}``.

    Raises:
        RankFailed: a rank raised or died; names the first one (the launcher stops the rest).
        torch.distributed.elastic.multiprocessing.api.SignalException: the parent got
            SIGTERM/SIGINT/SIGHUP/SIGQUIT; the ranks have been stopped.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
    )
    try:
        return elastic_launch(config, _rank_entry)(fn, args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", str(message))
        if not os.path.isfile(failure.error_file) or not str(message).strip():
            # no error file: died before its function ran (import error), or by a signal
            died = (f"killed by {failure.signal_name()}" if failure.exitcode < 0
                    else f"exit code {failure.exitcode}")
            message = f"{died}; its traceback, if any, is in the output above"
        raise RankFailed(rank, str(message).strip(), failure.exitcode) from None


def _fit_rank(estimator: Any, fit_args: tuple, fit_kwargs: dict, out: str) -> dict[str, Any]:
    """One rank of :func:`fit_distributed`: fit (the estimator finds the process group);
    rank 0 saves the complete estimator to ``out``. Returns what this rank holds."""
    from nme.base import resolve_device

    comm = current_comm(resolve_device(estimator.device))
    estimator.fit(*fit_args, **fit_kwargs)
    rank = 0 if comm is None else comm.rank
    own = getattr(estimator, "_n_persons_local", len(estimator.person_ids_))
    if rank == 0:
        estimator.save(out)
    return {"rank": rank, "world_size": 1 if comm is None else comm.world_size,
            "persons": own, "sigma2": estimator.sigma2_,
            "Sigma": estimator._Sigma_flat.detach().cpu().tolist()}


def fit_distributed(estimator: Any, *fit_args: Any, nproc: int = 2, **fit_kwargs: Any) -> Any:
    """Fit ``estimator`` with ``nproc`` local ranks; returns rank 0's complete fitted copy.

    ``estimator.fit(*fit_args, **fit_kwargs)`` runs in every rank (each keeps its own persons'
    rows, see :func:`shard_mask`); rank 0 saves the artifact to a temporary directory, which
    is loaded here. The returned estimator's ``ranks_`` lists, per rank, the persons it
    trained and its σ² and Σ (the same on every rank). ``nproc=1`` fits in this process. The
    estimator passed in is not changed.

    Raises:
        RankFailed: a rank failed (the others were stopped).
    """
    from sklearn.base import clone

    from nme.base import load_estimator

    if nproc == 1:
        return clone(estimator).fit(*fit_args, **fit_kwargs)
    with tempfile.TemporaryDirectory(prefix="nme-fit-") as tmp:
        out = os.path.join(tmp, "model")
        ranks = launch(_fit_rank, (estimator, fit_args, fit_kwargs, out), nproc)
        fitted = load_estimator(out, device=str(estimator.device))
    fitted.ranks_ = [ranks[r] for r in sorted(ranks)]
    return fitted
