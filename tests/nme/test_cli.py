"""The ``nme`` command line: simulate -> fit -> predict, and clean errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nme.cli import main
from nme.estimators import NMERegressor, load_estimator

FAST = ["--hidden", "8", "--max-epochs", "3", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def mood_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 persons x 20 days of simulated mood, written by the CLI itself."""
    path = tmp_path_factory.mktemp("data") / "mood.csv"
    assert main(["simulate", "mood", "--persons", "20", "--days", "20", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def model_dir(mood_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "model"
    argv = ["fit", "--data", str(mood_csv), "--person-col", "user", "--target", "mood",
            "--time-col", "day", *FAST, "--out", str(out)]
    assert main(argv) == 0
    return out


def fit_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--data", str(data), "--person-col", "user", "--target", "mood", *FAST,
            *extra, "--out", str(out)]


def write_csv(df: pd.DataFrame, tmp_path: Path, name: str = "variant.csv") -> Path:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def assert_usage_error(code: int, capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


# --------------------------------------------------------------------------- happy paths
def test_simulate_writes_data_and_truth(mood_csv: Path) -> None:
    df = pd.read_csv(mood_csv)
    truth = pd.read_csv(mood_csv.with_name("mood.truth.csv"))
    assert len(df) == 400
    assert df["user"].nunique() == 20
    assert list(truth.columns) == ["user", "baseline", "event_day", "event_size", "gps_slope"]
    assert len(truth) == 20


def test_fit_writes_artifact_and_cli_metadata(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = json.loads((model_dir / "cli.json").read_text())
    assert meta["person_col"] == "user"
    assert meta["target"] == "mood"
    assert meta["task"] == "regression"
    # ``day`` is the time column and not numeric anyway; the rest are the default features
    assert meta["features"] == ["weekday", "typing_speed", "screen_minutes", "gps_km"]
    est = load_estimator(model_dir)
    assert isinstance(est, NMERegressor)
    assert est.hidden == (8,)
    assert len(est.person_ids_) == 20
    assert len(est.history_) == 3
    assert 1 <= est.best_epoch_ <= 3
    assert "val_metric" in est.history_[0]  # the default 20 % validation split was used


def test_fit_prints_summary(mood_csv: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(fit_argv(mood_csv, tmp_path / "m", "--features", "weekday,gps_km",
                         "--placement", "all", "--hidden", "", "--anneal", "none"))
    out = capsys.readouterr().out
    assert code == 0
    for word in ("persons:         20", "epochs:", "best", "validation RMSE", "sigma2",
                 str(tmp_path / "m")):
        assert word in out
    assert load_estimator(tmp_path / "m").feature_names_ == ["weekday", "gps_km"]


def test_fit_without_validation(mood_csv: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(fit_argv(mood_csv, tmp_path / "m", "--val-fraction", "0")) == 0
    out = capsys.readouterr().out
    assert "400 train, 0 validation" in out
    assert "n/a" in out
    assert "val_metric" not in load_estimator(tmp_path / "m").history_[0]


def test_validation_split_is_each_persons_last_days(
    mood_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With --time-col, shuffled rows give the same split: the last 20 % of each person's days."""
    seen: list[dict] = []
    fit = NMERegressor.fit

    def spy(self: NMERegressor, X, y, persons, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({"persons": list(kwargs["persons_val"]), "y": list(kwargs["y_val"])})
        return fit(self, X, y, persons, **kwargs)

    monkeypatch.setattr(NMERegressor, "fit", spy)
    df = pd.read_csv(mood_csv)
    shuffled = write_csv(df.sample(frac=1.0, random_state=1), tmp_path)
    for data in (mood_csv, shuffled):
        assert main(fit_argv(data, tmp_path / "m", "--time-col", "day")) == 0
        assert "320 train, 80 validation" in capsys.readouterr().out
    last_days = df.groupby("user")["day"].rank(ascending=False) <= 4
    expected = sorted(zip(df.loc[last_days, "user"], df.loc[last_days, "mood"], strict=True))
    for call in seen:
        assert sorted(zip(call["persons"], call["y"], strict=True)) == expected


def test_predict_writes_rows_plus_prediction(
    model_dir: Path, mood_csv: Path, tmp_path: Path
) -> None:
    df = pd.read_csv(mood_csv)
    df.loc[:9, "user"] = "newcomer"
    new = write_csv(df, tmp_path)
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(model_dir), "--data", str(new),
                 "--out", str(out)]) == 0
    preds = pd.read_csv(out)
    source = pd.read_csv(new)
    assert list(preds.columns) == [*source.columns, "prediction"]
    pd.testing.assert_frame_equal(preds[source.columns], source)
    est = load_estimator(model_dir)
    feats = source[est.feature_names_]
    np.testing.assert_allclose(preds["prediction"], est.predict(feats, source["user"]),
                               rtol=1e-6)
    # the unknown person gets the generic model
    generic = est.predict(feats.iloc[:1], None)
    np.testing.assert_allclose(preds["prediction"].iloc[0], generic[0], rtol=1e-6)


def test_classification_fit_and_predict_proba(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = pd.read_csv(mood_csv)
    df["mood_class"] = np.where(df["mood"] > 50, "good", "bad")
    data = write_csv(df, tmp_path)
    model = tmp_path / "clf"
    argv = ["fit", "--data", str(data), "--person-col", "user", "--target", "mood_class",
            "--features", "weekday,typing_speed,screen_minutes,gps_km",
            "--task", "classification", *FAST, "--out", str(model)]
    assert main(argv) == 0
    assert "validation accuracy" in capsys.readouterr().out
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    preds = pd.read_csv(out)
    assert set(preds["prediction"]) <= {"good", "bad"}
    np.testing.assert_allclose(preds["proba_bad"] + preds["proba_good"], 1.0, rtol=1e-5)


def test_predict_needs_person_col_without_cli_metadata(
    model_dir: Path, mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    load_estimator(model_dir).save(bare)  # as saved from Python: no cli.json
    out = tmp_path / "p.csv"
    code = main(["predict", "--model", str(bare), "--data", str(mood_csv), "--out", str(out)])
    assert_usage_error(code, capsys, "--person-col")
    argv = ["predict", "--model", str(bare), "--data", str(mood_csv), "--out", str(out),
            "--person-col", "user"]
    assert main(argv) == 0
    assert len(pd.read_csv(out)) == 400


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--help"]) == 0
    assert "--val-fraction" in capsys.readouterr().out


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(fit_argv(tmp_path / "nope.csv", tmp_path / "m"))
    assert_usage_error(code, capsys, "no such file", "nope.csv")


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert_usage_error(main(fit_argv(empty, tmp_path / "m")), capsys, "empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("user,weekday,mood\n")
    assert_usage_error(main(fit_argv(header_only, tmp_path / "m")), capsys, "no data rows")


@pytest.mark.parametrize(
    ("extra", "column"),
    [(["--target", "happiness"], "happiness"),
     (["--features", "weekday,sleep_hours"], "sleep_hours"),
     (["--time-col", "date"], "date")],
)
def test_missing_column_is_named(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], column: str,
) -> None:
    assert_usage_error(main(fit_argv(mood_csv, tmp_path / "m", *extra)), capsys, repr(column))


def test_predict_missing_feature_column_is_named(
    model_dir: Path, mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_csv(pd.read_csv(mood_csv).drop(columns="gps_km"), tmp_path)
    code = main(["predict", "--model", str(model_dir), "--data", str(data),
                 "--out", str(tmp_path / "p.csv")])
    assert_usage_error(code, capsys, "'gps_km'")


def test_non_numeric_features_are_named(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = pd.read_csv(mood_csv)
    df.insert(0, "city", "Oslo")
    data = write_csv(df, tmp_path)
    code = main(fit_argv(data, tmp_path / "m", "--features", "weekday,city,day"))
    assert_usage_error(code, capsys, "non-numeric", "city", "day")
    assert not (tmp_path / "m").exists()


def test_non_numeric_regression_target(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(fit_argv(mood_csv, tmp_path / "m", "--target", "day", "--features", "weekday"))
    assert_usage_error(code, capsys, "'day'", "--task classification")


@pytest.mark.parametrize("column", ["gps_km", "mood"])
def test_nan_names_column_and_row(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str
) -> None:
    df = pd.read_csv(mood_csv)
    df.loc[[7, 9], column] = np.nan
    data = write_csv(df, tmp_path)
    err = assert_usage_error(main(fit_argv(data, tmp_path / "m")), capsys, repr(column))
    assert "2 missing" in err
    assert "data row 7 (line 9" in err


@pytest.mark.parametrize(
    ("extra", "words"),
    [(["--method", "bayes"], ["invalid choice", "bayes"]),
     (["--task", "ranking"], ["invalid choice", "ranking"]),
     (["--hidden", "64,x"], ["--hidden", "64,x"]),
     (["--val-fraction", "1.5"], ["--val-fraction"]),
     (["--anneal", "1.5"], ["anneal"]),  # checked by the estimator: a ValueError
     (["--placement", "layers.9.weight"], ["layers.9.weight"]),
     (["--device", "tpu9"], ["--device"])],
)
def test_unknown_option_values(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], words: list[str],
) -> None:
    assert_usage_error(main(fit_argv(mood_csv, tmp_path / "m", *extra)), capsys, *words)


def test_bad_model_directory(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", "--model", str(tmp_path / "none"), "--data", str(mood_csv),
                 "--out", str(tmp_path / "p.csv")])
    assert_usage_error(code, capsys, "no model artifact")


def test_fit_refuses_to_replace_an_unrelated_directory(
    mood_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert_usage_error(main(fit_argv(mood_csv, precious)), capsys, "refusing to overwrite")
    assert (precious / "thesis.tex").read_text() == "years of work"


# --------------------------------------------------------------------------- installed script
def test_console_script_end_to_end(tmp_path: Path) -> None:
    """simulate -> fit -> predict through the installed ``nme`` script in a subprocess."""
    script = Path(sys.executable).with_name("nme")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nme.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*command, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    run("simulate", "mood", "--persons", "10", "--days", "14", "--out", "mood.csv")
    fitted = run("fit", "--data", "mood.csv", "--person-col", "user", "--target", "mood",
                 "--time-col", "day", *FAST, "--out", "model")
    assert "persons:         10" in fitted.stdout
    run("predict", "--model", "model", "--data", "mood.csv", "--out", "preds.csv")
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == 140
    assert preds["prediction"].notna().all()
