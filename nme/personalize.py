"""Make chosen parameters of any ``nn.Module`` person-specific: θ = θ̄ + θⁱ[person].

The module's own parameters are θ̄. A :class:`~nme.persons.PersonTable` holds one flattened θⁱ
row per person; the forward gathers the batch's rows, unflattens them into per-sample parameter
tensors and runs the module once over the whole batch, never a Python loop over persons or
samples. Two equivalent paths:

* placed parameters that are the weight/bias of ``nn.Linear`` layers (the MLP placements): the
  module runs once with θ̄ and forward hooks on those layers add the per-sample part,
  ``out_b += ΔW_b x_b + Δb_b``, as one batched matmul — no per-sample copy of θ̄;
* anything else: ``torch.func.vmap`` over samples of ``functional_call`` with θ̄ + θⁱ.

A base module may list parameters it uses *outside* its forward (e.g. CRF transitions) in a
class attribute ``external_parameters``; they are placed like any other but the forward leaves
them to the caller (``layout.split(rows)``).
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.func import functional_call, vmap

from nme.persons import Gathered, PersonTable

METHODS = ("generic", "specific", "unme", "nme")
"""The variants of paper §5.2 that share this machinery (mlp-lme lives in ``nme.lme``)."""

Placement = str | Sequence[str]


@dataclass(frozen=True)
class EffectsLayout:
    """Order and shapes of the parameters inside one flattened θⁱ row."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def dim(self) -> int:
        return sum(self.sizes)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat: (..., dim)`` -> ``{name: (..., *shape)}`` (views, no copy)."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return {
            n: p.reshape(*lead, *s) for n, s, p in zip(self.names, self.shapes, parts, strict=True)
        }

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (*shape)}`` -> ``(dim,)`` in layout order."""
        if not self.names:
            return torch.zeros(0)
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def to_json(self) -> list[dict]:
        return [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes, strict=True)]

    @classmethod
    def from_json(cls, items: list[dict]) -> EffectsLayout:
        return cls(tuple(i["name"] for i in items), tuple(tuple(i["shape"]) for i in items))


def resolve_placement(module: nn.Module, placement: Placement) -> list[str]:
    """Names of the parameters of ``module`` that become person-specific.

    Args:
        placement: ``"last"`` (weight and bias of the last ``nn.Linear`` in module order),
            ``"all"`` (every parameter), ``"none"``, or a list of patterns; each pattern matches a
            parameter's exact name, a dotted suffix of it (``"0.weight"`` matches
            ``"layers.0.weight"``) or, failing both, a full-match regular expression.

    Raises:
        ValueError: if the placement is unknown or a pattern matches no parameter.
    """
    names = [n for n, _ in module.named_parameters()]
    if isinstance(placement, str):
        if placement == "all":
            return names
        if placement == "none":
            return []
        if placement == "last":
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("placement='last' needs an nn.Linear in the module; none found")
            prefix = f"{linears[-1]}." if linears[-1] else ""
            return [n for n in names if n in (f"{prefix}weight", f"{prefix}bias")]
        placement = [placement]
    chosen: list[str] = []
    unmatched: list[str] = []
    for pattern in placement:
        hits = [n for n in names if n == pattern or n.endswith(f".{pattern}")]
        if not hits:
            try:
                rx = re.compile(pattern)
            except re.error:
                rx = None
            hits = [n for n in names if rx is not None and rx.fullmatch(n)]
        if not hits:
            unmatched.append(pattern)
        chosen.extend(h for h in hits if h not in chosen)
    if unmatched:
        raise ValueError(
            f"placement patterns {unmatched} match no parameter; parameters are {names}"
        )
    # Keep the module's own order so the flattened layout is canonical.
    return [n for n in names if n in chosen]


_Active = tuple[dict[str, torch.Tensor], torch.Tensor | None, tuple[torch.Tensor, int] | None]
"""What the linear hooks read during a forward: θⁱ split per parameter ``{name: (u, *shape)}``,
the item → person index ``(batch,)`` (None: one row per item), and the grouping of
:func:`_groups`."""


def _groups(g: Gathered, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(slot (batch,), largest group)``: each item's position among its person's items.

    Only worth it when the batch holds few persons with many items each (e.g. person batches);
    with about one item per person the per-item path is cheaper.
    """
    inverse = g.inverse
    if inverse is None or x.dim() != 2 or g.unique.shape[0] * 4 > x.shape[0]:
        return None
    counts = torch.bincount(inverse, minlength=g.unique.shape[0])  # (u,)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(inverse)
    slot[order] = torch.arange(inverse.shape[0], device=inverse.device) - starts[inverse[order]]
    return slot, int(counts.max())


class PersonalizedModule(nn.Module):
    """Wraps ``base`` so that the ``placement`` parameters are θ̄ + θⁱ[person].

    Args:
        base: any module mapping ``x: (batch, ...)`` to ``(batch, ...)``; its parameters are θ̄.
        placement: see :func:`resolve_placement`.
        n_persons: rows of the person table.
        method: ``"generic"`` (no θⁱ at all), ``"specific"`` (θⁱ only: the placed θ̄ are frozen
            at zero and every person's row starts from the base's initial values), ``"unme"`` or
            ``"nme"`` (θ̄ + θⁱ with θⁱ starting at zero, the prior mean).
    """

    def __init__(
        self, base: nn.Module, placement: Placement, n_persons: int, method: str = "nme"
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.base = base
        self.method = method
        names = [] if method == "generic" else resolve_placement(base, placement)
        params = dict(base.named_parameters())
        self.layout = EffectsLayout(tuple(names), tuple(tuple(params[n].shape) for n in names))
        self.persons = PersonTable(n_persons, self.layout.dim)
        self._hooked = self._install_linear_hooks(names)
        # per-thread: the service may run forwards of one model from several threads
        self._active = threading.local()
        if method == "specific" and names:
            with torch.no_grad():
                init = self.layout.flatten({n: params[n].detach() for n in names})
                self.persons.weight.copy_(init.expand(n_persons, -1))
                for n in names:
                    params[n].zero_()
                    params[n].requires_grad_(False)

    def _install_linear_hooks(self, names: list[str]) -> bool:
        """Use the hook path when every placed, non-external parameter belongs to nn.Linear."""
        external = set(getattr(self.base, "external_parameters", ()))
        linears = {n: m for n, m in self.base.named_modules() if isinstance(m, nn.Linear)}
        owners: set[str] = set()
        for name in names:
            if name in external:
                continue
            owner, _, leaf = name.rpartition(".")
            if owner not in linears or leaf not in ("weight", "bias"):
                return False
            owners.add(owner)
        for owner in owners:
            linears[owner].register_forward_hook(_WeakLinearHook(self, owner))
        return True

    def _linear_hook(
        self, owner: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        active: _Active | None = getattr(self._active, "deltas", None)
        if active is None:  # the base module called on its own: θ̄ only
            return None
        deltas, inverse, groups = active  # {name: (u, *shape)}, (batch,) or None
        prefix = f"{owner}." if owner else ""
        x = inputs[0]  # (batch, ..., in)
        b = x.shape[0]
        weight = deltas.get(f"{prefix}weight")  # (u, out, in)
        if weight is not None and groups is not None and x.dim() == 2:
            # few persons, many rows each: one real matmul per person over their rows, so
            # θⁱ is never copied per sample
            slot, size = groups
            padded = x.new_zeros(weight.shape[0], size, x.shape[-1])
            padded = padded.index_put((inverse, slot), x)  # (u, rows, in)
            per_person = torch.bmm(padded, weight.transpose(1, 2))  # (u, rows, out)
            output = output + per_person[inverse, slot]  # (batch, out)
        elif weight is not None:
            if inverse is not None:
                weight = weight[inverse]  # (batch, out, in)
            if x.dim() == 2:
                # one input row per sample: a broadcast multiply-and-sum is 2–4× faster than
                # a batch of tiny matrix-vector products (bmm), forward and backward
                output = output + (weight * x.unsqueeze(1)).sum(-1)  # (batch, out)
            else:
                flat = x.reshape(b, -1, x.shape[-1])  # (batch, m, in)
                output = output + torch.bmm(flat, weight.transpose(1, 2)).reshape(output.shape)
        bias = deltas.get(f"{prefix}bias")  # (u, out)
        if bias is not None:
            if inverse is not None:
                bias = bias[inverse]  # (batch, out)
            output = output + bias.reshape(b, *([1] * (output.dim() - 2)), bias.shape[-1])
        return output

    def __getstate__(self) -> dict:
        # the per-thread forward state cannot be pickled (and is empty between forwards)
        state = self.__dict__.copy()
        state.pop("_active", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._active = threading.local()

    @property
    def effect_dim(self) -> int:
        return self.layout.dim

    @torch.no_grad()
    def recentre(self, mean: torch.Tensor | None = None) -> torch.Tensor:
        """Move the mean θⁱ across persons into θ̄: θ̄ += m, θⁱ −= m for every person.

        Every θ̄ + θⁱ, hence every prediction, is unchanged, and Σᵢ θⁱᵀΣ⁻¹θⁱ can only shrink
        (the mean minimises it), so the NME objective does not increase. At its optimum the
        mean is zero anyway (the θ̄-gradient of the data term is −2Σ⁻¹ Σᵢ θⁱ there); moving it
        at once saves the many small Adam steps θ̄ would need to absorb it.

        Args:
            mean: ``(dim,)`` the mean to move, when the table holds only some of the persons
                (a rank of a distributed fit: the mean over every rank's rows); default the
                table's own mean.

        Returns:
            ``(dim,)`` the mean that moved (zeros without persons or placed parameters).
        """
        table = self.persons.weight
        if self.layout.dim == 0 or (mean is None and table.shape[0] == 0):
            return table.new_zeros(self.layout.dim)
        if mean is None:
            mean = table.mean(dim=0)  # (dim,)
        params = dict(self.base.named_parameters())
        for name, delta in self.layout.split(mean).items():
            params[name].add_(delta)
        table.sub_(mean)
        return mean

    def generic_parameters(self) -> list[nn.Parameter]:
        """The trainable θ̄ (everything but the person table)."""
        return [p for p in self.base.parameters() if p.requires_grad]

    def forward(
        self,
        x: torch.Tensor,
        persons: torch.Tensor | None = None,
        effects: torch.Tensor | None = None,
        gathered: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | Gathered]:
        """Run the module with per-sample parameters.

        Args:
            x: ``(batch, ...)`` inputs of ``base``.
            persons: ``(batch,) long`` person indices (-1 = unknown → θⁱ = 0).
            effects: optional ``(batch, dim)`` θⁱ rows to use instead of the table's (serving
                passes rows fetched from the database).

        Returns:
            ``(output, rows)``: the module's output ``(batch, ...)`` and the θⁱ rows used,
            ``(batch, dim)`` (for the penalty of the NME objective) — or, with
            ``gathered=True``, the same rows as a :class:`~nme.persons.Gathered` (one row per
            distinct person), which makes the penalty cost O(persons in the batch).
        """
        if effects is not None:
            g = Gathered(effects, None)
        elif persons is not None:
            g = self.persons.gather(persons)
        else:
            raise ValueError("pass persons (indices into the table) or effects (θⁱ rows)")
        ret = g if gathered else None
        if self.layout.dim == 0:
            return self.base(x), (ret or g.per_item())
        if self._hooked:
            groups = _groups(g, x)
            if groups is None and g.inverse is not None:
                # one gather of whole rows instead of one per placed tensor in the hooks
                deltas = self.layout.split(g.per_item())  # {name: (batch, *shape)}
                self._active.deltas = (deltas, None, None)
            else:
                self._active.deltas = (self.layout.split(g.unique), g.inverse, groups)
            try:
                out = self.base(x)
            finally:
                self._active.deltas = None
            return out, (ret or g.per_item())
        rows = g.per_item()  # (batch, dim)
        base_params = {n: p for n, p in self.base.named_parameters() if n in self.layout.names}
        deltas = self.layout.split(rows)  # {name: (batch, *shape)}

        def one(delta: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            params = {n: base_params[n] + d for n, d in delta.items()}
            return functional_call(self.base, params, (xi.unsqueeze(0),)).squeeze(0)

        out = vmap(one, randomness="different")(deltas, x)
        return out, (ret or rows)

    def squared_output_grads(
        self, x: torch.Tensor, persons: torch.Tensor, chunk: int = 4096
    ) -> torch.Tensor:
        """Per person, Σⱼ (∂f(Xⁱⱼ)/∂θⁱ)² for a module with one scalar output per sample.

        Args:
            x: ``(n, ...)`` inputs; persons: ``(n,) long`` their (known) persons.

        Returns:
            ``(n_persons, dim)`` accumulated squared per-sample gradients (the diagonal of the
            Gauss–Newton matrix of a squared-error loss, up to the factor 2).
        """
        base_params = {n: p.detach() for n, p in self.base.named_parameters()
                       if n in self.layout.names}
        layout = self.layout

        def f(row: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
            params = {n: base_params[n] + d for n, d in layout.split(row).items()}
            return functional_call(self.base, params, (xi.unsqueeze(0),)).reshape(())

        per_sample = vmap(torch.func.grad(f))
        table = self.persons.weight.detach()
        out = torch.zeros_like(table)  # (n_persons, dim)
        for s in range(0, x.shape[0], chunk):
            p = persons[s : s + chunk]
            g = per_sample(table[p], x[s : s + chunk])  # (b, dim)
            out.index_add_(0, p, g * g)
        return out


class _WeakLinearHook:
    """A forward hook that reaches its :class:`PersonalizedModule` through a weak reference.

    The hooked ``nn.Linear`` lives inside the personalised module; a hook holding the module
    itself (a bound method) would close a reference cycle, so a dropped model would wait for the
    cyclic garbage collector — and never be freed once ``gc.freeze()`` moved it out of reach
    (a serving process replacing its model would leak every old network).
    """

    def __init__(self, target: PersonalizedModule, owner: str) -> None:
        self._target = weakref.ref(target)
        self._owner = owner

    def __reduce__(self) -> tuple:
        # pickled (and deep-copied) as its target and owner: the weak reference is rebuilt
        return (_WeakLinearHook, (self._target(), self._owner))

    def __call__(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        target = self._target()
        if target is None:
            return None
        return target._linear_hook(self._owner, module, inputs, output)

