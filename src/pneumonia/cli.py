"""The `pneumonia` command: tools around the pipeline (the pipeline itself runs with `dvc repro`)."""

import argparse
import json
from pathlib import Path

from pneumonia import paths
from pneumonia.logs import run_stage


def check_params(args: argparse.Namespace) -> None:
    from pneumonia.config import load_params

    print(json.dumps(load_params(args.params).model_dump(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumonia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-params", help="validate params.yaml and print it with all defaults filled in")
    check.add_argument("--params", type=Path, default=paths.PARAMS)
    check.set_defaults(handler=check_params)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_stage(lambda: args.handler(args))
