"""The ServerApp: the stage itself, run by the SuperLink (Flower finds `app` here). It builds the stage from the resolved config
the command wrote and runs it with the `flower` backend on this run's Grid: sampling, aggregation,
the server strategy, evaluation and the run folder are those of every backend."""
from __future__ import annotations

from pathlib import Path

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from recbole_ext.federated.flower.backend import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from recbole_ext.pipeline import Stage

    settings = context.run_config
    cfg = yaml.safe_load(Path(settings["config-file"]).read_text())
    with serve(grid):
        stage = Stage(cfg, str(settings["where"]))
        print(stage.describe(), flush=True)
        stage.run(show_progress=False, resume=bool(settings["resume"]), overwrite=bool(settings["overwrite"]))
