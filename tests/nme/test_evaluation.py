"""The evaluation protocol and ``nme evaluate`` end to end on a small simulated set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nme.cli import main
from nme.evaluation import EvalConfig, evaluate_frame, split_frame
from nme.simulate import MOOD_FEATURES, simulate_mood

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_split_is_temporal_within_person_and_drops_short_persons() -> None:
    df, _ = simulate_mood(n_persons=6, n_days=50, seed=1)
    # person u0001 keeps only 20 days: 4 test rows, fewer than min_test=10
    df = df[(df["user"] != "u0001") | (df["day"] < df["day"].min() + pd.Timedelta(days=20))]
    shuffled = df.sample(frac=1.0, random_state=0)  # the time column restores the order
    s = split_frame(shuffled, "user", "day", (0.6, 0.2, 0.2), min_test=10)
    assert s.dropped == ["u0001"]
    for part in (s.train, s.val, s.test):
        assert "u0001" not in set(part["user"])
    for user in set(s.test["user"]):
        tr, va, te = (p.loc[p["user"] == user, "day"] for p in (s.train, s.val, s.test))
        assert (len(tr), len(va), len(te)) == (30, 10, 10)
        assert tr.max() < va.min() and va.max() < te.min()
    with pytest.raises(ValueError, match="lower min_test"):
        split_frame(df, "user", "day", min_test=100)


def test_config_rejects_bad_choices() -> None:
    with pytest.raises(ValueError, match="methods"):
        EvalConfig(methods=("nme", "lasso"))
    with pytest.raises(ValueError, match="mlp-lme"):
        EvalConfig(task="classification", methods=("nme", "mlp-lme"))
    assert "mlp-lme" not in EvalConfig(task="classification").methods
    assert EvalConfig(task="sequence").placements == ("T", "last+T", "all+T")
    with pytest.raises(ValueError, match="placements"):
        EvalConfig(placements=("T",))
    with pytest.raises(ValueError, match="grid"):
        EvalConfig(grid="huge")


def test_classification_protocol_reports_accuracy_and_alpha() -> None:
    df, _ = simulate_mood(n_persons=12, n_days=50, seed=2)
    df = df.assign(good=np.where(df["mood"] > df["mood"].median(), "good", "bad"))
    config = EvalConfig(task="classification", methods=("generic", "nme"), placements=("last",),
                        grid="none", max_epochs=2, n_bootstrap=200, progress=False)
    result = evaluate_frame(df, "user", "good", MOOD_FEATURES, "day", config)
    assert result.metrics == ["accuracy", "alpha"]
    nme = result.run("nme", "last")
    assert nme is not None and len(nme.per_person) == 12
    acc = nme.per_person["accuracy"]
    assert ((acc >= 0) & (acc <= 1)).all()
    alpha = nme.per_person["alpha"].dropna()
    assert ((alpha >= -1) & (alpha <= 1)).all()
    assert {c.metric for c in result.comparisons} == {"accuracy", "alpha"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``nme simulate`` then ``nme evaluate`` with every method, tiny budgets."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "mood.csv"
    assert main(["simulate", "mood", "--persons", "16", "--days", "55", "--seed", "4",
                 "--out", str(data)]) == 0
    out = root / "report"
    argv = ["evaluate", "--data", str(data), "--person-col", "user", "--target", "mood",
            "--time-col", "day", "--grid", "none", "--max-epochs", "3", "--bootstrap", "500",
            "--batch-size", "128", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_evaluate_writes_table_json_and_plots(evaluated: Path) -> None:
    md = (evaluated / "results.md").read_text()
    assert "| Method | last: NRMSE | last: CCC | last: r | all: NRMSE |" in md
    for label in ("Generic", "Specific", "UNME", "NME", "MLP-LME"):
        assert f"\n| {label} |" in md
    assert md.count("**") >= 2 * 6  # a best value in every column
    table_rows = [line for line in md.splitlines() if line.startswith("| MLP-LME |")]
    assert table_rows[0].rstrip(" |").endswith("–")  # no "all" placement for MLP-LME
    for png in ("bias_vs_baseline.png", "per_person_nrmse.png"):
        blob = (evaluated / png).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000
        assert f"]({png})" in md


def test_evaluate_json_holds_every_number(evaluated: Path) -> None:
    doc = json.loads((evaluated / "results.json").read_text())
    assert doc["data"]["persons"] == 16 and doc["data"]["rows"]["test"] == 16 * 11
    assert set(doc["runs"]) == {"generic", "specific/last", "specific/all", "unme/last",
                                "unme/all", "nme/last", "nme/all", "mlp-lme/last"}
    for run in doc["runs"].values():
        per_person = run["per_person"]
        assert set(per_person) == {"nrmse", "ccc", "pearson", "n"}
        assert len(per_person["nrmse"]) == 16
        mean = np.mean([v for v in per_person["nrmse"].values() if v is not None])
        assert run["summary"]["nrmse"]["mean"] == pytest.approx(mean)
    # 4 baselines under "last" (generic, specific, unme, mlp-lme) + 3 under "all", 3 metrics
    assert len(doc["comparisons"]) == (4 + 3) * 3
    for c in doc["comparisons"]:
        boot = c["nme_minus_baseline_oriented"]
        assert boot["low"] <= boot["diff"] <= boot["high"]
        assert boot["n_resamples"] == 500
        assert c["baseline_significantly_worse"] == (boot["low"] > 0)
    bias = doc["runs"]["nme/last"]["bias"]
    assert set(bias) == set(doc["training_baseline"]) and len(bias) == 16


def test_evaluate_reports_a_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture
                                           ) -> None:
    data = tmp_path / "d.csv"
    pd.DataFrame({"user": ["a", "b"], "x": [1.0, 2.0]}).to_csv(data, index=False)
    code = main(["evaluate", "--data", str(data), "--person-col", "user", "--target", "mood",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no column 'mood'" in capsys.readouterr().err


def test_evaluate_sequences_reports_transitions(tmp_path: Path) -> None:
    """``--task sequence``: T placements, accuracy/α per person, group transition plot."""
    from nme.simulate import simulate_sequences

    data, truth = simulate_sequences(n_persons=10, n_sequences=5, length=12, seed=0)
    data = data.merge(truth[["group"]], left_on="person", right_index=True)
    csv = tmp_path / "seq.csv"
    data.to_csv(csv, index=False)
    out = tmp_path / "report"
    argv = ["evaluate", "--data", str(csv), "--person-col", "person", "--target", "label",
            "--task", "sequence", "--sequence-col", "sequence_id", "--position-col",
            "position", "--group-col", "group", "--methods", "generic,nme", "--grid", "none",
            "--max-epochs", "2", "--bootstrap", "200", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["runs"]) == {"generic", "nme/T", "nme/last+T", "nme/all+T"}
    assert doc["data"]["sequences"]["test"] == 10  # one of each person's 5 sequences
    trans = doc["extras"]["transitions"]
    assert trans["run"] == "nme/last+T" and set(trans["groups"]) == {"control", "depressed"}
    mats = np.asarray(trans["groups"]["control"])
    np.testing.assert_allclose(mats.sum(axis=1), 1.0, atol=1e-6)
    assert (out / "transitions.png").read_bytes().startswith(PNG_MAGIC)
    assert "| Method | T: Acc. | T: α | last+T: Acc." in (out / "results.md").read_text()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_prediction_shift_is_in_label_units_for_nme_and_mlp_lme() -> None:
    """Figure 4's quantity: a person 40 label units above the rest is shifted by about that
    much by NME and by MLP-LME alike. (MLP-LME's random intercept alone, the old Figure 4
    value, says 20 here: its weight effects on 32 ReLU units carry the rest of the shift.)"""
    from nme.estimators import NMERegressor
    from nme.evaluation import prediction_shift
    from nme.lme import MLPLMERegressor

    rng = np.random.default_rng(0)
    n_persons, n_rows = 16, 24
    offsets = rng.normal(0.0, 5.0, n_persons)
    offsets[0] = 40.0  # person p00: a large known baseline shift, in label units
    persons = np.repeat([f"p{i:02d}" for i in range(n_persons)], n_rows)
    X = pd.DataFrame(rng.normal(size=(n_persons * n_rows, 2)), columns=["a", "b"])
    y = 50.0 + 3.0 * X["a"].to_numpy() + np.repeat(offsets, n_rows) + rng.normal(
        0.0, 1.0, n_persons * n_rows)
    # the unknown-person prediction sits at the persons' mean offset
    expected = offsets[0] - offsets.mean()
    nme = NMERegressor(hidden=(32,), lr=1e-2, max_epochs=60, random_state=0).fit(X, y, persons)
    lme = MLPLMERegressor(hidden=(32,), lr=1e-2, max_iter=60, batch_size="auto",
                          random_state=0).fit(X, y, persons)
    for est in (nme, lme):
        shift = prediction_shift(est, X, persons, "regression")
        assert shift is not None and len(shift) == n_persons
        assert shift["p00"] == pytest.approx(expected, rel=0.15)
        # a shift per person: the others' follow their own offsets, not p00's
        assert np.corrcoef(shift.to_numpy()[1:], offsets[1:] - offsets.mean())[0, 1] > 0.9
    generic = NMERegressor(hidden=(8,), method="generic", max_epochs=2).fit(X, y, persons)
    assert prediction_shift(generic, X, persons, "regression") is None
