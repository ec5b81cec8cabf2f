"""DVC stage `evaluate`: threshold chosen on validation, the out-of-distribution reference, the model on the
test split and on the external set if there is one (pneumonia.evaluation.evaluate) -> the model's settings,
out-of-distribution reference and ONNX graph beside it (models/model.json, models/model.ood.npz, models/model.onnx:
what every user of the model reads), metrics/evaluation.json (the headline), each split's scores and the external
set's tables in reports/evaluation/, plot tables and figures, the HTML report, the model card, the MLflow run (the
servable model, metrics and outputs).

All or nothing: every output is written into a scratch folder and moved into place once the MLflow run has
them too; a failure (a deleted run, a full disk) leaves the previous outputs as they were, so `pneumonia
predict` never meets settings whose run failed."""

from pneumonia import EXTERNAL_SPLIT, engines, paths, serving, tracking
from pneumonia.atomic import staged_outputs, write_csv, write_json, write_text
from pneumonia.config import load_params
from pneumonia.evaluation.evaluate import evaluate
from pneumonia.evaluation.model_card import markdown
from pneumonia.logs import run_stage
from pneumonia.model_settings import model_digest, onnx_digest, onnx_file, training_data
from pneumonia.models.build import load_model

# The test split's tables (ScoredSplit.tables), beside its figures; the external set's are
# external_<name>.csv in paths.EVALUATION_DETAILS
TEST_TABLES = {"predictions": paths.TEST_PREDICTIONS, "roc": paths.ROC_CURVE, "precision_recall": paths.PR_CURVE,
               "calibration": paths.CALIBRATION_CURVE}
# Each split's data as MLflow records it: (manifest, context)
DATASETS = {"test": (paths.MANIFESTS / "test.csv", "testing"),
            EXTERNAL_SPLIT: (paths.EXTERNAL / "manifest.csv", "external validation")}
# Every output of the stage (dvc.yaml's outs and metrics), moved into place together at the end. The model's
# settings, out-of-distribution reference and ONNX graph are model_settings.settings_file, ood_file and onnx_file
# of paths.MODEL.
OUTPUTS = [paths.MODEL_SETTINGS, paths.OOD_REFERENCE, onnx_file(paths.MODEL), paths.EVALUATION_METRICS,
           paths.EVALUATION_DETAILS, *TEST_TABLES.values(), paths.EVALUATION_REPORT, paths.FIGURES, paths.MODEL_CARD]


def main() -> None:
    params = load_params()
    tracking.check_run(paths.RUN_INFO)  # before the work: a deleted run, a store elsewhere, one down
    model = load_model(paths.MODEL, compile=False)  # it only predicts, in float32 (models.build.in_float32)
    result = evaluate(model, paths.TFRECORDS, paths.EXTERNAL, params.evaluate, params.train.batch_size)
    onnx = engines.onnx_model(model)  # also with test-time views: their one-view network (docs/decisions.md)
    settings = result.settings(params, model_digest(paths.MODEL),
                               training_data(params.data.source, paths.RAW_SOURCE, paths.SPLIT_COUNTS,
                                             tracking.manifests_hash(paths.MANIFESTS)), tracking.git_commit())
    settings = settings.model_copy(update={"onnx_sha256": onnx_digest(onnx)})
    card = result.card(settings, paths.SPLIT_COUNTS)

    with staged_outputs(OUTPUTS, "evaluate") as staged:
        result.ood.save(staged(paths.OOD_REFERENCE))
        staged(onnx_file(paths.MODEL)).write_bytes(onnx)
        write_text(staged(paths.MODEL_SETTINGS), settings.to_json())
        write_text(staged(paths.MODEL_CARD), markdown(card, f"Model card: {params.model.name}, pneumonia on chest "
                                                            "X-rays"))
        for name, table in result.test.tables().items():
            write_csv(staged(TEST_TABLES[name]), *table)
        details = staged(paths.EVALUATION_DETAILS)
        details.mkdir()
        write_json(details / paths.TEST_SCORES.name, result.test.scores)
        if result.external:
            write_json(details / paths.EXTERNAL_SCORES.name, result.external.scores)
            for name, table in result.external.tables().items():
                write_csv(details / f"{EXTERNAL_SPLIT}_{name}.csv", *table)
        write_json(staged(paths.EVALUATION_METRICS), result.headline)
        figures = staged(paths.FIGURES)
        figures.mkdir()
        write_text(staged(paths.EVALUATION_REPORT), result.report(figures, params, paths.TRAIN_HISTORY,
                                                                  paths.SPLIT_COUNTS, paths.TRAIN_METRICS, card))

        with tracking.resumed_run(paths.RUN_INFO):
            # The model first: each split's metrics are linked to it. The servable model: the bundle and its card.
            logged = serving.log_model(paths.MODEL, params.tracking.register_model, staged(paths.MODEL_CARD),
                                       settings=staged(paths.MODEL_SETTINGS), ood=staged(paths.OOD_REFERENCE),
                                       onnx=staged(onnx_file(paths.MODEL)))
            splits = {name: (*DATASETS[name], metrics) for name, metrics in result.mlflow_metrics().items()}
            outputs = [staged(paths.EVALUATION_METRICS), *sorted(details.iterdir()),
                       *map(staged, TEST_TABLES.values()), staged(paths.EVALUATION_REPORT), staged(paths.MODEL_CARD),
                       *sorted(figures.glob("*.png"))]
            tracking.log_evaluation(params.evaluate.model_dump(), logged.model_id, splits, outputs, paths.DATA_REPORT)


if __name__ == "__main__":
    run_stage(main)
