#!/usr/bin/env python
"""Command line for ur4rec-moe.

    python run.py --config yamls/stage2.yaml [--set key=value ...]   run one stage
    python run.py prepare SUBCOMMAND ...                               build data and feature files
    python run.py report RUN_DIR [RUN_DIR ...]                         table of finished runs
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from recbole_ext import compat  # noqa: F401  (numpy aliases before any RecBole import)
from recbole_ext.errors import UserError


def run_stage(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py", description="Run one UR4Rec-MoE stage from its YAML file.")
    parser.add_argument("--config", required=True, help="stage file, e.g. yamls/stage2.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.learning_rate=0.01 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from recbole_ext.config import load_config
    from recbole_ext.pipeline import Stage
    from recbole_ext.report import format_summary

    cfg = load_config(args.config, args.set)
    stage = Stage(cfg, args.config)
    print(stage.describe(), flush=True)
    summary = stage.run(show_progress=not args.quiet)
    print(format_summary(summary))
    print(f"run folder: {cfg['run_dir']}")


def main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "prepare":
            from recbole_ext.data import prepare
            prepare.main(argv[1:])
        elif argv and argv[0] == "report":
            from recbole_ext.report import main as report_main
            report_main(argv[1:])
        else:
            run_stage(argv)
    except UserError as err:
        print(textwrap.fill(f"error: {err}", width=100, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
