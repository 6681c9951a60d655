#!/usr/bin/env python
"""Command line for ur4rec-moe.

    python run.py --config yamls/stage2.yaml [--set key=value ...]   run one stage
    python run.py --config yamls/stage2.yaml --resume runs/stage2      continue an interrupted run
    python run.py --config yamls/stage2.yaml --overwrite               replace an earlier run of it
    python run.py prepare SUBCOMMAND ...                               build data and feature files
    python run.py report RUN_DIR [RUN_DIR ...]                         table of finished runs
    python run.py results RUN_DIR ... --out F.json [--plots DIR]       result records, seed table, figures
    python run.py compare RUN_A RUN_B [--split test] [--json F]        two runs user by user, overall and per slice
    python run.py curves RUN_DIR ... --out F.png [--json F.json]       validation against passes and wall time
    python run.py baseline --config FILE --model SASRec --epochs N     stock RecBole model on our split
    python run.py baseline --config FILE --model Pop                   popularity on the same split
    python run.py tune --config yamls/tune_stage2.yaml [--set ...]     sweep a stage with Ray Tune
    python run.py tune --resume SWEEP_DIR                              continue an interrupted sweep
    python run.py ablate RUN_DIR [--split valid]                       what each score term carries
    python run.py items RUN_DIR [--item-count-bins 10]                 item vectors by training interactions
    python run.py attack RUN_DIR [--clients N] [--json F]              what the server learns from one upload
    python run.py attack --records F.json ...                          one table of attack records
    python run.py node-data --config FILE --out DIR                    each Flower node's data file
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from recbole_ext import compat  # noqa: F401  (numpy aliases before any RecBole import)
from recbole_ext.errors import UserError


def run_stage(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py", description="Run one UR4Rec-MoE stage from its YAML file.")
    parser.add_argument("--config", required=True, help="stage file, e.g. yamls/stage2.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.learning_rate=0.01 (repeatable)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="RUN_DIR",
                       help="continue an interrupted run of this config from its last saved round")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in the run folder (only its files; a folder holding "
                            "anything else is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from recbole_ext.config import check_resumable, load_config
    from recbole_ext.pipeline import Stage
    from recbole_ext.analysis.report import format_summary
    from recbole_ext.runs import check_fresh

    cfg = load_config(args.config, args.set + ([f"run_dir={args.resume}"] if args.resume else []))
    if args.resume:
        check_resumable(cfg)
    else:
        check_fresh(cfg["run_dir"], args.overwrite)
    if cfg["trainer"] == "federated" and cfg["federated"]["backend"] == "flower":
        from recbole_ext.federated.privacy import check_settings

        check_settings(cfg, args.config)  # here, not first in the ServerApp after the deployment started
        from recbole_ext.analysis.report import read_summary
        from recbole_ext.federated.flower.deploy import run_stage as run_deployed
        from recbole_ext.nodes import write_node_data

        run_deployed(cfg, args.config, bool(args.resume), args.overwrite, show_progress=not args.quiet,
                     write_nodes=lambda folder: write_node_data(cfg, args.config, folder))
        summary = read_summary(cfg["run_dir"])
    else:
        stage = Stage(cfg, args.config)
        print(stage.describe(), flush=True)
        summary = stage.run(show_progress=not args.quiet, resume=bool(args.resume), overwrite=args.overwrite)
    print(format_summary(summary))
    print(f"run folder: {cfg['run_dir']}")


# subcommand -> the module whose main(argv) runs it; anything else is a stage run
SUBCOMMANDS = {
    "prepare": "recbole_ext.data.prepare",
    "report": "recbole_ext.analysis.report",
    "results": "recbole_ext.analysis.results",
    "compare": "recbole_ext.analysis.compare",
    "curves": "recbole_ext.analysis.curves",
    "baseline": "recbole_ext.analysis.baseline",
    "ablate": "recbole_ext.analysis.ablate",
    "items": "recbole_ext.analysis.item_vectors",
    "attack": "recbole_ext.analysis.attack",
    "node-data": "recbole_ext.nodes",
    "tune": "recbole_ext.tune",
}


def main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in SUBCOMMANDS:
            importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        else:
            run_stage(argv)
    except UserError as err:
        print(textwrap.fill(f"error: {err}", width=100, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
