"""The sequence part of the evaluation over several seeds, pooled, with transition recovery.

    .venv/bin/python scripts/sequence_study.py run --seeds 0,1,2 --out var/study/now
    .venv/bin/python scripts/sequence_study.py run --out var/study/before \
        --hessian-max-dim 0 --set "sigma2='mean_loss'"
    .venv/bin/python scripts/sequence_study.py summary var/study/now --before var/study/before \
        [--baselines var/study/base]

``run`` evaluates :func:`nme.simulate.simulate_sequences` (60 persons × 10 sequences × 20
segments, as ``scripts/results.py``) with the protocol of :func:`nme.evaluation.
evaluate_sequence_frame` once per seed and keeps each seed's JSON (per-person scores and every
chosen tagger's per-person transition matrices) and the simulation's true matrices.

``summary`` pools the seeds: per placement column the per-person accuracy and α of every
method, the paired person bootstrap of NME against each baseline over the pooled persons
(persons of different seeds are different persons), and for the NME runs that personalise T
the recovery of the simulated transitions: the correlation of recovered and true per-person
probabilities (raw and centred on each run's mean), and the group difference (mean Pⁱ of
control minus depressed persons) cell by cell against the true one — its sign where the true
difference is at least ``--min-diff`` (0.095) and the ratio of magnitudes there.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nme.evaluation import EvalConfig, evaluate_sequence_frame
from nme.metrics import paired_bootstrap
from nme.simulate import SEQUENCE_STATES, TRANSITION_COLUMNS, simulate_sequences

PLACEMENTS = ("T", "last+T", "all+T")
BASELINES = ("generic", "specific", "unme")


def run(args: argparse.Namespace) -> None:
    extra = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        df, truth = simulate_sequences(n_persons=args.persons, n_sequences=10, length=20,
                                       seed=seed)
        df = df.merge(truth[["group"]], left_on="person", right_index=True)
        methods = tuple(args.methods.split(",")) if args.methods else None
        config = EvalConfig(task="sequence", grid=args.grid, n_bootstrap=1000, seed=seed,
                            max_epochs=args.max_epochs, patience=10, progress=False,
                            methods=methods, estimator_params=extra)
        result = evaluate_sequence_frame(
            df, "person", "sequence_id", "label", [c for c in df.columns if c.startswith("f")],
            "position", "group", config, name=f"sequences-{seed}")
        out = result.to_dict()
        out["truth"] = {"persons": truth.index.tolist(), "group": truth["group"].tolist(),
                        "matrices": truth[TRANSITION_COLUMNS].to_numpy().tolist()}
        (args.out / f"seed{seed}.json").write_text(json.dumps(out))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def refit(args: argparse.Namespace) -> None:
    """Refit each seed's chosen NME grid point of ``args.folder`` for the T placements and
    write its per-person transition matrices in both readings (chain and softmax) next to
    it, as ``recovery{seed}.json`` (the protocol is deterministic: the same split and seed)."""
    from nme import evaluation

    extra = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    for path in sorted(args.folder.glob("seed*.json")):
        res = json.loads(path.read_text())
        seed = int(res["config"]["seed"])
        df, truth = simulate_sequences(n_persons=args.persons, n_sequences=10, length=20,
                                       seed=seed)
        df = df.merge(truth[["group"]], left_on="person", right_index=True)
        out: dict = {"truth": res.get("truth") or {
            "persons": truth.index.tolist(), "group": truth["group"].tolist(),
            "matrices": truth[TRANSITION_COLUMNS].to_numpy().tolist()}, "runs": {}}
        for placement in args.placements.split(","):
            key = f"nme/{placement}"
            params = dict(res["runs"][key]["params"])
            params["hidden"] = tuple(params["hidden"])
            evaluation.GRIDS["chosen"] = [params]
            config = EvalConfig(task="sequence", grid="chosen", n_bootstrap=100, seed=seed,
                                max_epochs=args.max_epochs, patience=10, progress=False,
                                methods=("nme",), placements=(placement,),
                                estimator_params=extra)
            captured: dict = {}
            original = evaluation._person_transitions

            def capture(chosen: dict, captured: dict = captured,
                        original: Any = original) -> dict:
                for k, est in chosen.items():
                    ids = list(est.person_ids_)
                    captured[k] = {
                        "states": [str(s) for s in est.states_], "persons": ids,
                        "chain": est.transition_matrices(ids).tolist(),
                        "softmax": est.transition_matrices(ids, reading="softmax").tolist(),
                        "Sigma_T": float(est.Sigma_["transitions"].mean()),
                    }
                return original(chosen)

            evaluation._person_transitions = capture
            try:
                result = evaluate_sequence_frame(
                    df, "person", "sequence_id", "label",
                    [c for c in df.columns if c.startswith("f")], "position", "group",
                    config, name=f"refit-{seed}")
            finally:
                evaluation._person_transitions = original
            run = captured[key]
            run["summary"] = result.runs[key].summary
            out["runs"][key] = run
        (args.folder / f"recovery{seed}.json").write_text(json.dumps(out))
        print(f"refit seed {seed} done", file=sys.stderr, flush=True)


def recovery_summary(folder: Path, min_diff: float) -> None:
    """Print the recovery of the refits of :func:`refit`, pooled over seeds, per reading."""
    files = sorted(folder.glob("recovery*.json"))
    if not files:
        return
    loaded = [json.loads(p.read_text()) for p in files]
    for key in loaded[0]["runs"]:
        for reading in ("softmax", "chain"):
            seeds = [{"truth": r["truth"], "extras": {"person_transitions": {key: {
                "states": r["runs"][key]["states"], "persons": r["runs"][key]["persons"],
                "matrices": r["runs"][key][reading]}}}} for r in loaded]
            rec = _recovery(seeds, key, min_diff)
            assert rec is not None
            sig = np.mean([r["runs"][key]["Sigma_T"] for r in loaded])
            acc = np.mean([r["runs"][key]["summary"]["accuracy"]["mean"] for r in loaded])
            print(f"refit {key} {reading} ({len(loaded)} seeds, Σ_T {sig:.3f}, acc {acc:.3f}): "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in rec.items()))


def _load(folder: Path, baselines: Path | None = None) -> list[dict]:
    """Every seed's result; runs missing from ``folder`` (e.g. the baselines, which do not
    depend on NME's settings) are taken from the same seed in ``baselines``."""
    seeds = []
    for path in sorted(folder.glob("seed*.json")):
        res = json.loads(path.read_text())
        if baselines is not None and (baselines / path.name).exists():
            other = json.loads((baselines / path.name).read_text())
            res["runs"] = {**other["runs"], **res["runs"]}
        seeds.append(res)
    return seeds


def _per_person(seeds: list[dict], key: str, metric: str) -> pd.Series:
    parts = []
    for k, res in enumerate(seeds):
        values = res["runs"][key]["per_person"][metric]  # {person: value}
        parts.append(pd.Series({f"{k}:{p}": v for p, v in values.items()}, dtype=float))
    return pd.concat(parts)


def _recovery(seeds: list[dict], key: str, min_diff: float) -> dict[str, float] | None:
    learned, true, group, rec_diff, true_diff = [], [], [], [], []
    for res in seeds:
        runs = res["extras"].get("person_transitions", {})
        if key not in runs:
            return None
        run = runs[key]
        order = [SEQUENCE_STATES.index(s) for s in run["states"]]
        t = res["truth"]
        index = {p: i for i, p in enumerate(t["persons"])}
        rows = [index[p] for p in run["persons"]]
        tm = np.asarray(t["matrices"]).reshape(-1, 4, 4)[rows][:, order][:, :, order]
        lm = np.asarray(run["matrices"])  # (n, S, S)
        g = np.asarray(t["group"])[rows]
        learned.append(lm - lm.mean(0))
        true.append(tm - tm.mean(0))
        group.append(g)
        rec_diff.append(lm[g == "control"].mean(0) - lm[g == "depressed"].mean(0))
        true_diff.append(tm[g == "control"].mean(0) - tm[g == "depressed"].mean(0))
        learned[-1], true[-1] = (lm, learned[-1]), (tm, true[-1])
    raw_l = np.concatenate([a for a, _ in learned]).ravel()
    raw_t = np.concatenate([a for a, _ in true]).ravel()
    cen_l = np.concatenate([b for _, b in learned]).ravel()
    cen_t = np.concatenate([b for _, b in true]).ravel()
    rd, td = np.stack(rec_diff).ravel(), np.stack(true_diff).ravel()
    big = np.abs(td) >= min_diff
    return {
        "r_raw": float(np.corrcoef(raw_l, raw_t)[0, 1]),
        "r_centred": float(np.corrcoef(cen_l, cen_t)[0, 1]),
        "spread": float(np.concatenate([b for _, b in learned]).std()),
        "true_spread": float(np.concatenate([b for _, b in true]).std()),
        "cells": int(big.sum()),
        "sign_agreement": float((np.sign(rd[big]) == np.sign(td[big])).mean()),
        "magnitude_ratio": float((np.abs(rd[big]) / np.abs(td[big])).mean()),
        "ratio_of_means": float(np.abs(rd[big]).mean() / np.abs(td[big]).mean()),
        "signed_ratio": float((rd[big] / td[big]).mean()),
    }


def summary(args: argparse.Namespace) -> None:
    for label, folder in (("before", args.before), ("now", args.folder)):
        if folder is None:
            continue
        seeds = _load(folder, args.baselines)
        print(f"\n## {label}: {folder} ({len(seeds)} seeds)\n")
        print("| Method | " + " | ".join(f"{p}: Acc. | {p}: α" for p in PLACEMENTS) + " |")
        print("|---|" + "---:|" * (2 * len(PLACEMENTS)))
        for method in (*BASELINES, "nme"):
            cells = []
            for p in PLACEMENTS:
                key = method if method == "generic" else f"{method}/{p}"
                for metric in ("accuracy", "alpha"):
                    value = _per_person(seeds, key, metric)
                    mark = ""
                    if method != "nme":
                        ref = _per_person(seeds, f"nme/{p}", metric)
                        a, b = ref.align(value, join="inner")
                        boot = paired_bootstrap(a.to_numpy(), b.to_numpy(), args.bootstrap)
                        mark = ("†" if boot.low > 0 else "‡" if boot.high < 0 else "")
                        mark += f" ({boot.diff:+.3f} [{boot.low:+.3f}, {boot.high:+.3f}])"
                    cells.append(f"{value.mean():.3f}{mark}")
            print(f"| {method} | " + " | ".join(cells) + " |")
        print("\n† baseline significantly worse than NME in the column, ‡ better; NME "
              "advantage and 95 % interval of the pooled paired person bootstrap.\n")
        recovery_summary(folder, args.min_diff)
        for p in PLACEMENTS:
            rec = _recovery(seeds, f"nme/{p}", args.min_diff)
            if rec is not None:
                print(f"recovery nme/{p}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float)
                                                        else f"{k} {v}" for k, v in rec.items()))
            rec = _recovery(seeds, f"specific/{p}", args.min_diff)
            if rec is not None:
                print(f"recovery specific/{p}: " + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in rec.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", default="0,1,2")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--persons", type=int, default=60)
    r.add_argument("--grid", default="small")
    r.add_argument("--max-epochs", type=int, default=100)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="NME estimator parameter (a Python literal), repeatable")
    r.add_argument("--methods", help="comma-separated subset of generic,specific,unme,nme")
    r.add_argument("--hessian-max-dim", type=int,
                   help="NMESequenceTagger.HESSIAN_MAX_DIM (0: no exact E-step, as before it)")
    f = sub.add_parser("refit")
    f.add_argument("folder", type=Path)
    f.add_argument("--placements", default="T,last+T")
    f.add_argument("--persons", type=int, default=60)
    f.add_argument("--max-epochs", type=int, default=100)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--hessian-max-dim", type=int)
    f.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    s = sub.add_parser("summary")
    s.add_argument("folder", type=Path)
    s.add_argument("--before", type=Path, help="results of the same seeds before a change")
    s.add_argument("--baselines", type=Path,
                   help="results with the runs missing from the folders (same seeds)")
    s.add_argument("--bootstrap", type=int, default=10_000)
    s.add_argument("--min-diff", type=float, default=0.095)
    args = parser.parse_args(argv)
    if args.command in ("run", "refit"):
        torch.set_num_threads(args.threads)
        if args.hessian_max_dim is not None:
            from nme.sequence import NMESequenceTagger

            NMESequenceTagger.HESSIAN_MAX_DIM = args.hessian_max_dim
        run(args) if args.command == "run" else refit(args)
    else:
        summary(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
