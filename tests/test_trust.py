"""Trust: nothing lost, nothing silently wrong. One test per risk a review found; each failed on
the code before its fix (the closing note of the trust work names them).
"""

import optuna
import pytest

from fersearch.cli import main
from fersearch.errors import FersearchError
from fersearch.searcher import OWNER_ATTR, fresh_study, study_owner


def _one_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fersearch: error: ") and len(err.splitlines()) == 1, err
    assert fragment in err, err
    return err


def _search(synthetic_dir, tmp_path, name, *extra):
    return ["search", "--data", str(synthetic_dir), "--mlruns", str(tmp_path / "m"), "--trials", "2",
            "--max-epochs", "1", "--name", name, *extra]


def _study_with_one_trial(url: str, name: str, owner: str | None) -> None:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    if owner:
        study.set_user_attr(OWNER_ATTR, owner)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))


def test_a_colleagues_study_in_a_shared_optuna_storage_is_never_deleted(synthetic_dir, tmp_path, capsys, no_ray):
    """A new search named like a study in a shared --optuna-storage is refused in one line
    before Ray starts, whoever made that study; only the search's own stale study (same host,
    same Ray folder, whose results were deleted) is replaced."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'team.db'}"
    _study_with_one_trial(url, "colleague", None)  # made by another tool
    _study_with_one_trial(url, "elsewhere", study_owner(tmp_path / "their-mlruns" / "ray" / "elsewhere"))
    for name in ("colleague", "elsewhere"):
        assert main(_search(synthetic_dir, tmp_path, name, "--optuna-storage", url)) == 2
        _one_error(capsys, f"already holds a study named {name!r}")
        assert len(optuna.load_study(study_name=name, storage=url).trials) == 1  # untouched
        with pytest.raises(FersearchError, match="already holds"):
            fresh_study(url, name, study_owner(tmp_path / "m" / "ray" / name))
        assert len(optuna.load_study(study_name=name, storage=url).trials) == 1
    # This search's own stale study: the checks pass (the search goes on to start Ray) ...
    own = study_owner(tmp_path / "m" / "ray" / "mine")
    _study_with_one_trial(url, "mine", own)
    with pytest.raises(AssertionError, match="Ray was started"):
        main(_search(synthetic_dir, tmp_path, "mine", "--optuna-storage", url))
    # ... and the new search starts from an empty study of that name; the others stay.
    fresh_study(url, "mine", own)
    names = {s.study_name for s in optuna.get_all_study_summaries(url)}
    assert names == {"colleague", "elsewhere"}
