"""DVC stage `evaluate`: threshold chosen on validation, the model on the test split and on the external
set if there is one (pneumonia.evaluation.evaluate) -> metrics/evaluation.json (the headline), every
figure of each split in reports/evaluation/, plot tables and figures, the HTML report, the MLflow run."""

import json
from pathlib import Path

import mlflow

from pneumonia import paths, serving, tracking
from pneumonia.atomic import atomic_path, write_csv, write_json, write_text
from pneumonia.config import load_params
from pneumonia.data.external import SPLIT as EXTERNAL
from pneumonia.evaluation import summary
from pneumonia.evaluation.evaluate import evaluate
from pneumonia.evaluation.figures import draw_figures, read_history
from pneumonia.evaluation.report import render
from pneumonia.evaluation.scoring import ScoredSplit
from pneumonia.logs import run_stage
from pneumonia.models.build import load_model

# The test split's tables (ScoredSplit.tables), beside its figures; the external set's are
# external_<name>.csv in paths.EVALUATION_DETAILS
TEST_TABLES = {"predictions": paths.TEST_PREDICTIONS, "roc": paths.ROC_CURVE, "precision_recall": paths.PR_CURVE,
               "calibration": paths.CALIBRATION_CURVE}


def write_tables(split: ScoredSplit, files: dict[str, Path]) -> None:
    tables = split.tables()
    for name, path in files.items():
        write_csv(path, *summary.table(tables[name]))


def main() -> None:
    params = load_params()
    model = load_model(paths.MODEL)
    result = evaluate(model, paths.TFRECORDS, paths.EXTERNAL, params.evaluate, params.train.batch_size)
    test, external = result.test, result.external

    write_tables(test, TEST_TABLES)
    with atomic_path(paths.EVALUATION_DETAILS, directory=True) as folder:
        write_json(folder / paths.TEST_SCORES.name, test.scores)
        if external:
            write_json(folder / paths.EXTERNAL_SCORES.name, external.scores)
            write_tables(external, {name: folder / f"{EXTERNAL}_{name}.csv" for name in TEST_TABLES})
    write_json(paths.EVALUATION_METRICS, summary.headline(test.scores, external.scores if external else None))
    with atomic_path(paths.FIGURES, directory=True) as folder:
        figures = draw_figures(folder, read_history(paths.TRAIN_HISTORY), result.scored, result.gradcam_layer)
        write_text(paths.EVALUATION_REPORT, render(
            scores=test.scores, external=external.scores if external else None, figures=figures,
            params=params.model_dump(), data=json.loads(paths.SPLIT_COUNTS.read_text()),
            training=json.loads(paths.TRAIN_METRICS.read_text()), model_summary=result.model_summary))

    with tracking.resumed_run(paths.RUN_INFO):
        mlflow.set_tags({f"evaluate.{key}": value for key, value in params.evaluate.model_dump().items()})
        # The model first, then each split's metrics linked to it and to that split's data: the logged
        # model's page shows them and mlflow.search_logged_models ranks models by them.
        logged = serving.log_model(paths.MODEL, result.threshold, params.tfrecords.jpeg_quality,  # the servable model
                                   params.tracking.register_model)
        datasets = tracking.log_manifests(paths.MANIFESTS, {"test": "testing"})
        if external:
            datasets[EXTERNAL] = tracking.manifest_dataset(paths.EXTERNAL / "manifest.csv", name=EXTERNAL)
            mlflow.log_input(datasets[EXTERNAL], context="external validation")
        for split in result.scored:
            mlflow.log_metrics(summary.mlflow_metrics(split.scores, prefix=split.name), model_id=logged.model_id,
                               dataset=datasets[split.name])
        for path in (paths.EVALUATION_METRICS, *sorted(paths.EVALUATION_DETAILS.iterdir()), *TEST_TABLES.values(),
                     paths.EVALUATION_REPORT, *sorted(paths.FIGURES.glob("*.png"))):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        # The data report belongs with the run; logged here so that report changes cost no retraining.
        mlflow.log_artifacts(str(paths.DATA_REPORT), artifact_path="inputs/data")


if __name__ == "__main__":
    run_stage(main)
