"""demo.py as a learner runs it: what it logs, what it prints, how it fails."""

import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import sklearn
from mlflow import MlflowClient
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

from conftest import (
    EXPERIMENT,
    MODEL_FILES,
    PAGES,
    README,
    REPO,
    PLOTS,
    REPORT,
    expected_params,
    flat,
    learner_env,
    make_workshop,
    model_folder,
    printed_ids,
    readme_commands,
    readme_snippet,
    run_demo,
)

def client_for(workshop):
    return MlflowClient(tracking_uri=f"sqlite:///{Path(workshop) / 'mlflow.db'}")


def demo_runs(workshop):
    client = client_for(workshop)
    experiment = client.get_experiment_by_name(EXPERIMENT)
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

    # Every setting of the forest, defaults included, then the split.
    assert run.data.params == expected_params()
    assert run.data.params["n_estimators"] == "100" and run.data.params["max_depth"] == "6"
    assert run.data.params["random_state"] == run.data.params["seed"] == "42"
    assert run.data.params["test_size"] == "0.25"
    assert set(run.data.metrics) == {"accuracy", "roc_auc", "precision", "recall", "f1"}
    assert all(0.5 < value <= 1.0 for value in run.data.metrics.values())

    tags = run.data.tags
    assert tags["model_type"] == "RandomForestClassifier"
    assert tags["dataset"] == "sklearn breast_cancer"
    assert tags["owner"]
    assert tags["mlflow.note.content"] == (
        "RandomForestClassifier telling malignant from benign tumours in scikit-learn's breast "
        "cancer data, trained on 426 tumours and scored on 143 held-out ones."
    )


def test_readme_quotes_the_default_metrics(demo_workshop):
    """The README says what a first run scores; that must stay true."""

    (run,) = demo_runs(demo_workshop["path"])
    prose = flat(README)
    accuracy = re.search(r"accuracy about (\d\.\d\d)", prose).group(1)
    roc_auc = re.search(r"ROC AUC about (\d\.\d\d)", prose).group(1)
    assert f"{run.data.metrics['accuracy']:.2f}" == accuracy
    assert f"{run.data.metrics['roc_auc']:.2f}" == roc_auc


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
    model_dir = model_folder(demo_workshop["path"], model.model_id)
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
    (run,) = demo_runs(workshop)
    X_test, y_test = logged_test_set(run)
    assert accuracy_score(y_test, model.predict(X_test)) == run.data.metrics["accuracy"]


def test_the_readme_s_load_model_line_works_in_the_repository_folder(demo_workshop):
    """The README's `mlflow.sklearn.load_model("models:/<model_id>")`, in a
    Python started in the repository folder with no tracking URI set: MLflow's
    default store is that folder's mlflow.db, and the forest comes back."""
    (line,) = re.findall(r'`(mlflow\.sklearn\.load_model\("models:/<model_id>"\))`', flat(README))
    code = f"import mlflow; print(mlflow.get_tracking_uri()); print(type({line}).__name__)"
    workshop = demo_workshop["path"]
    result = subprocess.run([sys.executable, "-c", code.replace("<model_id>", demo_workshop["model_id"])],
                            cwd=workshop, env=learner_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"sqlite:///{workshop / 'mlflow.db'}", "RandomForestClassifier"]


def logged_test_set(run, context="testing"):
    """The test (or training) set of a run, split again from its logged params,
    and checked against the fingerprint of the dataset it logged."""
    data = load_breast_cancer(as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=float(run.data.params["test_size"]), stratify=data.target,
        random_state=int(run.data.params["seed"]),
    )
    rows, labels = (X_test, y_test) if context == "testing" else (X_train, y_train)
    (logged,) = [item.dataset for item in run.inputs.dataset_inputs if item.dataset.name == f"breast_cancer_{context}"]
    assert mlflow.data.from_pandas(rows.assign(target=labels), targets="target").digest == logged.digest
    return rows, labels


def test_prints_steps_metrics_and_next_commands(demo_workshop):
    out, err = demo_workshop["stdout"], demo_workshop["stderr"]
    (run,) = demo_runs(demo_workshop["path"])
    for name, value in run.data.metrics.items():
        # One metric a line, its name and its value apart, however long the name.
        assert re.search(rf"^  {name} +{value:.4f}$", out, re.MULTILINE), name
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


def test_second_run_with_same_flags_gives_same_metrics(tmp_path, demo_workshop, built_database):
    """Another run with the default flags, in another folder and this time
    started from inside it, as the README says: the same metrics as the
    session's run, to the last digit, and a model (under a new id) that
    answers every tumour as the first one does, which the README's serving
    section promises a learner whose first run scrolled away."""
    workshop = make_workshop(tmp_path / "again", built_database)
    result = run_demo(workshop, cwd=workshop)
    assert result.returncode == 0, result.stderr
    (run,) = demo_runs(workshop)
    (session_run,) = demo_runs(demo_workshop["path"])
    assert run.info.run_id != session_run.info.run_id
    assert run.data.metrics == session_run.data.metrics
    _, model_id = printed_ids(result.stdout)
    assert model_id != demo_workshop["model_id"]
    X = load_breast_cancer(as_frame=True).data
    probabilities = [mlflow.sklearn.load_model(str(model_folder(folder, model)))
                     .predict_proba(X) for folder, model in [(workshop, model_id),
                                                             (demo_workshop["path"], demo_workshop["model_id"])]]
    assert (probabilities[0] == probabilities[1]).all()


def test_readme_more_runs_each_add_a_run_with_their_flags(tmp_path, built_database):
    """Every line of the README's "more runs" block adds one run to the same
    experiment, and each run's params are the flags that line gave."""
    workshop = make_workshop(tmp_path / "flags", built_database)
    commands = readme_commands("more-runs")
    assert commands[0] == "python demo.py --n-estimators 10 --max-depth 2"
    for command in commands:
        program, script, *flags = command.split()
        assert (program, script) == ("python", "demo.py")
        result = run_demo(workshop, *flags, cwd=workshop)
        assert result.returncode == 0, result.stderr
    runs = demo_runs(workshop)
    assert len(runs) == len(commands) == 3
    flag_to_params = {"--n-estimators": ["n_estimators"], "--max-depth": ["max_depth"],
                      "--test-size": ["test_size"], "--seed": ["seed", "random_state"]}
    for run, command in zip(runs, commands):
        flags = command.split()[2:]
        for flag, value in zip(flags[::2], flags[1::2]):
            for param in flag_to_params[flag]:
                assert run.data.params[param] == value, (command, param, run.data.params)
        assert run.data.params == expected_params(flags), command
    first, second, other_split = runs
    assert first.data.metrics != second.data.metrics

    # The README's registry snippet, run after these runs, crowns the best of
    # the runs tested on the default test set, never the run tested on others.
    # Run again, it adds version 2 and moves @champion to it.
    client = client_for(workshop)
    name = re.search(r'models:/([\w-]+)@champion', readme_snippet("registry-serve")).group(1)
    fair = max([first, second], key=lambda run: run.data.metrics["accuracy"])
    assert other_split.data.params["test_size"] == "0.4"
    for version in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", readme_snippet("registry-python")], cwd=workshop,
                                env=learner_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"run {fair.info.run_id} is version {version} of {name}, @champion"
        champion = client.get_model_version_by_alias(name, "champion")
        assert (str(champion.version), champion.run_id) == (version, fair.info.run_id)


# %% Bad input: a usage message, exit status 2, nothing logged


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n-estimators", "-5"], "-5 is not between 1 and 1000"),
        (["--n-estimators", "ten"], "invalid int value: 'ten'"),
        (["--max-depth", "0"], "0 is not between 1 and 50"),
        (["--test-size", "1.5"], "1.5 is not between 0.1 and 0.9"),
        (["--seed", "4.2"], "invalid int value: '4.2'"),
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


def test_the_readme_s_bad_flag_gets_the_line_it_shows(demo_workshop):
    """The README's example of a refused value, run as it is written: the
    line it shows is the last one demo.py prints, and nothing is logged."""
    command, line = re.search(r"`(python demo\.py --[^`]+)`[^`]*`(demo\.py: error: [^`]+)`",
                              flat(README)).groups()
    workshop = demo_workshop["path"]
    before = store_fingerprint(workshop)
    result = run_demo(workshop, *command.split()[2:])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == line, result.stderr
    assert store_fingerprint(workshop) == before


def test_bad_flag_in_a_fresh_folder_creates_no_store(tmp_path):
    workshop = make_workshop(tmp_path / "fresh")
    result = run_demo(workshop, "--max-depth", "-1")
    assert result.returncode == 2
    assert not (workshop / "mlflow.db").exists()
    assert not (workshop / "mlruns").exists()


def test_a_copied_folder_stops_before_logging_and_writes_nothing_elsewhere(tmp_path, demo_workshop):
    """A workshop folder copied after a run: its mlflow.db still sends files to
    the original folder. demo.py says so in one line, before logging anything."""
    original = demo_workshop["path"]
    copy = tmp_path / "my-copy"
    shutil.copytree(original, copy)
    before_original, before_copy = store_fingerprint(original), store_fingerprint(copy)
    result = run_demo(copy)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{copy / 'mlflow.db'} was copied from another folder (its files are in "
        f"{(original / 'mlruns' / EXPERIMENT).as_uri()}): delete mlflow.db and mlruns/ here to start afresh.")
    assert store_fingerprint(original) == before_original
    assert store_fingerprint(copy) == before_copy
    # As the line says: without the copied stores, the copy runs on its own.
    shutil.rmtree(copy / "mlruns")
    (copy / "mlflow.db").unlink()
    assert run_demo(copy).returncode == 0
    assert store_fingerprint(original) == before_original


def test_readme_shows_the_real_usage_error(demo_workshop):

    result = run_demo(demo_workshop["path"], "--n-estimators", "-5")
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"`{last_line}`" in flat(README)


# %% Failures in the middle of a run end it FAILED, never RUNNING


FAILING_SAVEFIG = """
import runpy, sys
import matplotlib.figure

def broken(*args, **kwargs):
    raise RuntimeError("the plot cannot be drawn")

# A failure in the middle of the run: the first plot cannot be written.
matplotlib.figure.Figure.savefig = broken
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_exception_mid_run_ends_the_run_failed(tmp_path, built_database):
    workshop = make_workshop(tmp_path / "failing", built_database)
    driver = tmp_path / "fail_mid_run.py"
    driver.write_text(FAILING_SAVEFIG)
    result = subprocess.run(
        [sys.executable, str(driver), str(workshop / "demo.py")],
        cwd=tmp_path, env=learner_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    # A bug, not a stop: Python's own traceback, ending in the error.
    assert "Traceback" in result.stderr and result.stderr.strip().endswith("RuntimeError: the plot cannot be drawn")
    (run,) = demo_runs(workshop)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    # What was logged before the failure is kept.
    assert run.data.params["n_estimators"] == "100"


# %% One file, ended by Python's normal exit


def test_demo_py_copied_alone_into_an_empty_folder(tmp_path):
    """demo.py needs no other file of this repository: copied alone into an
    empty folder and started from another, it runs and logs beside itself."""
    import ast

    tree = ast.parse((REPO / "demo.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if (REPO / f"{name}.py").exists() or (REPO / name).is_dir()]
    project, elsewhere = tmp_path / "my-project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    shutil.copy(REPO / "demo.py", project / "demo.py")
    result = run_demo(project, "--n-estimators", "10", cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in project.iterdir()) == ["demo.py", "mlflow.db", "mlruns"]
    assert list(elsewhere.iterdir()) == []
    (run,) = demo_runs(project)
    assert run.info.status == "FINISHED"


FORK_TAIL = """
import atexit

notes = open(PROJECT_DIR / "notes.txt", "w")  # never closed: Python flushes it as it exits
notes.write(f"run {run_id}\\n")
atexit.register(lambda: (PROJECT_DIR / "atexit.txt").write_text("the hook ran"))
"""


def test_a_fork_s_atexit_hook_and_unclosed_file(tmp_path, built_database):
    """demo.py ends through Python's normal exit: a fork's atexit hook runs,
    and a file it never closed is flushed."""
    workshop = make_workshop(tmp_path / "fork", built_database)
    (workshop / "demo.py").write_text((workshop / "demo.py").read_text() + FORK_TAIL)
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    run_id, _ = printed_ids(result.stdout)
    assert (workshop / "notes.txt").read_text() == f"run {run_id}\n"
    assert (workshop / "atexit.txt").read_text() == "the hook ran"


# %% Flags answer at once


@pytest.mark.parametrize("flags", [["--help"], ["--max-depth", "0"]])
def test_flags_are_read_before_the_heavy_imports(tmp_path, flags):
    """`--help` and a typo answer before scikit-learn, pandas, matplotlib or
    MLflow are imported: -X importtime lists every module the run imported."""
    workshop = make_workshop(tmp_path / "help")
    result = subprocess.run([sys.executable, "-X", "importtime", str(workshop / "demo.py"), *flags],
                            cwd=tmp_path, env=learner_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == (0 if flags == ["--help"] else 2)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported
    assert not {"numpy", "pandas", "sklearn", "matplotlib", "mlflow"} & imported
    assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()


# %% Cell by cell, as in Jupyter or VS Code

# Each cell of demo.py in story order: its heading, what it shows when run, and
# the variables it leaves for the learner to look at.
CELLS = [
    ("Settings", ["Flags: n_estimators=100, max_depth=6, min_samples_leaf=1, test_size=0.25, seed=42"],
     ["args", "parser"]),
    ("Load the data", ["426 tumours to train on, 143 held out to test"],
     ["data", "class_names", "X_train", "X_test", "y_train", "y_test"]),
    ("Choose and train the model", ["Trained on 426 tumours: RandomForestClassifier(max_depth=6, random_state=42)"],
     ["model", "model_type"]),
    ("Evaluate on the held-out test set", ["RandomForestClassifier on the 143 test tumours:", "  accuracy ",
                                           "   malignant "], ["y_pred", "metrics", "report"]),
    ("Plot the results", ["Drew 3 plots."], ["confusion_fig", "roc_fig", "importance", "importance_fig", "figures"]),
    ("Choose where to log", ["Logging to experiment 'demo-mlflow-artifacts' in "], ["experiment", "PROJECT_DIR"]),
    ("Log the run", ["Run 'random_forest_breast_cancer' finished.", "  run id: "], ["run", "run_name", "model_info"]),
    ("Next steps", ["mlflow ui --port 5000 --workers 1", "mlflow models serve -m models:/m-"], []),
]


def test_runs_cell_by_cell_in_a_jupyter_kernel(tmp_path):
    """Each `# %%` cell becomes a notebook cell, run in order in a real kernel.
    After each one, a probe cell lists the kernel's variables: every cell shows
    its own step's output and leaves its variables behind."""
    import jupytext
    import nbclient
    import nbformat

    workshop = make_workshop(tmp_path / "notebook")
    notebook = jupytext.read(workshop / "demo.py", fmt="py:percent")
    docstring, *cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert docstring.source.startswith('"""')
    assert [cell.source.splitlines()[0] for cell in cells] == [f"# {heading}" for heading, _, _ in CELLS]

    probe = "import json; print(json.dumps(sorted(name for name in globals() if not name.startswith('_'))))"
    run_in_order = [docstring]
    for cell in cells:
        run_in_order += [cell, nbformat.v4.new_code_cell(probe)]
    # demo.py turns Python's garbage collector off only as a script: a notebook keeps it.
    notebook.cells = run_in_order + [nbformat.v4.new_code_cell("import gc; print(gc.isenabled(), gc.get_freeze_count())")]
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workshop)}}
    ).execute()

    def shown(cell, output_type="stream"):
        return "".join(output.get("text", "") for output in cell.outputs
                       if output["output_type"] == output_type and output.get("name") != "stderr")

    for (heading, texts, variables), cell, probe_cell in zip(CELLS, notebook.cells[1::2], notebook.cells[2::2]):
        output = shown(cell)
        for text in texts:
            assert text in output, (heading, text, output)
        assert not [o for o in cell.outputs if o["output_type"] == "error"], heading
        names = json.loads(shown(probe_cell))
        assert set(variables) <= set(names), (heading, set(variables) - set(names))

    # The plots show in the notebook, one picture each.
    plot_cell = notebook.cells[1 + 2 * [heading for heading, _, _ in CELLS].index("Plot the results")]
    pictures = [o for o in plot_cell.outputs if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(pictures) == 3

    assert shown(notebook.cells[-1]).split() == ["True", "0"]
    outputs = "".join(shown(cell) for cell in notebook.cells)
    run_id, _ = printed_ids(outputs)
    (run,) = demo_runs(workshop)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.params == expected_params()
    # What MLflow records as a notebook run's source, as the README says: the
    # kernel, and no git commit (though this kernel's Python lies in a git clone).
    assert run.data.tags["mlflow.source.type"] == "NOTEBOOK"
    assert Path(run.data.tags["mlflow.source.name"]).name == "ipykernel_launcher.py"
    assert "mlflow.source.git.commit" not in run.data.tags
    page = flat(PAGES["docs/make-it-yours.md"])
    assert "`NOTEBOOK`" in page and "`ipykernel_launcher.py`" in page
    assert {item.path for item in MlflowClient(f"sqlite:///{workshop / 'mlflow.db'}").list_artifacts(run_id, "plots")} \
        == set(PLOTS)


# %% A fork: one expression changed, and the run still tells the truth about itself

# The model expression a forker writes, the imports it needs, and the name the
# run should give it: alone, in a pipeline, wrapped, searched, and from outside
# scikit-learn.
FORKS = [
    ("make_pipeline(StandardScaler(), LogisticRegression())",
     ["from sklearn.linear_model import LogisticRegression", "from sklearn.pipeline import make_pipeline",
      "from sklearn.preprocessing import StandardScaler"], "LogisticRegression"),
    ("GradientBoostingClassifier(random_state=args.seed)",
     ["from sklearn.ensemble import GradientBoostingClassifier"], "GradientBoostingClassifier"),
    ("HistGradientBoostingClassifier(random_state=args.seed)",
     ["from sklearn.ensemble import HistGradientBoostingClassifier"], "HistGradientBoostingClassifier"),
    ("SVC()", ["from sklearn.svm import SVC"], "SVC"),  # no predict_proba: ROC from decision_function
    ("KNeighborsClassifier()", ["from sklearn.neighbors import KNeighborsClassifier"], "KNeighborsClassifier"),
    ("CalibratedClassifierCV(LinearSVC())", ["from sklearn.calibration import CalibratedClassifierCV",
                                             "from sklearn.svm import LinearSVC"], "CalibratedClassifierCV(LinearSVC)"),
    ("LGBMClassifier(n_estimators=50, random_state=args.seed, verbose=-1)", ["from lightgbm import LGBMClassifier"],
     "LGBMClassifier"),
    ("GridSearchCV(RandomForestClassifier(n_estimators=20, random_state=args.seed), "
     "{'max_depth': [2, 6], 'min_samples_leaf': [1, 5]}, cv=3)",
     ["from sklearn.model_selection import GridSearchCV"], "GridSearchCV(RandomForestClassifier)"),
]
MODEL_ASSIGNMENT = re.compile(r"^model = RandomForestClassifier\(\n(?:    .*\n)+\)$", re.MULTILINE)


@pytest.mark.parametrize("expression, imports, model_type", FORKS, ids=[fork[2] for fork in FORKS])
def test_a_fork_changes_one_expression(tmp_path, built_database, expression, imports, model_type):
    workshop = make_workshop(tmp_path / "fork", built_database)
    source = (workshop / "demo.py").read_text()
    (assignment,) = MODEL_ASSIGNMENT.findall(source)  # the one place the model is built
    forked = source.replace(assignment, "\n".join([*imports, f"model = {expression}"]))
    (workshop / "demo.py").write_text(forked)

    result = run_demo(workshop)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id, model_id = printed_ids(result.stdout)
    (run,) = demo_runs(workshop)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"

    # The model as the fork built and fitted it, on the split the run logged.
    namespace = {"args": __import__("argparse").Namespace(seed=42)}
    exec("\n".join(["from sklearn.ensemble import RandomForestClassifier", *imports]), namespace)
    model = eval(expression, namespace)
    X_train, y_train = logged_test_set(run, "training")
    model.fit(X_train, y_train)
    # The settings that made the model: a search's best ones, as it refitted them.
    chosen = getattr(model, "best_estimator_", model)
    assert run.data.params == {**{key: str(value) for key, value in chosen.get_params().items()},
                               "test_size": "0.25", "seed": "42"}
    if chosen is not model:
        for key, value in model.best_params_.items():
            assert run.data.params[key] == str(value)
        assert run.data.metrics["best_cv_score"] == pytest.approx(model.best_score_)
    assert run.data.tags["model_type"] == model_type
    assert run.info.run_name.endswith("_breast_cancer")
    assert model_type in run.data.tags["mlflow.note.content"]
    if "Forest" not in model_type:
        told = [run.info.run_name, *run.data.tags.values(), result.stdout]
        assert not [text for text in told if "forest" in text.lower()], told

    client = client_for(workshop)
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    artifacts |= {item.path for item in client.list_artifacts(run_id, "plots")}
    assert set(PLOTS) | {REPORT} <= artifacts
    for plot in PLOTS:
        assert Path(client.download_artifacts(run_id, plot)).read_bytes().startswith(b"\x89PNG")

    # What loading the model needs is in its requirements, pinned: lightgbm for LightGBM.
    requirements = model_folder(workshop, model_id) / "requirements.txt"
    needed = {"mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas"} | ({"lightgbm"} if "LGBM" in model_type else set())
    assert {line.split("==")[0] for line in requirements.read_text().split()} == needed
    mlflow.set_tracking_uri(f"sqlite:///{workshop / 'mlflow.db'}")
    try:
        loaded = mlflow.sklearn.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    X_test, y_test = logged_test_set(run)
    assert accuracy_score(y_test, loaded.predict(X_test)) == run.data.metrics["accuracy"]
    assert 0.5 < run.data.metrics["roc_auc"] <= 1.0


def test_readme_make_it_yours(tmp_path, built_database):
    """The three changes to demo.py that the README and docs/make-it-yours.md
    make, where they say, in a git clone: the swapped model, a metric, a tag
    and a file, and what MLflow records by itself."""
    page = flat(PAGES["docs/make-it-yours.md"])

    # The learner's clone, and the README's way to fork it beside the original.
    original = make_workshop(tmp_path / "mlflow-workshop")
    shutil.copy(REPO / ".gitignore", original)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", original / ".venv"], check=True)
    git = ["git", "-c", "user.name=Learner", "-c", "user.email=learner@example.com"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "the workshop"]):
        subprocess.run([*git, *command], cwd=original, check=True, capture_output=True)
    clone, cd = readme_commands("fork-clone")
    assert cd == "cd ../my-fork"
    subprocess.run(clone, shell=True, cwd=original, check=True, capture_output=True)
    workshop = tmp_path / "my-fork"
    # The fork has no venv of its own: in a new terminal, the page's command activates the first folder's.
    assert not (workshop / ".venv").exists()
    activate = re.search(r"`(source <first folder>/\.venv/bin/activate)`", page).group(1)
    in_a_new_terminal = f"{activate.replace('<first folder>', '../mlflow-workshop')} && command -v python"
    python = subprocess.run(["bash", "-c", in_a_new_terminal], cwd=workshop, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert Path(python) == original / ".venv" / "bin" / "python"

    source = (workshop / "demo.py").read_text()
    (assignment,) = MODEL_ASSIGNMENT.findall(source)
    source = source.replace(assignment, readme_snippet("fork-model").strip())
    # "just before `report = ...`", and "right after `mlflow.log_text(report, ...)`"
    before, after = "report = classification_report(", '    mlflow.log_text(report, "classification_report.txt")\n'
    assert "`report = ...`" in page and f"`{after.strip()}`" in page  # the places the page names
    assert source.count(before) == 1 and source.count(after) == 1
    source = source.replace(before, readme_snippet("fork-metric") + "\n" + before)
    source = source.replace(after, after + readme_snippet("fork-tag-and-file"))
    (workshop / "demo.py").write_text(source)
    shutil.copy(built_database, workshop / "mlflow.db")  # (the first run's build is not the point here)
    subprocess.run([*git, "commit", "-q", "-am", "my fork"], cwd=workshop, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workshop, check=True, capture_output=True,
                          text=True).stdout.strip()

    result = run_demo(workshop)
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = demo_runs(workshop)
    assert run.info.status == "FINISHED" and run.info.run_name == "logistic_regression_breast_cancer"
    # Each folder has its own store: the fork's run is not in the first folder.
    assert not (original / "mlflow.db").exists() and not (original / "mlruns").exists()
    tags = run.data.tags
    assert tags["model_type"] == "LogisticRegression"
    assert {"logisticregression__C", "standardscaler__with_mean", "test_size", "seed"} <= set(run.data.params)
    assert re.search(r"(\d+) params in all", page).group(1) == str(len(run.data.params))
    structure = {name for name in run.data.params if "__" not in name} - {"test_size", "seed"}
    assert structure == {"steps", "memory", "transform_input", "verbose", "standardscaler", "logisticregression"}
    assert all(f"`{name}`" in page for name in ("steps", "memory", "transform_input", "verbose"))
    balanced = run.data.metrics["balanced_accuracy"]
    assert f"\n  balanced_accuracy {balanced:.4f}\n" in result.stdout
    assert tags["purpose"] == "my first fork"
    X_test, _ = logged_test_set(run)
    summary = Path(client_for(workshop).download_artifacts(run.info.run_id, "test_set_summary.txt")).read_text()
    assert summary == X_test.describe().to_string()

    # What MLflow records by itself.
    assert run.info.start_time < run.info.end_time
    assert tags["mlflow.user"] and tags["mlflow.runName"] == run.info.run_name
    assert Path(tags["mlflow.source.name"]) == workshop / "demo.py"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == head
    _, model_id = printed_ids(result.stdout)
    mlmodel = (model_folder(workshop, model_id) / "MLmodel").read_text()
    for line in (f"mlflow_version: {mlflow.__version__}", f"sklearn_version: {sklearn.__version__}",
                 f"python_version: {platform.python_version()}"):
        assert line in mlmodel, line
