"""DVC stage `evaluate`: threshold chosen on validation, the model on the test split (read here and
nowhere else) and on the external set if there is one -> metrics/test.json, metrics/external.json,
plot tables and figures, the HTML report, the MLflow run."""

import json

import keras
import mlflow

from pneumonia import paths, serving, tracking
from pneumonia.atomic import atomic_path, write_csv, write_json
from pneumonia.config import load_params
from pneumonia.data.external import SPLIT as EXTERNAL, has_external
from pneumonia.data.tfrecords import read_meta
from pneumonia.evaluation import summary
from pneumonia.evaluation.figures import draw_figures, read_history
from pneumonia.evaluation.gradcam import last_feature_map
from pneumonia.evaluation.predictions import predict_split
from pneumonia.evaluation.report import write_report
from pneumonia.evaluation.scoring import ScoredSplit, score_split
from pneumonia.logs import run_stage


def model_summary(model: keras.Model) -> str:
    lines = []
    model.summary(print_fn=lines.append, line_length=110)
    return "\n".join(lines)


def write_plot_tables(split: ScoredSplit, predictions_csv, curve_csvs: dict) -> None:
    write_csv(predictions_csv, *summary.table(summary.predictions_table(split.predictions, split.scores["threshold"])))
    for name, path in curve_csvs.items():
        write_csv(path, *summary.table(split.curves[name]))


def main() -> None:
    params = load_params()
    config = params.evaluate
    batch_size = params.train.batch_size
    model = keras.models.load_model(paths.MODEL)
    val = predict_split(model, paths.TFRECORDS, "val", batch_size)
    test_predictions = predict_split(model, paths.TFRECORDS, "test", batch_size)
    test = score_split(model, paths.TFRECORDS, "test", test_predictions,
                       summary.evaluation_scores(val, test_predictions, config), config)
    threshold = test.scores["threshold"]  # chosen on validation: what the model is used with from here on
    external = None
    if has_external(paths.EXTERNAL):
        external_predictions = predict_split(model, paths.EXTERNAL, EXTERNAL, batch_size)
        audit = read_meta(paths.EXTERNAL)["audit"]
        external = score_split(model, paths.EXTERNAL, EXTERNAL, external_predictions,
                               summary.external_scores(external_predictions, threshold, config, audit), config)
    scored = [test, *([external] if external else [])]

    write_json(paths.TEST_METRICS, test.scores)
    write_plot_tables(test, paths.TEST_PREDICTIONS, {"roc": paths.ROC_CURVE, "precision_recall": paths.PR_CURVE,
                                                     "calibration": paths.CALIBRATION_CURVE})
    with atomic_path(paths.EXTERNAL_PLOTS, directory=True) as folder:  # empty without an external set
        if external:
            write_plot_tables(external, folder / "predictions.csv",
                              {name: folder / f"{name}.csv" for name in ("roc", "precision_recall", "calibration")})
    write_json(paths.EXTERNAL_METRICS, external.scores if external else {"evaluated": False})
    with atomic_path(paths.FIGURES, directory=True) as folder:
        figures = draw_figures(folder, read_history(paths.TRAIN_HISTORY), scored, last_feature_map(model).layer_name)
        write_report(paths.EVALUATION_REPORT, scores=test.scores, external=external.scores if external else None,
                     figures=figures, params=params.model_dump(), data=json.loads(paths.DATA_METRICS.read_text()),
                     training=json.loads(paths.TRAIN_METRICS.read_text()), model_summary=model_summary(model))

    with tracking.resumed_run(paths.RUN_INFO):
        mlflow.set_tags({f"evaluate.{key}": value for key, value in config.model_dump().items()})
        # The model first, then each split's metrics linked to it and to that split's data: the logged
        # model's page shows them and mlflow.search_logged_models ranks models by them.
        logged = serving.log_model(paths.MODEL, threshold, params.tfrecords.jpeg_quality,  # the run's servable model
                                   params.tracking.register_model)
        datasets = tracking.log_manifests(paths.MANIFESTS, {"test": "testing"})
        if external:
            datasets[EXTERNAL] = tracking.manifest_dataset(paths.EXTERNAL / "manifest.csv", name=EXTERNAL)
            mlflow.log_input(datasets[EXTERNAL], context="external validation")
        for split in scored:
            mlflow.log_metrics(summary.mlflow_metrics(split.scores, prefix=split.name), model_id=logged.model_id,
                               dataset=datasets[split.name])
        for path in (paths.TEST_METRICS, paths.EXTERNAL_METRICS, paths.TEST_PREDICTIONS, paths.ROC_CURVE,
                     paths.PR_CURVE, paths.CALIBRATION_CURVE, paths.EVALUATION_REPORT,
                     *sorted(paths.EXTERNAL_PLOTS.glob("*.csv")), *sorted(paths.FIGURES.glob("*.png"))):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        # The data report belongs with the run; logged here so that report changes cost no retraining.
        mlflow.log_artifacts(str(paths.DATA_REPORT), artifact_path="inputs/data")


if __name__ == "__main__":
    run_stage(main)
