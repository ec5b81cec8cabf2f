"""Run every benchmark, each in its own process, and write benchmarks/results.json and results.md.

    python -m benchmarks.run_all            # full: 10 to 20 minutes on 2 CPU cores, depending on load
    python -m benchmarks.run_all --smoke    # tiny sizes, all in one process: checks that every benchmark works
    python -m benchmarks.run_all --copies   # measure nothing: the README's and docs' copies of results.json
                                            # written again against today's params.yaml

The report records the params it was measured with; where params.yaml has changed what is measured since
(MEASURED_WITH), the copies say that their figures are of another default.

Run from the repository root with the project's venv active.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import yaml

from benchmarks.common import REPO, SAMPLE_ZIP, load_average, replace_block

BENCHMARKS = {  # module: what it measures, in the order
    "input_vs_compute": "1. Input pipeline vs compute limit",
    "tfrecords_vs_folders": "2. TFRecords vs reading image folders",
    "conversion_scaling": "3. Conversion scales with cores",
    "incremental_dvc": "4. Incremental work",
    "memory": "5. Memory",
    "training_speed": "6. Training speed",
    "inference": "7. Inference",
    "inference_ensemble": "8. Inference, 2-member ensemble",
}
# Benchmarks that are another one's module with options: name: (module, {option: value})
RUNS_OF = {"inference_ensemble": ("inference", {"members": 2})}
# Where the report is copied: the table into docs/performance.md, the summary into README.md.
TABLE_MARKERS = ("<!-- performance-table: made by python -m benchmarks.run_all -->", "<!-- /performance-table -->")
SUMMARY_MARKERS = ("<!-- performance-summary: made by python -m benchmarks.run_all -->",
                   "<!-- /performance-summary -->")
PACKAGES = ("tensorflow", "keras", "dvc", "pillow", "numpy", "psutil")
# The params.yaml keys (and sections) whose values the figures depend on: the default profile measured.
MEASURED_WITH = ("data.image_size", "tfrecords.jpeg_quality", "model", "train", "evaluate.tta_views")


def measured_params(params: dict, prefix: str = "") -> dict:
    """The MEASURED_WITH part of `params` (params.yaml as read, of any version), dotted keys."""
    found = {}
    for key, value in params.items():
        dotted = prefix + key
        if isinstance(value, dict):
            found.update(measured_params(value, dotted + "."))
        elif any(dotted == name or dotted.startswith(name + ".") for name in MEASURED_WITH):
            found[dotted] = value
    return found


def changed_since(report: dict, params: dict) -> tuple[list[str], int] | None:
    """The MEASURED_WITH keys of both the report's params and `params` whose values differ, and how many keys
    only one of them has (added or renamed since); None for a report from before reports recorded params.
    A key added since at the value a params.yaml without it gets from the schema (a new setting, off) is no change:
    the figures were measured with it."""
    from pneumonia.config import Params

    if "params" not in report:
        return None
    then, now = measured_params(report["params"]), measured_params(params)
    defaults = measured_params(Params().model_dump())
    added_as_before = {key for key in now.keys() - then.keys() if key in defaults and defaults[key] == now[key]}
    return (sorted(key for key in then.keys() & now.keys() if then[key] != now[key]),
            len((then.keys() ^ now.keys()) - added_as_before))


def staleness(report: dict, params: dict) -> str:
    """A sentence saying the figures are of another default than `params`'s; "" when they are today's."""
    changed = changed_since(report, params)
    if changed == ([], 0):
        return ""
    if changed is None:
        what = "measured before reports recorded their params"
    else:
        keys, others = changed
        what = "params.yaml changed since: " + "; ".join(
            ([", ".join(keys)] if keys else []) + ([f"{others} keys added or renamed"] if others else []))
    return f"**Figures of another default** ({what}): `python -m benchmarks.run_all` measures today's."


# The CPU flags that decide training speed here: oneDNN's float32 kernels (AVX-512), native bfloat16 arithmetic
# (AVX-512 BF16) and the matrix units (AMX). The machines of one name are not always the same model.
SPEED_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_description(machine: dict) -> str:
    """"Intel Xeon (avx512f, amx_bf16)": the CPU's name and those of SPEED_FLAGS it has (reports before them: the
    name alone)."""
    if "cpu_flags" not in machine:
        return machine["cpu"]
    return f"{machine['cpu']} ({', '.join(machine['cpu_flags']) or 'none of ' + ', '.join(SPEED_FLAGS)})"


def machine(packages: tuple[str, ...] = PACKAGES) -> dict:
    import psutil

    cpuinfo = Path("/proc/cpuinfo")
    lines = (cpuinfo.read_text() if cpuinfo.exists() else "").splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    cpu = names[0] if names else platform.processor()

    return {
        "cpu": cpu, "cpu_flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(), "python": platform.python_version(),
        "versions": {package: version(package) for package in packages},
    }


def run_benchmark(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    if args.smoke:
        return run_in_this_process(name, args.sample, workdir)
    module, options = RUNS_OF.get(name, (name, {}))
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [sys.executable, "-m", f"benchmarks.{module}", "--workdir", str(workdir),
                   "--sample", str(args.sample), "--json", output.name,
                   *(arg for option, value in options.items() for arg in (f"--{option}", str(value)))]
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO, stderr=subprocess.PIPE, text=True, check=False)
        if completed.returncode != 0:
            return {"met": False, "error": completed.stderr[-3000:], "measured": "failed (see error)"}
        return {**json.loads(Path(output.name).read_text()), "benchmark_seconds": round(time.perf_counter() - started)}


def run_in_this_process(name: str, sample: Path, workdir: Path) -> dict:
    """--smoke: the benchmark's `run` at smoke sizes in this process, not a process of its own (each of which
    would import TensorFlow again: seconds that check nothing); a failure is its result, as in a full run."""
    import importlib
    import traceback

    from benchmarks.common import SMOKE, quiet_tensorflow

    quiet_tensorflow()
    print(f"== {name}", flush=True)
    module, options = RUNS_OF.get(name, (name, {}))
    started = time.perf_counter()
    try:
        result = importlib.import_module(f"benchmarks.{module}").run(workdir, SMOKE, sample, **options)
    except Exception:  # noqa: BLE001 - any failure is the benchmark's, reported like a full run's
        return {"met": False, "error": traceback.format_exc()[-3000:], "measured": "failed (see error)"}
    return {**result, "benchmark_seconds": round(time.perf_counter() - started)}


def table(results: dict) -> str:
    lines = ["| target | measured | met | load average (before/after) |", "|---|---|---|---|"]
    for name, title in BENCHMARKS.items():
        if result := results.get(name):
            load = result.get("load_average", {})
            met = "yes" if result["met"] else "**no**"
            lines.append(f"| {title}: {result.get('target', name)} | {result['measured']} | {met} | "
                         f"{load.get('before', '?')} / {load.get('after', '?')} |")
    return "\n".join(lines)


# what a user asks first
IN_README = ("training_speed", "inference", "inference_ensemble", "input_vs_compute", "incremental_dvc")


def readme_summary(report: dict, params: dict) -> str:
    """The README's lines: the figures a user asks about first, and where the rest is; whether they are of
    `params`'s default (params.yaml as read)."""
    lines = [f"- {result['target']}: {result['measured']}" + ("" if result["met"] else " (**not met**)")
             for name in IN_README if (result := report["results"].get(name))]
    stale = staleness(report, params)
    return "\n".join([*([stale, ""] if stale else []), *lines, "",
                      f"Measured {report['finished'][:10]} on {report['machine']['cores']} cores of an "
                      f"{cpu_description(report['machine'])} "
                      f"([benchmarks/results.md](benchmarks/results.md), `{report['command']}`)."])


def performance_table(report: dict, params: dict) -> str:
    """docs/performance.md's copy of the table, saying when it is of another default than `params`'s."""
    stale = staleness(report, params)
    return "\n".join([*([stale, ""] if stale else []), table(report["results"])])


def write_copies(report: dict) -> None:
    """The table into docs/performance.md and the summary into README.md, against today's params.yaml."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    replace_block(REPO / "docs" / "performance.md", *TABLE_MARKERS, performance_table(report, params))
    replace_block(REPO / "README.md", *SUMMARY_MARKERS, readme_summary(report, params))


def markdown(report: dict) -> str:
    machine, results = report["machine"], report["results"]
    versions = ", ".join(f"{package} {number}" for package, number in machine["versions"].items())
    smoke = " (smoke sizes: these figures check that the benchmarks work, not the targets)" if report["smoke"] else ""
    lines = [
        "# Performance benchmarks", "",
        (f"Measured {report['finished']} on {cpu_description(machine)}, {machine['cores']} cores, "
         f"{machine['memory_gb']} GB, "
         f"{machine['os']}, Python {machine['python']}, {versions}."), "",
        f"Reproduce from the repository root: `{report['command']}`{smoke}", "",
        table(results),
    ]
    standin_mb = results.get("tfrecords_vs_folders", {}).get("standin_mean_mb", "?")
    lines += [
        "",
        ("Ratios, not absolute times, are the targets: both sides of each are measured in the same run, "
         "alternately, and each figure is the median of the repetitions. The machine was shared with other "
         "work: the load average shows how busy it was (2.0 = both cores busy). Target 1's ratio is the median "
         "of the per-round ratios, each round fitting both sides; the images/s beside it are each side's median."),
        "",
        ("Full-resolution stand-ins (targets 2, 3, 7, 8): the sample's 224 px training images upscaled to 1800x1500 "
         f"grayscale JPEGs with film grain (mean {standin_mb} MB, like the Kaggle originals' ~0.15-0.2 MB), since "
         "the originals cannot be downloaded here."),
    ]
    if speed := results.get("training_speed", {}).get("variants"):
        peak = results["training_speed"]["peak_gflops_per_second"]
        lines += ["", "Target 6 in detail: each variant fitted in turn, "
                  f"{results['training_speed']['rounds']} rounds, median images/s; the machine's peak measured in the "
                  f"same run: matmul {peak['float32']['matmul']} / {peak['bfloat16']['matmul']} GFLOP/s and 3x3 "
                  f"convolution {peak['float32']['conv3x3']} / {peak['bfloat16']['conv3x3']} GFLOP/s "
                  "(float32 / bfloat16).", "",
                  "| variant | px | precision | images/s | GFLOP per training image | GFLOP/s | share of the "
                  "convolution peak of its precision |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {row['image_size']} | {row['precision']} | {row['images_per_second']} | "
                  f"{row['training_gflops_per_image']:.2f} | {row['gflops_per_second']} | "
                  f"{row['share_of_conv_peak']:.0%} |" for name, row in speed.items()]
    for name, title in BENCHMARKS.items():
        if (result := results.get(name)) and not result["met"] and "profile" in result:
            lines += ["", f"Profile of {title} (not met): `{json.dumps(result['profile'])}`"]
    lines += ["", ("Every repetition: [results.json](results.json); how each figure is measured: the docstring "
                   "of its script in this folder."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every benchmark works")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--sample", type=Path, default=SAMPLE_ZIP, help="the chest X-ray sample zip")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for results.json and results.md")
    parser.add_argument("--copies", action="store_true",
                        help="measure nothing: write the README's and docs/performance.md's copies again")
    args = parser.parse_args()
    args.sample = args.sample.resolve()
    if args.copies:
        write_copies(json.loads((args.out / "results.json").read_text()))
        return

    from pneumonia.atomic import write_json, write_text

    report = {"machine": machine(), "smoke": args.smoke, "params": yaml.safe_load((REPO / "params.yaml").read_text()),
              "started": datetime.now(UTC).isoformat(timespec="seconds"), "load_average_at_start": load_average(),
              "command": "python -m benchmarks.run_all" + (" --smoke" if args.smoke else ""), "results": {}}
    with tempfile.TemporaryDirectory(prefix="pneumonia-bench-") as workdir:
        for name in args.only or BENCHMARKS:
            report["results"][name] = result = run_benchmark(name, args, Path(workdir))
            print(f"   {result['measured']} (met: {result['met']})", flush=True)
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["all_met"] = all(result["met"] for result in report["results"].values())
    write_json(args.out / "results.json", report)
    write_text(args.out / "results.md", markdown(report))
    if not args.smoke and not args.only and args.out.resolve() == (REPO / "benchmarks").resolve():
        write_copies(report)
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
