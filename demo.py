"""Train a classifier on breast cancer data and track it with MLflow, end to end.

A random forest learns to tell malignant from benign tumours in scikit-learn's
bundled breast cancer data (569 tumours, 30 measurements each) and is scored on
tumours it never saw: accuracy about 0.95, ROC AUC about 0.99 with the default
flags. MLflow records the run: params, metrics, tags, the datasets, three plots,
a report, and the model with its signature and environment. Run it with the
virtual environment active::

    python demo.py                                # default settings
    python demo.py --n-estimators 200 --max-depth 4
    python demo.py --help                         # every flag and its default

Everything lands beside this file, in ``mlflow.db`` and ``mlruns/``, or on the
tracking server that ``MLFLOW_TRACKING_URI`` names. At the end it prints the
commands that open the run in the MLflow UI, serve the model and query it.

Each ``# %%`` cell is one step: in VS Code, PyCharm or Jupyter, run them one at
a time and look at each step's variables and plots. To try another model,
change the one assignment ``model = ...``: everything else follows from it.
"""

# %%
# Settings
# --------
# Every choice that changes the result is a command-line flag, so that each
# run records exactly what produced it. The flags are read before the heavy
# imports below, so `--help` and a typo answer at once.

import argparse
import sys

IN_NOTEBOOK = "ipykernel" in sys.modules  # Jupyter, or the cells of VS Code or PyCharm


def number_from(low, high, kind=int):
    """An argparse type: a whole number (any number with kind=float) from low to high."""

    def parse(text):
        try:
            number = kind(text)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not between {low} and {high}")
        return number

    return parse


parser = argparse.ArgumentParser(description="Train a classifier on the breast cancer data and log it to MLflow.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# The random forest's knobs, used where the model is built below.
parser.add_argument("--n-estimators", type=number_from(1, 1000), default=100, help="number of trees, 1 to 1000")
parser.add_argument("--max-depth", type=number_from(1, 50), default=6,
                    help="how many questions deep each tree may go, 1 to 50")
parser.add_argument("--min-samples-leaf", type=number_from(1, 100), default=1,
                    help="fewest training rows allowed in each leaf (final answer) of a tree, 1 to 100")
# How the data is split, whatever the model.
parser.add_argument("--test-size", type=number_from(0.1, 0.9, float), default=0.25,
                    help="share of the rows held out for testing, 0.1 to 0.9")
parser.add_argument("--seed", type=number_from(0, 2**32 - 1), default=42, help="random seed of the split and the model")
# In a notebook the command line belongs to Jupyter: the defaults are used.
args = parser.parse_args([] if IN_NOTEBOOK else None)
print("Flags:", ", ".join(f"{name}={value}" for name, value in vars(args).items()))

import clean_stop

if not IN_NOTEBOOK:  # in a notebook, the interrupt button stops only the cell
    clean_stop.install()  # Ctrl+C or a full disk: one line, not a traceback (clean_stop.py)

# %%
# Load the data
# -------------
# Each row is one tumour described by 30 measurements; the target is 0
# (malignant) or 1 (benign). A test set is held out that the model never sees
# while training, with the same share of each class as the whole (`stratify`).

from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

data = load_breast_cancer(as_frame=True)
class_names = list(data.target_names)  # ["malignant", "benign"], for classes 0 and 1
X_train, X_test, y_train, y_test = train_test_split(
    data.data, data.target, test_size=args.test_size, stratify=data.target, random_state=args.seed
)
print(f"{len(X_train)} tumours to train on, {len(X_test)} held out to test, "
      f"{X_train.shape[1]} measurements each ({', '.join(X_train.columns[:3])}, ...)")

# %%
# Choose and train the model
# --------------------------
# A random forest is many decision trees voting together. More trees are
# steadier but slower; deeper trees fit the training data more closely.
#
# To try another model, replace the expression after `model =` and import its
# class: any scikit-learn classifier, alone or in a pipeline, such as
# `make_pipeline(StandardScaler(), LogisticRegression())`. The rest follows
# from the `model` object: the params logged, its name, scores and plots.

from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline

model = RandomForestClassifier(
    n_estimators=args.n_estimators,
    max_depth=args.max_depth,
    min_samples_leaf=args.min_samples_leaf,
    random_state=args.seed,  # each tree sees random rows and features: seed them
)
model.fit(X_train, y_train)

# The model's class names it in the run (in a pipeline, the last step's class).
model_type = type(model[-1] if isinstance(model, Pipeline) else model).__name__
print(f"Trained on {len(X_train)} tumours: {model}")  # shows the settings that differ from the defaults

# %%
# Evaluate on the held-out test set
# ---------------------------------
# Scores on the training data would flatter the model: only the test set says
# how it does on tumours it has not seen. Accuracy is the share of test tumours
# labelled right. Precision, recall and f1 are about class 1, "benign": recall
# 0.97 means 97% of the benign tumours were called benign. ROC AUC (0.5 is a
# coin toss, 1.0 perfect) asks how well the model ranks benign above malignant,
# so it needs a score per tumour, not a label: scikit-learn's scorer takes
# `predict_proba`, or `decision_function` for a model without probabilities.

from sklearn.metrics import accuracy_score, classification_report, f1_score, get_scorer, precision_score, recall_score

y_pred = model.predict(X_test)
metrics = {
    "accuracy": accuracy_score(y_test, y_pred),
    "roc_auc": get_scorer("roc_auc")(model, X_test, y_test),
    "precision": precision_score(y_test, y_pred),
    "recall": recall_score(y_test, y_pred),
    "f1": f1_score(y_test, y_pred),
}
report = classification_report(y_test, y_pred, target_names=class_names, digits=3)
print(f"{model_type} on the {len(X_test)} test tumours:")
for name, value in metrics.items():
    print(f"  {name:<17} {value:.4f}")
print(report)

# %%
# Plot the results
# ----------------
# Three plots, logged with the run below: which tumours were labelled right or
# wrong, how well the scores rank them at every threshold, and which
# measurements the model relies on.

import matplotlib

if not IN_NOTEBOOK:
    matplotlib.use("Agg")  # as a script: draw into memory and open no window
import matplotlib.pyplot as plt
from sklearn.inspection import permutation_importance
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

confusion_fig, ax = plt.subplots(figsize=(5, 4.5))
ConfusionMatrixDisplay.from_predictions(y_test, y_pred, display_labels=class_names, cmap="Blues", ax=ax)
ax.set_title(f"Confusion matrix (test set)\n{model_type}")
confusion_fig.tight_layout()

roc_fig, ax = plt.subplots(figsize=(5, 4.5))
RocCurveDisplay.from_estimator(model, X_test, y_test, name=model_type, plot_chance_level=True, ax=ax)
ax.set_title("ROC curve (test set), positive class 1: benign")
roc_fig.tight_layout()

# Permutation importance shuffles one measurement at a time in the test set and
# sees how much ROC AUC drops (accuracy, on a test set this small, moves in
# steps too coarse to show it). It works for any model, on unseen data. (A
# forest also has `feature_importances_`, learned from the training data, which
# favour measurements with many distinct values.) Measurements that go together,
# such as radius, perimeter and area, stand in for each other, so each bar
# understates what the group is worth: read a small bar as "replaceable", not
# "useless". Three shuffles each find the same top three as thirty; fewer may not.
importance = permutation_importance(model, X_test, y_test, scoring="roc_auc", n_repeats=3, random_state=args.seed)
ranked = importance.importances_mean.argsort()[::-1]  # the measurements, most important first
top = ranked[:15][::-1]  # the top 15, drawn bottom up
importance_fig, ax = plt.subplots(figsize=(7, 5.5))
ax.barh(X_test.columns[top], importance.importances_mean[top], xerr=importance.importances_std[top])
ax.set_title(f"Permutation importance, top 15 (test set)\n{model_type}")
ax.set_xlabel("Drop in ROC AUC when the measurement is shuffled")
importance_fig.tight_layout()

figures = {"plots/confusion_matrix.png": confusion_fig, "plots/roc_curve.png": roc_fig,
           "plots/permutation_importance.png": importance_fig}
print(f"Drew {len(figures)} plots. The model relies most on: {', '.join(X_test.columns[ranked[:3]])}")

# %%
# Choose where to log
# -------------------
# MLflow keeps run metadata (experiments, runs, params, metrics, tags) in a
# *backend store*, and files (plots, reports, models) in an *artifact store*.
# Without MLFLOW_TRACKING_URI both are beside this file: the SQLite database
# `mlflow.db` and the folder `mlruns/`. With it, both belong to that server.

import getpass
import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow.exceptions import MlflowException

EXPERIMENT_NAME = "demo-mlflow-artifacts"
owner = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()  # on a server, your account

# Beside this file, whatever folder it is started from (in a notebook: its folder).
PROJECT_DIR = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
server_uri = os.environ.get("MLFLOW_TRACKING_URI")
if server_uri:
    EXPERIMENT_NAME += f"-{owner}"  # on a shared server, an experiment of your own, which only you can change
    # MLflow retries a failed request for minutes, which looks like a hang at a
    # laptop; a few quick retries still ride out a busy server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    artifact_location = None  # the server decides where files go
else:
    # local_store.py takes care of what a laptop's folder goes through: runs
    # started at once, a run stopped half-way (Ctrl-C, kill -9, a full disk),
    # files from an older MLflow. No need to read it for the workshop.
    from local_store import open_local_store

    artifact_location, this_run_file = open_local_store(PROJECT_DIR, EXPERIMENT_NAME)

# An experiment groups the runs of one problem; the first run creates it, with
# its files under mlruns/. (mlflow.set_experiment alone would put them in the
# current folder, and in MLflow 3.17 fails when a room creates it at once.)
try:
    if mlflow.get_experiment_by_name(EXPERIMENT_NAME) is None:
        try:
            mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
        except MlflowException as error:  # a room starting at once: another run created it first
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment = mlflow.set_experiment(EXPERIMENT_NAME)
except MlflowException as error:  # a server that is down, or a wrong password: one line
    sys.exit(f"Could not log to {mlflow.get_tracking_uri()}: {error.message}")
where = server_uri or f"{PROJECT_DIR / 'mlflow.db'} (backend store) and {PROJECT_DIR / 'mlruns'} (artifact store)"
print(f"Logging to experiment '{EXPERIMENT_NAME}' in {where}")

# %%
# Log the run
# -----------
# A run is one execution of this script, and everything logged inside the
# `with` block belongs to it. Leaving the block ends the run: FINISHED on
# success, FAILED if anything inside raises, Ctrl-C included.

import re
import warnings
from importlib.metadata import version

import skops.io
from mlflow.models import infer_signature

# "RandomForestClassifier" gives "random_forest_breast_cancer", and so on.
run_name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", model_type.removesuffix("Classifier")).lower() + "_breast_cancer"
description = (f"{model_type} telling malignant from benign tumours in scikit-learn's breast cancer "
               f"data, trained on {len(X_train)} tumours and scored on {len(X_test)} held-out ones.")

with mlflow.start_run(run_name=run_name, description=description) as run:
    if not server_uri:  # so that a later run can tell if this one died (local_store.py)
        this_run_file.write_text(run.info.run_id)

    # Params: what produced the run. get_params() lists every setting of the
    # model, defaults included: they can change between scikit-learn versions.
    mlflow.log_params({**model.get_params(), "test_size": args.test_size, "seed": args.seed})

    # Metrics: how the run went. The UI sorts, charts and compares runs by them.
    mlflow.log_metrics(metrics)

    # Tags: free-form labels for finding and grouping runs later.
    mlflow.set_tags({"model_type": model_type, "dataset": "sklearn breast_cancer", "owner": owner})

    # Datasets: a fingerprint (digest) and schema, to tell if two runs saw the same rows.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")  # our 0/1 target has no gaps
    for rows, labels, context in [(X_train, y_train, "training"), (X_test, y_test, "testing")]:
        dataset = mlflow.data.from_pandas(rows.assign(target=labels), name=f"breast_cancer_{context}", targets="target")
        try:
            mlflow.log_input(dataset, context=context)
        except MlflowException:  # on a server, another run recorded the same rows at this instant
            mlflow.log_input(dataset, context=context)  # now the record is there, and is shared

    # Artifacts: any files. They go to the artifact store, not the database.
    for artifact_path, figure in figures.items():
        mlflow.log_figure(figure, artifact_path)
    plt.close("all")
    mlflow.log_text(report, "classification_report.txt")

    # The model. Its signature (input columns, output type) lets a server turn
    # away a malformed request. The input example is saved beside it, and as
    # serving_input_example.json: a ready-made body for a REST request.
    model_info = mlflow.sklearn.log_model(
        model,
        name="model",
        signature=infer_signature(X_test, y_pred),
        input_example=X_test.head(3),
        # MLflow 3 saves scikit-learn models with skops, not pickle: loading a
        # pickle runs whatever code it holds, while skops rebuilds only types it
        # trusts. skops lists the types it does not trust by default (for a
        # forest, the compiled tree of each estimator); we built this model, so
        # we trust exactly those.
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(model)),
        # What loading the model needs, pinned to the versions installed here,
        # so that `mlflow models serve` can rebuild the same environment.
        pip_requirements=[f"{package}=={version(package)}"
                          for package in ["mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas"]],
    )

run_id, experiment_id = run.info.run_id, run.info.experiment_id
print(f"\nRun '{run_name}' finished.")
print(f"  run id:    {run_id}")
print(f"  model URI: {model_info.model_uri}   (or runs:/{run_id}/model)")

# %%
# Next steps
# ----------
# Everything logged is also in the UI, and readable from Python and the REST
# API. The commands are filled in for this run.

if server_uri:
    print(f"\nNext, open the run page: {server_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
else:  # the stores are local: start the UI and serve the model from here
    model_dir = Path(url2pathname(urlparse(mlflow.get_logged_model(model_info.model_id).artifact_location).path))
    serving_example = (model_dir / "serving_input_example.json").relative_to(PROJECT_DIR).as_posix()
    print(f"""
Next, in a terminal in {PROJECT_DIR}:
  1. Start the MLflow UI (PowerShell: $env:MLFLOW_SERVER_ENABLE_JOB_EXECUTION = "false"):
       export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
       mlflow ui --port 5000 --workers 1
     then open this run's page, click 'Model training' at the top left,
     and close the MLflow Assistant panel on the right with its x:
       http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}
  2. Serve the model (in a second terminal):
       mlflow models serve -m {model_info.model_uri} --env-manager local --port 5001
  3. Ask it for predictions (in a third):
       curl -X POST -H "Content-Type: application/json" --data @{serving_example} http://127.0.0.1:5001/invocations""")

if not IN_NOTEBOOK:
    clean_stop.leave()  # everything is saved: exit at once, skipping Python's slow tidy-up
