"""Trust: nothing lost, nothing silently wrong. One test per risk a review found; each failed on
the code before its fix (the closing note of the trust work names them).
"""

import os

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


def _saved_search(tmp_path, data_dir, fingerprint: str) -> None:
    """A resumable search's saved state (as `search` writes it) recorded on data `fingerprint`."""
    import json
    import pickle

    from fersearch.record import STATE_VERSION

    folder = tmp_path / "m" / "ray" / "s1"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"a": 1}))
    (folder / "fersearch_search.json").write_text(json.dumps({
        "model": "cnn", "trials": 4, "max_epochs": 2, "data_dir": str(data_dir), "parent_run_id": "p",
        "points": [], "fingerprint": fingerprint, "cpus_per_trial": 2, "gpus_per_trial": 0,
        "state_version": STATE_VERSION,
    }))


@pytest.mark.parametrize("extra", [["--trials", "9"], ["--time-budget", "1h"], ["--data", "x", "--seed", "3"],
                                   ["--max-epochs", "24"], ["--fixed", "lr=0.1"]])
def test_resume_refuses_settings_it_would_ignore(synthetic_copy, tmp_path, capsys, no_ray, extra):
    """--resume continues with the saved settings; an option that would change them is one
    line, not silently dropped (even one equal to the CLI's default)."""
    _saved_search(tmp_path, synthetic_copy, "x" * 20)
    assert main(["search", "--resume", "s1", "--mlruns", str(tmp_path / "m"), *extra]) == 2
    err = _one_error(capsys, "cannot change")
    assert all(option in err for option in extra if option.startswith("--"))


def test_resume_sync_and_repeat_refuse_changed_data(synthetic_copy, smoke_search, tmp_path, capsys, no_ray):
    """A search's data fingerprint is checked: --resume (from the state file) and repeat (from
    the parent run) refuse data that changed since the search ran, naming both fingerprints;
    --allow-other-data goes on."""
    from mlflow.tracking import MlflowClient

    from fersearch.data import load_raw
    from fersearch.tracking import FINGERPRINT_TAG, tracking_uri

    current = load_raw(synthetic_copy).fingerprint
    _saved_search(tmp_path, synthetic_copy, "0" * 20)
    assert main(["search", "--resume", "s1", "--mlruns", str(tmp_path / "m")]) == 2
    _one_error(capsys, f"ran on data with fingerprint {'0' * 20}, but {synthetic_copy} now has fingerprint {current}")
    with pytest.raises(AssertionError, match="Ray was started"):  # allowed: it goes on to start Ray
        main(["search", "--resume", "s1", "--mlruns", str(tmp_path / "m"), "--allow-other-data"])

    outcome, mlruns, _ = smoke_search
    client = MlflowClient(tracking_uri(mlruns))
    recorded = client.get_run(outcome.parent_run_id).data.tags[FINGERPRINT_TAG]
    client.set_tag(outcome.parent_run_id, FINGERPRINT_TAG, "1" * 20)  # as if the data changed since
    try:
        assert main(["repeat", "--search", "smoke", "--mlruns", str(mlruns), "--seeds", "1"]) == 2
        _one_error(capsys, f"ran on data with fingerprint {'1' * 20}")
    finally:
        client.set_tag(outcome.parent_run_id, FINGERPRINT_TAG, recorded)


def test_a_local_ray_runtime_that_listens_beyond_loopback_is_stopped(ray_runtime):
    """After a local Ray runtime starts, what it started is checked, not assumed: the session's
    real runtime passes; a node address or a child process listening beyond loopback (what a
    Ray release that renamed the patched constant would do) is one line."""
    import subprocess
    import sys

    from fersearch.ray_runtime import check_loopback_only

    check_loopback_only(ray_runtime.util.get_node_ip_address())
    with pytest.raises(FersearchError, match="took the network address 10.1.2.3"):
        check_loopback_only("10.1.2.3")
    server = ("import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
              "print(s.getsockname()[1], flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    try:
        port = child.stdout.readline().strip()
        with pytest.raises(FersearchError, match=rf"listen beyond loopback: .*\(pid {child.pid}\) on 0\.0\.0\.0:{port}"):
            check_loopback_only("127.0.0.1")
    finally:
        child.kill()
        child.wait(timeout=30)
    check_loopback_only("127.0.0.1")


def test_resume_refuses_a_search_folder_others_can_write(tmp_path, capsys, no_ray):
    """Resuming unpickles Ray's saved state: a folder or file in it that other users can write
    (or a link out of it) is refused in one line before anything is read; the user's own
    private group may write (umask 002)."""
    import os
    import stat

    _saved_search(tmp_path, tmp_path, "x" * 20)
    folder = tmp_path / "m" / "ray" / "s1"
    argv = ["search", "--resume", "s1", "--mlruns", str(tmp_path / "m")]
    for target in (folder, folder / "tuner.pkl"):
        mode = target.stat().st_mode
        target.chmod(mode | stat.S_IWOTH)
        assert main(argv) == 2
        _one_error(capsys, f"{target} is writable by other users: resuming would run code from it")
        target.chmod(mode)
    (folder / "searcher-state.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    assert main(argv) == 2
    _one_error(capsys, "is a symbolic link")
    (folder / "searcher-state.pkl").unlink()
    (folder / "tuner.pkl").chmod((folder / "tuner.pkl").stat().st_mode | stat.S_IWGRP)
    os.chown(folder / "tuner.pkl", -1, os.getgid())
    # Past the folder check (the saved data folder is not FERPlus: a later check refuses it).
    assert main(argv) == 2
    assert "other users" not in capsys.readouterr().err


@pytest.mark.slow
def test_the_app_ended_by_sigterm_removes_its_download_folder(tmp_path):
    """`fersearch app` ended as a service manager ends it (SIGTERM) exits cleanly and removes
    its temporary folder of models downloaded from the store."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.helpers import free_port

    temp = tmp_path / "tmp"
    temp.mkdir()
    (tmp_path / "store").mkdir()
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "TMPDIR": str(temp)}
    app = subprocess.Popen([sys.executable, "-m", "fersearch", "app", "--mlruns", str(tmp_path / "store"), "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 180
        while True:
            assert app.poll() is None and time.time() < deadline, "the app did not start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        assert [p.name[:14] for p in temp.iterdir() if p.name.startswith("fersearch-app-")] == ["fersearch-app-"]
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=60) == 0
        assert not [p for p in temp.iterdir() if p.name.startswith("fersearch-app-")]
    finally:
        app.kill()
        app.wait(timeout=30)


@pytest.mark.slow
def test_a_python_caller_gets_its_process_back_after_a_search(synthetic_dir, tmp_path):
    """run_search from Python (its own process, no Ray runtime yet): afterwards the environment
    is as it was and the Ray runtime the search started is shut down."""
    import subprocess
    import sys

    script = f"""
import os, ray
from pathlib import Path
from fersearch.search import SearchSettings, run_search
before = dict(os.environ)
settings = SearchSettings(model="cnn", data_dir=Path({str(synthetic_dir)!r}), name="api", mlruns=Path({str(tmp_path / 'm')!r}),
                          trials=1, max_epochs=1, cpus_per_trial=1)
outcome = run_search(settings, emit=lambda line: None)
assert outcome.counts["trials"] == 1, outcome.counts
assert not ray.is_initialized(), "the search left its Ray runtime running"
changed = {{k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}}
assert not changed, changed
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]
