"""The evaluate stage's work, returned, not written: the threshold chosen on the validation split,
the test split (read here and nowhere else) and the external set, if the external stage holds one,
scored at it, with what the figures and the report show of them. The stage writes metrics/,
plots/, the report, and logs to MLflow.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import keras

from pneumonia.config import EvaluateConfig
from pneumonia.data.external import SPLIT as EXTERNAL, has_external
from pneumonia.data.tfrecords import read_meta
from pneumonia.evaluation import summary
from pneumonia.evaluation.gradcam import last_feature_map
from pneumonia.evaluation.predictions import predict_split
from pneumonia.evaluation.scoring import ScoredSplit, score_split


@dataclass(frozen=True)
class Evaluation:
    test: ScoredSplit  # reports/evaluation/test.json, its plot tables and figures
    external: ScoredSplit | None  # the same of the external set; None without one
    gradcam_layer: str  # the layer the Grad-CAM maps are taken on
    model_summary: str  # the model's layers, for the report

    @property
    def threshold(self) -> float:
        """Chosen on validation: what the model is used with from here on."""
        return self.test.scores["threshold"]

    @property
    def scored(self) -> list[ScoredSplit]:
        return [self.test, *([self.external] if self.external else [])]


SUMMARY_WIDTH = 110  # characters: room for every column of Keras's table, layer names included


def model_summary(model: keras.Model) -> str:
    lines = []
    # Keras draws the table with rich, which crops it to the terminal's width (COLUMNS, else 80),
    # whatever line_length says: without the same width for both, the report lost `Param #`.
    with mock.patch.dict(os.environ, {"COLUMNS": str(SUMMARY_WIDTH + 4)}):  # Keras keeps 4 columns spare
        model.summary(print_fn=lines.append, line_length=SUMMARY_WIDTH)
    return "\n".join(lines)


def evaluate(model: keras.Model, tfrecords: Path, external: Path, config: EvaluateConfig,
             batch_size: int) -> Evaluation:
    """`model` on the splits in `tfrecords` and on the external stage's output `external`."""
    val = predict_split(model, tfrecords, "val", batch_size)
    test_predictions = predict_split(model, tfrecords, "test", batch_size)
    test = score_split(model, tfrecords, "test", test_predictions,
                       summary.evaluation_scores(val, test_predictions, config), config)
    scored_external = None
    if has_external(external):
        external_predictions = predict_split(model, external, EXTERNAL, batch_size)
        audit = read_meta(external)["audit"]
        scores = summary.external_scores(external_predictions, test.scores["threshold"], config, audit)
        scored_external = score_split(model, external, EXTERNAL, external_predictions, scores, config)
    return Evaluation(test, scored_external, last_feature_map(model).layer_name, model_summary(model))
