"""Person-sharded training on torch.distributed with two gloo ranks (NCCL with two GPUs).

Each launch starts two processes (the elastic launcher, spawn: a few seconds each on a busy
machine), so the module keeps them few and small: two 2-rank fits (the estimator's defaults,
and a procedure whose Σ is exactly the spread of the rows) shared by the tests, one through
``nme fit --nproc 2``, one failing run and one stopped run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from nme import NMERegressor, load_estimator
from nme.cli import main
from nme.data import Standardizer, temporal_split
from nme.distributed import (
    Comm,
    RankFailed,
    current_comm,
    fit_distributed,
    fit_standardizer,
    gather_rows,
    owner_of,
    shard_mask,
    union_labels,
)
from nme.simulate import MOOD_FEATURES, simulate_mood

# the paper's M-step without annealing and θⁱ as the epochs left them: Σ is then exactly the
# sample variance of the (best epoch's) θⁱ rows, which the test recomputes
EXACT_SPREAD = {"hidden": (16,), "m_step": "paper", "anneal": None, "e_step": "sgd",
                "batch_size": 128, "max_epochs": 12, "random_state": 0}
DEFAULTS = {"hidden": (16,), "batch_size": 128, "max_epochs": 12, "random_state": 0}
"""The estimator's own fit procedure (Newton E-step, Laplace M-step), small and short."""
CONFIGS = {"exact_spread": EXACT_SPREAD, "defaults": DEFAULTS}


@pytest.fixture(scope="module")
def mood() -> tuple:
    df, _ = simulate_mood(n_persons=40, n_days=30, seed=5)
    part = temporal_split(df["user"].to_numpy(), (0.6, 0.2, 0.2))
    return df[part == 0], df[part == 1], df[part == 2]


def _fit_args(mood: tuple) -> tuple:
    train, val, _ = mood
    return (train[MOOD_FEATURES], train["mood"], train["user"].tolist(),
            val[MOOD_FEATURES], val["mood"], val["user"].tolist())


def _per_person_rmse(est: NMERegressor, test) -> float:  # type: ignore[no-untyped-def]
    pred = est.predict(test[MOOD_FEATURES], test["user"].tolist())
    sq = test.assign(e=(pred - test["mood"].to_numpy()) ** 2).groupby("user")["e"].mean()
    return float(np.sqrt(sq).mean())


def _fits(mood: tuple, device: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # short fits on purpose
        start = time.perf_counter()
        twos = {name: fit_distributed(NMERegressor(device=device, **params), *_fit_args(mood),
                                      nproc=2)
                for name, params in CONFIGS.items()}
        seconds = time.perf_counter() - start
        ones = {name: NMERegressor(device=device, **params).fit(*_fit_args(mood))
                for name, params in CONFIGS.items()}
    return {"one": ones, "two": twos, "seconds": seconds}


@pytest.fixture(scope="module")
def fits(mood: tuple) -> dict:
    return _fits(mood, "cpu")


def test_owner_is_stable_and_covers_every_person() -> None:
    ids = [f"u{k:04d}" for k in range(200)] + list(range(50))
    owners = owner_of(ids, 2)
    assert set(owners.tolist()) == {0, 1}
    assert owners.tolist() == owner_of(ids, 2).tolist()  # no salted hash
    assert owner_of(["u0001", "u0001"], 3)[0] == owner_of(["u0001"], 3)[0]
    assert shard_mask(ids, None).all()


def _check_two_ranks(fits: dict, mood: tuple) -> None:
    for name in CONFIGS:
        one, two = fits["one"][name], fits["two"][name]
        assert sorted(two.person_ids_) == sorted(one.person_ids_)  # every person, once
        rmse_one, rmse_two = _per_person_rmse(one, mood[2]), _per_person_rmse(two, mood[2])
        assert abs(rmse_two - rmse_one) <= 0.03 * rmse_one, (name, rmse_one, rmse_two)
        assert two.sigma2_ == pytest.approx(one.sigma2_, rel=0.1)
        print(f"{name}: per-person RMSE 1 process {rmse_one:.4f}, 2 ranks {rmse_two:.4f}")
        # every rank took the same decisions and holds the same σ², Σ; each its own persons
        ranks = two.ranks_
        assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
        assert ranks[0]["sigma2"] == ranks[1]["sigma2"] == pytest.approx(two.sigma2_)
        assert ranks[0]["Sigma"] == ranks[1]["Sigma"]
        assert ranks[0]["persons"] + ranks[1]["persons"] == len(two.person_ids_)
        assert min(r["persons"] for r in ranks) > 0
    print(f"both 2-rank fits {fits['seconds']:.1f} s")


def test_reductions_of_one_rank_equal_the_plain_statistics(tmp_path: Path) -> None:
    """The collectives' arithmetic in this process (a gloo group of one rank): the spread,
    mean row, standardiser and gathered rows are what the single-process code computes."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert current_comm() is None  # one rank: the fit takes the single-process path
        comm = Comm(0, 1, torch.device("cpu"))
        table = torch.randn(7, 3)
        n, var = comm.spread(table)
        assert n == 7
        torch.testing.assert_close(var, table.var(0, unbiased=True))
        torch.testing.assert_close(comm.mean_row(table), table.mean(0))
        values = np.random.default_rng(0).normal(3.0, 2.0, (50, 4))
        ours, plain = fit_standardizer(values, comm), Standardizer.fit(values)
        np.testing.assert_allclose(ours.mean, plain.mean, rtol=1e-6)
        np.testing.assert_allclose(ours.std, plain.std, rtol=1e-6)
        gathered = gather_rows(table, comm)
        assert gathered is not None
        torch.testing.assert_close(gathered, table)
        assert union_labels({"b", "a"}, comm) == {"a", "b"}
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_match_one_process(fits: dict, mood: tuple) -> None:
    _check_two_ranks(fits, mood)


def _check_spread(est: NMERegressor) -> None:
    rows = est.effects_matrix().astype(np.float64)  # every rank's θⁱ, gathered on rank 0
    flat = torch.cat([v.reshape(-1) for v in est.Sigma_.values()]).numpy()
    np.testing.assert_allclose(flat, rows.var(axis=0, ddof=1), rtol=1e-4, atol=1e-8)
    # σ² is the best epoch's mean training loss over every rank's items
    record = est.history_[est.best_epoch_ - 1]
    assert est.sigma2_ == pytest.approx(record["train_loss"], rel=1e-6)


def test_sigma_is_the_spread_of_all_ranks_rows(fits: dict) -> None:
    two = fits["two"]["exact_spread"]
    assert two.effects_matrix().shape[0] == len(two.person_ids_) == 40
    _check_spread(two)


def test_cli_nproc_2_writes_one_artifact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    df, _ = simulate_mood(n_persons=30, n_days=20, seed=2)
    data = tmp_path / "mood.csv"
    df.to_csv(data, index=False)
    out = tmp_path / "model"
    code = main(["fit", "--data", str(data), "--person-col", "user", "--target", "mood",
                 "--time-col", "day", "--hidden", "16", "--max-epochs", "4", "--batch-size", "256",
                 "--device", "cpu",
                 "--nproc", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "world size:      2" in printed
    assert "persons:         30" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "mood.csv"]  # one artifact
    est = load_estimator(out)
    assert len(est.person_ids_) == 30
    assert main(["predict", "--model", str(out), "--data", str(data),
                 "--out", str(tmp_path / "preds.csv")]) == 0


def test_nproc_under_torchrun_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    code = main(["fit", "--data", str(tmp_path / "x.csv"), "--person-col", "user", "--target",
                 "mood", "--nproc", "2", "--out", str(tmp_path / "model")])
    assert code == 2
    assert "under torchrun" in capsys.readouterr().err


def test_only_the_complete_estimator_saves(mood: tuple, tmp_path: Path) -> None:
    est = NMERegressor(hidden=(4,), max_epochs=1, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(*_fit_args(mood)[:3])
    est._shard = (1, 2)  # what a rank other than 0 holds after a distributed fit
    with pytest.raises(ValueError, match="only the persons of rank 1"):
        est.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(*_fit_args(mood)[:3])  # a new fit in one process holds every person again
    est.save(tmp_path / "model")


def test_a_failed_rank_fails_the_run(tmp_path: Path, mood: tuple,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NME_FAIL_RANK", "1:1")  # rank 1 raises after its first epoch
    with pytest.raises(RankFailed, match="rank 1 failed.*injected failure") as err:
        fit_distributed(NMERegressor(device="cpu", hidden=(8,), batch_size=256, max_epochs=5),
                        *_fit_args(mood), nproc=2)
    assert err.value.rank == 1


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopping_the_parent_leaves_no_rank(tmp_path: Path) -> None:
    df, _ = simulate_mood(n_persons=30, n_days=20, seed=2)
    data = tmp_path / "mood.csv"
    df.to_csv(data, index=False)
    parent = subprocess.Popen(
        [sys.executable, "-m", "nme.cli", "fit", "--data", str(data), "--person-col", "user",
         "--target", "mood", "--hidden", "8", "--max-epochs", "100000", "--patience", "none",
         "--device", "cpu", "--nproc", "2", "--out", str(tmp_path / "model")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ranks: set[int] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(ranks) < 2:
            ranks = {c for c in _children(parent.pid)
                     if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")}
            time.sleep(0.2)
        assert len(ranks) == 2, "the ranks did not start"
        time.sleep(3)  # inside the fit
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=60)
        assert parent.returncode == 128 + signal.SIGTERM, err
        assert "stopped" in err
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(r) for r in ranks):
            time.sleep(0.1)
        assert not any(_alive(r) for r in ranks), "a rank outlived its parent"
        assert not (tmp_path / "model").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for NCCL")
def test_two_ranks_on_nccl(mood: tuple) -> None:
    fits = _fits(mood, "cuda")
    _check_two_ranks(fits, mood)
    _check_spread(fits["two"]["exact_spread"])
