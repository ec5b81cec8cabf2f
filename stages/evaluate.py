"""DVC stage `evaluate`: the trained model on the test split -> metrics/test.json, plots, the MLflow run."""

import keras
import mlflow

from pneumonia import paths, tracking
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import load_params
from pneumonia.evaluation import metrics, plots
from pneumonia.evaluation.predictions import predict_split
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    model = keras.models.load_model(paths.MODEL)
    test = predict_split(model, paths.TFRECORDS, "test", params.train.batch_size)
    threshold = params.evaluate.threshold
    scores = metrics.classification_metrics(test.labels, test.probabilities, threshold)
    write_json(paths.TEST_METRICS, scores)

    predicted = (test.probabilities >= threshold).astype(int)
    write_csv(paths.TEST_PREDICTIONS, ["file_name", "actual", "predicted", "probability"],
              [[name, label, guess, f"{p:.6f}"] for name, label, guess, p in
               zip(test.file_names, test.labels, predicted, test.probabilities)])
    roc = metrics.roc_points(test.labels, test.probabilities)
    write_csv(paths.ROC_CURVE, ["fpr", "tpr"], list(zip(roc["fpr"], roc["tpr"])))

    with tracking.resumed_run(paths.RUN_INFO):
        mlflow.set_tags({f"evaluate.{key}": value for key, value in params.evaluate.model_dump().items()})
        mlflow.log_metrics({f"test_{name}": float(value) for name, value in scores.items()})
        figures = paths.PLOTS / "figures"
        plots.confusion_matrix_png(metrics.confusion(test.labels, predicted), figures / "confusion_matrix.png",
                                   f"test, threshold {threshold:.2f}")
        plots.roc_png(roc["fpr"], roc["tpr"], scores["roc_auc"], figures / "roc.png")
        for path in (paths.TEST_PREDICTIONS, paths.ROC_CURVE, paths.TEST_METRICS, *figures.glob("*.png")):
            mlflow.log_artifact(str(path), artifact_path="evaluation")


if __name__ == "__main__":
    run_stage(main)
