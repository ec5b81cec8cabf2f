"""Calibration (evaluate.calibration) measured on the models external_validity kept (`--keep-models DIR`), no
retraining:

    python -m benchmarks.calibration --models DIR --profile default

For each seed's model and each method (none, temperature, platt): the calibration fitted on the validation
split, the threshold the pipeline's rule (evaluate.threshold) chooses on the calibrated validation
probabilities, and on the external set the expected calibration error (ECE, 10 bins, as the evaluate stage
reports it) with a 95% bootstrap interval, its paired difference to the uncalibrated model's (the same
resampled images, so the seed's own noise cancels), the Brier score, and the ECE on two fixed halves of the
external patients (a method that helps should help on both). The external set chooses nothing: every
calibration and threshold is fitted on validation. The test split is not read (the evaluate stage's alone).
Results go to <out>/calibration-<profile>.json and .md.
"""

import argparse
import statistics
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, load_during, write_report
from benchmarks.external_validity import patient_halves
from benchmarks.prediction_levers import kept_seeds, kept_split, view_probabilities
from benchmarks.run_all import machine

COMPARED_METHODS = ("none", "temperature", "platt")
BOOTSTRAP = 2000
ECE_TARGET = 0.08  # issue 34: on every seed, external set


def paired_bootstrap(labels: np.ndarray, first: np.ndarray, second: np.ndarray, resamples: int,
                     seed: int = 0) -> dict:
    """95% intervals of the ECE of `second`, and of ECE(second) - ECE(first), over the same stratified resamples of
    the images (each resample keeps the numbers of each class)."""
    from pneumonia.evaluation.metrics import expected_calibration_error

    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    alone, differences = [], []
    for _ in range(resamples):
        drawn = np.r_[rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        after = expected_calibration_error(labels[drawn], second[drawn])
        alone.append(after)
        differences.append(after - expected_calibration_error(labels[drawn], first[drawn]))
    return {"ece_ci95": np.percentile(alone, [2.5, 97.5]).tolist(),
            "difference_ci95": np.percentile(differences, [2.5, 97.5]).tolist()}


def seed_scores(val: tuple, external: tuple, halves: np.ndarray, rule) -> dict:
    """One model's validation and external probabilities, each method: {method: scores}."""
    from pneumonia.evaluation.calibration import fit_calibration
    from pneumonia.evaluation.metrics import classification_metrics, expected_calibration_error
    from pneumonia.evaluation.threshold import choose_threshold

    (val_labels, val_probabilities), (labels, probabilities) = val, external
    found = {}
    for method in COMPARED_METHODS:
        calibration = fit_calibration(method, val_labels, val_probabilities)
        calibrated_val, calibrated = calibration.apply(val_probabilities), calibration.apply(probabilities)
        threshold = choose_threshold(val_labels, calibrated_val, rule)
        at = classification_metrics(labels, calibrated, threshold)
        found[method] = {
            "calibration": calibration.as_dict(), "threshold": threshold,
            "validation_ece": expected_calibration_error(val_labels, calibrated_val),
            **{name: at[name] for name in ("ece", "brier", "roc_auc", "sensitivity", "specificity", "accuracy")},
            "halves_ece": [expected_calibration_error(labels[halves == side], calibrated[halves == side])
                           for side in (0, 1)],
            **paired_bootstrap(labels, probabilities, calibrated, BOOTSTRAP),
        }
    return found


def markdown(report: dict) -> str:
    seeds = report["seeds"]
    lines = [f"Profile {report['profile']}, rule {report['rule']}; each calibration and threshold fitted on "
             "validation; external set (244 X-rays). ECE: expected calibration error, 10 bins (95% bootstrap "
             "interval); difference: ECE calibrated - ECE uncalibrated on the same resampled images (paired, 95%); "
             "halves: the ECE on two fixed halves of the external patients.", "",
             "| seed | method | scale / shift | threshold | external ECE [95% CI] | difference [95% CI] | halves A / B "
             "| Brier | sensitivity / specificity | validation ECE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, methods in seeds.items():
        for method, found in methods.items():
            parameters = found["calibration"]
            difference = ("" if method == "none" else
                          f"{found['ece'] - methods['none']['ece']:+.3f} "
                          f"[{found['difference_ci95'][0]:+.3f}, {found['difference_ci95'][1]:+.3f}]")
            lines.append(
                f"| {seed} | {method} | {parameters['scale']:.3f} / {parameters['shift']:+.3f} | "
                f"{found['threshold']:.3f} | {found['ece']:.3f} [{found['ece_ci95'][0]:.3f}, "
                f"{found['ece_ci95'][1]:.3f}] | {difference} | {found['halves_ece'][0]:.3f} / "
                f"{found['halves_ece'][1]:.3f} | {found['brier']:.3f} | {found['sensitivity']:.3f} / "
                f"{found['specificity']:.3f} | {found['validation_ece']:.3f} |")
    lines += ["", "Over seeds (mean ± sd; the threshold's spread also in log-odds, where a confident model's "
              "thresholds crowd near 1):", "",
              f"| method | external ECE | worst seed's ECE | seeds with ECE <= {ECE_TARGET} | threshold "
              "| threshold log-odds |", "|---|---|---|---|---|---|"]

    def spread(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    for method in COMPARED_METHODS:
        eces = [methods[method]["ece"] for methods in seeds.values()]
        thresholds = [methods[method]["threshold"] for methods in seeds.values()]
        log_odds = [float(np.log(t / (1 - t))) for t in thresholds]
        lines.append(f"| {method} | {spread(eces)} | {max(eces):.3f} | {sum(e <= ECE_TARGET for e in eces)} of "
                     f"{len(eces)} | {spread(thresholds)} | {spread(log_odds)} |")
    lines += ["", f"Reproduce: `{report['command']}`. Measured {report['date']} on {report['machine']['cpu']} "
              f"({report['machine']['cores']} cores), load average {report['load_before']} before, "
              f"{report['load_after']} after."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="external_validity's --keep-models folder")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)

    from pneumonia.config import load_params
    from pneumonia.data.external import SPLIT
    from pneumonia.models.build import load_model

    rule = load_params(REPO / "params.yaml").evaluate.threshold
    data = args.models / args.profile / "data"
    val_labels, _, val_images = kept_split(data / "tfrecords", "val")
    labels, names, images = kept_split(data / "external", SPLIT)
    halves = patient_halves(names)
    report = {"profile": args.profile, "rule": str(rule), "seeds": {},
              "command": f"python -m benchmarks.calibration --models DIR --profile {args.profile}",
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine()}
    timing = {}
    with load_during(timing):
        for seed in kept_seeds(args.models, args.profile):
            model = load_model(args.models / f"{args.profile}-{seed}.keras")
            report["seeds"][str(seed)] = seed_scores(
                (val_labels, view_probabilities(model, val_images, 1)), (labels, view_probabilities(model, images, 1)),
                halves, rule)
    report.update(load_before=timing["load_average"]["before"], load_after=timing["load_average"]["after"])
    write_report(args.out, f"calibration-{args.profile}", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
