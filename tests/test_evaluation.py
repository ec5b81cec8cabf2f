"""The evaluate library: threshold chosen on validation and applied to test (known answers),
the scores' layout and metrics/evaluation.json's headline, plot tables, the images shown."""

import json
import math

import numpy as np
import pytest

from pneumonia.config import EvaluateConfig
from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import Predictions
from pneumonia.evaluation.scores import (
    AT_DEFAULT,
    CI_METRICS,
    HEADLINE_KEYS,
    MLFLOW_KEYS,
    OUTCOMES,
    curves,
    evaluation_scores,
    finite_or_none,
    header_and_rows,
    headline,
    load_images,
    mlflow_metrics,
    ood_summary,
    pick_cases,
    predictions_table,
)
from pneumonia.evaluation.threshold import threshold_on_validation

# Validation: perfectly separable, negatives 0.1-0.3, positives 0.6-0.8.
VAL = Predictions([f"v{i}" for i in range(6)], np.array([0, 0, 0, 1, 1, 1]),
                  np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8]))
# Test:       ------ NORMAL ------      ------ PNEUMONIA -----
TEST_LABELS = [0, 0, 0, 0] + [1, 1, 1, 1]
TEST_PROBS = [0.1, 0.3, 0.55, 0.62] + [0.52, 0.65, 0.9, 0.95]
TEST = Predictions([f"t{i}" for i in range(8)], np.array(TEST_LABELS), np.array(TEST_PROBS))


def scores_for(rule, val=VAL, test=TEST):
    """The test split's scores as the evaluate stage makes them: the threshold `rule` chose on validation."""
    return evaluation_scores(val, test, threshold_on_validation(val, rule), rule, bootstrap_samples=200,
                             seed=EvaluateConfig().seed)


def midway(low, high):
    """Halfway in log-odds: where a data-driven threshold lands between two validation scores."""
    logit_low, logit_high = (math.log(p / (1 - p)) for p in (low, high))
    return 1 / (1 + math.exp(-(logit_low + logit_high) / 2))


@pytest.mark.parametrize("rule, threshold, sensitivity, specificity", [
    # Youden on validation: anything in (0.3, 0.6] separates perfectly; the middle is 0.445.
    ("youden", midway(0.3, 0.6), 4 / 4, 2 / 4),  # test at 0.445: catches 0.52, accepts the normals 0.55, 0.62
    # 2 of 3 validation positives (>= 0.5) are caught from 0.7 down to above 0.6: 0.652.
    ("sensitivity@0.5", midway(0.6, 0.7), 2 / 4, 4 / 4),
    ("sensitivity@1", midway(0.3, 0.6), 4 / 4, 2 / 4),
    (0.5, 0.5, 4 / 4, 2 / 4),
])
def test_threshold_chosen_on_validation_and_applied_to_test(rule, threshold, sensitivity, specificity):
    scores = scores_for(rule)
    assert scores["threshold"] == pytest.approx(threshold)
    assert scores["threshold_rule"] == str(rule)
    assert scores["sensitivity"] == pytest.approx(sensitivity)
    assert scores["specificity"] == pytest.approx(specificity)
    # The same test metrics at 0.5: all four pneumonia cases, two of four normal ones.
    at_half = scores[AT_DEFAULT]
    assert at_half["threshold"] == 0.5
    assert (at_half["tp"], at_half["fn"], at_half["tn"], at_half["fp"]) == (4, 0, 2, 2)
    # What the chosen threshold does on validation (where it was chosen).
    assert scores["validation"]["n"] == 6


def test_threshold_does_not_depend_on_test():
    # Youden on this test alone would pick 0.65 (sensitivity 3/4, specificity 1); validation says 0.445.
    assert scores_for("youden")["threshold"] == pytest.approx(midway(0.3, 0.6))
    shuffled_test = Predictions(TEST.file_names, TEST.labels, TEST.probabilities[::-1].copy())
    assert scores_for("youden", test=shuffled_test)["threshold"] == pytest.approx(midway(0.3, 0.6))


def test_scores_have_headline_metrics_at_top_and_intervals_around_them():
    scores = scores_for("youden")
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "threshold", "tp", "fp", "tn", "fn", "n"):
        assert isinstance(scores[key], (int, float)), key
    for name in CI_METRICS:
        assert scores["ci95"][name]["low"] <= scores[name] <= scores["ci95"][name]["high"]
    json.dumps(scores, allow_nan=False)  # strict JSON: no NaN or infinity


def test_headline_is_the_threshold_and_five_metrics_of_each_split():
    """metrics/evaluation.json, what `dvc exp show` compares: distinct column names (test.roc_auc,
    external.roc_auc), no external key without an external set."""
    scores = scores_for("youden")
    assert headline(scores, None) == {"threshold": scores["threshold"], "tta_views": 1,
                                              "test": {key: scores[key] for key in HEADLINE_KEYS}}
    both = headline(scores, {**scores, "roc_auc": 0.5})
    assert set(both) == {"threshold", "tta_views", "test", "external"} and both["external"]["roc_auc"] == 0.5
    assert HEADLINE_KEYS == ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")


def test_undefined_metrics_become_null():
    assert finite_or_none({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}}) == {
        "a": None, "b": [1.0, None], "c": {"d": 2}}


def test_data_driven_rule_needs_both_classes_in_validation():
    one_class = Predictions(["a", "b"], np.array([1, 1]), np.array([0.4, 0.9]))
    with pytest.raises(PipelineError, match="evaluate.threshold"):
        scores_for("youden", val=one_class)
    assert scores_for(0.5, val=one_class)["threshold"] == 0.5  # a fixed number needs nothing


def test_one_class_test_split_is_a_clear_error():
    one_class = Predictions(["a", "b"], np.array([0, 0]), np.array([0.4, 0.9]))
    with pytest.raises(PipelineError, match="one class"):
        scores_for(0.5, test=one_class)


def test_mlflow_metrics_are_the_headline_numbers_with_their_intervals():
    scores = {**scores_for("youden"), "border_share": 0.2,
              **ood_summary(np.array([1.0, 5.0, 2.0, 9.0]), 4.0, np.array([3.0, -1.0, 2.0, 0.5]),
                            np.array([True, False, False, True]), np.array([False, False, True, False]))}
    flat = mlflow_metrics(scores, prefix="external")
    assert flat["external_ood_flagged_share"] == 0.5 and flat["external_mirror_flagged_share"] == 0.25
    assert flat["external_detail_flagged_share"] == 0.75
    assert scores["mirror"] == {"flagged": 1, "flagged_once_mirrored": 3, "images": 4}
    assert scores["detail"] == {"blurred": 2, "noisy": 1, "images": 4}
    assert flat["external_roc_auc"] == scores["roc_auc"] and flat["external_border_share"] == 0.2
    assert {"external_threshold", "external_sensitivity", "external_specificity", "external_ci95_roc_auc_low",
            "external_ci95_roc_auc_high", "external_ci95_accuracy_high"} <= flat.keys()
    # one clean name each: no counts, no metrics at 0.5 or on validation (they stay in metrics/*.json)
    assert not [key for key in flat if "at_0.5" in key or "validation" in key or key.endswith(("_tp", "_n"))]
    assert len(flat) == len(MLFLOW_KEYS) + 2 * len(CI_METRICS)
    assert all(isinstance(value, float) for value in flat.values())


def test_plot_tables_are_finite_and_complete():
    tables = curves(TEST)
    header, rows = header_and_rows(tables["roc"])
    assert header == ["fpr", "tpr", "threshold"]
    assert all(math.isfinite(value) for row in rows for value in row)
    assert rows[0][:2] == [0.0, 0.0] and rows[0][2] == 1.0  # "nobody positive" end, threshold clipped
    assert rows[-1][:2] == [1.0, 1.0]
    assert header_and_rows(tables["precision_recall"])[0] == ["recall", "precision", "threshold"]
    calibration = tables["calibration"]
    assert sum(calibration["count"]) == 8

    predictions = predictions_table(TEST, 0.6)
    assert predictions["actual"] == ["NORMAL"] * 4 + ["PNEUMONIA"] * 4
    assert predictions["predicted"][3] == "PNEUMONIA" and predictions["predicted"][4] == "NORMAL"
    assert predictions["predicted_at_0_5"][4] == "PNEUMONIA"


def test_cases_shown_cover_each_outcome_most_confident_errors_first():
    labels = np.array([1] * 6 + [0] * 6)
    probs = np.array([0.9, 0.8, 0.7, 0.4, 0.1, 0.3] + [0.2, 0.1, 0.3, 0.6, 0.95, 0.7])
    predictions = Predictions([f"f{i}" for i in range(12)], labels, probs)
    cases = pick_cases(predictions, 0.5, per_outcome=2, seed=0)
    by_outcome = {name: [case for case in cases if case.outcome == name] for name, _, _ in OUTCOMES}
    assert [case.outcome for case in cases] == [name for name, _, _ in OUTCOMES for _ in range(2)]
    assert [case.probability for case in by_outcome["false negative"]] == [0.1, 0.3]  # most confidently wrong
    assert [case.probability for case in by_outcome["false positive"]] == [0.95, 0.7]
    assert {case.index for case in by_outcome["true positive"]} <= {0, 1, 2}
    assert {case.index for case in by_outcome["true negative"]} <= {6, 7, 8}
    for case in cases:
        assert case.file_name == f"f{case.index}" and case.label == labels[case.index]
        assert case.predicted == int(probs[case.index] >= 0.5)
    assert pick_cases(predictions, 0.5, per_outcome=2, seed=0) == cases  # reproducible
    # Fewer cases than asked: all of them.
    assert len(pick_cases(predictions, 0.5, per_outcome=10, seed=0)) == 12


def test_images_read_back_in_case_order(synthetic_data):
    from pneumonia.data import dataset

    tfrecords = synthetic_data / "data" / "tfrecords"
    labels, names = dataset.labels_and_names(tfrecords, "test")
    predictions = Predictions(names, np.array(labels), np.linspace(0.01, 0.99, len(names)))
    cases = pick_cases(predictions, 0.5, per_outcome=2, seed=1)
    images = load_images(tfrecords, "test", cases)
    assert images.shape == (len(cases), 48, 48, 3) and images.dtype == np.uint8
    everything = list(dataset.records(tfrecords, "test").as_numpy_iterator())
    for case, image in zip(cases, images):
        assert everything[case.index]["file_name"].decode() == case.file_name
        np.testing.assert_array_equal(image, everything[case.index]["image"])


def test_model_summary_has_every_column_whatever_the_terminal(monkeypatch):
    """The report's Model table: Keras draws it with rich at the terminal's width, which cut it after
    `Output Shape` in an 80-column terminal or none (the evaluate stage under DVC)."""
    import keras

    from pneumonia.evaluation.evaluate import model_summary

    monkeypatch.setenv("COLUMNS", "80")
    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(3, name="a_rather_long_dense_layer_name")(inputs))
    lines = model_summary(model).splitlines()
    assert any("Layer (type)" in line and "Output Shape" in line and "Param #" in line for line in lines), lines
    [dense] = [line for line in lines if "a_rather_long_dense_layer_name (Dense)" in line]
    assert dense.rstrip(" │").endswith(" 15"), dense  # 4 x 3 weights + 3 biases


def test_a_model_of_another_image_size_is_a_message(synthetic_data, tmp_path):
    """issue 33: a valid .keras model trained at another data.image_size gave Keras's ValueError traceback."""
    from pneumonia.config import ModelConfig
    from pneumonia.evaluation.evaluate import evaluate
    from pneumonia.models.build import build_model

    (tmp_path / "meta.json").write_text(json.dumps({"image_size": 48, "splits": {}}))  # no external set
    with pytest.raises(PipelineError, match=r"the model takes 32 x 32 images, but .*tfrecords holds 48 x 48 ones "
                                            r"\(data.image_size\): retrain it \(`dvc repro`\), or set data.image_size "
                                            "to 32"):
        evaluate(build_model(ModelConfig(crop=0), 32), synthetic_data / "data" / "tfrecords", tmp_path,
                 EvaluateConfig(), 8)
