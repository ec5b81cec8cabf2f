"""Which `evaluate.threshold` rule generalises, judged on the validation split alone.

    python -m benchmarks.threshold_rules --project .   # after `dvc repro train` (or a full repro)

The trained model (models/model.keras) predicts the validation split once. Then, many times over,
the validation patients are split in two halves at random: each rule chooses its threshold on one
half and is scored on the other (and the other way round). The mean sensitivity and specificity on
the held-out halves show how each rule's operating point carries over to images it was not chosen
on, without reading the test split. Writes <out>/threshold_rules.json and .md.
"""

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, working_directory
from pneumonia.atomic import write_json, write_text

RULES = ("youden", "sensitivity@0.95", "sensitivity@0.97", "sensitivity@0.99", 0.5)


def held_out_scores(labels: np.ndarray, probabilities: np.ndarray, patients: list[str], rule, repeats: int,
                    seed: int) -> dict:
    from pneumonia.evaluation.metrics import classification_metrics
    from pneumonia.evaluation.threshold import choose_threshold

    unique = sorted(set(patients))
    patient_index = np.array([unique.index(patient) for patient in patients])
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "balanced_accuracy": [], "accuracy": []}
    for _ in range(repeats):
        in_first = rng.permutation(len(unique)) < len(unique) // 2
        first = in_first[patient_index]
        for chosen_on, scored_on in ((first, ~first), (~first, first)):
            if len(set(labels[chosen_on])) < 2 or len(set(labels[scored_on])) < 2:
                continue  # a half without both classes: no data-driven threshold to choose or score
            threshold = choose_threshold(labels[chosen_on], probabilities[chosen_on], rule)
            metrics = classification_metrics(labels[scored_on], probabilities[scored_on], threshold)
            for name in scores:
                scores[name].append(metrics[name])
    return {name: {"mean": statistics.fmean(values) if values else float("nan"),
                   "sd": statistics.stdev(values) if len(values) > 1 else float("nan")}
            for name, values in scores.items()}


def compare_rules(project: Path, repeats: int = 200) -> dict:
    """Held-out validation scores of every rule in RULES for the model trained in `project`."""
    from pneumonia import paths
    from pneumonia.config import load_params
    from pneumonia.data.prepare import patient_id
    from pneumonia.evaluation.predictions import predict_split
    from pneumonia.models.build import load_model

    with working_directory(project.resolve()):
        params = load_params()
        val = predict_split(load_model(paths.MODEL), paths.TFRECORDS, "val", params.train.batch_size)
    patients = [patient_id(name) for name in val.file_names]
    return {"validation_images": len(val.labels), "validation_patients": len(set(patients)), "repeats": repeats,
            "model": params.model.name, "train_seed": params.train.seed,
            "rules": {str(rule): held_out_scores(val.labels, val.probabilities, patients, rule, repeats, seed=0)
                      for rule in RULES}}


def markdown(report: dict) -> str:
    lines = [f"Validation only: {report['validation_images']} images of {report['validation_patients']} patients, "
             f"{report['repeats']} random halvings by patient; {report['model']}, train.seed {report['train_seed']}.",
             "", "| rule | held-out sensitivity | held-out specificity | held-out balanced accuracy |",
             "|---|---|---|---|"]
    lines += [f"| {rule} | " + " | ".join(f"{scores[name]['mean']:.3f} ± {scores[name]['sd']:.3f}"
                                        for name in ("sensitivity", "specificity", "balanced_accuracy")) + " |"
              for rule, scores in report["rules"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=REPO, help="project folder holding the trained model")
    parser.add_argument("--repeats", type=int, default=200, help="random halvings of the validation patients")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for threshold_rules.json/.md")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    report = compare_rules(args.project, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "threshold_rules.json", report, sort_keys=False)
    write_text(args.out / "threshold_rules.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
