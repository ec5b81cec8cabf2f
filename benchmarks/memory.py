"""Target 5: peak resident memory of the tfrecords stage does not grow with the dataset: the real
stage script run as a child process on manifests listing the sample once and 4 times, memory
summed over the stage and its decoding workers. "Does not grow": the larger run's peak within 5%
(measurement noise) of the smaller one's, where holding the encoded images would add their size.
"""

import shutil
from pathlib import Path

from benchmarks.common import (
    REPO,
    Scale,
    load_during,
    main,
    median,
    peak_tree_rss,
    prepared_sample,
    python,
    sample_records,
)

TOLERANCE = 1.05


def run(workdir: Path, scale: Scale, sample_zip: Path) -> dict:
    from pneumonia import SPLITS, paths
    from pneumonia.data.manifest import write_manifests

    sample = prepared_sample(workdir, sample_zip, scale.sample_every)
    splits = {split: sample_records(sample, split) for split in SPLITS}
    projects = {}
    for copies in scale.memory_copies:
        project = workdir / f"memory-{copies}x"
        write_manifests(project / paths.MANIFESTS, {split: records * copies for split, records in splits.items()})
        shutil.copyfile(REPO / "params.yaml", project / "params.yaml")
        projects[copies] = project

    runs: dict[int, list[dict]] = {copies: [] for copies in projects}
    result: dict = {"images": {f"{copies}x": copies * sum(map(len, splits.values())) for copies in projects}}
    with load_during(result):
        for _ in range(scale.repeats):
            for copies, project in projects.items():
                runs[copies].append(peak_tree_rss([python(), str(REPO / "stages" / "tfrecords.py")], project))
                result.setdefault("tfrecords_mb", {})[f"{copies}x"] = round(
                    sum(f.stat().st_size for f in (project / paths.TFRECORDS).iterdir()) / 2**20, 1)
                shutil.rmtree(project / paths.TFRECORDS)
    small, large = scale.memory_copies
    peaks = {copies: median([r["peak_rss_mb"] for r in values]) for copies, values in runs.items()}
    ratio = peaks[large] / peaks[small]
    return {
        "target": f"peak RSS of the tfrecords stage (with its workers) at {large}x the sample "
                  f"<= {TOLERANCE} x at {small}x",
        "measured": f"{ratio:.3f} x ({peaks[large]:.0f} vs {peaks[small]:.0f} MB)",
        "ratio": round(ratio, 3), "met": ratio <= TOLERANCE,
        "peak_rss_mb": {f"{copies}x": peak for copies, peak in peaks.items()},
        "runs": {f"{copies}x": values for copies, values in runs.items()},
        **result,
    }


if __name__ == "__main__":
    main(run)
