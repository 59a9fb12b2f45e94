"""The README's "Exploring in the MLflow UI" steps, walked in a real browser.

Two runs are logged as the README says (`python demo.py`, then the first line
of its `more-runs` snippet), `mlflow ui` is started with the README's own
command (on a free port), and headless Chromium follows steps 1 to 6 in order,
finding things by their role and visible text, as a learner does. Each value
the page shows is compared with what MlflowClient reads from `mlflow.db`.

The browser is Debian's Chromium (`apt-get install chromium`), driven by the
`playwright` package; nothing downloads a browser. With UPDATE_SCREENSHOTS=1
the walk also writes the README's screenshots to docs/images/.
"""

import io
import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import (CHROMIUM, CHROMIUM_FLAGS, EXPERIMENT, PAGE_TIMEOUT_MS, README, REPO, flat, free_port, make_workshop,
                      printed_ids, readme_commands, readme_snippet, run_demo, start_server, with_port)

VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS = REPO / "docs" / "images"
RUN_NAME = "random_forest_breast_cancer"


def browser_or_skip():
    """The playwright module, or a skip (outside CI) that says how to get a browser."""
    problem = None
    try:
        import playwright.sync_api
    except ImportError:
        problem = "the playwright package is missing: python -m pip install -r requirements-dev.txt"
    if problem is None and not Path(CHROMIUM).is_file():
        problem = "no Chromium found: install Debian's with `apt-get install chromium`"
    if problem:  # a failure under CI=true (conftest.py)
        pytest.skip(f"UI walk skipped, {problem}")
    return playwright.sync_api


def save_screenshot(page, name):
    """With UPDATE_SCREENSHOTS=1, keep what the page shows as docs/images/NAME,
    quantised to a palette to stay small."""
    if os.environ.get("UPDATE_SCREENSHOTS") != "1":
        return
    page.mouse.move(VIEWPORT["width"] - 1, VIEWPORT["height"] - 1)  # no hover effects
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    image = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image.save(SCREENSHOTS / name, optimize=True)


def local_path(uri):
    return Path(url2pathname(urlparse(uri).path))


def test_readme_ui_walk(tmp_path, monkeypatch):
    sync_api = browser_or_skip()
    expect = sync_api.expect
    expect.set_options(timeout=PAGE_TIMEOUT_MS)

    # Two runs with different flags: the default one, then the README's first
    # "more runs" line. The second is the newest, on top of the run list.
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    more_runs = shlex.split(readme_commands("more-runs")[0])
    assert more_runs[:2] == ["python", "demo.py"], more_runs
    run_ids = []
    for flags in ([], more_runs[2:]):
        result = run_demo(workshop, *flags)
        assert result.returncode == 0, result.stdout + result.stderr
        run_ids.append(printed_ids(result.stdout)[0])
    older_id, newest_id = run_ids

    # What MLflow recorded, read back without the UI.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(tracking_uri=f"sqlite:///{workshop / 'mlflow.db'}")
    newest, older = client.get_run(newest_id), client.get_run(older_id)
    (model_output,) = newest.outputs.model_outputs
    model = client.get_logged_model(model_output.model_id)
    model_dir = local_path(model.artifact_location)
    run_artifacts = local_path(newest.info.artifact_uri)

    # The UI, started as the README says, on a free port instead of 5000.
    ui_command = readme_snippet("ui")  # a two-line shell script
    port = free_port()
    readme_url = re.search(r"open <(http://127\.0\.0\.1:\d+)>", flat(README)).group(1)
    base_url = readme_url.rsplit(":", 1)[0] + f":{port}"
    requests, page_errors = [], []
    with start_server(with_port(ui_command, port), cwd=workshop, ready_url=f"{base_url}/health"), \
            sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
            headless=True, viewport=VIEWPORT,
        )
        try:
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            context.on("request", lambda request: requests.append(request.url))
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(base_url)
            main = page.get_by_role("main")
            sidebar = page.get_by_role("navigation")

            # Step 1: switch from the GenAI view to "Model training", and close
            # the MLflow Assistant panel and the telemetry notice if shown.
            page.get_by_role("button", name="Model training").click()
            expect(sidebar.get_by_role("link", name="Model registry")).to_be_visible()
            expect(sidebar.get_by_role("link", name="Prompts")).to_have_count(0)
            for close in (page.get_by_role("button", name="Close", exact=True),
                          page.get_by_role("button", name="Close alert")):
                try:
                    close.click(timeout=5_000)
                except sync_api.TimeoutError:
                    continue  # not shown this time
                expect(close).to_be_hidden()

            # Step 2: Experiments, then the experiment: one row per run, both
            # named random_forest_breast_cancer, newest first.
            sidebar.get_by_role("link", name="Experiments").click()
            main.get_by_role("link", name=EXPERIMENT).click()
            expect(main.get_by_role("heading", name="Runs")).to_be_visible()
            run_links = main.get_by_role("link", name=RUN_NAME, exact=True)
            expect(run_links).to_have_count(2)
            expect(main).to_contain_text("2 matching runs")
            for column in ("Run Name", "Created", "Dataset", "Duration", "Source", "Models"):
                expect(main.get_by_role("columnheader", name=column, exact=True).first).to_be_visible()
            save_screenshot(page, "01-experiment-runs.png")
            # Columns > accuracy adds each run's accuracy to the table.
            main.get_by_role("button", name="Columns").click()
            page.get_by_role("dialog").get_by_text("accuracy", exact=True).click()
            page.keyboard.press("Escape")
            for run in (newest, older):
                expect(main.get_by_role("gridcell", name=repr(run.data.metrics["accuracy"]),
                                        exact=True)).to_be_visible()

            # Step 3: the newest run's Overview: description, metrics, params,
            # logged model, datasets and tags, with the values logged.
            run_links.first.click()
            expect(page).to_have_url(re.compile(f"/runs/{newest_id}"))
            expect(main.get_by_role("tab", name="Overview")).to_have_attribute("aria-selected", "true")
            expect(main).to_contain_text(newest.data.tags["mlflow.note.content"])
            for key, value in newest.data.metrics.items():
                expect(main.get_by_role("row", name=f"{key} {value!r} model", exact=True)).to_be_visible()
            for key, value in newest.data.params.items():
                expect(main.get_by_role("row", name=f"{key} {value}", exact=True)).to_be_visible()
            expect(main.get_by_role("heading", name="Logged models (1)")).to_be_visible()
            # The counts the README gives: 5 metrics, and every setting of the forest plus the split.
            for label, count in (("Metrics", len(newest.data.metrics)), ("Parameters", len(newest.data.params))):
                assert f"**{label} ({count})**" in README, (label, count)
                expect(main.get_by_role("heading", name=f"{label} ({count})")).to_be_visible()
            expect(main.get_by_role("heading", name="About this run")).to_be_visible()
            expect(main).to_contain_text(re.compile(rf"Run ID\s*{newest_id}"))
            for label, value in (("Created by", newest.data.tags["mlflow.user"]), ("Status", "Finished"),
                                 ("Source", Path(newest.data.tags["mlflow.source.name"]).name)):
                expect(main).to_contain_text(re.compile(rf"{label}\s*{re.escape(value)}"))
            expect(main).to_contain_text(re.compile(r"Duration\s*[0-9.]+\s*(ms|s|min)"))
            for key in ("model_type", "dataset", "owner"):
                expect(main.get_by_role("status", name=key, exact=True)).to_contain_text(
                    newest.data.tags[key])
            save_screenshot(page, "02-run-overview.png")
            # Clicking a dataset opens its details: rows, digest and schema.
            datasets = [d.dataset for d in newest.inputs.dataset_inputs]
            assert sorted(d.name for d in datasets) == ["breast_cancer_testing", "breast_cancer_training"]
            training = next(d for d in datasets if d.name == "breast_cancer_training")
            main.get_by_role("button", name=f"{training.name} ({training.digest})").click()
            details = page.get_by_role("dialog")
            expect(details).to_contain_text("2 datasets used")
            for dataset in datasets:
                details.get_by_text(f"{dataset.name} ({dataset.digest})").click()
                expect(details).to_contain_text(f"num rows: {json.loads(dataset.profile)['num_rows']}")
                expect(details).to_contain_text(f"Digest: {dataset.digest}")
                expect(details.get_by_text("mean radius", exact=True)).to_be_visible()
            page.keyboard.press("Escape")
            expect(details).to_be_hidden()

            # Step 4: the run's Artifacts tab: the plots render as images, the
            # report shows its text.
            main.get_by_role("tab", name="Artifacts").click()
            main.get_by_text("classification_report.txt", exact=True).click()
            report = (run_artifacts / "classification_report.txt").read_text()
            for line in filter(str.strip, report.splitlines()):
                expect(main).to_contain_text(" ".join(line.split()))
            main.get_by_text("plots", exact=True).click()
            for plot in ("confusion_matrix.png", "permutation_importance.png", "roc_curve.png"):
                main.get_by_text(plot, exact=True).click()
                image = main.get_by_role("img", name=f"plots/{plot}", exact=True)
                expect(image).to_be_visible()
                page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                       arg=image.element_handle(), timeout=PAGE_TIMEOUT_MS)
                with Image.open(run_artifacts / "plots" / plot) as logged:
                    assert image.evaluate("img => img.naturalWidth") == logged.width, plot
            save_screenshot(page, "03-run-artifacts.png")

            # Step 5: the logged model, from the run's Overview, and its files.
            main.get_by_role("tab", name="Overview").click()
            main.get_by_role("grid").get_by_role("link", name="model", exact=True).click()
            expect(page).to_have_url(re.compile(f"/models/{model.model_id}"))
            expect(main).to_contain_text(model.model_id)
            for key, value in newest.data.metrics.items():  # metric, dataset, source run, value
                row = main.get_by_role("row", name=f"{key} - {RUN_NAME} {value!r}", exact=True)
                expect(row).to_be_visible()
            main.get_by_role("link", name="Artifacts", exact=True).click()
            for name in sorted(path.name for path in model_dir.iterdir()):
                expect(main.get_by_text(name, exact=True)).to_be_visible()
            serving_example = json.loads((model_dir / "serving_input_example.json").read_text())
            columns = serving_example["dataframe_split"]["columns"]
            conda_yaml = (model_dir / "conda.yaml").read_text()
            pinned = [line.strip() for line in conda_yaml.splitlines() if "==" in line]
            for name, shown in [
                ("serving_input_example.json", ["dataframe_split", *columns]),
                ("conda.yaml", pinned),
                ("MLmodel", [f"model_id: {model.model_id}", f"run_id: {newest_id}", "mlflow.sklearn"]),
            ]:
                main.get_by_text(name, exact=True).click()
                for text in shown:
                    expect(main).to_contain_text(text)
            save_screenshot(page, "04-logged-model.png")
            # The experiment's Models page lists the model of each run.
            sidebar.get_by_role("link", name="Models").click()
            expect(main.get_by_role("heading", name="Models")).to_be_visible()
            expect(main.get_by_role("link", name="model", exact=True)).to_have_count(2)

            # Step 6: back on Runs, tick both runs and press Compare: the plots,
            # then params and metrics side by side (newest run first).
            sidebar.get_by_role("link", name="Runs").click()
            row_boxes = main.get_by_role("checkbox", name="toggle row selection")
            expect(row_boxes).to_have_count(2)
            row_boxes.nth(0).check()
            row_boxes.nth(1).check()
            main.get_by_role("button", name="Compare").click()
            expect(main.get_by_role("heading", name="Comparing 2 Runs from 1 Experiment")).to_be_visible()
            for tab in ("Parallel Coordinates Plot", "Scatter Plot", "Box Plot", "Contour Plot"):
                expect(main.get_by_role("tab", name=tab)).to_be_visible()
            plot = main.get_by_role("tabpanel", name="Parallel Coordinates Plot")
            differing = [key for key in newest.data.params if newest.data.params[key] != older.data.params[key]]
            for axis in [*differing, "accuracy"]:
                expect(plot).to_contain_text(axis)
            param_rows = {key: main.get_by_role("row", exact=True,
                                                name=f"{key} {newest.data.params[key]} {older.data.params[key]}")
                          for key in newest.data.params}
            for row in param_rows.values():
                expect(row).to_be_visible()
            metric_names = sorted(newest.data.metrics)
            expect(main.get_by_role("link", name=metric_names[-1], exact=True)).to_be_visible()
            assert main.get_by_role("grid").first.inner_text().split() == metric_names
            shown_values = main.get_by_role("grid").last.inner_text().split()
            assert shown_values == [f"{round(run.data.metrics[key], 3):g}"
                                    for key in metric_names for run in (newest, older)]
            # "Show diff only" keeps the params that differ between the runs.
            main.get_by_role("switch", name="Parameters - Show diff only").click()
            for key, row in param_rows.items():
                if newest.data.params[key] == older.data.params[key]:
                    expect(row).to_be_hidden()
                else:
                    expect(row).to_be_visible()
            main.get_by_role("button", name="Parameters", exact=True).evaluate("el => el.scrollIntoView()")
            save_screenshot(page, "05-compare-runs.png")
        finally:
            context.close()

    assert page_errors == [], page_errors
    elsewhere = [url for url in requests
                 if urlparse(url).scheme not in ("data", "blob") and urlparse(url).hostname != "127.0.0.1"]
    assert requests and elsewhere == [], elsewhere
