"""What a search writes on its Optuna study's records, and how to read them back, without Ray:
the searcher (searcher.py) writes them; the search's outcome and the report read them."""

from __future__ import annotations

import optuna

from fersearch.config import REPORTS_PER_EPOCH

PROPOSED_BY = "fersearch.proposed_by"  # Optuna user attr of every trial: who chose its values
CONTINUES = "fersearch.continues"  # on a promoted trial's later record: the number of its first
WARM_START_FROM = "fersearch.warm_start_from"  # on a trial copied from an earlier study: its name
REUSED_FROM = "fersearch.reused_from"  # on a known point's trial taken from a stored run: its run id
FIDELITY_ATTR = "fersearch.fidelity"  # the study's config.FIDELITY
OWNER_ATTR = "fersearch.owner"  # the study's search: `searcher.study_owner` (host and Ray folder)


def proposals(study: optuna.Study) -> dict[str, int]:
    """How many of the study's configurations each proposer chose (warm-start trials and a
    promoted trial's later records excluded)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        source = t.user_attrs.get(PROPOSED_BY, "unknown")
        if source not in ("warm_start", "promoted"):
            counts[source] = counts.get(source, 0) + 1
    return counts


def latest_records(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """One record per configuration the study ran: for a trial paused at a rung and promoted
    later, its latest record (the first was told PRUNED at the pause)."""
    latest: dict[int, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(PROPOSED_BY) == "warm_start":
            continue
        latest[int(t.user_attrs.get(CONTINUES, t.number))] = t  # later records come later
    return list(latest.values())


def first_rung_scores(study: optuna.Study, grace: float) -> dict[str, list[float]]:
    """Each configuration's score at ASHA's first rung (`grace` epochs: its intermediate value at
    that report), grouped by who proposed it, in proposal order: how the searcher's model's
    choices compare with its random start-up's at the fidelity the model sees. Known points (on
    schedules of their own), warm-start copies and a promoted trial's later records are left out."""
    step = round(grace * REPORTS_PER_EPOCH)
    scores: dict[str, list[float]] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        source = t.user_attrs.get(PROPOSED_BY, "unknown")
        value = t.intermediate_values.get(step)
        if source not in ("point", "warm_start", "promoted") and value is not None:
            scores.setdefault(source, []).append(float(value))
    return scores
