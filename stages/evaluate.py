"""DVC stage `evaluate`: threshold chosen on validation, the model on the test split (read here and
nowhere else) -> metrics/test.json, plot tables and figures, the HTML report, the MLflow run."""

import json

import keras
import mlflow

from pneumonia import paths, serving, tracking
from pneumonia.atomic import atomic_path, write_csv, write_json
from pneumonia.config import load_params
from pneumonia.evaluation import gallery, gradcam, summary
from pneumonia.evaluation.figures import draw_figures, read_history
from pneumonia.evaluation.predictions import predict_split
from pneumonia.evaluation.report import write_report
from pneumonia.logs import run_stage


def model_summary(model: keras.Model) -> str:
    lines = []
    model.summary(print_fn=lines.append, line_length=110)
    return "\n".join(lines)


def main() -> None:
    params = load_params()
    config = params.evaluate
    model = keras.models.load_model(paths.MODEL)
    val = predict_split(model, paths.TFRECORDS, "val", params.train.batch_size)
    test = predict_split(model, paths.TFRECORDS, "test", params.train.batch_size)

    scores = summary.evaluation_scores(val, test, config)
    threshold = scores["threshold"]  # chosen on validation: what the model is used with from here on
    write_json(paths.TEST_METRICS, scores)
    write_csv(paths.TEST_PREDICTIONS, *summary.table(summary.predictions_table(test, threshold)))
    curves = summary.curves(test)
    for path, name in ((paths.ROC_CURVE, "roc"), (paths.PR_CURVE, "precision_recall"),
                       (paths.CALIBRATION_CURVE, "calibration")):
        write_csv(path, *summary.table(curves[name]))

    cases = gallery.pick_cases(test, threshold, config.images_per_outcome, config.seed)
    images = gallery.load_images(paths.TFRECORDS, "test", cases)
    heatmaps = gradcam.heatmaps(model, images, target_class=[case.predicted for case in cases])
    with atomic_path(paths.FIGURES, directory=True) as folder:
        figures = draw_figures(folder, scores, test, curves, read_history(paths.TRAIN_HISTORY), cases, images,
                               heatmaps, gradcam.last_feature_map(model).layer_name)
        write_report(paths.EVALUATION_REPORT, scores=scores, figures=figures, params=params.model_dump(),
                     data=json.loads(paths.DATA_METRICS.read_text()),
                     training=json.loads(paths.TRAIN_METRICS.read_text()), model_summary=model_summary(model))

    with tracking.resumed_run(paths.RUN_INFO):
        mlflow.set_tags({f"evaluate.{key}": value for key, value in config.model_dump().items()})
        # The model first, then its test metrics linked to it and to the test set: the logged model's
        # page shows them and mlflow.search_logged_models ranks models by them.
        logged = serving.log_model(paths.MODEL, threshold, params)  # the run's servable model, deciding at `threshold`
        [test_set] = tracking.log_manifests(paths.MANIFESTS, {"test": "testing"}).values()
        mlflow.log_metrics(summary.mlflow_metrics(scores), model_id=logged.model_id, dataset=test_set)
        for path in (paths.TEST_METRICS, paths.TEST_PREDICTIONS, paths.ROC_CURVE, paths.PR_CURVE,
                     paths.CALIBRATION_CURVE, paths.EVALUATION_REPORT, *sorted(paths.FIGURES.glob("*.png"))):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        # The data report belongs with the run; logged here so that report changes cost no retraining.
        mlflow.log_artifacts(str(paths.DATA_REPORT), artifact_path="inputs/data")


if __name__ == "__main__":
    run_stage(main)
