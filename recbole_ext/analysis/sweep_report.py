"""A Ray Tune sweep's results (`run.py tune` writes them as the sweep ends, `--report` at any time):
trials.csv (one row per trial, judged by the success test `tune.criterion` names, if any), best.yaml,
the console table, stability.png and loss_curves.png. Reads the sweep folder and the trials' run
folders only."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..config import dump, get, with_values
from ..runs import read_metrics
from .plotting import pyplot

_PREFERRED_AXES = ("federated.server_lr", "optim.learning_rate", "model.projector_init_gain")


def report(cfg: dict, sweep_dir: Path, trials: list, final: bool, planned: int) -> list[dict]:
    """Write trials.csv, the plots and (`final`: the sweep has ended) best.yaml from Tune's `trials`,
    print the best trials; return the rows."""
    rows = []
    for t in trials:
        row = row_of(cfg, Path(t.path), t.config, t.last_result or {}, t.get_error())
        if t.status not in ("TERMINATED", "ERROR"):
            row["status"] = "unfinished"
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    _write_csv(rows, cfg, sweep_dir / "trials.csv")
    best = ranked(rows, cfg)
    if not final:
        print(f"{sum(r['status'] != 'unfinished' for r in rows)} of {planned} trials ended; "
              "best.yaml is written when the sweep ends")
    elif best and best[0]["status"] in ("ok", "pruned"):
        _write_best(cfg, best[0], sweep_dir)
    else:
        print("no trial finished without diverging or failing: best.yaml not written")
    plot_stability(rows, cfg, sweep_dir / "stability.png")
    plot_loss_curves(rows, cfg, sweep_dir, sweep_dir / "loss_curves.png")
    print(_table(best[:5], cfg))
    print(f"sweep folder: {sweep_dir}")
    return rows


def metric_key(cfg: dict) -> str:
    return f"{cfg['tune']['protocol']}_{cfg['tune']['metric']}"


def reported_metrics(cfg: dict) -> list[str]:
    return list(dict.fromkeys(["hit@10", "ndcg@10", cfg["tune"]["metric"]]))


def units_of(cfg: dict, values: dict | None = None) -> int:
    """Rounds (or epochs) a run of `cfg` lasts, with a trial's `values` when the sweep varies them."""
    key = "federated.rounds" if cfg["trainer"] == "federated" else "centralized.epochs"
    return (values or {}).get(key, get(cfg, key))


def row_of(cfg: dict, trial_dir: Path, values: dict, last: dict, error) -> dict:
    """A trial's trials.csv row: `values` are its sampled config values, `last` its last report to Tune,
    `error` what it failed with (or None); the rest comes from its run folder's metrics.jsonl."""
    run_dir = trial_dir / "run"
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    error = _last_line(error)
    if error:
        status = "error"
    elif last.get("diverged"):
        status = "diverged"
    elif (run_dir / "summary.json").is_file() or last.get("round", 0) >= units_of(cfg, values):
        status = "ok"  # ended on its own (last round or early stopping), or stopped at its last round
    else:
        status = "pruned"  # stopped by the scheduler before its last round
    protocol, metric = cfg["tune"]["protocol"], cfg["tune"]["metric"]
    sign = 1 if cfg["tune"]["mode"] == "max" else -1
    validated = [r for r in records if "valid" in r and not math.isnan(r["valid"][protocol][metric])]
    best = max(validated, key=lambda r: sign * r["valid"][protocol][metric], default=None)
    row = {"trial": trial_dir.name, **{key: values.get(key) for key in cfg["tune"]["space"]}, "status": status,
           "diverged_round": last.get("diverged_round") if status == "diverged" else None,
           "best_round": best.get("round", best.get("epoch")) if best else None,
           **{f"valid_{p}_{m}": best["valid"][p][m] if best else None
              for p in ("full", "uni100") for m in reported_metrics(cfg)},
           "rounds_run": len(records),
           "first_loss": records[0]["loss"] if records else None,
           **{f"final_{k}": records[-1][k] if records else None for k in ("loss", "rec_loss", "align_loss")}}
    row[f"final_valid_{protocol}_{metric}"] = validated[-1]["valid"][protocol][metric] if validated else None
    if cfg["tune"]["criterion"] == "stage2":
        row.update(stage2_criterion(cfg, status, validated, best))
    row["error"] = error
    return row


# `tune.criterion: stage2`: stage 2 succeeds when its best validation HR@10 is at most _CRITERION_GAP
# below stage 1's and its last validated round keeps at least 1 - _CRITERION_DROP of its best value of
# the sweep's metric. The hold test is on the fixed validation users: a round's training loss comes from
# other clients each round, so a falling loss says nothing (docs/TUNING.md).
_CRITERION_GAP = 0.05
_CRITERION_DROP = 0.1


def stage2_criterion(cfg: dict, status: str, validated: list[dict], best: dict | None) -> dict:
    """A trial's `stage1_valid_hit@10` and `criterion` (met, not met, unknown) from its validated
    metrics records and the best of them."""
    protocol, metric = cfg["tune"]["protocol"], cfg["tune"]["metric"]
    sign = 1 if cfg["tune"]["mode"] == "max" else -1
    stage1 = stage1_hit(cfg)
    if status == "diverged":
        met = "not met"
    elif stage1 is None or len(validated) < 2:  # no trend from a single validation
        met = "unknown"
    else:
        hit_ok = best["valid"][protocol]["hit@10"] >= stage1 - _CRITERION_GAP
        final = validated[-1]["valid"][protocol][metric]
        holds = sign * final >= sign * best["valid"][protocol][metric] * (1 - sign * _CRITERION_DROP)
        met = "met" if hit_ok and holds else "not met"
    return {"stage1_valid_hit@10": stage1, "criterion": met}


def stage1_hit(cfg: dict) -> float | None:
    """Stage 1's validation HR@10 on the sweep's protocol, from the summary.json next to the stage-1
    checkpoint this config loads; None when there is none."""
    for entry in cfg["load"]:
        summary = _read_json(Path(entry["checkpoint"]).with_name("summary.json"))
        if summary and summary.get("stage") == 1:
            return summary.get("valid", {}).get(cfg["tune"]["protocol"], {}).get("hit@10")
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(error) -> str | None:
    """The last line of a trial's error (its traceback ends with the exception and its message)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def ranked(rows: list[dict], cfg: dict) -> list[dict]:
    """Trials best first: those that ran stably (ok, pruned) by their best metric, then the rest."""
    key = f"valid_{metric_key(cfg)}"
    sign = 1 if cfg["tune"]["mode"] == "max" else -1
    return sorted(rows, key=lambda r: (r["status"] not in ("ok", "pruned"), r[key] is None,
                                       -sign * (r[key] or 0.0)))


def _write_csv(rows: list[dict], cfg: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def _write_best(cfg: dict, best: dict, sweep_dir: Path) -> None:
    values = {key: best[key] for key in cfg["tune"]["space"]}
    winner = with_values(cfg, {**values, "name": f"{cfg['name']}-best", "run_dir": str(sweep_dir / "best")},
                         str(sweep_dir / "best.yaml"))
    path = sweep_dir / "best.yaml"
    head = (f"# Best trial of the sweep in {sweep_dir}: {best['trial']}, valid {metric_key(cfg)} "
            f"{best['valid_' + metric_key(cfg)]:.4f} at round {best['best_round']}.\n"
            f"# Run it with: python run.py --config {path}\n")
    path.write_text(head + dump(winner))


def values_text(values: dict, cfg: dict) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_short(values.get(k))}" for k in cfg["tune"]["space"])


def trial_line(row: dict, cfg: dict) -> str:
    values = values_text(row, cfg)
    key = f"valid_{metric_key(cfg)}"
    found = f", valid {metric_key(cfg)} {row[key]:.4f} (round {row['best_round']})" if row[key] is not None else ""
    extra = (f", diverged in round {row['diverged_round']}" if row["status"] == "diverged"
             else f": {row['error']}" if row["status"] == "error" else "")
    return f"{row['trial']} {row['status']}: {values}{found}{extra}"


def _table(rows: list[dict], cfg: dict) -> str:
    key = f"valid_{metric_key(cfg)}"
    names = [k.rsplit(".", 1)[-1] for k in cfg["tune"]["space"]]
    criterion = ["criterion"] if cfg["tune"]["criterion"] else []
    head = ["trial", *names, "status", key, "best round", *criterion]
    body = [[r["trial"], *(_short(r[k]) for k in cfg["tune"]["space"]), r["status"],
             "-" if r[key] is None else f"{r[key]:.4f}", str(r["best_round"] or "-"), *(r[c] for c in criterion)]
            for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths))
    return "\n".join(["best trials:", fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in body])


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_stability(rows: list[dict], cfg: dict, path: Path) -> None:
    """Learning rate x projector init gain (or the first two numeric keys of the space), each trial
    coloured by its best metric; diverged trials a red cross, failed ones a grey square."""
    plt = pyplot()
    space, key = cfg["tune"]["space"], f"valid_{metric_key(cfg)}"
    numeric = [k for k in space
               if rows and all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)]
    axes = sorted(numeric, key=lambda k: (k not in _PREFERRED_AXES, _PREFERRED_AXES.index(k)
                                          if k in _PREFERRED_AXES else 0))[:2]
    x_of = (lambda r: r[axes[0]]) if axes else (lambda r: rows.index(r))
    y_of = (lambda r: r[axes[1]]) if len(axes) > 1 else (lambda r: r[key] if r[key] is not None else float("nan"))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    scored = [r for r in rows if r["status"] in ("ok", "pruned") and r[key] is not None]
    if scored:
        points = ax.scatter([x_of(r) for r in scored], [y_of(r) for r in scored], c=[r[key] for r in scored],
                            cmap="viridis", s=70,
                            edgecolors=["black" if r["status"] == "ok" else "none" for r in scored])
        fig.colorbar(points, ax=ax, label=f"best valid {metric_key(cfg)} (ringed: ran every round)")
    for status, marker, color in (("diverged", "x", "red"), ("error", "s", "grey")):
        chosen = [r for r in rows if r["status"] == status]
        if chosen:
            ax.scatter([x_of(r) for r in chosen], [y_of(r) for r in chosen], marker=marker, color=color, s=70,
                       label=status)
        for r in chosen:
            if status == "diverged":
                ax.annotate(f"round {r['diverged_round']}", (x_of(r), y_of(r)), textcoords="offset points",
                            xytext=(0, 8), ha="center", fontsize=8, color="red")
    for axis, name in zip(("x", "y"), axes):
        spec, log = space[name], space[name]["type"] == "loguniform" or _spans_decades([r[name] for r in rows])
        if log:
            getattr(ax, f"set_{axis}scale")("log")
        if "low" in spec:  # show the whole searched range, not only where the samples fell
            low, high = spec["low"], spec["high"]
            pad = (high / low) ** 0.05 if log else 0.05 * (high - low)
            getattr(ax, f"set_{axis}lim")(*((low / pad, high * pad) if log else (low - pad, high + pad)))
    ax.set_xlabel(axes[0] if axes else "trial")
    ax.set_ylabel(axes[1] if len(axes) > 1 else key)
    ax.set_title(f"{cfg['name']}: {len(rows)} trials")
    if any(r["status"] in ("diverged", "error") for r in rows):
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(rows: list[dict], cfg: dict, sweep_dir: Path, path: Path, most_diverged: int = 4) -> None:
    """Training loss per round, log scale: the best and the worst trial that ran stably (by the sweep's
    metric) and the `most_diverged` trials that diverged first, each labelled with its values."""
    plt = pyplot()
    colors = {"best": "tab:green", "worst": "tab:blue", "diverged": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    chosen = loss_curve_trials(rows, cfg, most_diverged)
    for row, kind in chosen:
        records = read_metrics(sweep_dir / row["trial"] / "run")
        losses = [r["loss"] if math.isfinite(r["loss"]) else float("nan") for r in records]
        ax.plot([r.get("round", r.get("epoch")) for r in records], losses, color=colors[kind], marker="o", markersize=3,
                label=f"{kind}: {values_text(row, cfg)}")
    ax.set_yscale("log")
    ax.set_xlabel("round" if cfg["trainer"] == "federated" else "epoch")
    ax.set_ylabel("training loss (mean over the round's clients)")
    ax.set_title(f"{cfg['name']}: training loss")
    if chosen:
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_curve_trials(rows: list[dict], cfg: dict, most_diverged: int) -> list[tuple[dict, str]]:
    """(row, best|worst|diverged) for plot_loss_curves."""
    stable = [r for r in ranked(rows, cfg) if r["status"] in ("ok", "pruned") and r["rounds_run"]]
    diverged = sorted((r for r in rows if r["status"] == "diverged"), key=lambda r: r["diverged_round"] or 0)
    return ([(r, "best") for r in stable[:1]] + [(r, "worst") for r in stable[1:][-1:]]
            + [(r, "diverged") for r in diverged[:most_diverged]])


def _spans_decades(values: list) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 20
