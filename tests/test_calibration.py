"""Calibration of the probability of pneumonia (pneumonia.evaluation.calibration): fitted on validation labels,
applied in evaluate, predict and serving alike, the threshold chosen on the calibrated probability."""

import json

import numpy as np
import pytest
from scipy.special import expit

from pneumonia.config import parse_params
from pneumonia.errors import PipelineError
from pneumonia.evaluation import metrics
from pneumonia.evaluation.calibration import UNCALIBRATED, Calibration, calibration_on_validation, fit_calibration
from pneumonia.evaluation.predictions import Predictions
from pneumonia.evaluation.threshold import choose_threshold


def drawn(n: int, seed: int, scale: float, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a true probability, and a model's probability that is `scale` x its log-odds + `shift`:
    overconfident for scale > 1, biased towards pneumonia for shift > 0."""
    rng = np.random.default_rng(seed)
    log_odds = rng.normal(0.5, 2.5, n)
    labels = (rng.random(n) < expit(log_odds)).astype(int)
    return labels, expit(scale * log_odds + shift).astype("float32")  # as the model gives it: 1.0 from ~16.6 on


@pytest.mark.parametrize(("method", "scale", "shift"), [("temperature", 3.0, 0.0), ("platt", 2.0, 1.5)])
def test_fitting_undoes_a_known_miscalibration_and_lowers_the_error_on_new_images(method, scale, shift):
    labels, probabilities = drawn(20_000, seed=0, scale=scale, shift=shift)
    fitted = fit_calibration(method, labels, probabilities)
    assert fitted.scale == pytest.approx(1 / scale, rel=0.05)
    assert fitted.shift == pytest.approx(-shift / scale, abs=0.08)

    new_labels, new_probabilities = drawn(5_000, seed=1, scale=scale, shift=shift)
    before = metrics.expected_calibration_error(new_labels, new_probabilities)
    after = metrics.expected_calibration_error(new_labels, fitted.apply(new_probabilities))
    assert before > 0.05 and after < 0.02


def test_temperature_alone_cannot_remove_a_bias_that_platt_removes():
    labels, probabilities = drawn(20_000, seed=2, scale=1.0, shift=2.0)
    temperature, platt = (fit_calibration(method, labels, probabilities) for method in ("temperature", "platt"))
    assert temperature.shift == 0
    assert (metrics.expected_calibration_error(labels, platt.apply(probabilities))
            < metrics.expected_calibration_error(labels, temperature.apply(probabilities)) / 2)


def test_calibration_keeps_the_ranking_and_the_operating_point_only_the_threshold_moves():
    labels, probabilities = drawn(400, seed=3, scale=4.0, shift=2.0)
    new_labels, new_probabilities = drawn(300, seed=4, scale=4.0, shift=2.0)
    fitted = fit_calibration("platt", labels, probabilities)
    for rule in ("youden", "sensitivity@0.93"):
        raw = choose_threshold(labels, probabilities, rule)
        calibrated = choose_threshold(labels, fitted.apply(probabilities), rule)
        assert calibrated == pytest.approx(float(fitted.apply([raw])[0]))  # midway in log-odds either way
        assert fitted.uncalibrated(calibrated) == pytest.approx(raw)
        before = metrics.classification_metrics(new_labels, new_probabilities, raw)
        after = metrics.classification_metrics(new_labels, fitted.apply(new_probabilities), calibrated)
        for name in ("roc_auc", "sensitivity", "specificity", "tp", "fp"):
            assert after[name] == pytest.approx(before[name]), (rule, name)


def test_a_separable_validation_split_gives_a_finite_scale_not_certainty():
    """Maximum likelihood against 0/1 targets would push the scale up without bound (every probability to 0 or
    1); Platt's targets keep it finite."""
    labels = np.r_[np.zeros(30, int), np.ones(90, int)]
    probabilities = np.r_[np.linspace(0.05, 0.45, 30), np.linspace(0.55, 0.99, 90)]
    for method in ("temperature", "platt"):
        fitted = fit_calibration(method, labels, probabilities)
        assert 1 < fitted.scale < 10, method  # sharper, since it separates them, but finite
    platt = fit_calibration("platt", labels, probabilities).apply(probabilities)
    # with a shift, the calibrated probabilities sum to the targets': (90 + 1) / (90 + 2) each positive, 1 / 32 each
    # negative (the likelihood's derivative by the shift is zero)
    assert platt.sum() == pytest.approx(90 * 91 / 92 + 30 / 32, rel=1e-3)


def test_none_is_the_identity_and_the_parameters_travel_as_a_dict():
    probabilities = np.array([0.0, 0.2, 0.7, 1.0])
    assert fit_calibration("none", [0, 1, 0, 1], probabilities) is UNCALIBRATED
    np.testing.assert_array_equal(UNCALIBRATED.apply(probabilities), probabilities)
    assert UNCALIBRATED.uncalibrated(0.3) == 0.3
    fitted = Calibration("platt", scale=0.4, shift=-1.2)
    assert Calibration.from_dict(json.loads(json.dumps(fitted.as_dict()))) == fitted
    assert Calibration.from_dict(None) == UNCALIBRATED  # a model evaluated before calibration existed
    assert np.isfinite(fitted.apply([0.0, 1.0])).all()  # exact 0 and 1: finite log-odds
    assert fitted.apply([1.0]) > fitted.apply([np.nextafter(np.float32(1), np.float32(0))])  # rank kept


@pytest.mark.parametrize("bad", [{"method": "isotonic", "scale": 1, "shift": 0},
                                 {"method": "platt", "scale": 0, "shift": 0},
                                 {"method": "platt", "scale": float("nan"), "shift": 0}])
def test_impossible_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="calibration"):
        Calibration.from_dict(bad)


def test_a_validation_split_of_one_class_stops_evaluate_with_what_to_do():
    val = Predictions(["a", "b"], np.array([1, 1]), np.array([0.3, 0.9]))
    with pytest.raises(PipelineError, match=r"evaluate.calibration = 'platt'.*evaluate.calibration=none"):
        calibration_on_validation(val, "platt")
    assert calibration_on_validation(val, "none") is UNCALIBRATED


def test_the_models_settings_carry_the_calibration_and_refuse_a_broken_one(tmp_path):
    """Predict and serving read the calibration from the model's settings (pneumonia.model_settings)."""
    from pneumonia.model_settings import (
        CalibrationSettings,
        ModelSettings,
        OodSettings,
        TrainingData,
        read_settings_file,
    )

    fitted = Calibration("temperature", scale=0.5)
    assert Calibration(**CalibrationSettings(**fitted.as_dict()).model_dump()) == fitted
    valid = ModelSettings(
        model_sha256="0" * 64, model_name="custom_cnn", class_names=("NORMAL", "PNEUMONIA"), image_size=128,
        input_norm="per_image", crop=0.08, jpeg_quality=95, tta_views=1, threshold=0.4, threshold_rule="youden",
        input_checks="flag", calibration=CalibrationSettings(**fitted.as_dict()),
        ood=OodSettings(method="m", threshold=3.0, validation_flagged=0.01),
        training_data=TrainingData(source="local", archive_sha256=None, manifests_sha256="0" * 64, images={}),
        git_commit=None)
    settings = tmp_path / "model.json"
    settings.write_text(valid.to_json())
    assert read_settings_file(settings).calibration.scale == 0.5
    settings.write_text(valid.to_json().replace('"scale": 0.5', '"scale": -1.0'))
    with pytest.raises(PipelineError, match=r"calibration.scale: Input should be greater than 0"):
        read_settings_file(settings)


def test_the_classifier_reports_the_calibrated_probability():
    """What predict and serving return: the model's probability through the run's calibration."""
    from pneumonia.classifier import Classifier
    from pneumonia.engines import KerasEngine

    class Constant:  # a model whose probability of pneumonia is 0.9 for every image
        def predict_on_batch(self, batch):
            return np.full((len(batch), 1), 0.9, "float32")

    fitted = Calibration("platt", scale=0.5, shift=-1.5)
    classifier = Classifier(KerasEngine(Constant()), threshold=0.5, jpeg_quality=95, calibration=fitted)
    [probability] = classifier.probabilities([np.zeros((8, 8, 3), "uint8")])
    assert probability == pytest.approx(expit(0.5 * np.log(0.9 / 0.1) - 1.5))
    assert classifier.label(probability) == "NORMAL"  # 0.9 uncalibrated, 0.40 calibrated


def test_params_name_the_methods_allowed():
    with pytest.raises(PipelineError, match="evaluate.calibration"):
        parse_params({"evaluate": {"calibration": "isotonic"}})
