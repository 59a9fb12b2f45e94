"""Track a scikit-learn model with MLflow, end to end.

This script trains a random forest that tells malignant from benign tumours in
scikit-learn's bundled breast cancer data set (569 samples, 30 numeric features,
no download), and records everything about the run with MLflow Tracking:

* params: the settings that shaped the model,
* metrics: how well it does on data it never saw during training,
* tags and a description: free-form facts for searching and reading later,
* datasets: which data trained and tested it,
* artifacts: three plots and a text report,
* a logged model, with its signature, an input example and its environment.

Run it from anywhere, with the virtual environment active::

    python demo.py                                # default settings
    python demo.py --n-estimators 200 --max-depth 4
    python demo.py --help                         # every flag and its default

Everything lands next to this file: metadata in ``mlflow.db`` (the *backend
store*) and files in ``mlruns/`` (the *artifact store*). Set
``MLFLOW_TRACKING_URI`` to log to a shared tracking server instead.

The same flags give the same metrics every time. At the end the script prints
the commands that open this run in the MLflow UI, serve the model over HTTP,
and ask it for predictions.

Each ``# %%`` section is one step of the story. In VS Code, PyCharm or Jupyter
you can run the sections one by one: each defines the function for its step,
and the last one runs them all. Importing the file runs nothing.
"""

# %%
# Set-up
# ------
# Every choice a participant may vary between runs is a command-line flag, so
# each run records exactly what produced it.

import argparse
import gc
import getpass
import os
import sqlite3
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import matplotlib

matplotlib.use("Agg")  # draw into files; no window pops up

import matplotlib.pyplot as plt
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    classification_report,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import train_test_split

EXPERIMENT_NAME = "demo-mlflow-artifacts"
RUN_NAME = "random_forest_breast_cancer"
RANDOM_STATE = 42  # one seed for the split and the forest: same flags, same metrics

# The stores live beside this file, whatever folder you start it from, so that
# `mlflow ui` started in this folder finds every run. (A notebook has no
# __file__; there the notebook's folder is used.)
PROJECT_DIR = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
LOCAL_TRACKING_URI = f"sqlite:///{(PROJECT_DIR / 'mlflow.db').as_posix()}"
LOCAL_ARTIFACT_URI = (PROJECT_DIR / "mlruns" / EXPERIMENT_NAME).as_uri()

# The packages needed to load the model again. Pinning the versions installed
# here lets `mlflow models serve` rebuild the same environment on another
# machine, and spares MLflow a slow subprocess that would guess this list.
MODEL_REQUIREMENTS = ["mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas"]


def whole_number(low, high):
    """An argparse type: a whole number from low to high."""

    def parse(text):
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not between {low} and {high}")
        return number

    return parse


def share_of_rows(text):
    """An argparse type: a fraction from 0.1 to 0.9."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.1 <= number <= 0.9:
        raise argparse.ArgumentTypeError(f"{number} is not between 0.1 and 0.9")
    return number


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a random forest on the breast cancer data and log it to MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-estimators", type=whole_number(1, 1000), default=100,
                        help="number of trees in the forest, 1 to 1000")
    parser.add_argument("--max-depth", type=whole_number(1, 50), default=6,
                        help="how many questions deep each tree may go, 1 to 50")
    parser.add_argument("--min-samples-leaf", type=whole_number(1, 100), default=1,
                        help="fewest training rows allowed in each leaf (final answer) of a tree, 1 to 100")
    parser.add_argument("--test-size", type=share_of_rows, default=0.25,
                        help="share of the rows held out for testing, 0.1 to 0.9")
    parser.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=RANDOM_STATE,
                        help="random seed for the split and the forest (logged as random_state), 0 to 2**32-1")
    return parser.parse_args(argv)


# %%
# Load the data
# -------------
# The data set ships inside scikit-learn. Each row is one tumour described by 30
# measurements; the target is 0 (malignant) or 1 (benign). A test set is held
# out that the model never sees while training, with the same share of each
# class as the whole (`stratify`).


def load_data(test_size, seed):
    data = load_breast_cancer(as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=test_size, stratify=data.target, random_state=seed
    )
    return X_train, X_test, y_train, y_test, list(data.target_names)


# %%
# Train
# -----
# A random forest is many decision trees voting together. `n_estimators` and
# `max_depth` are the knobs to turn between runs; more trees are steadier but
# slower, deeper trees fit the training data more closely.


def train(X_train, y_train, params):
    model = RandomForestClassifier(**params, n_jobs=-1)  # n_jobs=-1: use every core
    return model.fit(X_train, y_train)


# %%
# Evaluate on the held-out test set
# ---------------------------------
# Scores on the training data would flatter the model: only the test set says
# how it does on tumours it has not seen. Accuracy is the share of test tumours
# labelled right. Precision, recall and f1 are about class 1, "benign": recall
# 0.97 means 97% of the benign tumours were called benign. ROC AUC (0.5 is a
# coin toss, 1.0 perfect) is computed from the predicted probability of
# "benign", so it also rewards a model that is confident when it is right.


def evaluate(model, X_test, y_test, class_names):
    y_pred = model.predict(X_test)
    y_score = model.predict_proba(X_test)[:, 1]
    metrics = {
        "accuracy": accuracy_score(y_test, y_pred),
        "roc_auc": roc_auc_score(y_test, y_score),
        "precision": precision_score(y_test, y_pred),
        "recall": recall_score(y_test, y_pred),
        "f1": f1_score(y_test, y_pred),
    }
    report = classification_report(y_test, y_pred, target_names=class_names, digits=3)

    confusion_fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay.from_predictions(
        y_test, y_pred, display_labels=class_names, cmap="Blues", ax=ax
    )
    ax.set_title("Confusion matrix (test set)")
    confusion_fig.tight_layout()

    roc_fig, ax = plt.subplots(figsize=(5, 4.5))
    RocCurveDisplay.from_predictions(y_test, y_score, name="Random forest", ax=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="Chance (AUC = 0.5)")
    ax.set_title("ROC curve (test set)")
    ax.legend(loc="lower right")
    roc_fig.tight_layout()

    # How much each feature helped the trees split tumours into purer groups
    # ("mean decrease in impurity"). These come free with a forest, but they
    # favour features with many distinct values: read them as a hint, not a verdict.
    ranked = sorted(zip(model.feature_importances_, X_test.columns))[-15:]
    importance_fig, ax = plt.subplots(figsize=(7, 5.5))
    ax.barh([name for _, name in ranked], [value for value, _ in ranked])
    ax.set_title("Top 15 feature importances")
    ax.set_xlabel("Mean decrease in impurity")
    importance_fig.tight_layout()

    figures = {
        "plots/confusion_matrix.png": confusion_fig,
        "plots/roc_curve.png": roc_fig,
        "plots/feature_importances.png": importance_fig,
    }
    return y_pred, metrics, report, figures


# %%
# Choose where to log
# -------------------
# Without MLFLOW_TRACKING_URI, run metadata (experiments, runs, params, metrics,
# tags) goes to the local SQLite file, the *backend store*, and files (plots,
# reports, models) go to mlruns/, the *artifact store*. With it, both go to the
# tracking server it names.


def create_local_store():
    """Build mlflow.db's tables, one process at a time.

    Your own scripts will not need this: MLflow builds the tables on first use.
    It only matters when several runs start in a new folder at the same second,
    as in a workshop room or in this project's tests, and would otherwise all
    build them at once. They take turns through an exclusive SQLite lock on a
    small file, which the system releases even if a run is killed.
    """
    (PROJECT_DIR / "mlruns").mkdir(exist_ok=True)
    turn = sqlite3.connect(PROJECT_DIR / "mlruns" / ".mlflow-db.lock", timeout=300, isolation_level=None)
    try:
        turn.execute("BEGIN EXCLUSIVE")
        mlflow.search_experiments(max_results=1)  # builds the tables if missing
    finally:
        turn.close()


def use_experiment(shared_server):
    if not shared_server:
        mlflow.set_tracking_uri(LOCAL_TRACKING_URI)
        create_local_store()
    # An experiment groups the runs of one modelling problem. When a whole room
    # starts the demo at the same moment, several processes may try to create
    # it at once: whoever loses that race uses the winner's.
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        try:
            mlflow.create_experiment(
                EXPERIMENT_NAME, artifact_location=None if shared_server else LOCAL_ARTIFACT_URI
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    return mlflow.set_experiment(experiment_id=experiment.experiment_id)


# %%
# Log the run
# -----------
# A run is one execution of this script. Leaving the `with` block ends it:
# FINISHED on success, FAILED if anything inside raises (Ctrl-C included).
# Only a process killed outright (kill -9, a closed terminal) leaves it RUNNING.


def log_run(params, test_size, metrics, report, figures, model, X_train, X_test, y_train, y_test, y_pred):
    description = (
        f"Random forest with {params['n_estimators']} trees of depth at most "
        f"{params['max_depth']}, telling malignant from benign tumours in "
        f"scikit-learn's breast cancer data, scored on a held-out {test_size:.0%} of the rows."
    )
    with mlflow.start_run(run_name=RUN_NAME, description=description) as run:
        # Params: the inputs you chose, one value each, fixed for the run.
        mlflow.log_params({**params, "test_size": test_size})

        # Metrics: numbers that say how the run went. The UI charts them, and
        # sorts and compares runs by them.
        mlflow.log_metrics(metrics)

        # Tags: free-form labels for finding and grouping runs later.
        mlflow.set_tags({
            "model_type": "RandomForestClassifier",
            "dataset": "sklearn breast_cancer",
            # On a shared server, the account you log in with; else your login.
            "owner": os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser(),
        })

        # Datasets: MLflow stores a fingerprint (digest) and the schema of the
        # data, so you can tell later whether two runs saw the same rows.
        # (MLflow hints that integer columns cannot hold missing values; our
        # 0/1 target never has any, so that one hint is silenced.)
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        for rows, labels, context in ((X_train, y_train, "training"), (X_test, y_test, "testing")):
            dataset = mlflow.data.from_pandas(
                rows.assign(target=labels), name=f"breast_cancer_{context}", targets="target"
            )
            mlflow.log_input(dataset, context=context)

        # Artifacts: any files. They go to the artifact store, not the database.
        for artifact_path, figure in figures.items():
            mlflow.log_figure(figure, artifact_path)
            plt.close(figure)
        mlflow.log_text(report, "classification_report.txt")
        # The plots are saved: let go of their pixels before the model is
        # saved, the step that needs the most memory. (Figures refer to
        # themselves in cycles, which only the garbage collector frees.)
        figures.clear()
        gc.collect()

        # The model. The signature records the input columns and the output
        # type, so a server can turn away a malformed request. The input
        # example is saved beside the model, together with
        # serving_input_example.json: a ready-made body for a REST request.
        model_info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(X_test, y_pred),
            input_example=X_test.head(3),
            # MLflow 3 saves scikit-learn models with skops, not pickle: loading
            # a pickle runs whatever code it holds, while skops rebuilds only
            # the types it is told to trust. A forest needs one type beyond
            # skops' defaults, the compiled tree inside each of its estimators.
            skops_trusted_types=["sklearn.tree._tree.Tree"],
            pip_requirements=[f"{package}=={version(package)}" for package in MODEL_REQUIREMENTS],
        )
    return run, model_info


# %%
# Next steps
# ----------
# Everything printed here is also in the UI, and readable from Python and the
# REST API. The commands are filled in for this run.


def print_next_steps(run, model_info, shared_server):
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    print(f"Run '{RUN_NAME}' finished.")
    print(f"  run id:    {run_id}")
    print(f"  model URI: {model_info.model_uri}   (or runs:/{run_id}/model)")
    if shared_server:
        print(f"  run page:  {shared_server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
        return
    model_location = mlflow.get_logged_model(model_info.model_id).artifact_location
    model_dir = Path(url2pathname(urlparse(model_location).path))
    serving_example = model_dir.relative_to(PROJECT_DIR) / "serving_input_example.json"
    print(f"  stores:    {PROJECT_DIR / 'mlflow.db'} (backend), {PROJECT_DIR / 'mlruns'} (artifacts)")
    print()
    print(f"Next, in a terminal in {PROJECT_DIR}:")
    print("  1. Start the MLflow UI (PowerShell: $env:MLFLOW_SERVER_ENABLE_JOB_EXECUTION = \"false\"):")
    print("       export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false")
    print("       mlflow ui --port 5000 --workers 1")
    print("     then open this run's page, and click 'Model training' at the top left:")
    print(f"       http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}")
    print("  2. Serve the model (in a second terminal):")
    print(f"       mlflow models serve -m {model_info.model_uri} --env-manager local --port 5001")
    print("  3. Ask it for predictions (in a third):")
    print('       curl -X POST -H "Content-Type: application/json" '
          f"--data @{serving_example.as_posix()} http://127.0.0.1:5001/invocations")


# %%
# Run it all
# ----------
# In a notebook the command line belongs to Jupyter, so the defaults are used.


def main(argv=None):
    if argv is None and "ipykernel" in sys.modules:
        argv = []
    args = parse_args(argv)
    params = {
        "n_estimators": args.n_estimators,
        "max_depth": args.max_depth,
        "min_samples_leaf": args.min_samples_leaf,
        "random_state": args.seed,
    }

    print("Loading the breast cancer data ...")
    X_train, X_test, y_train, y_test, class_names = load_data(args.test_size, args.seed)
    print(f"  {len(X_train)} rows to train on, {len(X_test)} held out to test")

    print(f"Training a random forest with {params} ...")
    model = train(X_train, y_train, params)

    print("Evaluating on the test set ...")
    y_pred, metrics, report, figures = evaluate(model, X_test, y_test, class_names)
    for name, value in metrics.items():
        print(f"  {name:<10}{value:.4f}")

    shared_server = os.environ.get("MLFLOW_TRACKING_URI")
    where = shared_server or f"{PROJECT_DIR / 'mlflow.db'} and {PROJECT_DIR / 'mlruns'}"
    print(f"Logging params, metrics, tags, datasets, plots, a report and the model to {where} ...")
    if shared_server:
        # MLflow retries a failed request for minutes by default, which looks
        # like a hang to someone at a laptop; a few quick retries still ride
        # out a busy server. Settings of your own win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    try:
        use_experiment(shared_server)
    except MlflowException as error:
        if not shared_server:
            raise
        # The first request to the server: a server that is down or a wrong
        # password shows up here, as one line rather than a traceback.
        sys.exit(f"Could not log to the tracking server at {shared_server}: {error.message}")
    run, model_info = log_run(params, args.test_size, metrics, report, figures,
                              model, X_train, X_test, y_train, y_test, y_pred)
    print()
    print_next_steps(run, model_info, shared_server)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Ctrl-C: leaving the `with mlflow.start_run()` block has already marked
        # the run FAILED, so say so briefly instead of printing a traceback.
        print("\nInterrupted. A run that had started is marked FAILED in MLflow.", file=sys.stderr)
        sys.exit(130)
