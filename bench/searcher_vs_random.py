"""The searcher against random search at equal budget: time-budgeted studies in pairs, one with
the default searcher (Optuna TPE after its start-up) and one with `--sampler random`, per seed.

    python bench/searcher_vs_random.py --data ../shared/data/ferplus --mlruns /work/studies/mlruns \
        --budget 30m --max-epochs 8 --seeds 0 1 2 [--prefix vs] [--table-only]

Each study runs alone, one after the other, as `fersearch search` in its own process (its log
beside the store, `<mlruns>/<name>.log`). Both arms search the same space: the default CNN space
with no known points (`points: {}`, written to `<mlruns>/<prefix>-space.yaml`), so neither arm
spends its budget on a point, and neither gets one for free (a point trained by the first study
of a store would be reused by the next, which would then have its 1.5 slot-minutes more to
search). Then a markdown table: per
study its search wall, the configurations judged (searched trials with a report at the first rung;
by TPE's model / random draws), the mean first-rung score of the configurations proposed after
the TPE arm's random start-up (TPE's model's, or the random arm's later draws), how many reached one epoch and the best whole-validation accuracy
there, how many decayed branches were scored at the capped rung and the best of them, when it switched to finishing, and the best trial the search chose, scored as the search
scores it (its best epoch, its TTA; ferplus8 val and test); then each arm's means. A study that
already exists is not run again (`--table-only` runs none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {"tpe": [], "random": ["--sampler", "random"]}


def space_without_points(out: Path) -> Path:
    """The default CNN space with an empty `points:` section (a space with no `points:` key would
    run the `seed` point, space.load_space)."""
    from fersearch.space import SPACES_DIR

    doc = yaml.safe_load((SPACES_DIR / "cnn.yaml").read_text())
    doc["points"] = {}
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def run_study(args, name: str, seed: int, extra: list[str], space: Path) -> None:
    cmd = [sys.executable, "-m", "fersearch", "search", "--model", "cnn", "--data", str(args.data),
           "--time-budget", args.budget, "--max-epochs", str(args.max_epochs), "--name", name,
           "--mlruns", str(args.mlruns), "--seed", str(seed), "--space", str(space), *extra]
    print(f"running {name}: {' '.join(cmd)}", flush=True)
    with open(args.mlruns / f"{name}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        print(f"{name} exited with {done.returncode} (log {args.mlruns / f'{name}.log'})", flush=True)


def study_row(mlruns: Path, name: str) -> dict | None:
    from fersearch import metrics as M
    from fersearch.record import experiment_path, read_outcome
    from fersearch.report import load_study, stored_study
    from fersearch.study_records import first_rung_scores
    from fersearch.tracking import client_for, tracking_uri

    outcome = read_outcome(experiment_path(mlruns, name))
    if outcome is None:
        return None
    uri = tracking_uri(mlruns)
    parent, _, trials, _, _ = load_study(uri, "cnn", name)
    study = stored_study(parent, mlruns)
    grace = float(parent.data.params["grace_period"])
    searched = [t for t in trials if not t.point]
    judged = [t for t in searched if t.judge]
    at_one = [curve[1] for curve in (dict(t.history) for t in searched) if 1 in curve]
    client = client_for(uri)
    cooled = [m.value for t in searched for m in client.get_metric_history(t.run_id, M.COOLED_ACCURACY)]
    best = outcome.best or {}
    ferplus8 = best.get("by_protocol", {}).get("ferplus8", {})
    return {
        "name": name,
        "wall_min": outcome.wall_s / 60,
        "judged": len(judged),
        "tpe": outcome.proposals.get("tpe", 0),
        "random": outcome.proposals.get("random", 0),
        "at_one": len(at_one),
        "best_at_one": max(at_one, default=float("nan")),
        "cooled": len(cooled),
        "best_cooled": max(cooled, default=float("nan")),
        "switch_min": None if outcome.finishing_at_s is None else outcome.finishing_at_s / 60,
        "best": best.get("trial_id", "-"),
        "val": ferplus8.get("val", {}).get("accuracy", float("nan")),
        "test": ferplus8.get("test", {}).get("accuracy", float("nan")),
        "first_rung": first_rung_scores(study, grace) if study is not None else {},
    }


def after_startup(row: dict, startup: int) -> list[float]:
    """First-rung scores of a study's configurations proposed after the TPE arm's random start-up
    (`startup` draws): TPE's model's proposals, or the random arm's draws from the same point on
    (the two arms of a seed draw the same start-up)."""
    scores = row["first_rung"]
    return scores.get("tpe", []) if row["tpe"] else scores.get("random", [])[startup:]


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| study | search wall (min) | configurations judged (TPE / random) "
             "| first-rung score after the start-up: mean (n) | reached 1 epoch (best val there) "
             "| decayed branches at the capped rung (best val) "
             "| switched to finishing (min) | best trial | its val (ferplus8) | its test (ferplus8) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for studies in rows.values():
        for r in studies:
            switch = "-" if r["switch_min"] is None else f"{r['switch_min']:.1f}"
            later = r["after_startup"]
            first = f"{statistics.fmean(later):.4f} ({len(later)})" if later else "-"
            lines.append(f"| {r['name']} | {r['wall_min']:.1f} | {r['judged']} ({r['tpe']} / {r['random']}) | {first} "
                         f"| {r['at_one']} ({r['best_at_one']:.4f}) | {r['cooled']} ({r['best_cooled']:.4f}) | {switch} | {r['best']} | {r['val']:.4f} | {r['test']:.4f} |")
    for arm, studies in rows.items():
        if studies:
            mean = {k: statistics.fmean(r[k] for r in studies) for k in ("judged", "val", "test")}
            later = [v for r in studies for v in r["after_startup"]]
            first = f"{statistics.fmean(later):.4f} ({len(later)})" if later else "-"
            lines.append(f"| **mean, {arm}** ({len(studies)}) | | {mean['judged']:.1f} | {first} | | | | | **{mean['val']:.4f}** "
                         f"| {mean['test']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    from fersearch.record import experiment_path, read_outcome

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--mlruns", type=Path, required=True)
    parser.add_argument("--budget", default="30m")
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prefix", default="vs")
    parser.add_argument("--table-only", action="store_true", help="run no study; tabulate those that exist")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the table is this script's output
    args.mlruns.mkdir(parents=True, exist_ok=True)
    space = space_without_points(args.mlruns / f"{args.prefix}-space.yaml")
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        pair: dict[str, dict] = {}
        for arm, extra in ARMS.items():
            name = f"{args.prefix}-{arm}-s{seed}"
            if not args.table_only and read_outcome(experiment_path(args.mlruns, name)) is None:
                run_study(args, name, seed, extra, space)
            row = study_row(args.mlruns, name)
            if row is not None:
                pair[arm] = row
                rows[arm].append(row)
        startup = len(pair["tpe"]["first_rung"].get("random", [])) if "tpe" in pair else 0
        for row in pair.values():
            row["after_startup"] = after_startup(row, startup)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
