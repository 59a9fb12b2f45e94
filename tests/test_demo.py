"""demo.py as a learner runs it: what it logs, what it prints, how it fails."""

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score

from conftest import (
    MODEL_FILES,
    PLOTS,
    REPO,
    REPORT,
    learner_env,
    make_workshop,
    printed_ids,
    readme_commands,
    run_demo,
)

sys.path.insert(0, str(REPO))
import demo  # noqa: E402  (importing it must run nothing: see test_import_runs_nothing)


def client_for(workshop):
    return MlflowClient(tracking_uri=f"sqlite:///{Path(workshop) / 'mlflow.db'}")


def demo_runs(workshop):
    client = client_for(workshop)
    experiment = client.get_experiment_by_name(demo.EXPERIMENT_NAME)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def store_fingerprint(workshop):
    """A digest of everything in the stores, to prove that nothing changed."""
    digest = hashlib.sha256()
    workshop = Path(workshop)
    for path in sorted([workshop / "mlflow.db", *workshop.glob("mlruns/**/*")]):
        digest.update(str(path).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# %% The first run: everything the README says is logged is in the store


def test_stores_are_created_beside_demo_py(demo_workshop):
    workshop = demo_workshop["path"]
    assert (workshop / "mlflow.db").is_file()
    assert (workshop / "mlruns").is_dir()
    # demo.py was started from the parent folder: nothing may land there.
    assert not (workshop.parent / "mlflow.db").exists()
    assert not (workshop.parent / "mlruns").exists()


def test_run_has_params_metrics_tags_and_description(demo_workshop):
    (run,) = demo_runs(demo_workshop["path"])
    assert run.info.run_id == demo_workshop["run_id"]
    assert run.info.run_name == "random_forest_breast_cancer"
    assert run.info.status == "FINISHED"

    defaults = demo.parse_args([])
    assert run.data.params == {
        "n_estimators": str(defaults.n_estimators),
        "max_depth": str(defaults.max_depth),
        "min_samples_leaf": str(defaults.min_samples_leaf),
        "random_state": str(defaults.seed),
        "test_size": str(defaults.test_size),
    }
    assert set(run.data.metrics) == {"accuracy", "roc_auc", "precision", "recall", "f1"}
    assert all(0.5 < value <= 1.0 for value in run.data.metrics.values())

    tags = run.data.tags
    assert tags["model_type"] == "RandomForestClassifier"
    assert tags["dataset"] == "sklearn breast_cancer"
    assert tags["owner"]
    assert "Random forest with 100 trees" in tags["mlflow.note.content"]


def test_readme_quotes_the_default_metrics(demo_workshop):
    """The README says what a first run scores; that must stay true."""
    from conftest import README

    (run,) = demo_runs(demo_workshop["path"])
    assert "accuracy about\n   0.95" in README and "ROC AUC about 0.99" in README
    assert round(run.data.metrics["accuracy"], 2) == 0.95
    assert round(run.data.metrics["roc_auc"], 2) == 0.99


def test_training_and_test_data_are_logged_as_datasets(demo_workshop):
    (run,) = demo_runs(demo_workshop["path"])
    inputs = {
        next(tag.value for tag in item.tags if tag.key == "mlflow.data.context"): item.dataset
        for item in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "testing"}
    assert inputs["training"].name == "breast_cancer_training"
    assert inputs["testing"].name == "breast_cancer_testing"
    assert inputs["training"].digest != inputs["testing"].digest


def test_plots_and_report_are_artifacts(demo_workshop):
    client = client_for(demo_workshop["path"])
    run_id = demo_workshop["run_id"]
    listed = {item.path for item in client.list_artifacts(run_id)}
    listed |= {item.path for item in client.list_artifacts(run_id, "plots")}
    assert set(PLOTS) | {REPORT} <= listed

    for plot in PLOTS:
        png = Path(client.download_artifacts(run_id, plot)).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width >= 400 and height >= 300, (plot, width, height)

    report = Path(client.download_artifacts(run_id, REPORT)).read_text()
    assert "malignant" in report and "benign" in report and "precision" in report


def test_model_is_logged_with_its_files(demo_workshop):
    client = client_for(demo_workshop["path"])
    model = client.get_logged_model(demo_workshop["model_id"])
    assert model.name == "model"
    assert model.source_run_id == demo_workshop["run_id"]
    model_dir = demo_workshop["path"] / "mlruns" / "demo-mlflow-artifacts" / "models" / model.model_id / "artifacts"
    for name in MODEL_FILES:
        assert (model_dir / name).is_file(), name
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "serialization_format: skops" in mlmodel
    assert "sklearn.tree._tree.Tree" in mlmodel
    assert "signature:" in mlmodel and "mean radius" in mlmodel


def test_model_loads_from_runs_uri_and_predicts(demo_workshop):
    workshop, run_id = demo_workshop["path"], demo_workshop["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{workshop / 'mlflow.db'}")
    try:
        model = mlflow.sklearn.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    defaults = demo.parse_args([])
    _, X_test, _, y_test, _ = demo.load_data(defaults.test_size, defaults.seed)
    (run,) = demo_runs(workshop)
    assert accuracy_score(y_test, model.predict(X_test)) == run.data.metrics["accuracy"]


def test_prints_steps_metrics_and_next_commands(demo_workshop):
    out, err = demo_workshop["stdout"], demo_workshop["stderr"]
    (run,) = demo_runs(demo_workshop["path"])
    for name, value in run.data.metrics.items():
        assert f"{name:<10}{value:.4f}" in out
    run_id, model_id = demo_workshop["run_id"], demo_workshop["model_id"]
    assert f"runs:/{run_id}/model" in out
    assert f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}" in out
    assert f"mlflow models serve -m models:/{model_id} --env-manager local --port 5001" in out
    assert (
        f"--data @mlruns/demo-mlflow-artifacts/models/{model_id}/artifacts/serving_input_example.json"
        " http://127.0.0.1:5001/invocations" in out
    )
    # The commands printed are the README's, filled in.
    for line in readme_commands("ui"):
        assert line in out
    assert readme_commands("serve")[0].replace("<model_id>", model_id) in out
    # Nothing alarming for a learner: no traceback, no warning.
    assert "Traceback" not in out + err
    assert "Warning" not in err and "WARNING" not in err, err


# %% Re-running: same flags, same metrics


def test_second_run_with_same_flags_gives_same_metrics(tmp_path, demo_workshop):
    workshop = make_workshop(tmp_path / "again")
    for _ in range(2):
        # This time started from inside the workshop folder, as the README says.
        result = run_demo(workshop, cwd=workshop)
        assert result.returncode == 0, result.stderr
    first, second = demo_runs(workshop)
    assert first.info.run_id != second.info.run_id
    assert first.data.metrics == second.data.metrics
    (session_run,) = demo_runs(demo_workshop["path"])
    assert first.data.metrics == session_run.data.metrics


def test_readme_more_runs_each_add_a_run_with_their_flags(tmp_path):
    """Every line of the README's "more runs" block adds one run to the same
    experiment, and each run's params are the flags that line gave."""
    workshop = make_workshop(tmp_path / "flags")
    commands = readme_commands("more-runs")
    assert commands[0] == "python demo.py --n-estimators 10 --max-depth 2"
    for command in commands:
        program, script, *flags = command.split()
        assert (program, script) == ("python", "demo.py")
        result = run_demo(workshop, *flags, cwd=workshop)
        assert result.returncode == 0, result.stderr
    runs = demo_runs(workshop)
    assert len(runs) == len(commands) == 3
    flag_to_param = {"--n-estimators": "n_estimators", "--max-depth": "max_depth",
                     "--test-size": "test_size", "--seed": "random_state"}
    for run, command in zip(runs, commands):
        flags = command.split()[2:]
        for flag, value in zip(flags[::2], flags[1::2]):
            assert run.data.params[flag_to_param[flag]] == value, (command, run.data.params)
    first, second, _ = runs
    assert first.data.metrics != second.data.metrics


# %% Bad input: a usage message, exit status 2, nothing logged


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n-estimators", "-5"], "-5 is not between 1 and 1000"),
        (["--n-estimators", "ten"], "'ten' is not a whole number"),
        (["--max-depth", "0"], "0 is not between 1 and 50"),
        (["--test-size", "1.5"], "1.5 is not between 0.1 and 0.9"),
        (["--seed", "4.2"], "'4.2' is not a whole number"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flag_exits_2_and_logs_nothing(demo_workshop, flags, message):
    workshop = demo_workshop["path"]
    before = store_fingerprint(workshop)
    result = run_demo(workshop, *flags)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: demo.py")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert store_fingerprint(workshop) == before


def test_bad_flag_in_a_fresh_folder_creates_no_store(tmp_path):
    workshop = make_workshop(tmp_path / "fresh")
    result = run_demo(workshop, "--max-depth", "-1")
    assert result.returncode == 2
    assert not (workshop / "mlflow.db").exists()
    assert not (workshop / "mlruns").exists()


def test_readme_shows_the_real_usage_error(demo_workshop):
    from conftest import README

    result = run_demo(demo_workshop["path"], "--n-estimators", "-5")
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line in README


# %% Failures in the middle of a run end it FAILED, never RUNNING


FAILING_SAVEFIG = """
import runpy, sys
import matplotlib.figure

def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

# A failure in the middle of the run: the first plot cannot be written.
matplotlib.figure.Figure.savefig = full_disk
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_exception_mid_run_ends_the_run_failed(tmp_path):
    workshop = make_workshop(tmp_path / "failing")
    driver = tmp_path / "fail_mid_run.py"
    driver.write_text(FAILING_SAVEFIG)
    result = subprocess.run(
        [sys.executable, str(driver), str(workshop / "demo.py")],
        cwd=tmp_path, env=learner_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "No space left on device" in result.stderr
    (run,) = demo_runs(workshop)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    # What was logged before the failure is kept.
    assert run.data.params["n_estimators"] == "100"


def test_ctrl_c_mid_run_ends_the_run_failed(tmp_path):
    workshop = make_workshop(tmp_path / "interrupted")
    process = subprocess.Popen(
        [sys.executable, str(workshop / "demo.py")],
        cwd=tmp_path, env=learner_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Wait until the run is RUNNING and saving its plots, then press Ctrl-C.
        # (Plots are files, not database writes: a Ctrl-C that lands inside an
        # SQLite write can leave MLflow's own connection holding the lock, so
        # that it cannot mark the run FAILED; see the closing note of issue 2.)
        deadline = time.monotonic() + 120
        while not (running_run_exists(workshop / "mlflow.db")
                   and any(workshop.glob("mlruns/*/*/artifacts/plots/*.png"))):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "Interrupted" in err
    assert "Traceback" not in err
    (run,) = demo_runs(workshop)
    assert run.info.status in ("FAILED", "KILLED")


def running_run_exists(db_path):
    if not db_path.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as connection:
            rows = connection.execute("SELECT status FROM runs").fetchall()
    except sqlite3.Error:  # tables not created yet, or locked for a moment
        return False
    return ("RUNNING",) in rows


# %% As a module and as a notebook


def test_import_runs_nothing(tmp_path):
    workshop = make_workshop(tmp_path / "imported")
    result = subprocess.run(
        [sys.executable, "-c", "import demo; print(demo.EXPERIMENT_NAME)"],
        cwd=workshop, env=learner_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "demo-mlflow-artifacts\n"
    assert not (workshop / "mlflow.db").exists()
    assert not (workshop / "mlruns").exists()


def test_runs_cell_by_cell_in_a_jupyter_kernel(tmp_path):
    """Each `# %%` cell becomes a notebook cell, run in order in a real kernel."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    workshop = make_workshop(tmp_path / "notebook")
    notebook = jupytext.read(workshop / "demo.py", fmt="py:percent")
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code_cells) >= 7
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workshop)}}
    ).execute()
    outputs = "".join(
        output.get("text", "") for cell in code_cells for output in cell.get("outputs", [])
    )
    assert "Run 'random_forest_breast_cancer' finished." in outputs
    run_id, _ = printed_ids(outputs)
    (run,) = demo_runs(workshop)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
