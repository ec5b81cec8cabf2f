"""Two profiles compared paired on the external set, seed by seed: is a lever a gain on another site's X-rays?

`python -m benchmarks.paired --models DIR --profiles A B` on the models `python -m benchmarks.external_validity
--profiles A B --seeds ... --keep-models DIR` kept (<DIR>/<profile>-<seed>.keras, both trained on the same data).
For each seed kept for both: each model's threshold chosen by evaluate.threshold on its own validation split, then on
the same external images ROC AUC, sensitivity, specificity and ECE of A and of B, the difference B - A with a 95%
interval over paired bootstrap resamples (the same stratified draws of the images for both models, so the
images' own noise cancels: the set holds 92 normal X-rays), and the difference on two fixed halves of the external
patients (a lever that helps should help on both). The external set chooses nothing; the test split is not read.
Results go to <out>/paired-<A>-<B>.json and .md. With --mirrored, the external images are mirrored left to right
(heart on the right: what a flipped export or film gives) and the thresholds stay those of validation as stored:
<out>/paired-<A>-<B>-mirrored.json and .md.
"""

import argparse
import statistics
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.calibration import BOOTSTRAP
from benchmarks.common import REPO, load_during, measured_on, write_report
from benchmarks.external_validity import patient_halves
from benchmarks.prediction_levers import kept_seeds, kept_split, view_probabilities
from benchmarks.run_all import machine

COMPARED = ("roc_auc", "sensitivity", "specificity", "ece")


def scores_at(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    from pneumonia.evaluation.metrics import classification_metrics, expected_calibration_error

    found = classification_metrics(labels, probabilities, threshold)
    return {"roc_auc": found["roc_auc"], "sensitivity": found["sensitivity"], "specificity": found["specificity"],
            "ece": expected_calibration_error(labels, probabilities)}


def paired(labels: np.ndarray, first: tuple[np.ndarray, float], second: tuple[np.ndarray, float],
           halves: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Each model's scores at its threshold, and the differences second - first: on the set, with a 95% interval
    over the same stratified resamples of the images, and on each half of the patients."""
    def difference(chosen: np.ndarray) -> dict[str, float]:
        a, b = (scores_at(labels[chosen], probabilities[chosen], threshold) for probabilities, threshold in
                (first, second))
        return {name: b[name] - a[name] for name in COMPARED}

    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    draws = [difference(np.r_[rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
             for _ in range(resamples)]
    everything = np.arange(len(labels))
    return {"first": scores_at(labels, *first), "second": scores_at(labels, *second),
            "thresholds": [first[1], second[1]], "difference": difference(everything),
            "difference_ci95": {name: np.percentile([draw[name] for draw in draws], [2.5, 97.5]).tolist()
                                for name in COMPARED},
            "halves": [difference(np.flatnonzero(halves == side)) for side in (0, 1)]}


def markdown(report: dict) -> str:
    first, second = report["profiles"]
    mirrored = " mirrored left to right" if report.get("mirrored") else ""
    lines = [f"{second} against {first}, paired on the external set{mirrored} ({report['images']} X-rays), each "
             "model at the "
             f"threshold rule {report['rule']} chose on its own validation split. Difference: {second} - {first} "
             "(95% interval over paired bootstrap resamples of the images); halves: the difference on two fixed "
             "halves of the external patients.", "",
             f"| seed | metric | {first} | {second} | difference [95% CI] | halves A / B |",
             "|---|---|---|---|---|---|"]
    for seed, found in report["seeds"].items():
        for name in COMPARED:
            low, high = found["difference_ci95"][name]
            lines.append(f"| {seed} | {name} | {found['first'][name]:.3f} | {found['second'][name]:.3f} | "
                         f"{found['difference'][name]:+.3f} [{low:+.3f}, {high:+.3f}] | "
                         f"{found['halves'][0][name]:+.3f} / {found['halves'][1][name]:+.3f} |")
    seeds = report["seeds"].values()
    lines += ["", "| metric | mean difference | seeds better / worse (interval excludes 0) |", "|---|---|---|"]
    for name in COMPARED:
        better = -1 if name == "ece" else 1  # a lower ECE is better
        differences = [found["difference"][name] for found in seeds]
        gains = sum(better * found["difference_ci95"][name][0 if better > 0 else 1] > 0 for found in seeds)
        losses = sum(better * found["difference_ci95"][name][1 if better > 0 else 0] < 0 for found in seeds)
        lines.append(f"| {name} | {statistics.fmean(differences):+.3f} | {gains} / {losses} of {len(differences)} |")
    lines += ["", measured_on(report)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="external_validity's --keep-models folder")
    parser.add_argument("--profiles", nargs=2, required=True, metavar=("A", "B"), help="B is compared against A")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--mirrored", action="store_true", help="the external images mirrored left to right")
    args = parser.parse_args()

    from pneumonia.config import load_params
    from pneumonia.data.external import SPLIT
    from pneumonia.models.build import load_model

    params = load_params(REPO / "params.yaml").evaluate
    splits = {}
    for profile in args.profiles:
        data = args.models / profile / "data"
        splits[profile] = kept_split(data / "tfrecords", "val"), kept_split(data / SPLIT, SPLIT)
    (val_labels, _, _), (labels, names, _) = splits[args.profiles[0]]
    for (other_val, _, _), (other_labels, other_names, _) in splits.values():
        if other_names != names or not (np.array_equal(other_val, val_labels) and np.array_equal(other_labels, labels)):
            raise SystemExit("the two profiles' kept models were trained on different data: nothing to pair")
    seeds = sorted(set(kept_seeds(args.models, args.profiles[0])) & set(kept_seeds(args.models, args.profiles[1])))
    if not seeds:
        raise SystemExit(f"no seed kept for both {args.profiles} in {args.models}")

    def at_threshold(profile: str, seed: int) -> tuple[np.ndarray, float]:
        from pneumonia.evaluation.threshold import choose_threshold

        (_, _, val_images), (_, _, images) = splits[profile]  # its own images: a lever may change data.image_size
        model = load_model(args.models / f"{profile}-{seed}.keras")
        validation = view_probabilities(model, val_images, params.tta_views)
        external = images[:, :, ::-1] if args.mirrored else images
        return view_probabilities(model, external, params.tta_views), choose_threshold(val_labels, validation,
                                                                                         params.threshold)

    mirrored = " --mirrored" if args.mirrored else ""
    report = {"profiles": args.profiles, "rule": str(params.threshold), "images": len(labels), "seeds": {},
              "mirrored": args.mirrored,
              "command": f"python -m benchmarks.paired --models DIR --profiles {' '.join(args.profiles)}{mirrored}",
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine()}
    halves = patient_halves(names)
    with load_during(report):
        for seed in seeds:
            report["seeds"][str(seed)] = paired(labels, at_threshold(args.profiles[0], seed),
                                                at_threshold(args.profiles[1], seed), halves)
    write_report(args.out, f"paired-{args.profiles[0]}-{args.profiles[1]}{mirrored.replace(' --', '-')}", report,
                 markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
