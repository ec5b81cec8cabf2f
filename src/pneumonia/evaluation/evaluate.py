"""The evaluate stage's work, returned, not written: the threshold chosen on the validation split,
the out-of-distribution reference and mirror check fitted on the training split (its flag's threshold on
validation), the test split (read here and nowhere else) and the external set, if the external stage holds
one, scored at them, with what the figures, the report and MLflow show of them, and the model's settings. The stage
writes the settings beside the model, metrics/, plots/, the report and the model card, and logs to MLflow.

The one entry of the package that takes params (EvaluateConfig); what it calls takes the values it needs.
Where to look: threshold.py (the operating point), metrics.py (every metric and its interval), scores.py
(a split's scores, tables and cases shown), figures.py, report.py (the HTML page), model_card.py.
"""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import keras
import numpy as np

from pneumonia import CLASS_NAMES, EXTERNAL_SPLIT, ood
from pneumonia.config import EvaluateConfig, Params
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.evaluation import model_card, scores
from pneumonia.evaluation.calibration import Calibration, calibration_on_validation
from pneumonia.evaluation.figures import draw_figures, read_history
from pneumonia.evaluation.gradcam import explained_layer
from pneumonia.evaluation.predictions import Predictions, predict_split, split_predictions
from pneumonia.evaluation.report import render
from pneumonia.evaluation.scores import ScoredSplit, score_split
from pneumonia.evaluation.threshold import threshold_on_validation
from pneumonia.model_settings import CalibrationSettings, ModelSettings, OodSettings, TrainingData
from pneumonia.models.augmentation import with_test_time_augmentation


@dataclass(frozen=True)
class Evaluation:
    test: ScoredSplit  # reports/evaluation/test.json, its plot tables and figures
    calibration: Calibration  # fitted on validation; every probability here is calibrated
    external: ScoredSplit | None  # the same of the external set; None without one
    gradcam_layer: str  # the layer the Grad-CAM maps are taken on
    model_summary: str  # the model's layers, for the report
    ood: ood.OodReference  # fitted on the training split, its threshold on validation
    ood_validation_flagged: float  # share of validation images flagged at its threshold

    @property
    def threshold(self) -> float:
        """Chosen on validation: what the model is used with from here on."""
        return self.test.scores["threshold"]

    @property
    def scored(self) -> list[ScoredSplit]:
        return [self.test, *([self.external] if self.external else [])]

    @property
    def headline(self) -> dict[str, Any]:
        """metrics/evaluation.json: the threshold and the headline metrics of each split (scores.headline)."""
        return scores.headline(self.test.scores, self.external.scores if self.external else None)

    def settings(self, params: Params, model_sha256: str, training_data: TrainingData,
                 git_commit: str | None) -> ModelSettings:
        """What every user of the model (whose .keras file has `model_sha256`) reads (pneumonia.model_settings),
        from this evaluation and `params`."""
        return ModelSettings(
            model_sha256=model_sha256, model_name=params.model.name, class_names=CLASS_NAMES,
            image_size=params.data.image_size,
            input_norm=params.model.input_norm, crop=params.model.crop, jpeg_quality=params.tfrecords.jpeg_quality,
            tta_views=params.evaluate.tta_views, threshold=self.threshold,
            threshold_rule=str(params.evaluate.threshold),
            input_checks=params.evaluate.input_checks,
            calibration=CalibrationSettings(**self.calibration.as_dict()),
            ood=OodSettings(method=ood.METHOD, threshold=self.ood.threshold,
                            validation_flagged=self.ood_validation_flagged),
            training_data=training_data, git_commit=git_commit)

    def mlflow_metrics(self) -> dict[str, dict[str, float]]:
        """{split name: its headline metrics for MLflow} of each scored split."""
        return {split.name: scores.mlflow_metrics(split.scores, prefix=split.name) for split in self.scored}

    def card(self, settings: ModelSettings, split_counts: Path) -> model_card.Sections:
        return model_card.sections(settings, self.test.scores, self.external.scores if self.external else None,
                                   json.loads(split_counts.read_text())["images"])

    def report(self, figures: Path, params: Params, history: Path, split_counts: Path, train_metrics: Path,
               card: model_card.Sections) -> str:
        """The HTML report, its figures drawn into the folder `figures`: the model `card`, the training curves
        of the `history` CSV, the images per split of `split_counts` and the training of `train_metrics` (JSON)
        with the scores of each split, `params` and the model's layers."""
        drawn = draw_figures(figures, read_history(history), self.scored, self.gradcam_layer)
        return render(scores=self.test.scores, external=self.external.scores if self.external else None,
                      figures=drawn, params=params.model_dump(), data=json.loads(split_counts.read_text()),
                      training=json.loads(train_metrics.read_text()), model_summary=self.model_summary,
                      model_card=card)


SUMMARY_WIDTH = 110  # characters: room for every column of Keras's table, layer names included


def model_summary(model: keras.Model) -> str:
    lines = []
    # Keras draws the table with rich, which crops it to the terminal's width (COLUMNS, else 80),
    # whatever line_length says: without the same width for both, the report lost `Param #`.
    with mock.patch.dict(os.environ, {"COLUMNS": str(SUMMARY_WIDTH + 4)}):  # Keras keeps 4 columns spare
        model.summary(print_fn=lines.append, line_length=SUMMARY_WIDTH)
    return "\n".join(lines)


def check_image_size(model: keras.Model, *folders: Path) -> None:
    """The model takes the images of each TFRecords folder (with splits) at their size: a model of another
    data.image_size (one copied in, or trained before a change) failed in Keras with a ValueError traceback."""
    size = model.input_shape[1]
    for folder in folders:
        meta = read_meta(folder)
        if meta["splits"] and size is not None and meta["image_size"] != size:
            raise PipelineError(f"the model takes {size} x {size} images, but {folder} holds {meta['image_size']} x "
                                f"{meta['image_size']} ones (data.image_size): retrain it (`dvc repro`), or set "
                                f"data.image_size to {size} as it was trained")


def evaluate(model: keras.Model, tfrecords: Path, external: Path, config: EvaluateConfig,
             batch_size: int) -> Evaluation:
    """`model` on the splits in `tfrecords` and on the external stage's output `external`. Each probability is
    the mean over evaluate.tta_views views of the image, then calibrated (evaluate.calibration, fitted on
    validation), as `pneumonia predict` and the served model make it; the Grad-CAM maps and the border audit
    explain the model on the image itself."""
    check_image_size(model, tfrecords, external)
    predictor = with_test_time_augmentation(model, config.tta_views)
    features_model = ood.pooled_features_model(model)

    def passed(on: Path, split: str) -> tuple[Predictions, tuple[np.ndarray, np.ndarray], np.ndarray]:
        """A split's predictions, out-of-distribution inputs and fine detail; with one view, of one forward pass."""
        outputs, thumbnails, features, detail = ood.split_outputs(features_model, on, split, batch_size)
        found = (split_predictions(outputs, on, split) if config.tta_views == 1
                 else predict_split(predictor, on, split, batch_size))
        return found, (thumbnails, features), detail

    val, val_inputs, _ = passed(tfrecords, "val")
    _, *train_inputs, train_detail = ood.split_outputs(features_model, tfrecords, "train", batch_size,
                                                       ood.MAX_FITTED_IMAGES)
    reference = ood.fit(tuple(train_inputs), val_inputs, config.ood_flagged, train_detail)
    calibration = calibration_on_validation(val, config.calibration)

    def predicted(on: Path, split: str) -> tuple[Predictions, dict[str, Any]]:
        found, inputs, detail = passed(on, split)
        ood_scores = reference.scores(*inputs)
        mirror_log_odds = reference.mirror.log_odds(inputs[0])
        return (replace(found, probabilities=calibration.apply(found.probabilities), ood_scores=ood_scores),
                scores.ood_summary(ood_scores, reference.threshold, mirror_log_odds,
                                   reference.detail.blurred(detail), reference.detail.noisy(detail)))

    val = replace(val, probabilities=calibration.apply(val.probabilities))
    test_predictions, test_ood = predicted(tfrecords, "test")
    threshold = threshold_on_validation(val, config.threshold)
    test_scores = scores.evaluation_scores(val, test_predictions, threshold, config.threshold,
                                           config.bootstrap_samples, config.seed)
    test = score_split(model, tfrecords, "test", test_predictions,
                       {**test_scores, "tta_views": config.tta_views, "calibration": calibration.as_dict(), **test_ood},
                       config.seed, config.images_per_outcome)
    scored_external = None
    meta = read_meta(external)
    if EXTERNAL_SPLIT in meta["splits"]:  # the external stage wrote one: evaluate.external is set
        external_predictions, external_ood = predicted(external, EXTERNAL_SPLIT)
        external_scores = scores.external_scores(external_predictions, threshold, config.threshold, config.external,
                                                 meta["audit"], config.bootstrap_samples, config.seed)
        scored_external = score_split(model, external, EXTERNAL_SPLIT, external_predictions,
                                      {**external_scores, **external_ood}, config.seed, config.images_per_outcome)
    validation_flagged = float(np.mean(reference.scores(*val_inputs) > reference.threshold))
    return Evaluation(test, calibration, scored_external, explained_layer(model), model_summary(model), reference,
                      validation_flagged)

