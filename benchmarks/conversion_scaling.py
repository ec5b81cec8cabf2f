"""Target 3: the tfrecords conversion on 2 worker processes >= 1.8 x the images/s on 1, on
full-resolution stand-ins (see tfrecords_vs_folders), where decoding dominates.

Steady state: each setting converts manifests listing the stand-ins once and `k` times; images/s is
the extra images over the extra time, so start-up (spawning workers) cancels out. Settings alternate,
`repeats` times; medians reported. On a shared machine the stage gets less than the cores it asks
for: the profile reports the cores it obtained and the CPU time per image of the writer (serial) and
of the workers (parallel), which show the limit.
"""

import resource
from pathlib import Path

from benchmarks.common import (
    REPO,
    Scale,
    load_during,
    main,
    manifests_for_tfrecords,
    median,
    prepared_sample,
    standins,
    timed,
)

TARGET = 1.8
WORKERS = (1, 2)


def run(workdir: Path, scale: Scale, sample_zip: Path) -> dict:
    from pneumonia.config import load_params
    from pneumonia.data.tfrecords import write_tfrecords

    params = load_params(REPO / "params.yaml")
    _, records = standins(workdir, prepared_sample(workdir, sample_zip, scale.sample_every), scale.standins,
                                  scale.standin_size)
    few, many = scale.conversion_copies
    manifests = {copies: manifests_for_tfrecords(workdir / f"conversion-{copies}x", {"train": records * copies})
                 for copies in (few, many)}

    def convert(workers: int, copies: int) -> dict[str, float]:
        """Wall seconds, and CPU seconds of this process (the writer) and of the workers (reaped at the end)."""
        config = params.tfrecords.model_copy(update={"workers": workers})
        before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        out = workdir / "conversion-out"
        seconds = timed(lambda: write_tfrecords(manifests[copies], out, params.data.image_size, config))
        after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        writer, workers_cpu = (a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
        return {"seconds": seconds, "writer_cpu": writer, "workers_cpu": workers_cpu}

    rates: dict[int, list[float]] = {workers: [] for workers in WORKERS}
    profile: dict[int, list[dict]] = {workers: [] for workers in WORKERS}
    images = many * len(records)
    result: dict = {"images": {"few": few * len(records), "many": images}, "seconds": {}}
    with load_during(result):
        for _ in range(scale.repeats):
            for workers in WORKERS:
                short, long = convert(workers, few), convert(workers, many)
                rates[workers].append((many - few) * len(records) / (long["seconds"] - short["seconds"]))
                timings = result["seconds"].setdefault(str(workers), [])
                timings.append([round(run["seconds"], 2) for run in (short, long)])
                profile[workers].append(long)
    one, two = median(rates[1]), median(rates[2])
    ratio = two / one
    return {
        "target": f"tfrecords conversion images/s on 2 processes >= {TARGET} x on 1 (full-resolution JPEGs)",
        "measured": f"{ratio:.2f} x ({two:.0f} vs {one:.0f} images/s)",
        "ratio": round(ratio, 3), "met": ratio >= TARGET,
        "images_per_second": {str(workers): round(median(values), 1) for workers, values in rates.items()},
        "rounds": {str(workers): [round(value, 1) for value in values] for workers, values in rates.items()},
        # Where the time goes, in the larger conversions: CPU ms per image in the writer (serial) and the
        # workers (parallel), and how many cores the stage actually got (2.0 on an idle 2-core machine).
        "profile": {str(workers): {
            "writer_cpu_ms_per_image": round(median([p["writer_cpu"] for p in runs]) / images * 1000, 2),
            "workers_cpu_ms_per_image": round(median([p["workers_cpu"] for p in runs]) / images * 1000, 2),
            "cores_obtained": round(median([(p["writer_cpu"] + p["workers_cpu"]) / p["seconds"] for p in runs]), 2),
        } for workers, runs in profile.items()},
        **result,
    }


if __name__ == "__main__":
    main(run)
