"""`fersearch repeat`: retrain a search's winner with several seeds, each run logged to MLflow.

How much of the winner's score is its seed? Each repeat trains the best trial's configuration
for its full budget with seed 1..N, scores the best-validation epoch on val and test, and logs
a run in the search's experiment tagged `fersearch.repeat_of=<search's parent run>`, with
per-epoch validation accuracy and the final scores. The report only reads these runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fersearch import metrics as M
from fersearch.errors import FersearchError
from fersearch.run_files import BEST_DIR, CONFIG_FILE
from fersearch.tracking import (
    FINGERPRINT_TAG,
    REPEAT_SEED_TAG,
    REPEAT_TAG,
    best_of_search,
    log_params,
)

# Final scores of a repeat run: the best-validation epoch on val and test.
REPEAT_VAL = "repeat/val_accuracy"
REPEAT_TEST = "repeat/test_accuracy"


def repeat_best(
    model: str,
    mlruns: Path,
    search: str | None,
    seeds: int,
    emit: Callable[[str], None] = print,
    allow_other_data: bool = False,
) -> list[dict[str, Any]]:
    import tempfile

    import yaml

    from fersearch.config import config_from_dict
    from fersearch.data import apply_protocol, check_same_data, load_raw
    from fersearch.training import Trainer

    _, client, parent, best_run_id = best_of_search(mlruns, model, search)
    with tempfile.TemporaryDirectory() as tmp:  # the winner's exact resolved config, as trained
        try:
            saved = yaml.safe_load(Path(client.download_artifacts(best_run_id, f"{BEST_DIR}/{CONFIG_FILE}", tmp)).read_text())
        except Exception as exc:  # noqa: BLE001 - any store error means there is nothing to repeat
            raise FersearchError(f"cannot read the best trial's {BEST_DIR}/{CONFIG_FILE} from run {best_run_id} ({exc})") from None
    winner = config_from_dict(saved)
    data_dir = parent.data.params.get("data_dir")
    if not data_dir or not Path(data_dir).is_dir():
        raise FersearchError(f"the data of search {parent.info.run_name!r} ({data_dir}) is not on this machine")
    raw = load_raw(data_dir)
    check_same_data(raw, parent.data.tags.get(FINGERPRINT_TAG), f"search {parent.info.run_name!r}", allow_other_data, "--allow-other-data")
    rows = []
    for seed in range(1, seeds + 1):
        cfg = config_from_dict({**winner.to_dict(), "seed": seed})
        trainer = Trainer(cfg, apply_protocol(raw, cfg.protocol))
        run = client.create_run(
            parent.info.experiment_id,
            run_name=f"{parent.info.run_name}-repeat-{seed}",
            tags={REPEAT_TAG: parent.info.run_id, REPEAT_SEED_TAG: str(seed)},
        )
        try:
            log_params(client, run.info.run_id, cfg.to_params())
            for _ in range(cfg.epochs):
                row = trainer.run_epoch()
                client.log_metric(run.info.run_id, M.VAL_ACCURACY, row[M.VAL_ACCURACY], step=trainer.epoch)
            report = trainer.final_report()
            scores = {"seed": seed, "val": float(report["val"]["accuracy"]), "test": float(report["test"]["accuracy"])}
            client.log_metric(run.info.run_id, REPEAT_VAL, scores["val"])
            client.log_metric(run.info.run_id, REPEAT_TEST, scores["test"])
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")
        emit(f"seed {seed}: best epoch {trainer.best_epoch}, val accuracy {scores['val']:.4f}, test accuracy {scores['test']:.4f}")
        rows.append(scores)
    return rows


def repeat_runs(client, parent) -> list[dict[str, Any]]:
    """The finished repeat runs of a search, from the store: seed, val and test accuracy."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{REPEAT_TAG}` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    rows = [
        {"seed": int(r.data.tags.get(REPEAT_SEED_TAG, 0)), "val": r.data.metrics[REPEAT_VAL], "test": r.data.metrics[REPEAT_TEST]}
        for r in runs
        if REPEAT_VAL in r.data.metrics and REPEAT_TEST in r.data.metrics
    ]
    return sorted(rows, key=lambda row: row["seed"])
