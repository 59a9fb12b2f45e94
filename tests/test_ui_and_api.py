"""`mlflow ui` started as the README says, and the README's Python and REST snippets."""

import json
import re
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
from http.client import HTTPConnection

import pytest
from mlflow import MlflowClient

from conftest import (
    PAGES,
    README,
    flat,
    free_port,
    http,
    learner_env,
    make_workshop,
    printed_ids,
    readme_commands,
    readme_snippet,
    run_demo,
    start_server,
    with_port,
)


@pytest.fixture(scope="module")
def ui(demo_workshop):
    """The README's `mlflow ui` command, run in the workshop folder on a free port."""
    command = readme_snippet("ui")  # a two-line shell script
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_server(with_port(command, port), demo_workshop["path"], f"{base}/health",
                      log_name="ui.log"):
        yield base


def api(base, method, path, body=None):
    status, text = http(method, base + path, json.dumps(body) if body else None,
                        {"Content-Type": "application/json"})
    assert status == 200, (path, status, text)
    return json.loads(text)


def test_ui_serves_the_page(ui):
    status, page = http("GET", ui + "/")
    assert status == 200 and "<html" in page.lower()


def test_the_ui_prints_the_line_the_readme_waits_for(ui, demo_workshop):
    """The README says to open the page once `mlflow ui` prints its "Uvicorn
    running on" line, and calls the warning before it harmless: the line is
    there with the UI's port, and that warning is the only one."""
    readme = flat(README)
    ready = re.search(r"`(Uvicorn running on http://127\.0\.0\.1:)5000`", readme).group(1)
    (named,) = re.findall(r"`(\w+Warning)`", readme)
    log = (demo_workshop["path"] / "ui.log").read_text()
    assert set(re.findall(r"\b(\w+Warning):", log)) == {named}, log
    assert log.index(named) < log.index(ready + ui.rsplit(":", 1)[1]), log


def test_rest_api_shows_experiment_run_and_artifacts(ui, demo_workshop):
    experiment = api(ui, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=demo-mlflow-artifacts")
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = api(ui, "POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
    run = next(r for r in runs if r["info"]["run_id"] == demo_workshop["run_id"])
    assert run["info"]["run_name"] == "random_forest_breast_cancer"
    assert run["info"]["status"] == "FINISHED"
    assert {m["key"] for m in run["data"]["metrics"]} >= {"accuracy", "roc_auc"}

    run_id = demo_workshop["run_id"]
    top = api(ui, "GET", f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    assert {f["path"] for f in top["files"]} == {"plots", "classification_report.txt"}
    plots = api(ui, "GET", f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=plots")
    assert {f["path"] for f in plots["files"]} == {
        "plots/confusion_matrix.png", "plots/roc_curve.png", "plots/permutation_importance.png"}


def test_a_plot_downloads_as_png(ui, demo_workshop):
    import urllib.request

    url = f"{ui}/get-artifact?path=plots/roc_curve.png&run_uuid={demo_workshop['run_id']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("image/png")
        assert response.read().startswith(b"\x89PNG")


def test_logged_model_is_visible_through_the_server(ui, demo_workshop):
    model = api(ui, "GET", f"/api/2.0/mlflow/logged-models/{demo_workshop['model_id']}")["model"]
    assert model["info"]["name"] == "model"
    assert model["info"]["source_run_id"] == demo_workshop["run_id"]


def readme_curl_json(snippet, base, **replace):
    """Run the README's curl command against `base`; its JSON answer."""
    (command,) = readme_commands(snippet)
    command = command.replace("http://127.0.0.1:5000", base)
    for old, new in replace.items():
        command = command.replace(old, new)
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_readme_rest_snippets_find_the_runs_by_the_experiment_name(tmp_path):
    """The experiment is not the first one in this mlflow.db (its id is 2): the
    README's look-up by name finds its id, and the search with that id finds
    the run, and only this experiment's runs."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    earlier = MlflowClient(tracking_uri=f"sqlite:///{workshop / 'mlflow.db'}")
    earlier.create_experiment("an-earlier-tutorial", artifact_location=(workshop / "mlruns" / "earlier").as_uri())
    earlier_run = earlier.create_run(earlier.get_experiment_by_name("an-earlier-tutorial").experiment_id)
    earlier.log_metric(earlier_run.info.run_id, "accuracy", 0.99)  # would top the search if mixed in
    earlier.set_terminated(earlier_run.info.run_id)
    demo = run_demo(workshop)
    assert demo.returncode == 0, demo.stderr
    run_id, _ = printed_ids(demo.stdout)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_server(with_port(readme_snippet("ui"), port), workshop, f"{base}/health", log_name="ui.log"):
        experiment = readme_curl_json("rest-experiment", base)["experiment"]
        assert experiment["name"] == "demo-mlflow-artifacts" and experiment["experiment_id"] == "2"
        assert '"experiment_id": "1"' in flat(README)  # the answer the README shows
        runs = readme_curl_json("rest-api", base, **{'["1"]': f'["{experiment["experiment_id"]}"]'})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id]
    # What each run holds, as the README lists it: info, data, inputs (the datasets) and outputs.
    assert set(runs[0]) == {"info", "data", "inputs", "outputs"} and len(runs[0]["inputs"]["dataset_inputs"]) == 2
    assert {"params", "metrics", "tags"} <= set(runs[0]["data"])


def test_readme_python_snippet_lists_the_run(demo_workshop):
    """best_runs.py reads mlflow.db itself, as the README says: no UI needed."""
    assert 'mlflow.set_tracking_uri("sqlite:///mlflow.db")' in readme_snippet("python-api")
    result = subprocess.run(
        [sys.executable, "-c", readme_snippet("python-api")],
        cwd=demo_workshop["path"], env=learner_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert demo_workshop["run_id"] in result.stdout
    assert "metrics.accuracy" in result.stdout


@pytest.mark.parametrize("variant", ["readme", "plain"])
def test_ctrl_c_stops_the_ui_and_the_runs_are_safe(demo_workshop, tmp_path, variant):
    """Ctrl+C in the UI's terminal (SIGINT to its process group) while a
    browser holds a connection open: the README's command and plain `mlflow ui`
    (job runner on) both stop within a minute, in order, and the runs are
    intact. The only traceback the README's command may print is the
    `CancelledError` that the README and the troubleshooting page call
    harmless (plain `mlflow ui` prints its job runner's KeyboardInterrupts too)."""
    workshop = tmp_path / "workshop"
    shutil.copytree(demo_workshop["path"], workshop, ignore=shutil.ignore_patterns("*.log"))
    command = readme_snippet("ui")
    if variant == "plain":
        command = "mlflow ui --port 5000"
    port = free_port()
    with start_server(with_port(command, port), workshop, f"http://127.0.0.1:{port}/health",
                      log_name="ui.log") as process:
        browser = HTTPConnection("127.0.0.1", port, timeout=60)  # kept alive, as a tab keeps it
        browser.request("GET", "/")
        assert browser.getresponse().read().lower().count(b"<html") == 1
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
        browser.close()
    log = (workshop / "ui.log").read_text()
    assert "Finished server process" in log
    named = re.findall(r"`([\w.]*CancelledError)`", flat(README) + flat(PAGES["docs/troubleshooting.md"]))
    assert named == ["CancelledError", "asyncio.exceptions.CancelledError"]
    if variant == "readme" and "Traceback" in log:  # one traceback, maybe chained, that ends as the pages say
        segments = log.split("Traceback (most recent call last):")[1:]
        assert all("During handling of the above exception" in segment for segment in segments[:-1]), log
        assert next(line for line in segments[-1].splitlines() if line and not line.startswith(" ")) == named[1]
    with sqlite3.connect(workshop / "mlflow.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = MlflowClient(tracking_uri=f"sqlite:///{workshop / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("demo-mlflow-artifacts").experiment_id])
    assert (run.info.run_id, run.info.status) == (demo_workshop["run_id"], "FINISHED")


def test_readme_load_model_lines_work_in_the_folder(demo_workshop):
    """The README's `mlflow.sklearn.load_model("models:/<model_id>")` and
    `mlflow.pyfunc.load_model(...)`, in a Python started in the folder with
    no tracking URI set: MLflow finds ./mlflow.db by itself."""
    readme = flat(README)
    sklearn_line = re.search(r'`(mlflow\.sklearn\.load_model\("models:/<model_id>"\))`', readme).group(1)
    assert "`mlflow.pyfunc.load_model(...)`" in readme
    model_uri = f"models:/{demo_workshop['model_id']}"
    code = "\n".join([
        "import mlflow",
        "from sklearn.datasets import load_breast_cancer",
        f"model = {sklearn_line.replace('models:/<model_id>', model_uri)}",
        f"generic = mlflow.pyfunc.load_model({model_uri!r})",
        "rows = load_breast_cancer(as_frame=True).data.iloc[[0, 19]]",
        "print(type(model).__name__, list(model.predict(rows)), list(generic.predict(rows)))",
    ])
    result = subprocess.run([sys.executable, "-c", code], cwd=demo_workshop["path"], env=learner_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "RandomForestClassifier"
    assert "[0, 1] [0, 1]" in result.stdout.replace("np.int64(", "").replace(")", "")


def test_readme_ui_with_the_database_named_from_another_folder(demo_workshop, tmp_path):
    """The README's `mlflow ui --backend-store-uri sqlite:////home/you/...`
    (an absolute path, four slashes), started in another folder with the
    workshop's path in place of the example's, shows the workshop's runs."""
    command = re.search(r"`(mlflow ui --backend-store-uri sqlite:////home/you/mlflow-workshop/mlflow\.db)`", flat(README)).group(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    database = demo_workshop["path"] / "mlflow.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_server(f"{command.replace('/home/you/mlflow-workshop/mlflow.db', str(database))} --port {port}",
                      elsewhere, f"{base}/health", log_name="ui.log"):
        status, body = http("POST", f"{base}/api/2.0/mlflow/runs/search",
                            json.dumps({"experiment_ids": ["1"]}),  # the only experiment there
                            {"Content-Type": "application/json"})
    assert status == 200, body
    assert demo_workshop["run_id"] in {run["info"]["run_id"] for run in json.loads(body)["runs"]}
    assert not (elsewhere / "mlflow.db").exists()
