"""Shared helpers for the workshop's tests.

The tests follow the README as a learner would: they copy the repository's
files into a temporary folder, run the README's commands there as subprocesses
against real MLflow (a real SQLite file, real servers on free ports of
127.0.0.1), and check what a learner would see. Commands and request bodies
come from README.md itself, through `readme_snippet`, so the guide cannot drift
away from what is tested.
"""

import ast
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Stops or holds demo.py at a chosen database call (see its docstring).
STOP_HOOK = REPO / "tests" / "stop_hook"
README = (REPO / "README.md").read_text(encoding="utf-8")
# The README and the pages it links to: docs/ (room kit, team server and stack,
# troubleshooting, serving) and CONTRIBUTING.md. The tests read each command
# they show from them.
PAGES = {path.relative_to(REPO).as_posix(): path.read_text(encoding="utf-8")
         for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "CONTRIBUTING.md"]
         if path.exists()}
WORKSHOP_FILES = ["demo.py", "requirements.txt", "requirements-lock.txt", "check_setup.py", "README.md"]
VENV_BIN = str(Path(sys.executable).parent)
# Every process the tests start uses one OpenMP thread. The suite runs three
# workers on two cores, often beside other work: OpenMP's threads then spin while
# they wait for one another, and a HistGradientBoosting fork that takes 6.5 s of
# CPU with one thread took 51 to 235 s beside a busy loop. Its predictions are the
# same to the last bit either way.
os.environ["OMP_NUM_THREADS"] = "1"

# What every run of demo.py logs as files: the run's artifacts and the logged
# model's files (each list sorted, as MLflow lists them).
EXPERIMENT = "demo-mlflow-artifacts"  # demo.py's experiment on a laptop
PLOTS = ["plots/confusion_matrix.png", "plots/permutation_importance.png", "plots/roc_curve.png"]
REPORT = "classification_report.txt"
MODEL_FILES = [
    "MLmodel",
    "conda.yaml",
    "input_example.json",
    "model.skops",
    "python_env.yaml",
    "requirements.txt",
    "serving_input_example.json",
]


def readme_snippet(name):
    """The code block that follows `<!-- snippet: NAME -->` in README.md, or
    in a page it links to under docs/."""
    for text in PAGES.values():
        match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```[a-z]*\n(.*?)```", text, re.DOTALL)
        if match:
            return match.group(1)
    raise AssertionError(f"no code block marked <!-- snippet: {name} --> in README.md or docs/*.md")


def flat(text):
    """A page's text with its line breaks and runs of spaces folded, to find a phrase in it."""
    return " ".join(text.split())


def readme_commands(name):
    """The commands of a shell snippet, one per entry, with `\\` continuations joined."""
    text = readme_snippet(name).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def learner_env(**overrides):
    """The environment of a learner's terminal: the virtual environment active
    (its bin/ first on PATH), telemetry off, no tracking URI of the caller's."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


# A bound on one step of a page in Chromium, not a measure: a loaded 2-core machine is slow.
PAGE_TIMEOUT_MS = 180_000
# Debian's Chromium, driven by Playwright, with flags for a machine with no network
# but loopback: no GPU, no background connections to Google's services.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def make_workshop(folder, database=None):
    """A fresh copy of the files a learner gets with `git clone`; with
    `database` (the `built_database` fixture), also the mlflow.db that
    demo.py's first run builds before it logs anything."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in WORKSHOP_FILES:
        shutil.copy(REPO / name, folder / name)
    if database:
        shutil.copy(database, folder / "mlflow.db")
    return folder


@pytest.fixture(scope="session")
def built_database(tmp_path_factory):
    """mlflow.db as demo.py's first run leaves it once it has built the
    tables, made once with demo.py's own build command. Tests whose point is
    not the first run start from a copy, and spare a Python that builds the
    tables (about 4 s of CPU each). The first run itself is proven where it
    is the point: the README's run, a copy alone, the builder stopped, the
    notebook, the room's local stores."""
    build = next(ast.literal_eval(node.value) for node in ast.walk(ast.parse((REPO / "demo.py").read_text()))
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "build")
    database = tmp_path_factory.mktemp("built") / "mlflow.db"
    built = subprocess.run([sys.executable, "-c", build, f"sqlite:///{database.as_posix()}"],
                           env=learner_env(), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and database.is_file(), built.stderr
    return database


def run_demo(workshop, *flags, cwd=None, env=None, timeout=300):
    """Run `python demo.py FLAGS` as a learner would (by default from another
    folder, to prove the stores land beside demo.py all the same)."""
    return subprocess.run(
        [sys.executable, str(Path(workshop) / "demo.py"), *flags],
        cwd=cwd or Path(workshop).parent,
        env=env or learner_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@functools.cache
def demo_defaults():
    """{flag: default} as `python demo.py --help` shows them, e.g. {"--seed": "42"}."""
    result = subprocess.run([sys.executable, str(REPO / "demo.py"), "--help"],
                            env=learner_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # argparse wraps long lines
    defaults = dict(re.findall(r"(--[a-z-]+) [A-Z_]+ .*?\(default: ([^)]+)\)", help_text))
    assert set(defaults) == {"--n-estimators", "--max-depth", "--min-samples-leaf", "--test-size", "--seed"}
    return defaults


def expected_params(flags=()):
    """The params a run of `python demo.py FLAGS` logs with the default model:
    every setting of the forest (get_params(), defaults included), then the split."""
    from sklearn.ensemble import RandomForestClassifier

    values = {**demo_defaults(), **dict(zip(flags[::2], flags[1::2]))}
    forest = RandomForestClassifier(
        n_estimators=int(values["--n-estimators"]),
        max_depth=int(values["--max-depth"]),
        min_samples_leaf=int(values["--min-samples-leaf"]),
        random_state=int(values["--seed"]),
    )
    params = {name: str(value) for name, value in forest.get_params().items()}
    return {**params, "test_size": str(float(values["--test-size"])), "seed": values["--seed"]}


def model_folder(workshop, model_id):
    """Where a local run of demo.py keeps the files of the model it logged."""
    return Path(workshop) / "mlruns" / EXPERIMENT / "models" / model_id / "artifacts"


def printed_ids(stdout):
    """The run id and model id that demo.py printed."""
    run_id = re.search(r"run id:\s+([0-9a-f]{32})", stdout).group(1)
    model_id = re.search(r"model URI:\s+models:/(m-[0-9a-f]{32})", stdout).group(1)
    return run_id, model_id


def free_ports(count):
    """Ports that nothing listens on now, all different (bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port():
    return free_ports(1)[0]


def http(method, url, body=None, headers=None, timeout=30):
    """(status, body text) of one HTTP request; 4xx and 5xx are answers, not errors."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def stop_process_group(process, grace=10):
    """Stop a server and every process it started (uvicorn or gunicorn workers),
    by its process group, which `start_server` made for it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)
        except ProcessLookupError:
            pass
    # Workers may outlive their parent for a moment; the group id is still theirs.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def start_server(command, cwd, ready_url, env=None, timeout=120, log_name="server.log"):
    """Start a server command (a string, as typed in a terminal) in its own
    process group, wait until `ready_url` answers, and always stop it."""
    log_path = Path(cwd) / log_name
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            shell=True,
            cwd=cwd,
            env=env or learner_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command!r} exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                status, _ = http("GET", ready_url, timeout=2)
                if status < 500:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{command!r} did not answer {ready_url} in {timeout} s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield process
    finally:
        stop_process_group(process)


def with_port(command, port):
    """A README command with its `--port N` (or `-p N`) changed to a free port."""
    changed, count = re.subn(r"(--port|-p)\s+\d+", rf"\g<1> {port}", command)
    assert count == 1, f"expected one --port in {command!r}"
    return changed


# What each test module needs beyond Python (the markers of pytest.ini); a test
# that mounts a tmpfs or makes a network namespace needs root.
MODULE_MARKS = {"test_ui_browser.py": ["browser"], "test_tracking_server.py": ["server"],
                "test_team_server.py": ["server"], "test_team_stack.py": ["stack", "root"],
                "test_interruptions.py": ["slow"]}
ROOT_FIXTURES = {"tmpfs", "small_disk"}
# Tests that take more than about half a minute on a 2-core machine, or run demo.py many times.
SLOW_TESTS = {"test_a_fork_changes_one_expression", "test_room_kit_sets_up_a_laptop_with_no_network",
              "test_readme_more_runs_each_add_a_run_with_their_flags", "test_readme_make_it_yours",
              "test_runs_cell_by_cell_in_a_jupyter_kernel", "test_readme_ui_with_the_database_named_from_another_folder",
              "test_ctrl_c_stops_the_ui_and_the_runs_are_safe", "test_readme_rest_snippets_find_the_runs_by_the_experiment_name",
              "test_second_run_with_same_flags_gives_same_metrics"}


# The order in which the workers take the modules: those that use the most CPU
# first (as measured on a loaded 2-core machine), the short ones last, so that
# no worker is left alone with a long module at the end while the others idle
# (pytest.ini turns off pytest-xdist's own order, by number of tests).
MODULE_ORDER = ["test_interruptions.py", "test_team_server.py", "test_team_stack.py", "test_demo.py",
                "test_setup.py", "test_ui_and_api.py", "test_ui_browser.py", "test_tracking_server.py",
                "test_requirements.py", "test_serving.py"]


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: MODULE_ORDER.index(item.path.name) if item.path.name in MODULE_ORDER
               else len(MODULE_ORDER))  # a stable sort: each module's tests keep their order
    for item in items:
        for mark in MODULE_MARKS.get(item.path.name, []):
            item.add_marker(mark)
        if ROOT_FIXTURES & set(item.fixturenames):
            item.add_marker("root")
        if item.originalname in SLOW_TESTS:
            item.add_marker("slow")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: CI must prove every step."""
    report = yield
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def demo_workshop(tmp_path_factory):
    """A workshop folder in which `python demo.py` (the README's command) has run once."""
    workshop = make_workshop(tmp_path_factory.mktemp("learner") / "mlflow-workshop")
    (command,) = readme_commands("run-demo")
    assert command == "python demo.py"
    result = run_demo(workshop)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id, model_id = printed_ids(result.stdout)
    return {"path": workshop, "stdout": result.stdout, "stderr": result.stderr,
            "run_id": run_id, "model_id": model_id}
