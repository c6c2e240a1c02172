"""The ``nme`` command line for sequences: simulate sequences, fit --task sequence, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nme import NMESequenceTagger, load_estimator
from nme.cli import main
from nme.simulate import SEQUENCE_STATES, TRANSITION_COLUMNS

FAST = ["--hidden", "", "--max-epochs", "2", "--batch-size", "16", "--device", "cpu"]
KEYS = ["--person-col", "person", "--target", "label", "--sequence-col", "sequence_id",
        "--position-col", "position"]


@pytest.fixture(scope="module")
def seq_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 persons x 5 sequences x 10 segments, written by the CLI itself."""
    path = tmp_path_factory.mktemp("data") / "seq.csv"
    argv = ["simulate", "sequences", "--persons", "8", "--sequences", "5", "--length", "10",
            "--out", str(path)]
    assert main(argv) == 0
    return path


@pytest.fixture(scope="module")
def tagger_dir(seq_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tagger"
    assert main(["fit", "--data", str(seq_csv), "--task", "sequence", *KEYS, *FAST,
                 "--out", str(out)]) == 0
    return out


def test_simulate_sequences_writes_data_and_truth(seq_csv: Path) -> None:
    df = pd.read_csv(seq_csv)
    truth = pd.read_csv(seq_csv.with_name("seq.truth.csv"))
    assert len(df) == 8 * 5 * 10
    assert set(df["label"]) <= set(SEQUENCE_STATES)
    assert list(truth.columns) == ["person", "group", *TRANSITION_COLUMNS]
    assert len(truth) == 8


def test_fit_writes_a_tagger_and_cli_metadata(tagger_dir: Path) -> None:
    meta = json.loads((tagger_dir / "cli.json").read_text())
    assert meta["task"] == "sequence"
    assert meta["sequence_col"] == "sequence_id"
    assert meta["position_col"] == "position"
    assert meta["features"] == [f"f{k}" for k in range(6)]
    est = load_estimator(tagger_dir)
    assert isinstance(est, NMESequenceTagger)
    assert est.placement == "last+T"  # the sequence default, not the regressor's "last"
    assert est.batch_size == 16
    assert sorted(est.states_) == sorted(SEQUENCE_STATES)
    assert len(est.person_ids_) == 8
    assert "val_metric" in est.history_[0]  # 1 of each person's 5 sequences validated


def test_predict_writes_states_and_marginals_in_input_order(
    tagger_dir: Path, seq_csv: Path, tmp_path: Path
) -> None:
    df = pd.read_csv(seq_csv, dtype={"person": str})
    # shuffled rows and a newcomer: predictions still follow each sequence's positions
    df.loc[df["sequence_id"] == 0, "person"] = "newcomer"
    shuffled = df.sample(frac=1.0, random_state=3)
    data = tmp_path / "new.csv"
    shuffled.to_csv(data, index=False)
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(tagger_dir), "--data", str(data),
                 "--out", str(out)]) == 0
    preds = pd.read_csv(out, dtype={"person": str})
    pd.testing.assert_frame_equal(preds[shuffled.columns], shuffled.reset_index(drop=True))
    probs = preds[[f"proba_{s}" for s in load_estimator(tagger_dir).states_]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)

    est = load_estimator(tagger_dir)
    for sid in (0, 7):
        rows = preds[preds["sequence_id"] == sid].sort_values("position")
        person = rows["person"].iloc[0]
        expected = est.predict([rows[est.feature_names_]], [person])[0]
        assert rows["prediction"].tolist() == expected
    # the newcomer decodes with the generic model
    rows = preds[preds["sequence_id"] == 0].sort_values("position")
    assert rows["prediction"].tolist() == est.predict([rows[est.feature_names_]])[0]


def test_forbid_option_reaches_the_tagger(seq_csv: Path, tmp_path: Path) -> None:
    df = pd.read_csv(seq_csv)
    # remove the jumps the option forbids, so the training labels respect it
    labels = df["label"].to_numpy().copy()
    for k in range(1, len(df)):
        same = df["sequence_id"].iat[k] == df["sequence_id"].iat[k - 1]
        if same and {labels[k - 1], labels[k]} == {"aggressive", "positive"}:
            labels[k] = "other"
    df["label"] = labels
    data = tmp_path / "clean.csv"
    df.to_csv(data, index=False)
    out = tmp_path / "m"
    argv = ["fit", "--data", str(data), "--task", "sequence", *KEYS, *FAST,
            "--forbid", "aggressive>positive,positive>aggressive", "--placement", "T",
            "--out", str(out)]
    assert main(argv) == 0
    est = load_estimator(out)
    a, p = est.states_.index("aggressive"), est.states_.index("positive")
    assert est.transition_matrices(None)[a, p] == 0.0
    assert est.module_.layout.names == ("transitions",)


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["--person-col", "person", "--target", "label"], ["--sequence-col"]),
     ([*KEYS[:6], "--position-col", "pos"], ["'pos'"]),
     ([*KEYS, "--forbid", "aggressive-positive"], ["--forbid"]),
     ([*KEYS, "--placement", "first+T"], ["first+T"])],
)
def test_sequence_input_errors(
    seq_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: list[str], words: list[str],
) -> None:
    code = main(["fit", "--data", str(seq_csv), "--task", "sequence", *argv, *FAST,
                 "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_duplicate_positions_are_refused(
    seq_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    df = pd.read_csv(seq_csv)
    df.loc[1, "position"] = 0
    data = tmp_path / "dup.csv"
    df.to_csv(data, index=False)
    code = main(["fit", "--data", str(data), "--task", "sequence", *KEYS, *FAST,
                 "--out", str(tmp_path / "m")])
    assert code == 2
    assert "same 'position'" in capsys.readouterr().err
