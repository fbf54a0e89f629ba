"""The `fersearch` command line. Only this module prints; bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fersearch.config import (
    APP_PORT,
    SEARCH_CPUS_PER_TRIAL,
    SEARCH_FIRST_RUNG_FACES,
    SEARCH_MAX_EPOCHS,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_TRIALS,
    SEARCH_TRIALS_WITH_BUDGET,
    SERVE_HOST,
    TTA,
    UI_PORT,
    parse_duration,
)
from fersearch.errors import FersearchError
from fersearch.outputs import atomic_write, check_out_dir, make_out_dir
from fersearch.synthetic import DEFAULT_SIZES

SYNTHETIC = "synthetic"
log = logging.getLogger("fersearch")


# --------------------------------------------------------------------------- shared helpers


def resolve_data(arg: str | None) -> Path:
    """`--data` to an absolute folder; `synthetic` builds the stand-in under ./data/synthetic."""
    hint = (
        "pass --data PATH (FERPlus in Microsoft's layout, or fer2013.csv + fer2013new.csv), "
        f"or --data {SYNTHETIC} for the built-in synthetic dataset"
    )
    if not arg:
        raise FersearchError(f"no dataset given: {hint}")
    if arg == SYNTHETIC:
        from fersearch.synthetic import ensure_synthetic, synthetic_is_current

        target = Path.cwd() / "data" / SYNTHETIC
        if synthetic_is_current(target):
            return target  # read once: ensure_synthetic would check the label files again
        print(f"building the synthetic dataset in {target} ...", flush=True)
        return ensure_synthetic(target)
    path = Path(arg).expanduser().resolve()
    if not path.is_dir():
        raise FersearchError(f"data folder {path} does not exist: {hint}")
    return path


# Upper bounds of the numeric options: far above any sensible value, low enough that nothing
# overflows (torch's thread count is a C int; Ray's resources are floats it compares).
MAX_THREADS = 1024
MAX_COUNT = 10**7
MAX_RESOURCES = 4096.0
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255  # Linux's PATH_MAX and NAME_MAX


def bounded_int(low: int, high: int):
    """argparse type for whole numbers in [low, high] (`--threads 0` is not 'all cores')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} is above {high:,}")
        return value

    parse.__name__ = "whole number"
    return parse


threads_int = bounded_int(1, MAX_THREADS)
seed_int = bounded_int(0, 2**32 - 1)


def finite_float(text: str) -> float:
    """argparse type for a number that is not NaN or infinite (ranges are checked by the command)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if abs(value) > MAX_RESOURCES:
        raise argparse.ArgumentTypeError(f"{value:g} is above {MAX_RESOURCES:g}")
    return value


finite_float.__name__ = "number"


def path_text(text: str) -> str:
    """argparse type for every path option: not empty (`--out "$UNSET"` must not mean the
    current folder), no NUL byte, within Linux's name and path lengths."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path")
    if "\0" in text:
        raise argparse.ArgumentTypeError("contains a NUL byte")
    encoded = os.fsencode(text)
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise argparse.ArgumentTypeError(
            f"is too long (a name over {MAX_NAME_BYTES} bytes or a path over {MAX_PATH_BYTES:,}): {text[:60]!r}...")
    return text


path_text.__name__ = "path"


def check_device(name: str) -> None:
    """Refuse a device this machine lacks before any data is loaded."""
    from fersearch.engine import select_device

    select_device(name)


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(max(1, threads or os.cpu_count() or 1))


# --------------------------------------------------------------------------- commands


class EpochProgress:
    """A line every `every_s` seconds within an epoch: samples done, samples/s, time left (the
    first epoch of a large net on a CPU is minutes long)."""

    def __init__(self, epoch: int, epochs: int, total: int, every_s: float = 10.0) -> None:
        self.epoch, self.epochs, self.total, self.every_s = epoch, epochs, total, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        print(f"  epoch {self.epoch}/{self.epochs}: {done:,}/{self.total:,} samples, {rate:,.0f} samples/s, "
              f"~{(self.total - done) / max(rate, 1e-9):.0f} s left in the epoch", flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from fersearch import metrics as M
    from fersearch.config import parse_assignments, resolve_config
    from fersearch.data import apply_protocol, load_raw
    from fersearch.metrics import SUMMARY_KEYS
    from fersearch.run_files import RUN_FILES, write_run_files
    from fersearch.training import Trainer

    overrides: dict[str, Any] = parse_assignments(args.set or [])
    if args.protocol:
        overrides["protocol"] = args.protocol
    if args.epochs is not None:
        if "epochs" in overrides:
            raise FersearchError(f"epochs is given twice (--set epochs={overrides['epochs']} and --epochs {args.epochs}): give it once")
        overrides["epochs"] = args.epochs
    cfg = resolve_config(args.model, overrides)
    out = check_out_dir(args.out, RUN_FILES, args.overwrite)
    check_device(args.device)
    data_dir = resolve_data(args.data)
    _set_threads(args.threads)
    print(f"loading {data_dir} ...", flush=True)
    raw = load_raw(data_dir, args.cache_dir)
    data = apply_protocol(raw, cfg.protocol)
    print(f"data: {data.summary()}")
    trainer = Trainer(cfg, data, args.device)
    print(f"model: {cfg.model} on {trainer.device}; training {cfg.epochs} epochs")
    for _ in range(cfg.epochs):
        progress = EpochProgress(trainer.epoch + 1, cfg.epochs, trainer.train_size)
        row = trainer.run_epoch(max_batches=2 if args.smoke else None, progress=progress)
        print(
            f"epoch {row[M.EPOCH]:>3}/{cfg.epochs}  train loss {row[M.TRAIN_LOSS]:.4f} "
            f"acc {row[M.TRAIN_ACCURACY]:.4f} | val loss {row[M.VAL_LOSS]:.4f} "
            f"acc {row[M.VAL_ACCURACY]:.4f} f1m {row[M.VAL_F1_MACRO]:.4f} | "
            f"lr {row[M.LR]:.3g} | {row[M.EPOCH_SECONDS]:.1f}s",
            flush=True,
        )
    report = trainer.final_report(raw)
    make_out_dir(out)
    written = write_run_files(out, trainer, report, f"{cfg.model} on {data.protocol}")
    print(f"best epoch {report['best_epoch']} (by validation accuracy)")
    for protocol, scores in report["by_protocol"].items():
        for split in ("val", "test"):
            line = "  ".join(f"{k} {scores[split][k]:.4f}" for k in SUMMARY_KEYS[:1] + ("f1_macro", "f1_weighted"))
            print(f"{protocol:>9} {split:>4}: {line}")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fersearch.data import SPLITS, prepare_from_kaggle

    check_out_dir(args.out)
    raw = prepare_from_kaggle(Path(args.fer2013), Path(args.ferplus), Path(args.out))
    counts = ", ".join(f"{s} {int((raw.split == i).sum())}" for i, s in enumerate(SPLITS))
    print(f"wrote Microsoft's FERPlus layout to {Path(args.out).resolve()} ({counts})")
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from fersearch.data import write_layout
    from fersearch.synthetic import generate

    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    if min(sizes.values()) < 1:
        raise FersearchError("--train, --valid and --test must each be at least 1")

    check_out_dir(args.out)
    images, votes, split = generate(sizes, args.seed)
    write_layout(Path(args.out), images, votes, split)
    print(f"wrote {len(images)} synthetic faces to {Path(args.out).resolve()}")
    return 0


# The options of a search that --resume cannot change (dest, option): its saved state holds them.
RESUME_FIXED = (
    ("data", "--data"), ("trials", "--trials"), ("max_epochs", "--max-epochs"), ("grace_period", "--grace-period"),
    ("reduction_factor", "--reduction-factor"), ("time_budget", "--time-budget"), ("cpus_per_trial", "--cpus-per-trial"),
    ("gpus_per_trial", "--gpus-per-trial"), ("seed", "--seed"), ("quasi_random", "--quasi-random"),
    ("sampler", "--sampler"), ("warm_start", "--warm-start"), ("space", "--space"), ("fixed", "--fixed"),
)


def cmd_search(args: argparse.Namespace) -> int:
    from fersearch.config import parse_assignments
    from fersearch.outcome import COMPLETED, FAILED, STOPPED_EARLY, UNFINISHED
    from fersearch.search import SearchSettings, command_line, plan_search, run_search
    from fersearch.tracking import check_search_name

    if args.resume and args.name:
        raise FersearchError("--resume NAME continues the search NAME; drop --name")
    if args.resume:
        # A resumed search goes on with its saved settings (the state file and Ray's pickle):
        # an option that would change them is refused, not silently ignored.
        given = [option for dest, option in RESUME_FIXED if getattr(args, dest) is not None]
        if given:
            raise FersearchError(
                f"--resume {args.resume} continues that search with its saved settings; "
                f"{', '.join(given)} cannot change (start a new search instead: --warm-start "
                f"{args.resume} gives it this one's trials)"
            )
    elif args.trials is None:
        args.trials = SEARCH_TRIALS_WITH_BUDGET if args.time_budget is not None else SEARCH_TRIALS
    for value, option in ((args.trials, "--trials"), (args.max_epochs, "--max-epochs")):
        if value is not None and value < 1:
            raise FersearchError(f"{option} must be at least 1")
    if args.grace_period is not None and not (math.isfinite(args.grace_period) and args.grace_period > 0):
        raise FersearchError("--grace-period must be a positive number of epochs, e.g. 0.25 (ASHA caps it at --max-epochs)")
    if args.reduction_factor is not None and args.reduction_factor < 2:
        raise FersearchError("--reduction-factor must be at least 2 (ASHA keeps 1/N of the trials at each rung)")
    if args.cpus_per_trial is not None and args.cpus_per_trial <= 0:
        raise FersearchError("--cpus-per-trial must be positive")
    if (args.gpus_per_trial or 0) < 0 or (args.quasi_random or 0) < 0:
        raise FersearchError("--gpus-per-trial and --quasi-random must be 0 or more")
    from fersearch.space import space_path

    if args.resume:
        name = check_search_name(args.resume)
    else:
        default = f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = check_search_name(default if args.name is None else args.name)
    # Options not given keep SearchSettings' defaults (each defined once, in config.py).
    given = {
        key: value
        for key, value in {
            "trials": args.trials,
            "max_epochs": args.max_epochs,
            "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
            "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial,
            "seed": args.seed,
            "quasi_random": args.quasi_random,
            "sampler": args.sampler,
        }.items()
        if value is not None
    }
    settings = SearchSettings(
        model=args.model,
        data_dir=Path("."),  # set below, once everything else is known to be right
        name=name,
        mlruns=Path(args.mlruns).expanduser().resolve(),
        time_budget_s=parse_duration(args.time_budget),
        warm_start=list(args.warm_start or []),
        space_path=space_path(args.model, args.space),
        fixed=parse_assignments(args.fixed or []),
        address=args.address,
        resume=bool(args.resume),
        command=command_line(),
        optuna_storage=args.optuna_storage,
        allow_other_data=args.allow_other_data,
        **given,
    )
    # Before anything starts or is written: a taken name or nothing to resume, then the space
    # with its --fixed pins and known points.
    plan = plan_search(settings)
    if not settings.resume:
        data_arg = args.data or SYNTHETIC
        if data_arg == SYNTHETIC:
            print("no FERPlus data given: searching on the built-in synthetic dataset (--data PATH for the real study)")
        settings.data_dir = resolve_data(data_arg)  # a missing folder fails here, with the synthetic hint
        settings.dataset_label = SYNTHETIC if data_arg == SYNTHETIC else str(settings.data_dir)
    verb = "resuming search" if settings.resume else "search"
    budget = f", a {args.time_budget} budget" if settings.time_budget_s else ""
    print(f"{verb} {name}: model {args.model}, up to {settings.trials} trials{budget}, up to {settings.max_epochs} epochs each")
    outcome = run_search(settings, emit=lambda line: print(line, flush=True), plan=plan)
    c = outcome.counts
    print(
        f"trials {c['trials']}: completed {c[COMPLETED]}, stopped early by ASHA {c[STOPPED_EARLY]}, "
        f"failed {c[FAILED]}, cut short by the budget or an interruption {c[UNFINISHED]}; {outcome.epochs_trained:g} epochs trained vs {outcome.epochs_without_asha} "
        f"without ASHA ({outcome.epochs_without_asha / max(outcome.epochs_trained, 1):.1f}x less); "
        f"{outcome.wall_s:.0f}s"
    )
    if outcome.proposals:
        shown = ", ".join(f"{n} by {PROPOSER_WORDS.get(k, k)}" for k, n in sorted(outcome.proposals.items(), key=lambda kv: -kv[1]))
        print(f"proposals: {shown}")
    if outcome.interrupted:
        print(f"interrupted with {c['unfinished']} trial(s) unfinished; continue with: fersearch search --model {args.model} --resume {name}")
        return 130
    if outcome.best is None:
        print("no trial finished successfully")
        return 1
    b = outcome.best
    run = f"MLflow run {b['run_id']}" if b["run_id"] else "not in MLflow yet"
    print(f"best trial {b['trial_id']} ({run}), epoch {b['epoch']}:")
    for protocol, scores in b["by_protocol"].items():
        print(f"  {protocol:>9}: val accuracy {scores['val']['accuracy']:.4f}, test accuracy {scores['test']['accuracy']:.4f}, test f1_macro {scores['test']['f1_macro']:.4f}")
    for point, stored in outcome.stored_above_best.items():
        print(f"  the known point {point}, a stored result of this data (MLflow run {stored['run_id']}), scored val "
              f"{stored['val']:.4f} without TTA, above this search's best ({b['best_val']:.4f}): the search exports "
              "only what it trained")
    if outcome.report:
        print(f"study report: {outcome.report}")
    if outcome.mlflow_failures or not outcome.recorded:
        print(
            f"MLflow missed part of this search ({outcome.mlflow_failures} failed call(s)"
            f"{'' if outcome.recorded else ', and its results'}); everything is in {settings.experiment_dir}: "
            f"once the tracking server is back, run: fersearch sync --model {args.model} --search {name}"
        )
        return 0
    print(f"MLflow store: {settings.mlruns} (make ui)")
    return 0


PROPOSER_WORDS = {"tpe": "TPE's model", "random": "random draws", "qmc": "quasi-random draws",
                  "point": "known points", "optuna": "Optuna"}


def _check_listen(host: str, port: int) -> None:
    from fersearch.listen import check_listen, listen_warning

    if (warning := listen_warning(host)) is not None:
        print(f"fersearch: warning: {warning}", file=sys.stderr)
    check_listen(host, port)


def cmd_ui(args: argparse.Namespace) -> int:
    from fersearch.tracking import tracking_uri

    _check_listen(args.host, args.port)
    mlruns = Path(args.mlruns).expanduser().resolve()
    try:
        mlruns.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FersearchError(f"cannot use --mlruns {mlruns} ({exc.strerror or exc})") from None
    uri = tracking_uri(mlruns)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", (mlruns / "artifacts").as_uri(),
        "--host", args.host, "--port", str(args.port), "--workers", "1",
    ]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"MLflow UI for {uri} at http://{shown}:{args.port} (Ctrl-C to stop)", flush=True)
    # The UI needs no server-side jobs (online scoring, trace archival); starting their worker
    # pool took most of a minute on a loaded 2-core machine.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from fersearch.app import find_models, serve
    except ImportError as exc:
        raise FersearchError(f"the app needs its extra: pip install -e '.[app]' (or make app) ({exc.name} missing)") from None

    _check_listen(args.host, args.port)
    bundles = []
    for folder in args.bundle:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise FersearchError(f"--bundle {path} is not a folder (pass one made by fersearch export or train)")
        bundles.append(path)
    mlruns = Path(args.mlruns).expanduser().resolve()
    found = find_models(mlruns, bundles)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fersearch app at http://{shown}:{args.port} with {len(found)} model(s) (Ctrl-C to stop)", flush=True)
    if not found:
        print("no model yet: make search MODEL=cnn, then make export MODEL=cnn (or --bundle DIR)", flush=True)
    serve(mlruns, bundles, args.host, args.port, detector=args.detector)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fersearch.export import export_best

    result = export_best(
        args.model, Path(args.out), Path(args.mlruns).expanduser().resolve(), args.search, args.run_id,
        register=not args.no_register,
    )
    print(f"exported the best trial of search {result['search']!r} (MLflow run {result['mlflow_run_id']}) to {result['bundle']}")
    for protocol, scores in result["by_protocol"].items():
        print(f"  {protocol:>9}: val accuracy {scores['val']['accuracy']:.4f}, test accuracy {scores['test']['accuracy']:.4f}")
    if result.get("registered"):
        print(f"registered as {result['registered']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

    from fersearch.bundle import load_bundle
    from fersearch.evaluate import EVALUATION_FILES, load_eval_set, score, write_evaluation
    from fersearch.metrics import SUMMARY_KEYS

    out = check_out_dir(args.out, EVALUATION_FILES, args.overwrite) if args.out else None  # before minutes of scoring
    check_device(args.device)
    bundle = load_bundle(args.bundle)
    _set_threads(args.threads)
    eval_set = load_eval_set(bundle, args.data, args.split, args.protocol, args.cache_dir,
                             detector=args.detector if args.detect else None)
    # The model's own classifier first (its config's TTA: what export scored, what predict uses),
    # then the plain net and any --tta asked for.
    own = bundle.cfg.tta
    runs = [(tta, score(bundle, eval_set, tta)) for tta in dict.fromkeys((own, "none", args.tta or own))]
    first = runs[0][1]
    print(f"{bundle.cfg.model} bundle {bundle.path} on {first['source']}: {first['n']} images")
    for tta, metrics in runs:
        label = ("plain" if tta == "none" else f"tta={tta}") + (" (model)" if tta == own else "")
        print(f"{label:>18}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in SUMMARY_KEYS))
    print(f"{'class':>12} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>7}")
    for name, row in first["per_class"].items():
        print(f"{name:>12} {row['precision']:9.4f} {row['recall']:7.4f} {row['f1']:6.4f} {row['support']:7d}")
    if eval_set.no_face:
        print(f"no face found in {len(eval_set.no_face)} photo(s), scored on the whole image: "
              + ", ".join(eval_set.no_face[:5]) + (" ..." if len(eval_set.no_face) > 5 else ""))
    for name, info in first["unmatched"].items():
        print(f"folder {name!r} ({info['n']} images) has no class in the bundle; predicted as {info['predicted']}")
    if out is not None:
        write_evaluation(out, runs)
        print(f"wrote metrics.json, confusion_matrix.png, confusion_matrix.csv to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fersearch.predict import Predictor, annotated_path, read_image, shown, write_png

    out = check_out_dir(args.out, (), overwrite=True) if args.out else None  # earlier annotations may be replaced
    predictor = Predictor(args.bundle, detector=args.detector)
    if out is not None:
        make_out_dir(out)
    results, failures = [], 0
    written: set[str] = set()
    for path in args.images:
        try:
            image = read_image(path)
            result = predictor.predict(image)
        except FersearchError as exc:
            failures += 1
            print(f"fersearch: error: {exc}", file=sys.stderr)
            continue
        result["image"] = str(path)
        if out is not None:
            target = annotated_path(out, Path(path).stem, written)
            annotated = predictor.annotate(image, result)
            atomic_write(target, lambda p, img=annotated: write_png(p, img))
            result["annotated"] = str(target)
        results.append(result)
        if not args.json:
            note = " (no face found: whole image classified)" if result["whole_image"] else ""
            print(f"{shown(path)}: {len(result['faces'])} face(s){note}")
            for i, face in enumerate(result["faces"], start=1):
                probs = ", ".join(f"{k} {v:.3f}" for k, v in sorted(face["probabilities"].items(), key=lambda kv: -kv[1]))
                print(f"  face {i} box x={face['box'][0]} y={face['box'][1]} w={face['box'][2]} h={face['box'][3]}: {probs}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 2 if failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    from fersearch.report import build_report

    check_out_dir(args.out, (), overwrite=True)
    path = build_report(args.model, Path(args.out), Path(args.mlruns).expanduser().resolve(), args.search)
    print(f"wrote {path} (and its figures)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from fersearch.sync import sync_search
    from fersearch.tracking import check_search_name

    result = sync_search(args.model, check_search_name(args.search), Path(args.mlruns).expanduser().resolve(), args.allow_other_data)
    parent = "its totals and best trial recorded on the parent run" if result.parent_recorded else "the parent run was up to date"
    print(f"search {result.name}: {result.trials} trials in the Ray results, {result.runs_updated} MLflow run(s) brought up to date; {parent}")
    return 0


def cmd_repeat(args: argparse.Namespace) -> int:
    from fersearch.repeat import repeat_best

    _set_threads(args.threads)
    rows = repeat_best(args.model, Path(args.mlruns).expanduser().resolve(), args.search, args.seeds,
                       allow_other_data=args.allow_other_data)
    vals, tests = [r["val"] for r in rows], [r["test"] for r in rows]
    print(f"{len(rows)} seeds: val accuracy mean {sum(vals) / len(vals):.4f}, test accuracy mean {sum(tests) / len(tests):.4f} "
          "(fersearch report shows them with their spread)")
    return 0


# --------------------------------------------------------------------------- parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--threads", type=threads_int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--cache-dir", type=path_text, default=None, help="decoded-image cache (default ~/.cache/fersearch)")


def _add_search_ref(p: argparse.ArgumentParser) -> None:
    """Options of the commands that read a finished search from the MLflow store."""
    p.add_argument("--model", default="cnn")
    p.add_argument("--search", default=None, help="search name (default: the latest finished search)")
    p.add_argument("--out", type=path_text, required=True)
    p.add_argument("--mlruns", type=path_text, default="mlruns", help="the MLflow store (default ./mlruns)")


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error (argparse prints the whole usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"fersearch: error: {message} (see {self.prog} --help)\n")


def _add_detector(p: argparse.ArgumentParser) -> None:
    from fersearch.faces import DEFAULT_DETECTOR, DETECTORS

    p.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                   help=f"face detector (default {DEFAULT_DETECTOR}: YuNet with eye landmarks; haar: OpenCV's Haar cascade)")


def _add_allow_other_data(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--allow-other-data", action="store_true",
                   help=f"{verb} even though the search's data (its fingerprint) has changed since it ran")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fersearch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model with named hyperparameters")
    p.add_argument("--model", default="cnn", help="cnn or resnet18")
    p.add_argument("--data", type=path_text, default=None, help=f"FERPlus folder, or '{SYNTHETIC}'")
    p.add_argument("--protocol", default=None, help="ferplus8 (default) or seed10")
    p.add_argument("--epochs", type=bounded_int(-MAX_COUNT, MAX_COUNT), default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a hyperparameter (repeatable)")
    p.add_argument("--out", type=path_text, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out")
    p.add_argument("--smoke", action="store_true", help="2 batches per epoch: checks the plumbing fast")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="convert Kaggle's fer2013.csv + fer2013new.csv to Microsoft's layout")
    p.add_argument("--fer2013", type=path_text, required=True)
    p.add_argument("--ferplus", type=path_text, required=True, help="fer2013new.csv")
    p.add_argument("--out", type=path_text, required=True)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("synthetic", help="write a synthetic FERPlus-like dataset")
    p.add_argument("--out", type=path_text, required=True)
    for split, size in DEFAULT_SIZES.items():
        p.add_argument(f"--{split}", type=bounded_int(-MAX_COUNT, MAX_COUNT), default=size, help=f"images in {split} (default {size})")
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=cmd_synthetic)
    p = sub.add_parser("search", help="hyperparameter search: Ray Tune + Optuna + ASHA, tracked in MLflow")
    p.add_argument("--model", default="cnn", help="cnn or resnet18 (space: search_spaces/MODEL.yaml)")
    p.add_argument("--data", type=path_text, default=None, help=f"FERPlus folder, or '{SYNTHETIC}' (default when none is given)")
    p.add_argument("--trials", type=bounded_int(-MAX_COUNT, MAX_COUNT), default=None,
                   help=f"at most this many trials (default {SEARCH_TRIALS}; {SEARCH_TRIALS_WITH_BUDGET} with --time-budget)")
    p.add_argument("--max-epochs", type=bounded_int(-MAX_COUNT, 100_000), default=None,
                   help=f"epochs of a trial ASHA never stops (its schedule's length; default {SEARCH_MAX_EPOCHS})")
    p.add_argument("--grace-period", type=float, default=None,
                   help=f"ASHA: epochs (fractional) before the first cut (default: the report nearest {SEARCH_FIRST_RUNG_FACES:,} "
                        "training faces, a quarter epoch of FERPlus, one epoch of the synthetic set)")
    p.add_argument("--reduction-factor", type=bounded_int(-MAX_COUNT, 1000), default=None, help=f"ASHA: keep 1/N at each rung (default {SEARCH_REDUCTION_FACTOR})")
    p.add_argument("--time-budget", default=None, help="stop starting trials after e.g. 30m, 2h")
    p.add_argument("--cpus-per-trial", type=finite_float, default=None, help=f"default {SEARCH_CPUS_PER_TRIAL:g} (one 1-thread trial per core)")
    p.add_argument("--gpus-per-trial", type=finite_float, default=None, help="default 0")
    p.add_argument("--seed", type=seed_int, default=None, help="seed of the Optuna sampler (default 0)")
    p.add_argument("--quasi-random", type=bounded_int(-MAX_COUNT, MAX_COUNT), default=None, help="first N trials quasi-random (QMC), then TPE")
    p.add_argument("--sampler", default=None, help="tpe (default) or random (search at random, for comparisons)")
    p.add_argument("--warm-start", nargs="+", metavar="NAME", default=None,
                   help="give these earlier searches' trials (same model and data) to the sampler first")
    p.add_argument(
        "--space",
        type=path_text,
        default=None,
        help="default (search_spaces/MODEL.yaml, focused), broad (MODEL-broad.yaml) or a space YAML file",
    )
    p.add_argument("--fixed", action="append", metavar="KEY=VALUE", help="pin a hyperparameter (repeatable)")
    p.add_argument("--name", default=None, help="search name (default MODEL-timestamp)")
    p.add_argument("--resume", metavar="NAME", default=None, help="continue an interrupted search")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--mlruns", type=path_text, default="mlruns", help="MLflow store and Ray results folder")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="RDB URL of the Optuna study (default sqlite:///MLRUNS/optuna.db)")
    _add_allow_other_data(p, "--resume")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write the best trial of a search as a self-contained bundle")
    _add_search_ref(p)
    p.add_argument("--run-id", default=None, help="MLflow run id of a search or one of its trials")
    p.add_argument("--no-register", action="store_true", help="skip the MLflow model registry")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="score a bundle on FERPlus or on CLASSNAME/*.png folders")
    p.add_argument("bundle", type=path_text)
    p.add_argument("--data", type=path_text, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--protocol", default=None, help="default: the bundle's")
    p.add_argument("--tta", default=None, choices=TTA,
                   help="also report with this test-time augmentation (the model's own, its config's, and the plain net always)")
    p.add_argument("--out", type=path_text, default=None, help="write metrics.json and the confusion matrix (PNG, CSV)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--detect", action="store_true",
                   help="the class folders hold ordinary photos: find each one's face first, as predict does")
    _add_detector(p)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="find faces in photos and classify their expression")
    p.add_argument("bundle", type=path_text)
    p.add_argument("images", type=path_text, nargs="+")
    p.add_argument("--out", type=path_text, default=None, help="write annotated images here")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    _add_detector(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="write the study report of a search (markdown + figures)")
    _add_search_ref(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sync", help="send what MLflow missed during a search (its server was down) from the Ray results")
    p.add_argument("--model", default="cnn")
    p.add_argument("--search", required=True, help="the search's name")
    p.add_argument("--mlruns", type=path_text, default="mlruns", help="the Ray results and (local) MLflow store (default ./mlruns)")
    _add_allow_other_data(p, "score the best checkpoint")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("repeat", help="retrain a search's best configuration with seeds 1..N (logged to MLflow)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--search", default=None, help="search name (default: the latest finished search)")
    p.add_argument("--seeds", type=bounded_int(1, 1000), default=3, help="how many seeds (default 3)")
    p.add_argument("--mlruns", type=path_text, default="mlruns", help="the MLflow store (default ./mlruns)")
    p.add_argument("--threads", type=threads_int, default=None)
    _add_allow_other_data(p, "retrain")
    p.set_defaults(func=cmd_repeat)

    p = sub.add_parser("ui", help="serve the MLflow UI for the project's store")
    p.add_argument("--mlruns", type=path_text, default="mlruns")
    p.add_argument("--host", default=SERVE_HOST, help=f"address to listen on (default {SERVE_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=UI_PORT)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("app", help="a local web app: classify faces in a photo or live from the camera")
    p.add_argument("--bundle", type=path_text, action="append", default=[], metavar="DIR",
                   help="also offer this bundle (an export or a fersearch train --out folder); repeatable")
    p.add_argument("--mlruns", type=path_text, default="mlruns", help="exports under MLRUNS/exports and the store's registered models")
    p.add_argument("--host", default=SERVE_HOST, help=f"address to listen on (default {SERVE_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=APP_PORT)
    _add_detector(p)
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # a retried MLflow call that fails says so itself, once
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    from fersearch.config import bound_mlflow_http
    from fersearch.errors import one_line

    bound_mlflow_http()
    try:
        return int(args.func(args) or 0)
    except FersearchError as exc:
        print(f"fersearch: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow"):
            raise
        # The MLflow store could not be used (a tracking server that is down, a broken store):
        # what it said, on one line.
        print(f"fersearch: error: MLflow: {one_line(exc, 400)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fersearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
