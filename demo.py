"""Train a classifier on breast cancer data and track it with MLflow, end to end.

A random forest learns to tell malignant from benign tumours, scored on tumours it never saw
(accuracy about 0.95). MLflow records params, metrics, tags, data, plots, a report and the
model, in `mlflow.db` and `mlruns/` beside this file (or on the server `MLFLOW_TRACKING_URI`
names). Run `python demo.py --help`, or run the `# %%` cells one by one in Jupyter or VS Code.
To try another model, change `model = ...`.
"""

# %%
# Settings
# --------
# Every choice that changes the result is a flag, so that each run records what produced it.
# They are read before the heavy imports, so a typo answers at once.

import argparse
import signal
import sys

IN_NOTEBOOK = "ipykernel" in sys.modules  # Jupyter, or the cells of VS Code or PyCharm


def number_from(low, high, kind=int):
    """An argparse type for a number from low to high."""
    def parse(text):
        if not low <= kind(text) <= high:  # kind("ten") fails first: argparse's "invalid int value"
            raise argparse.ArgumentTypeError(f"{text} is not between {low} and {high}")
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


parser = argparse.ArgumentParser(description="Train a classifier on the breast cancer data and log it to MLflow.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--n-estimators", type=number_from(1, 1000), default=100, help="number of trees, 1 to 1000")
parser.add_argument("--max-depth", type=number_from(1, 50), default=6, help="how deep each tree may go, 1 to 50")
parser.add_argument("--min-samples-leaf", type=number_from(1, 100), default=1, help="fewest rows in a leaf, 1 to 100")
parser.add_argument("--test-size", type=number_from(0.1, 0.9, float), default=0.25, help="share held out, 0.1 to 0.9")
parser.add_argument("--seed", type=number_from(0, 2**32 - 1), default=42, help="random seed of the split and model")
args = parser.parse_args([] if IN_NOTEBOOK else None)  # a notebook's command line is Jupyter's: use the defaults
print("Flags:", ", ".join(f"{name}={value}" for name, value in vars(args).items()))


def stopped(kind, error, traceback):
    """One line instead of a traceback when the script is stopped, or the disk is full."""
    for each in STOP_SIGNALS:
        signal.signal(each, signal.SIG_DFL)  # pressed again while this runs: stop at once
    causes = [error]  # and the errors it interrupted: a Ctrl+C in a call whose clean-up then failed
    while causes[-1].__context__:
        causes.append(causes[-1].__context__)
    if any(isinstance(cause, KeyboardInterrupt) for cause in causes):
        mlflow, where = sys.modules.get("mlflow"), "no run had started"  # (no mlflow: not imported yet)
        try:
            if mlflow:
                mlflow.end_run("FAILED")  # a run still active: stopped inside start_run, before `with` took over
                run = mlflow.last_active_run()
                if run and run.info.status == "RUNNING":  # stopped inside end_run, after it let go of the run
                    mlflow.MlflowClient().set_terminated(run.info.run_id, "FAILED")
                where = f"the run is {mlflow.last_active_run().info.status}" if run else where
        except Exception as problem:  # its store is out of reach
            where = f"the run's status is unknown ({problem})"
        print(f"\nInterrupted: {where}.", file=sys.stderr)
    elif any("No space left" in str(cause) or "disk is full" in str(cause) for cause in causes):
        print("Stopped: the disk is full. Free some space, then run again.", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


# Ctrl+C, a closed terminal (SIGHUP) and `kill` (SIGTERM) all stop the script with a
# KeyboardInterrupt, which ends a run in progress FAILED.
STOP_SIGNALS = [getattr(signal, name) for name in ["SIGINT", "SIGTERM", "SIGHUP"] if hasattr(signal, name)]
if not IN_NOTEBOOK:  # a notebook shows errors its own way, and its stop button stops only a cell
    sys.excepthook = stopped
    for each in STOP_SIGNALS:
        signal.signal(each, signal.default_int_handler)

# %%
# Load the data
# -------------
# Each row is one tumour, 30 measurements; the target is 0 (malignant) or 1 (benign). A test
# set is held out that the model never sees while training, with the same share of each class
# as the whole (`stratify`).

from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

data = load_breast_cancer(as_frame=True)
class_names = list(data.target_names)  # ["malignant", "benign"], for classes 0 and 1
X_train, X_test, y_train, y_test = train_test_split(
    data.data, data.target, test_size=args.test_size, stratify=data.target, random_state=args.seed)
print(f"{len(X_train)} tumours to train on, {len(X_test)} held out to test, {X_train.shape[1]} measurements each")

# %%
# Choose and train the model
# --------------------------
# A random forest is many decision trees voting together. More trees are steadier but slower;
# deeper trees fit the training data more closely. To try another model, replace the expression
# after `model =` and import its class: any scikit-learn classifier, alone, in a pipeline such as
# `make_pipeline(StandardScaler(), LogisticRegression())`, or in a search such as
# `GridSearchCV(...)`. Everything below follows from the `model` object.

from sklearn.ensemble import RandomForestClassifier

model = RandomForestClassifier(
    n_estimators=args.n_estimators,
    max_depth=args.max_depth,
    min_samples_leaf=args.min_samples_leaf,
    random_state=args.seed,  # each tree sees random rows and features: seed them
)
model.fit(X_train, y_train)
print(f"Trained on {len(X_train)} tumours: {model}")  # shows the settings that differ from the defaults

# Its name in the run: its class (a pipeline's last step's), and the model it wraps, if any.
final = model[-1] if hasattr(model, "steps") else model
inner = final.get_params().get("estimator")  # GridSearchCV(RandomForestClassifier), say
model_type = type(final).__name__ + (f"({type(inner).__name__})" if inner is not None else "")

# %%
# Evaluate on the held-out test set
# ---------------------------------
# Scores on the training data would flatter the model. Accuracy is the share of test tumours
# labelled right. Precision, recall and f1 are about class 1, "benign": recall 0.97 means 97% of
# the benign tumours were called benign. ROC AUC (0.5 is a coin toss, 1.0 perfect) asks how well
# the model ranks benign above malignant, from `predict_proba` (or `decision_function`).

from sklearn.metrics import classification_report, get_scorer

y_pred = model.predict(X_test)
# Each scorer asks the model for what it needs: labels (accuracy), or scores to rank by (roc_auc).
metrics = {name: get_scorer(name)(model, X_test, y_test) for name in ["accuracy", "roc_auc", "precision", "recall", "f1"]}
report = classification_report(y_test, y_pred, target_names=class_names, digits=3)
print(f"{model_type} on the {len(X_test)} test tumours:")
print("\n".join(f"  {name:<17} {value:.4f}" for name, value in metrics.items()), report, sep="\n")

# %%
# Plot the results
# ----------------
# Which tumours were labelled right or wrong, how well the scores rank them at every
# threshold, and which measurements the model relies on.

import matplotlib

if not IN_NOTEBOOK:
    matplotlib.use("Agg")  # as a script: draw into memory and open no window
import matplotlib.pyplot as plt
from sklearn.inspection import permutation_importance
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

confusion_fig, ax = plt.subplots(figsize=(5, 4.5), layout="constrained")
ConfusionMatrixDisplay.from_predictions(y_test, y_pred, display_labels=class_names, cmap="Blues", ax=ax)
ax.set_title(f"Confusion matrix (test set)\n{model_type}")
roc_fig, ax = plt.subplots(figsize=(5, 4.5), layout="constrained")
RocCurveDisplay.from_estimator(model, X_test, y_test, name=model_type, plot_chance_level=True, ax=ax)
ax.set_title("ROC curve (test set), positive class 1: benign")

# Permutation importance shuffles one measurement at a time in the test set and sees how much
# ROC AUC drops: it works for any model, on unseen data. Measurements that go together (radius,
# perimeter, area) stand in for each other: read a small bar as "replaceable", not "useless".
importance = permutation_importance(model, X_test, y_test, scoring="roc_auc", n_repeats=3, random_state=args.seed)
ranked = importance.importances_mean.argsort()[::-1]  # the measurements, most important first
top = ranked[:15][::-1]  # the top 15, drawn bottom up
importance_fig, ax = plt.subplots(figsize=(7, 5.5), layout="constrained")
ax.barh(X_test.columns[top], importance.importances_mean[top], xerr=importance.importances_std[top])
ax.set_title(f"Permutation importance, top 15 (test set)\n{model_type}")
ax.set_xlabel("Drop in ROC AUC when the measurement is shuffled")
figures = {"plots/confusion_matrix.png": confusion_fig, "plots/roc_curve.png": roc_fig,
           "plots/permutation_importance.png": importance_fig}
print(f"Drew {len(figures)} plots. The model relies most on: {', '.join(X_test.columns[ranked[:3]])}")

# %%
# Choose where to log
# -------------------
# MLflow keeps run metadata (experiments, runs, params, metrics, tags) in a *backend store*, and
# files (plots, reports, models) in an *artifact store*. Without MLFLOW_TRACKING_URI both are
# beside this file: the SQLite database `mlflow.db` and the folder `mlruns/`. With it, both
# belong to that server.

import contextlib
import gc
import getpass
import logging
import os
import subprocess
from pathlib import Path

# Python's garbage collector would search MLflow's many objects for reference cycles again and
# again, and once more at exit: a script's run lasts seconds, so it does without (a notebook keeps it).
if not IN_NOTEBOOK:
    gc.disable()

import mlflow

EXPERIMENT_NAME = "demo-mlflow-artifacts"
owner = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()  # on a server, your account
server_uri = os.environ.get("MLFLOW_TRACKING_URI")
PROJECT_DIR = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook's folder
database, mlruns = PROJECT_DIR / "mlflow.db", PROJECT_DIR / "mlruns"
artifact_location = None if server_uri else (mlruns / EXPERIMENT_NAME).as_uri()  # a server decides for itself
if server_uri:
    EXPERIMENT_NAME += f"-{owner}"  # on a shared server, an experiment of your own, which only you can change
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # not minutes of retries when it is down
# Stop before writing anything where MLflow would fail half-way or misread old files.
elif not os.access(PROJECT_DIR, os.W_OK):
    sys.exit(f"Cannot write in {PROJECT_DIR}: copy demo.py into a folder of your own and run it there.")
elif any(mlruns.glob("*/meta.yaml")):
    sys.exit(f"{mlruns} holds an older MLflow's runs, which `mlflow ui` would show instead of mlflow.db: "
             "rename that folder (say, to mlruns-old), then run again.")
elif database.exists() and database.open("rb").read(16) != b"SQLite format 3\x00":
    sys.exit(f"{database} is not a database: move it away, then run again.")
elif not database.exists():  # a first run: MLflow builds its tables, which a Ctrl+C could stop half-way,
    building = database.with_name(f"mlflow.db.{os.getpid()}")  # so another Python builds them here first
    # (without the garbage collector's searches either, as in this script: it ends sooner)
    build = ("import gc; gc.disable(); import mlflow, sys; "
             "mlflow.MlflowClient(sys.argv[1]).search_experiments(); gc.freeze()")
    built = subprocess.run([sys.executable, "-c", build, f"sqlite:///{building.as_posix()}"], capture_output=True)
    if built.returncode:  # a full disk, say: MLflow's last line tells
        sys.exit(f"MLflow could not build {database}: {built.stderr.decode().strip().splitlines()[-1]}")
    with contextlib.suppress(FileExistsError):  # another run made one just now: keep that one
        os.link(building, database)  # unlike a rename, never replaces a file
    building.unlink()
if not server_uri:
    mlflow.set_tracking_uri(f"sqlite:///{database.as_posix()}")
    # MLflow logs a failed database call with its traceback; the error raised says enough (a full disk: one line).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# An experiment groups the runs of one problem. The first run creates it, with its files in
# mlruns/ beside this file (set_experiment alone would put them in the current folder).
try:
    if mlflow.get_experiment_by_name(EXPERIMENT_NAME) is None:
        with contextlib.suppress(mlflow.MlflowException):  # another run may create it at this instant
            mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
    experiment = mlflow.set_experiment(EXPERIMENT_NAME)
except mlflow.MlflowException as error:  # a server that is down, or a wrong password: one line
    sys.exit(f"Could not log to {mlflow.get_tracking_uri()}: {error.message}")
if artifact_location and experiment.artifact_location != artifact_location:
    sys.exit(f"{database} was copied from another folder (its files are in {experiment.artifact_location}): "
             "delete mlflow.db and mlruns/ here to start afresh.")
print(f"Logging to experiment '{EXPERIMENT_NAME}' in {server_uri or PROJECT_DIR}")

# %%
# Log the run
# -----------
# A run is one execution of this script; everything logged inside the `with` block belongs to
# it. Leaving the block ends the run: FINISHED on success, FAILED if anything inside raises,
# Ctrl+C included.

import re
import warnings
from importlib.metadata import packages_distributions, version

import skops.io
from mlflow.models import infer_signature

# "RandomForestClassifier" gives "random_forest_breast_cancer", and so on.
run_name = "_".join(re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name.removesuffix("Classifier")).lower()
                    for name in re.findall(r"\w+", model_type)) + "_breast_cancer"
description = (f"{model_type} telling malignant from benign tumours in scikit-learn's breast cancer "
               f"data, trained on {len(X_train)} tumours and scored on {len(X_test)} held-out ones.")
chosen = getattr(model, "best_estimator_", model)  # a search (GridSearchCV) refits the best settings it found

with mlflow.start_run(run_name=run_name, description=description) as run:
    # Params: what produced the run. get_params() lists every setting of the model, defaults
    # included: they can change between scikit-learn versions.
    mlflow.log_params({**chosen.get_params(), "test_size": args.test_size, "seed": args.seed})
    # Metrics: how the run went. The UI sorts, charts and compares runs by them.
    mlflow.log_metrics(metrics)
    if chosen is not model:  # a search's score for its best settings, cross-validated on the training set
        mlflow.log_metric("best_cv_score", model.best_score_)
    # Tags: free-form labels for finding and grouping runs later.
    mlflow.set_tags({"model_type": model_type, "dataset": "sklearn breast_cancer", "owner": owner})
    # Datasets: a fingerprint (digest) and schema, to tell if two runs saw the same rows.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")  # our 0/1 target has no gaps
    for rows, labels, context in [(X_train, y_train, "training"), (X_test, y_test, "testing")]:
        dataset = mlflow.data.from_pandas(rows.assign(target=labels), name=f"breast_cancer_{context}", targets="target")
        try:
            mlflow.log_input(dataset, context=context)
        except mlflow.MlflowException:  # another run here logged the same data at this instant: it is there now
            mlflow.log_input(dataset, context=context)
    # Artifacts: any files. They go to the artifact store, not the database.
    for artifact_path, figure in figures.items():
        mlflow.log_figure(figure, artifact_path)
    plt.close("all")
    mlflow.log_text(report, "classification_report.txt")

    # The model. Its signature (input columns, output type) lets a server turn away a malformed
    # request; the input example becomes a ready-made request body, serving_input_example.json.
    # Its requirements pin what loading it needs, the package behind each class in it too
    # (lightgbm for LGBMClassifier).
    packages = {"mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas"}
    for part in [model, *model.get_params().values()]:  # the model, and each model or setting inside it
        module = type(part).__module__.split(".")[0]
        if module not in ("sklearn", "numpy", "builtins"):  # from another package: find which
            packages.update(packages_distributions().get(module, []))
    model_info = mlflow.sklearn.log_model(
        model, name="model", signature=infer_signature(X_test, y_pred), input_example=X_test.head(3),
        pip_requirements=sorted(f"{package}=={version(package)}" for package in packages),
        # MLflow 3 saves scikit-learn models with skops, not pickle: loading a pickle runs
        # whatever code it holds, while skops rebuilds only the types it trusts. It lists those
        # it does not trust by default (for a forest, each tree's compiled class); we built
        # this model, so we trust those.
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(model)),
    )

run_id, experiment_id = run.info.run_id, run.info.experiment_id
print(f"\nRun '{run_name}' finished.\n  run id:    {run_id}\n  model URI: {model_info.model_uri}   (or runs:/{run_id}/model)")

# %%
# Next steps
# ----------
# Everything logged is in the UI too, and readable from Python and the REST API.

if server_uri:
    print(f"\nNext, open the run page: {server_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
else:  # the stores are local: start the UI and serve the model from this folder
    example = f"mlruns/{EXPERIMENT_NAME}/models/{model_info.model_id}/artifacts/serving_input_example.json"
    print(f"""
Next, in a terminal in {PROJECT_DIR}:
  1. Start the MLflow UI, then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}
       export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   (PowerShell: $env:MLFLOW_SERVER_ENABLE_JOB_EXECUTION = "false")
       mlflow ui --port 5000 --workers 1
  2. Serve the model (in a second terminal):
       mlflow models serve -m {model_info.model_uri} --env-manager local --port 5001
  3. Ask it for predictions (in a third):
       curl -X POST -H "Content-Type: application/json" --data @{example} http://127.0.0.1:5001/invocations""")

if not IN_NOTEBOOK:
    gc.freeze()  # and Python skips that search at exit too: the script ends about a second sooner
