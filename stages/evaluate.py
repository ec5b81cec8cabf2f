"""DVC stage `evaluate`: threshold chosen on validation, the model on the test split and on the external
set if there is one (pneumonia.evaluation.evaluate) -> metrics/evaluation.json (the headline), each split's
scores and the external set's tables in reports/evaluation/, plot tables and figures, the HTML report, the
MLflow run (the servable model, metrics and outputs)."""

from pneumonia import EXTERNAL_SPLIT, paths, serving, tracking
from pneumonia.atomic import atomic_path, write_csv, write_json, write_text
from pneumonia.config import load_params
from pneumonia.evaluation.evaluate import evaluate
from pneumonia.logs import run_stage
from pneumonia.models.build import load_model

# The test split's tables (ScoredSplit.tables), beside its figures; the external set's are
# external_<name>.csv in paths.EVALUATION_DETAILS
TEST_TABLES = {"predictions": paths.TEST_PREDICTIONS, "roc": paths.ROC_CURVE, "precision_recall": paths.PR_CURVE,
               "calibration": paths.CALIBRATION_CURVE}
# Each split's data as MLflow records it: (manifest, context)
DATASETS = {"test": (paths.MANIFESTS / "test.csv", "testing"),
            EXTERNAL_SPLIT: (paths.EXTERNAL / "manifest.csv", "external validation")}


def main() -> None:
    params = load_params()
    result = evaluate(load_model(paths.MODEL), paths.TFRECORDS, paths.EXTERNAL, params.evaluate,
                      params.train.batch_size)

    for name, table in result.test.tables().items():
        write_csv(TEST_TABLES[name], *table)
    with atomic_path(paths.EVALUATION_DETAILS, directory=True) as folder:
        write_json(folder / paths.TEST_SCORES.name, result.test.scores)
        if result.external:
            write_json(folder / paths.EXTERNAL_SCORES.name, result.external.scores)
            for name, table in result.external.tables().items():
                write_csv(folder / f"{EXTERNAL_SPLIT}_{name}.csv", *table)
    write_json(paths.EVALUATION_METRICS, result.headline)
    with atomic_path(paths.FIGURES, directory=True) as folder:
        write_text(paths.EVALUATION_REPORT, result.report(folder, params, paths.TRAIN_HISTORY, paths.SPLIT_COUNTS,
                                                          paths.TRAIN_METRICS))

    with tracking.resumed_run(paths.RUN_INFO):
        # The model first: each split's metrics are linked to it.
        logged = serving.log_model(paths.MODEL, result.threshold, params.tfrecords.jpeg_quality,  # the servable model
                                   params.tracking.register_model, params.evaluate.tta_views, result.calibration)
        splits = {name: (*DATASETS[name], metrics) for name, metrics in result.mlflow_metrics().items()}
        outputs = [paths.EVALUATION_METRICS, *sorted(paths.EVALUATION_DETAILS.iterdir()), *TEST_TABLES.values(),
                   paths.EVALUATION_REPORT, *sorted(paths.FIGURES.glob("*.png"))]
        tracking.log_evaluation(params.evaluate.model_dump(), logged.model_id, splits, outputs, paths.DATA_REPORT)


if __name__ == "__main__":
    run_stage(main)
