"""`fersearch report`: the study a search ran, written up from the MLflow store by itself.

Everything comes from the store (parent run, one nested run per trial, the best trial's
artifacts), so the report's figures are the store's figures. `report.md` plus PNGs, readable
offline: the study's record, top trials, hyperparameter importance (Optuna's fANOVA),
range-edge flags, Optuna's figures of the search's stored study (slice, history, learning curves,
importance), the best so far against wall-clock minutes (time to accuracy), accuracy against
model size and FLOPs, the best trial's confusion matrix and per-class F1, the comparison with
the known points (the seed's configuration, the modern baseline) and the seed report's 72.57%,
the seed variance of the winner (read from the runs of `fersearch repeat`; the report trains
nothing), and findings as sentences computed from the numbers.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fersearch import metrics as M
from fersearch.config import REPORTS_PER_EPOCH, asha_rungs
from fersearch.errors import FersearchError, one_line
from fersearch.outcome import COMPLETED, FAILED, STOPPED_EARLY
from fersearch.run_files import BEST_DIR, CONFUSION_FILE, METRICS_FILE
from fersearch.space import Param, load_space
from fersearch.study_records import first_rung_scores, latest_records
from fersearch.tracking import (
    BEST_RUN_TAG,
    COMMAND_TAG,
    DATASET_TAG,
    INDEX_TAG,
    MODEL_FLOPS,
    MODEL_PARAMS,
    OPTUNA_FILE,
    OPTUNA_STORAGE_TAG,
    OPTUNA_STUDY_TAG,
    POINT_TAG,
    SPACE_FILE_TAG,
    STATUS_TAG,
    client_for,
    existing_store_uri,
    find_search,
    using_uri,
)

log = logging.getLogger(__name__)

SEED_REPORT_SEED10_TEST = 0.7257  # the seed report's best CNN, seed10 protocol, 100 epochs
TOP_K = 10
SLICE_PARAMS = 8  # parameters in the slice figure, the most important first
LEGEND_MAX = 12  # a figure legend with more entries (one per trial) is dropped: it outgrows the figure
EDGE_FRACTION = 0.1


@dataclass
class Trial:
    run_id: str
    name: str
    status: str
    start: int
    params: dict[str, str]
    score: float | None  # best validation accuracy over its epochs
    epochs: float
    history: list[tuple[int, float]]  # (epoch, val accuracy on the whole validation set)
    point: str = ""  # a known point's name (seed, modern), '' for the searcher's trials
    judge: list[tuple[int, float]] = field(default_factory=list)  # (report index, subset accuracy)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.point})" if self.point else self.name


def _parse(value: str) -> Any:
    """MLflow stores params as text: recover numbers and booleans for plots and statistics."""
    if value in ("True", "False"):
        return value == "True"
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _short(text: str) -> str:
    value = _parse(text)
    return f"{value:.4g}" if isinstance(value, float) else text


def trial_table(uri: str, parent) -> Any:
    """One row per trial run of the search, from `mlflow.search_runs` as a pandas frame, in the
    order the searcher suggested them: run_id, name, status, start (ms), score (best validation
    accuracy; NaN when failed or unscored), epochs, point, and the run's params as `params.*`."""
    import mlflow
    import pandas as pd

    with using_uri(uri):
        runs = mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=5000,
            output_format="pandas",
        )
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "name", "status", "start", "score", "epochs", "point"])

    def column(name: str, default: Any) -> pd.Series:
        return runs[name] if name in runs else pd.Series(default, index=runs.index)

    status = column(f"tags.{STATUS_TAG}", "unknown").fillna("unknown")
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "name": column("tags.mlflow.runName", ""),
        "status": status,
        "start": (runs["start_time"].astype("int64") // 1_000_000).astype("int64"),
        "score": column(f"metrics.{M.BEST_METRIC}", np.nan).where(status != FAILED),
        "epochs": column(f"metrics.{M.EPOCHS_TRAINED}", np.nan),
        "point": column(f"tags.{POINT_TAG}", "").fillna(""),
        "index": pd.to_numeric(column(f"tags.{INDEX_TAG}", ""), errors="coerce").fillna(10**9),
    })
    params = runs[[c for c in runs.columns if c.startswith("params.")]]
    table = pd.concat([table, params], axis=1).sort_values(["index", "start"], kind="stable")
    return table.drop(columns="index").reset_index(drop=True)


def load_study(uri: str, model: str, search: str | None) -> tuple[Any, Any, list[Trial], Trial | None, dict[str, Any]]:
    """The search's parent run, its trial table, a Trial per row (with its validation curve),
    the best trial and its metrics.json."""
    import pandas as pd

    client = client_for(uri)
    parent = find_search(client, model, search, None)
    table = trial_table(uri, parent)
    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    histories = [history(run_id, M.VAL_ACCURACY) for run_id in table["run_id"]]
    judged = [history(run_id, M.JUDGE_METRIC) for run_id in table["run_id"]]
    # A run without its epochs_trained metric (cut before it ended): the epochs it logged.
    table["epochs"] = table["epochs"].fillna(pd.Series([len(h) for h in histories], index=table.index))
    trials = []
    for row, curve, judge in zip(table.to_dict("records"), histories, judged, strict=True):
        params = {k.removeprefix("params."): v for k, v in row.items() if k.startswith("params.") and isinstance(v, str)}
        score = None if np.isnan(row["score"]) else float(row["score"])
        trials.append(Trial(row["run_id"], row["name"], row["status"], int(row["start"]), params, score,
                            float(row["epochs"]), curve, row["point"], judge))
    # The trial the search chose and scored (its parent run names it: the search ranks the trials it
    # trained, not the reused known points); for a search that named none, its rule: the best of
    # the trials that trained the whole budget, if any did.
    best_run = parent.data.tags.get(BEST_RUN_TAG)
    scored = [t for t in trials if t.score is not None]
    full = [t for t in scored if t.status == COMPLETED]
    best = next((t for t in scored if t.run_id == best_run), None) or (max(full or scored, key=lambda t: t.score) if scored else None)
    best_metrics: dict[str, Any] = {}
    if best_run:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(best_run, f"{BEST_DIR}/{METRICS_FILE}", tmp)
                best_metrics = json.loads(Path(path).read_text())
            except Exception as exc:  # noqa: BLE001 - a report without the best artifacts still has value
                log.warning("best trial's metrics.json unavailable: %s", exc)
    return parent, table, trials, best, best_metrics


def _space_params(client, parent) -> dict[str, Param]:
    """The searched parameters, parsed by `space.Param` from the space file logged with the search."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(client.download_artifacts(parent.info.run_id, "search_space.yaml", tmp))
            space = load_space(path)
        except Exception as exc:  # noqa: BLE001 - a search logged without (or with an outdated) space file
            log.info("no usable search space logged with %s: %s", parent.info.run_name, exc)
            return {}
    searched = set(parent.data.params.get("searched", "").split(","))
    return {p.name: p for p in space.params if p.name in searched}


def stored_study(parent, mlruns: Path) -> Any | None:
    """The search's own Optuna study, as its searcher stored it: the parent run's tags name the
    storage and the study; a store copied elsewhere is tried at its own optuna.db. None when
    neither opens (the report then goes without Optuna's figures and importance)."""
    import optuna

    name = parent.data.tags.get(OPTUNA_STUDY_TAG)
    urls = [parent.data.tags.get(OPTUNA_STORAGE_TAG), f"sqlite:///{(Path(mlruns) / OPTUNA_FILE).resolve()}"]
    for url in dict.fromkeys(u for u in urls if u):
        if not name or (url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file()):
            continue
        try:
            return optuna.load_study(study_name=name, storage=url)
        except Exception as exc:  # noqa: BLE001 - any storage error: try the next, then go without
            log.info("Optuna study %r not readable from %s: %s", name, url, one_line(exc))
    return None


def study_for_figures(stored: Any) -> tuple[Any, str]:
    """The stored study's configurations (one record each: `latest_records`), for Optuna's
    importance and figures. Completed records keep their value; ASHA-stopped ones are PRUNED,
    unless fewer than 8 completed: then they count as COMPLETE at their last reported score,
    so that fANOVA has enough values. Known points outside the space are not in the study
    (the searcher never told Optuna of them)."""
    import optuna
    from optuna.trial import TrialState

    records = [t for t in latest_records(stored) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    enough = sum(t.state == TrialState.COMPLETE for t in records) >= 8
    basis = "completed trials" if enough else "all judged trials (ASHA-stopped ones at their last report)"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory": not the user's news
    try:
        study = optuna.create_study(direction="maximize", study_name="report")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for t in records:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        done = t.state == TrialState.COMPLETE or (not enough and last is not None)
        if not done and t.state != TrialState.PRUNED:
            continue
        study.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions,
            value=(t.value if t.state == TrialState.COMPLETE else last) if done else None,
            state=TrialState.COMPLETE if done else TrialState.PRUNED,
            intermediate_values=dict(t.intermediate_values),
        ))
    return study, basis


def importance(study: Any, basis: str) -> tuple[dict[str, float], str]:
    """fANOVA importance of the searched parameters for the best validation accuracy."""
    import optuna

    if study is None:
        return {}, basis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 4:
        return {}, f"too few scored trials ({len(complete)}) for an importance estimate"
    try:
        scores = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (RuntimeError, ValueError) as exc:
        return {}, f"importance not computable ({exc})"
    return dict(scores), basis


def findings(trials: Sequence[Trial], space: dict[str, Param]) -> tuple[list[str], list[str]]:
    """One sentence per hyperparameter from the numbers, plus range-edge warnings."""
    import pandas as pd

    scored = [t for t in trials if t.score is not None]
    sentences, edges = [], []
    top = sorted(scored, key=lambda t: -t.score)[: max(3, len(scored) // 5)]
    for name, param in space.items():
        values = [(_parse(t.params[name]), t.score) for t in scored if name in t.params]
        if param.kind != "choice":  # a known point outside the range (weight decay 0) is not on its axis
            values = [(v, score) for v, score in values if param.contains(v)]
        if len(values) < 2:
            continue
        if param.kind == "choice":
            frame = pd.DataFrame(values, columns=["value", "score"]).astype({"value": str})
            groups = frame.groupby("value")["score"].agg(["median", "size"]).sort_values("median", ascending=False)
            parts = [f"{k}: median {median:.3f} ({size} trial{'s' if size > 1 else ''})"
                     for k, median, size in zip(groups.index, groups["median"], groups["size"], strict=True)]
            sentences.append(f"{name}: " + "; ".join(parts) + ".")
        else:
            xs = np.array([float(v) for v, _ in values])
            ys = np.array([s for _, s in values])
            log_scale = param.log_scale
            low, high = param.args
            tx = np.log(xs) if log_scale else xs
            lo, hi = (math.log(low), math.log(high)) if log_scale else (low, high)
            rho = _spearman(tx, ys)
            best_x = float(xs[np.argmax(ys)])
            sentences.append(
                f"{name}: rank correlation with validation accuracy {rho:+.2f} over {len(xs)} trials; "
                f"best trial at {best_x:.4g} (range {low:g} to {high:g})."
            )
            # Only values inside the range (a known point outside the space, e.g. weight decay 0, is not a range edge).
            top_x = np.array([float(v) for t in top if name in t.params and param.contains(v := _parse(t.params[name]))])
            if len(top_x):
                ttx = np.log(top_x) if log_scale else top_x
                span = hi - lo
                if np.all(ttx <= lo + EDGE_FRACTION * span):
                    edges.append(f"{name}: the {len(top_x)} best trials all sit at the low edge (<= {_edge(lo, span, log_scale, EDGE_FRACTION):.4g}); extend the range down.")
                elif np.all(ttx >= hi - EDGE_FRACTION * span):
                    edges.append(f"{name}: the {len(top_x)} best trials all sit at the high edge (>= {_edge(lo, span, log_scale, 1 - EDGE_FRACTION):.4g}); extend the range up.")
    return sentences, edges


def _edge(lo: float, span: float, log_scale: bool, fraction: float) -> float:
    value = lo + fraction * span
    return math.exp(value) if log_scale else value


def rung_agreement(trials: Sequence[Trial], max_epochs: float, grace: float, factor: float) -> list[dict[str, Any]]:
    """For each of ASHA's rungs (grace * factor^k epochs below max_epochs), how its ranking of
    the searched trials (their subset score at the first report at or past the rung; the known
    points, on schedules of their own, take no part in the rungs) agreed with the next
    rung's ranking of the trials that reached both, and with the final best validation accuracy
    of the trials that trained the whole budget: the data for choosing the grace period, the
    reduction factor and the report interval by measurement."""
    if grace <= 0 or factor < 2 or max_epochs <= 0:
        return []
    marks = asha_rungs(grace, factor, max_epochs)
    trials = [t for t in trials if not t.point]  # known points set no bar at the rungs (scheduler.py)

    def at(trial: Trial, rung: float) -> float | None:
        due = rung * REPORTS_PER_EPOCH - 1e-6
        return next((v for step, v in trial.judge if step >= due), None)

    rows = []
    for i, rung in enumerate(marks):
        here = {t.run_id: v for t in trials if (v := at(t, rung)) is not None}
        if len(here) < 3:
            continue
        row: dict[str, Any] = {"epoch": rung, "trials": len(here)}
        if i + 1 < len(marks):
            later = {t.run_id: v for t in trials if t.run_id in here and (v := at(t, marks[i + 1])) is not None}
            row["next_n"] = len(later)
            row["rho_next"] = _spearman(np.array([here[k] for k in later]), np.array(list(later.values()))) if len(later) >= 3 else None
        full = [t for t in trials if t.run_id in here and t.status == COMPLETED and t.score is not None]
        row["final_n"] = len(full)
        if len(full) >= 3:
            rung_scores, final = np.array([here[t.run_id] for t in full]), np.array([t.score for t in full])
            keep = max(1, round(len(full) / factor))
            row["rho"] = _spearman(rung_scores, final)
            row["winner_kept"] = int(np.argmax(final)) in set(np.argsort(-rung_scores, kind="stable")[:keep])
        rows.append(row)
    return rows


def proposer_table(study: Any, grace: float) -> list[dict[str, Any]]:
    """The first-rung scores of the study's configurations by proposer (study_records.
    first_rung_scores): n, mean, median and best of each, largest group first."""
    if study is None or grace <= 0:
        return []
    groups = first_rung_scores(study, grace)
    rows = [{"proposer": who, "n": len(v), "mean": float(np.mean(v)), "median": float(np.median(v)), "best": max(v)}
            for who, v in groups.items()]
    return sorted(rows, key=lambda r: -r["n"])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho with tied values sharing their mean rank (ASHA-stopped trials often tie)."""
    import pandas as pd

    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(pd.Series(x).corr(pd.Series(y), method="spearman"))


def _plot_time(out: Path, timeline, plt, cooled=None) -> str:
    """Best validation accuracy so far against wall-clock minutes, with the known points' bars
    (and the decayed branches' scores at the capped rung, as their own points: not kept)."""
    from fersearch.timeline import minutes_to_pass, point_scores

    fig, ax = plt.subplots(figsize=(7, 3.8))
    own = timeline[~timeline["reused"].astype(bool)]  # a reused point's epochs are another study's
    ax.plot(own["minutes"], own["best_so_far"], drawstyle="steps-post", label="best so far")
    ax.scatter(own["minutes"], own["val_accuracy"], s=8, alpha=0.4, c="tab:gray", label="an epoch's val accuracy")
    if cooled is not None and len(cooled):
        ax.scatter(cooled["minutes"], cooled["val_accuracy"], s=14, marker="x", alpha=0.6, c="tab:green",
                   label="a decayed branch at the capped rung (not kept)")
    passed = minutes_to_pass(timeline)
    for (point, bar), color in zip(sorted(point_scores(timeline).items()), ("tab:red", "tab:purple", "tab:brown", "tab:olive"), strict=False):
        when = passed.get(point, math.nan)
        text = f"{point} {bar:.4f}" + (f", passed at {when:.1f} min" if math.isfinite(when) else ", not passed")
        ax.axhline(bar, ls="--", c=color, lw=1, label=text)
        if math.isfinite(when):
            ax.axvline(when, ls=":", c=color, lw=1)
    low = own["best_so_far"].min() if len(own) else 0.0
    ax.set(xlabel="wall-clock minutes since the search began", ylabel="val accuracy",
           title="time to accuracy", ylim=(max(0.0, low - 0.05), None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "time_to_accuracy.png", dpi=90)
    plt.close(fig)
    return "time_to_accuracy.png"


def _optuna_figures(out: Path, study: Any, importances: dict[str, float], plt) -> dict[str, str]:
    """Optuna's own figures of the search's stored study: value against each parameter (the most
    important first, at most SLICE_PARAMS), best so far by trial, every trial's learning curve,
    and the importances."""
    if study is None:
        return {}
    import warnings

    import optuna
    from optuna.visualization import matplotlib as figures

    names = list(importances) or sorted({n for t in study.trials for n in t.params})
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # A figure is drawn only when the study has what it shows (Optuna warns on the terminal
    # and draws an empty frame otherwise).
    drawings = {}
    if complete:
        drawings["slice"] = lambda: figures.plot_slice(study, params=names[:SLICE_PARAMS])
        drawings["history"] = lambda: figures.plot_optimization_history(study)
    if any(t.intermediate_values for t in study.trials):
        drawings["intermediate"] = lambda: figures.plot_intermediate_values(study)
    if importances:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        drawings["importance"] = lambda: figures.plot_param_importances(study, evaluator=evaluator)
    files = {}
    for key, draw in drawings.items():
        with warnings.catch_warnings():
            # Optuna marks its matplotlib backend experimental: its interface may change, not its figures.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # A parameter that all drawn trials share (few trials) has one value on its axis:
            # matplotlib widens the axis itself and says so; the figure is right.
            warnings.filterwarnings("ignore", message="Attempting to set identical low and high [xy]lims")
            try:
                axes = draw()
            except Exception as exc:  # noqa: BLE001 - a figure Optuna cannot draw for this study is left out
                log.info("Optuna's %s figure not drawn: %s", key, exc)
                continue
        figure = np.ravel(axes)[0].figure
        legend = np.ravel(axes)[0].get_legend()
        if legend is not None and len(legend.get_texts()) > LEGEND_MAX:
            legend.remove()  # one entry per trial (the learning curves): taller than the figure
        figure.savefig(out / f"{key}.png", dpi=90, bbox_inches="tight")
        plt.close(figure)
        files[key] = f"{key}.png"
    return files


def _plots(out: Path, trials: Sequence[Trial], study: Any, importances: dict[str, float], best_metrics: dict[str, Any], timeline=None, cooled=None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fersearch.plots import plot_confusion

    files: dict[str, str] = {}
    scored = [t for t in trials if t.score is not None]
    files.update(_optuna_figures(out, study, importances, plt))
    colors = {COMPLETED: "tab:green", STOPPED_EARLY: "tab:orange"}
    # Our own figures only where Optuna has none: accuracy against wall-clock minutes (Optuna's
    # history is by trial number), against model size, and the best trial's test scores.
    if timeline is not None and len(timeline):
        files["time"] = _plot_time(out, timeline, plt, cooled)
    sized = [t for t in scored if MODEL_PARAMS in t.params and MODEL_FLOPS in t.params]
    if sized:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, key, label in ((axes[0], MODEL_PARAMS, "parameters"), (axes[1], MODEL_FLOPS, "training FLOPs per sample")):
            for status, color in {**colors, "": "tab:gray"}.items():
                pts = [(float(t.params[key]), t.score) for t in sized if (t.status if t.status in colors else "") == status]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), s=16, c=color, label=status.replace("_", " ") or "other")
            for t in sized:
                if t.point:
                    ax.annotate(t.point, (float(t.params[key]), t.score), fontsize=7)
            ax.set(xscale="log", xlabel=label, ylabel="best val accuracy", title=f"accuracy against {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "size.png", dpi=90)
        plt.close(fig)
        files["size"] = "size.png"
    if best_metrics.get("test"):
        test = best_metrics["test"]
        plot_confusion(test["confusion_matrix"], test["classes"], out / CONFUSION_FILE, "best trial, test")
        files["confusion"] = CONFUSION_FILE
        fig, ax = plt.subplots(figsize=(6, 3))
        names = list(test["per_class"])
        ax.bar(names, [test["per_class"][n]["f1"] for n in names])
        ax.set(ylabel="F1", title="best trial: per-class F1 (test)", ylim=(0, 1))
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / "per_class_f1.png", dpi=90)
        plt.close(fig)
        files["f1"] = "per_class_f1.png"
    return files


def seed_variance(client, parent) -> dict[str, Any] | None:
    """Mean and spread of the winner's val and test accuracy over its `fersearch repeat` runs."""
    import pandas as pd

    from fersearch.repeat import repeat_runs

    rows = repeat_runs(client, parent)
    if not rows:
        return None
    table = pd.DataFrame(rows)
    spread = table[["val", "test"]].agg(["mean", "std"]).fillna(0.0)  # sd is NaN for one run
    return {"runs": rows, "val_mean": float(spread.loc["mean", "val"]), "val_std": float(spread.loc["std", "val"]),
            "test_mean": float(spread.loc["mean", "test"]), "test_std": float(spread.loc["std", "test"])}


def build_report(model: str, out: Path, mlruns: Path, search: str | None = None) -> Path:
    uri = existing_store_uri(mlruns)
    parent, table, trials, best, best_metrics = load_study(uri, model, search)
    if not trials:
        raise FersearchError(f"search {parent.info.run_name!r} has no trials to report on")
    out = Path(out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FersearchError(f"cannot write to {out} ({exc.strerror})") from None
    from fersearch.timeline import minutes_to_pass, timelines

    space = _space_params(client_for(uri), parent)
    timeline, cooled = timelines(client_for(uri), parent.info.run_id)
    timeline.to_csv(out / "time_to_accuracy.csv", index=False)
    if len(cooled):
        cooled.to_csv(out / "time_to_accuracy_cooled.csv", index=False)
    stored = stored_study(parent, mlruns)
    study, basis = study_for_figures(stored) if stored is not None else (None, "the search's Optuna study is not readable")
    scores, basis = importance(study, basis)
    files = _plots(out, trials, study, scores, best_metrics, timeline, cooled)
    sentences, edges = findings(trials, space)
    p, tags, metrics = parent.data.params, parent.data.tags, parent.data.metrics
    scored = [t for t in trials if t.score is not None]
    points = [t for t in trials if t.point]
    tally = table["status"].value_counts()
    counts = {s: int(tally.get(s, 0)) for s in (COMPLETED, STOPPED_EARLY, FAILED)}
    epochs = float(table["epochs"].sum())
    lines = [f"# Study report: {parent.info.run_name} ({model})", ""]
    lines += ["## Record", "", "| item | value |", "|---|---|"]
    record = [
        ("command", f"`{tags.get(COMMAND_TAG, '')}`"),
        ("dataset", tags.get(DATASET_TAG, "")),
        ("protocol", p.get("fixed.protocol", "ferplus8 (default)")),
        ("search space", f"`{tags.get(SPACE_FILE_TAG, '')}` ({len(space)} searched parameters)"),
        ("sampler seed", p.get("seed", "")),
        ("ASHA", f"max {p.get('max_epochs')} epochs, grace {p.get('grace_period')}, reduction factor {p.get('reduction_factor')}"),
        ("trials", f"{len(trials)}: {counts[COMPLETED]} completed, {counts[STOPPED_EARLY]} stopped early by ASHA, {counts[FAILED]} failed"
         + (f", {cut} cut short (time budget or interruption)" if (cut := len(trials) - sum(counts.values())) else "")),
        ("proposals", ", ".join(f"{int(v)} {k.removeprefix('proposed_')}" for k, v in sorted(metrics.items()) if k.startswith("proposed_")) or "-"),
        ("compute", f"{epochs:.1f} epochs trained (without ASHA: {len(trials) * int(p.get('max_epochs', 0))}); wall {metrics.get('wall_s', float('nan')):.0f} s"),
    ]
    if best is not None:
        record.append(("best validation accuracy", f"{best.score:.4f} ({best.name})"))
    for protocol, splits in (best_metrics.get("by_protocol") or {}).items():
        record.append((f"best trial, test accuracy ({protocol})", f"{splits['test']['accuracy']:.4f}"))
    lines += [f"| {k} | {v} |" for k, v in record] + [""]

    names = ", ".join(f"`{t.point}`" for t in points)
    intro = (f"The search ran its known points ({names}) first, each for its whole budget (or took a stored "
             "result of the same configuration), then the searcher's trials." if points else
             "The search ran no known points (its space has none): only the searcher's trials.")
    lines += ["## Known points and the search", "", intro, "",
              "| configuration | val accuracy | test accuracy (seed10) |", "|---|---|---|"]
    seed10 = (best_metrics.get("by_protocol") or {}).get("seed10", {}).get("test", {}).get("accuracy")
    lines.append(f"| seed report, published (100 epochs) | - | {SEED_REPORT_SEED10_TEST:.4f} |")
    for t in points:
        score = t.score if t.score is not None else float("nan")
        lines.append(f"| known point `{t.point}` ({t.name}, {t.status}, {t.epochs:g} epochs) | {score:.4f} | - |")
    if best is not None:
        lines.append(f"| search's best ({best.label}) | {best.score:.4f} | {seed10 if seed10 is not None else float('nan'):.4f} |")
    lines.append("")
    for t in points:
        if best is not None and t.score is not None:
            gap = 100 * (best.score - t.score)
            lines.append(f"- The search's best {'beats' if gap >= 0 else 'falls short of'} the `{t.point}` point by "
                         f"{abs(gap):.2f} points of validation accuracy.")
    passed = minutes_to_pass(timeline)
    passed_cooled = minutes_to_pass(timeline, cooled)
    for point, minutes in passed.items():
        lines.append(f"- Validation accuracy passed the `{point}` point's after {minutes:.1f} wall-clock minutes."
                     if math.isfinite(minutes) else f"- No epoch of the study scored above the `{point}` point's best.")
        if len(cooled):
            when = passed_cooled[point]
            lines.append(f"  A decayed branch at the capped rung (scored, not kept) passed it after {when:.1f} minutes."
                         if math.isfinite(when) else "  No decayed branch at the capped rung passed it.")
    if "time" in files:
        lines += ["", f"![time to accuracy]({files['time']})", "",
                  "Best validation accuracy so far against wall-clock minutes since the search began "
                  "(data: `time_to_accuracy.csv`)."]
    if "size" in files:
        lines += ["", f"![size]({files['size']})", "",
                  "Best validation accuracy of each trial against its parameter count and training FLOPs per sample."]
    lines.append("")

    lines += [f"## Top {min(TOP_K, len(scored))} trials", ""]
    keys = list(space)
    lines.append("| trial | status | epochs | best val | " + " | ".join(keys) + " |")
    lines.append("|---" * (4 + len(keys)) + "|")
    top = table.dropna(subset=["score"]).sort_values("score", ascending=False, kind="stable").head(TOP_K)
    for _, t in top.iterrows():
        label = f"{t['name']} ({t['point']})" if t["point"] else t["name"]
        cells = [_short(v) if isinstance(v := t.get(f"params.{k}"), str) else "-" for k in keys]
        lines.append(f"| {label} | {t['status']} | {t['epochs']:.3g} | {t['score']:.4f} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## ASHA's rungs against the final result", ""]
    agreement = rung_agreement(trials, float(p.get("max_epochs", 0)), float(p.get("grace_period", 1)), float(p.get("reduction_factor", 3)))
    if agreement:
        def rho(value: float | None, n: int) -> str:
            return f"{value:+.2f} (n={n})" if value is not None else f"- (n={n})"

        lines += ["How well each rung's ranking (score on the fixed validation subset at the rung) agreed "
                  "with the next rung's, among the trials that reached both, and with the final best validation "
                  "accuracy of the trials that trained the whole budget: Spearman's rho, and whether the final "
                  "winner was in the rung's top 1/reduction-factor.", "",
                  "| rung (epochs) | trials at the rung | rho with the next rung | rho with the final | final winner in the rung's top |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['epoch']:g} | {r['trials']} | {rho(r.get('rho_next'), r.get('next_n', 0)) if 'next_n' in r else '-'} | "
                  f"{rho(r.get('rho'), r['final_n'])} | {('yes' if r['winner_kept'] else 'no') if 'winner_kept' in r else '-'} |"
                  for r in agreement]
    else:
        lines.append("Too few trials reached ASHA's rungs (3 needed) to compare them.")
    lines.append("")

    choosers = proposer_table(stored, float(p.get("grace_period", 0) or 0))
    lines += ["## Who chose the configurations", ""]
    if choosers:
        lines += [f"Each searched configuration's score on the validation subset at ASHA's first rung "
                  f"({p.get('grace_period')} epochs, the fidelity the searcher's model learns from), by who "
                  "proposed it (`tpe`: TPE's model; `random`: its random start-up, or every draw with "
                  "`--sampler random`; `qmc`: a quasi-random start-up).", "",
                  "| proposer | configurations | mean | median | best |", "|---|---|---|---|---|"]
        lines += [f"| {r['proposer']} | {r['n']} | {r['mean']:.4f} | {r['median']:.4f} | {r['best']:.4f} |" for r in choosers]
        by = {r["proposer"]: r for r in choosers}
        if "tpe" in by and "random" in by:
            gap = 100 * (by["tpe"]["mean"] - by["random"]["mean"])
            lines += ["", f"TPE's model's proposals scored {gap:+.1f} points against the random draws' on average at the first rung."]
    else:
        lines.append("The search's Optuna study is not readable, or no searched configuration reached the first rung.")
    lines.append("")

    lines += ["## Hyperparameter importance", ""]
    if scores:
        lines += [f"fANOVA on {basis} ({len(scored)} scored):", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in scores.items()]
        top_name, top_value = next(iter(scores.items()))
        lines += ["", f"{top_name} explains the largest share of the variance in validation accuracy ({top_value:.0%})."]
    else:
        lines.append(basis + ".")
    lines.append("")

    lines += ["## Findings", ""] + [f"- {s}" for s in sentences] + [""]
    lines += ["## Range edges", ""] + ([f"- {e}" for e in edges] or ["No searched range has its best trials crowded at an edge."]) + [""]
    lines += ["## Optuna's figures", "",
              "Drawn by `optuna.visualization.matplotlib` on the search's stored Optuna study (trials of a known "
              "point outside the space left out): validation accuracy against each parameter, the best so far "
              "by trial, every trial's reported score (4 reports an epoch: the validation subset between epochs) "
              "as the searcher saw it, and the importances.", ""]
    lines += [f"![{key}]({files[key]})" for key in ("slice", "history", "intermediate", "importance") if key in files] + [""]
    if "confusion" in files:
        test = best_metrics["test"]
        lines += ["## Best trial: confusion matrix and per-class F1 (test)", "", f"![confusion]({files['confusion']})", f"![f1]({files['f1']})", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |" for n, r in test["per_class"].items()]
        weakest = min(test["per_class"].items(), key=lambda kv: kv[1]["f1"] if kv[1]["support"] else 2)
        lines += ["", f"Weakest class: {weakest[0]} (F1 {weakest[1]['f1']:.3f} on {weakest[1]['support']} test images); "
                  f"macro F1 {test['f1_macro']:.3f} against accuracy {test['accuracy']:.3f}.", ""]
    lines += ["## Seed variance of the best configuration", ""]
    variance = seed_variance(client_for(uri), parent)
    if variance is not None:
        n = len(variance["runs"])
        lines += [f"Retrained {n} times (seeds {', '.join(str(r['seed']) for r in variance['runs'])}) for the full "
                  f"budget by `fersearch repeat`: validation accuracy {variance['val_mean']:.4f} +/- {variance['val_std']:.4f}, "
                  f"test accuracy {variance['test_mean']:.4f} +/- {variance['test_std']:.4f} (mean +/- sd)."]
        lines += ["", "| seed | val | test |", "|---|---|---|"] + [f"| {r['seed']} | {r['val']:.4f} | {r['test']:.4f} |" for r in variance["runs"]]
    else:
        lines.append("Not run (`fersearch repeat --search NAME --seeds N`, then the report again).")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({
        "search": parent.info.run_name, "trials": len(trials), **counts, "epochs": epochs,
        "best": None if best is None else {"trial": best.name, "val": best.score}, "importance": scores,
        "points": {t.point: {"trial": t.name, "val": t.score} for t in points},
        "minutes_to_pass": {k: (v if math.isfinite(v) else None) for k, v in passed.items()},
        "minutes_to_pass_cooled": {k: (v if math.isfinite(v) else None) for k, v in passed_cooled.items()},
        "findings": sentences, "edges": edges, "seed_variance": variance, "rung_agreement": agreement,
        "first_rung_by_proposer": choosers,
    }, indent=2))
    return out / "report.md"
