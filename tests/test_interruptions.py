"""A learner's laptop interrupts, fills up and keeps old files: after any of it,
demo.py has said what happened in one line, nothing logged is lost, and the
next `python demo.py` works.

Everything is real: demo.py subprocesses stopped by real signals, a real tmpfs
that fills up or is read-only (root only, as in CI), and databases and file
stores made by a real MLflow 2.22 in a venv of its own. No signal is timed:
tests/stop_hook/sitecustomize.py sends it as a chosen database call of a chosen
MLflow function begins (see its docstring).
"""

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAGES, STOP_HOOK, flat, free_port, http, learner_env, make_workshop, readme_snippet, run_demo, \
    start_server, with_port

MLFLOW_LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) mlflow")
TROUBLESHOOTING = flat(PAGES["docs/troubleshooting.md"])


def statuses(workshop):
    """run id -> status, read straight from mlflow.db."""
    with sqlite3.connect(f"file:{Path(workshop) / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        return dict(db.execute("SELECT run_uuid, status FROM runs"))


def model_statuses(workshop):
    """logged model id -> status (PENDING, READY or FAILED)."""
    names = {1: "PENDING", 2: "READY", 3: "FAILED"}  # LoggedModelStatus, as MLflow stores it
    with sqlite3.connect(f"file:{Path(workshop) / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        return {model_id: names[status] for model_id, status in db.execute("SELECT model_id, status FROM logged_models")}


def stopped_demo(workshop, stop, *flags, env=None):
    """Run demo.py in a process group of its own (as a terminal runs a command)
    with the stop hook set to `stop`; return (exit code, stdout, stderr)."""
    env = dict(env or learner_env(), PYTHONPATH=str(STOP_HOOK), DEMO_STOP=stop)
    result = subprocess.run([sys.executable, str(Path(workshop) / "demo.py"), *flags], cwd=Path(workshop).parent,
                            env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    return result.returncode, result.stdout, result.stderr


def own_lines(stderr):
    """What demo.py itself wrote to stderr (MLflow's INFO lines left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not MLFLOW_LOG_LINE.match(line)]


def next_run_works(workshop, before):
    """The next run finishes, and every earlier run is still there, as it was."""
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    after = statuses(workshop)
    assert {run_id: after[run_id] for run_id in before} == before, "an earlier run changed or was lost"
    assert [status for run_id, status in after.items() if run_id not in before] == ["FINISHED"]
    return after


# %% A signal at a chosen database call: one line, the run FAILED, the next run works

# (signal, the MLflow function, the how-manieth database statement after it
# begins): before the run, inside start_run, inside each kind of logging, inside
# log_model, and inside end_run after the run's last statement (the run had
# finished its work, but is not yet marked).
STOPS = [("SIGINT", "get_experiment_by_name", 1), ("SIGINT", "start_run", 5), ("SIGINT", "start_run", 12),
         ("SIGINT", "log_params", 1), ("SIGTERM", "log_metrics", 2), ("SIGHUP", "set_tags", 1),
         ("SIGINT", "log_input", 6), ("SIGINT", "log_figure", 1), ("SIGINT", "sklearn.log_model", 10),
         ("SIGINT", "sklearn.log_model", 85), ("SIGTERM", "end_run", 1), ("SIGINT", "end_run", 8)]


def test_a_signal_at_any_database_call_of_a_run(tmp_path, built_database):
    """Ctrl+C (SIGINT to the process group), `kill` (SIGTERM) or a closed
    terminal (SIGHUP) as a chosen database call begins: exit by SIGINT (130 in
    a shell), one line that tells the truth about the run, the run FAILED where
    it had started, and the earlier runs untouched. Each stopped run starts
    from the store the one before it left, and a last run finishes."""
    workshop = make_workshop(tmp_path / "mlflow-workshop", built_database)
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    for signal_name, function, at in STOPS:
        before, models_before = statuses(workshop), model_statuses(workshop)
        code, out, err = stopped_demo(workshop, f"{signal_name}:{function}:{at}", "--n-estimators", "10")
        assert code == -signal.SIGINT, (function, at, code, err)
        lines = own_lines(err)
        assert len(lines) == 1 and "Traceback" not in err, (function, at, err)
        after = statuses(workshop)
        assert {run_id: after[run_id] for run_id in before} == before, (function, at)
        new = [status for run_id, status in after.items() if run_id not in before]
        if lines == ["Interrupted: no run had started."]:
            assert new == [], (function, at, after)
        else:
            assert lines == ["Interrupted: the run is FAILED."] and new == ["FAILED"], (function, at, lines, new)
        if function == "sklearn.log_model":  # a model stopped half-saved never looks READY
            assert {status for model_id, status in model_statuses(workshop).items()
                    if model_id not in models_before} <= {"PENDING", "FAILED"}
    # Which calls stop before a run exists, and which inside it: as MLflow works today.
    assert list(statuses(workshop).values()).count("FAILED") == len(STOPS) - 2
    assert "`Interrupted: the run is FAILED.`" in TROUBLESHOOTING
    assert "`Interrupted: no run had started.`" in TROUBLESHOOTING
    next_run_works(workshop, statuses(workshop))


def test_ctrl_c_while_a_server_never_answers(tmp_path):
    """A tracking server that takes the connection and never answers: Ctrl+C
    stops demo.py at once, with one line."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen()
        black_hole.settimeout(300)
        env = learner_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{black_hole.getsockname()[1]}")
        process = subprocess.Popen([sys.executable, str(workshop / "demo.py")], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            connection, _ = black_hole.accept()  # MLflow's first request, never answered
            os.killpg(process.pid, signal.SIGINT)
            _, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        connection.close()
    assert process.returncode == -signal.SIGINT
    assert own_lines(err) == ["Interrupted: no run had started."], err


# %% The first run, which builds mlflow.db


def test_stopped_while_the_first_run_builds_the_database(tmp_path):
    """Ctrl+C or kill -9 while MLflow builds the tables, early or late: no
    mlflow.db is left (the tables were being built aside), and the next run
    builds it and finishes, without help. Each first run starts from what the
    one stopped before it left (a killed builder's half-built file, say)."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    for signal_name, at in [("SIGINT", 1), ("SIGINT", 700), ("SIGKILL", 40), ("SIGKILL", 1400)]:
        code, out, err = stopped_demo(workshop, f"{signal_name}:build:{at}")
        assert code == -getattr(signal, signal_name), (signal_name, at, err)
        if signal_name == "SIGINT":
            assert own_lines(err) == ["Interrupted: no run had started."], (at, err)
        assert not (workshop / "mlflow.db").exists(), (signal_name, at)
    next_run_works(workshop, {})


# %% kill -9 mid-run


def test_kill_9_mid_run_then_the_troubleshooting_command_marks_it(tmp_path, built_database):
    """The dead run stays RUNNING (nothing could end it), the next run works,
    and the one command on the troubleshooting page marks the dead run KILLED."""
    workshop = make_workshop(tmp_path / "mlflow-workshop", built_database)
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    before = statuses(workshop)
    code, _, _ = stopped_demo(workshop, "SIGKILL:log_figure:1", "--n-estimators", "10")
    assert code == -signal.SIGKILL
    (dead,) = [run_id for run_id, status in statuses(workshop).items() if run_id not in before]
    assert statuses(workshop)[dead] == "RUNNING"
    next_run_works(workshop, statuses(workshop))
    command = readme_snippet("mark-killed").strip().replace("<run_id>", dead)
    done = subprocess.run(command, shell=True, cwd=workshop, env=learner_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert statuses(workshop)[dead] == "KILLED"


# %% A full disk, a read-only folder


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MB tmpfs of the test's own (root only; CI runs as root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk, leave_bytes):
    """Fill the disk with a ballast file until `leave_bytes` are free."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, shutil.disk_usage(disk).free - leave_bytes)
    return ballast


def test_a_full_disk_ends_in_one_line_and_the_next_run_works(tmpfs, built_database):
    """Runs that start with too little room left: not enough for the plots; for
    the model's records in mlflow.db; for the model's files and the run's end.
    Each says so in one line, each starts from the store the one before left,
    and once there is room again the next run works, with nothing lost."""
    workshop = make_workshop(tmpfs / "mlflow-workshop", built_database)
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    before = statuses(workshop)
    assert "`Stopped: the disk is full. Free some space, then run again.`" in TROUBLESHOOTING
    for kilobytes in [100, 150, 250]:
        ballast = fill(tmpfs, kilobytes * 1024)
        result = run_demo(workshop, "--n-estimators", "10")
        assert result.returncode == 1, (kilobytes, result.stdout + result.stderr)
        assert own_lines(result.stderr) == ["Stopped: the disk is full. Free some space, then run again."], \
            (kilobytes, result.stderr)
        # No half-written model looks READY: the model is FAILED, or PENDING where
        # mlflow.db itself was full.
        assert list(model_statuses(workshop).values()).count("READY") == 1, kilobytes
        ballast.unlink()
    after = next_run_works(workshop, statuses(workshop))
    assert {run_id: after[run_id] for run_id in before} == before


@pytest.mark.parametrize("first_run", [True, False], ids=["fresh folder", "after a run"])
def test_a_read_only_folder(tmpfs, first_run):
    """One line, before writing anything, on a read-only file system."""
    workshop = make_workshop(tmpfs / "mlflow-workshop")
    if not first_run:
        assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    files = sorted(str(path) for path in workshop.rglob("*"))
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"Cannot write in {workshop}: copy demo.py into a folder of your own and "
                                     "run it there."), result.stderr
    assert sorted(str(path) for path in workshop.rglob("*")) == files


# %% Files MLflow would misread


def test_a_file_that_is_not_a_database(tmp_path):
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    garbage = b"my notes, saved under the wrong name\n" * 100
    (workshop / "mlflow.db").write_bytes(garbage)
    result = run_demo(workshop)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{workshop / 'mlflow.db'} is not a database: move it away, then run again."
    assert (workshop / "mlflow.db").read_bytes() == garbage
    assert not (workshop / "mlruns").exists()


def test_a_moved_folder_stops_before_logging(tmp_path, built_database):
    """The folder renamed after a run: its mlflow.db still names the old folder.
    demo.py stops in one line, and never re-creates the old folder."""
    workshop = make_workshop(tmp_path / "mlflow-workshop", built_database)
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    moved = tmp_path / "renamed-workshop"
    workshop.rename(moved)
    result = run_demo(moved)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{moved / 'mlflow.db'} was copied from another folder (its files are in "
        f"{(workshop / 'mlruns' / 'demo-mlflow-artifacts').as_uri()}): delete mlflow.db and mlruns/ here to start "
        "afresh.")
    assert not workshop.exists()


@pytest.fixture(scope="module")
def mlflow_2(tmp_path_factory):
    """A venv with MLflow 2.22 (the skinny package and its database driver)."""
    venv = tmp_path_factory.mktemp("mlflow-2.22")
    # uv, which the README's test command installs, takes seconds where pip takes a minute
    # (and then the venv needs no pip of its own).
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    subprocess.run([sys.executable, "-m", "venv", *(["--without-pip"] if uv else []), str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    installer = ([uv, "pip", "install", "--compile-bytecode", "--python", python] if uv
                 else [python, "-m", "pip", "install"])
    installed = subprocess.run([*installer, "--quiet", "mlflow-skinny==2.22.*", "sqlalchemy<2.1", "alembic"],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv / "bin" / "python"


OLD_TUTORIAL = """
import sys
import mlflow
mlflow.set_experiment("an-earlier-tutorial")
if sys.argv[1] == "runs":
    with mlflow.start_run(run_name="old-run"):
        mlflow.log_param("alpha", 0.5)
        mlflow.log_metric("rmse", 0.75)
else:  # experiments and a registered model, but no run
    mlflow.set_experiment("another-tutorial")
    mlflow.MlflowClient().create_registered_model("an-old-model", description="kept")
print(mlflow.__version__)
"""


def run_old_tutorial(python, folder, what, tracking_uri=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    result = subprocess.run([str(python), "-c", OLD_TUTORIAL, what], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2.22."), result.stdout


@pytest.mark.parametrize("what", ["runs", "no runs"])
def test_a_database_from_mlflow_2_is_upgraded_in_place_with_nothing_lost(tmp_path, mlflow_2, what):
    """As `mlflow ui` does, demo.py's MLflow upgrades an older database in
    place: every experiment, run and registered model is still there, and so is
    the file (never replaced). The troubleshooting page says so."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    run_old_tutorial(mlflow_2, workshop, what, "sqlite:///mlflow.db")
    inode = (workshop / "mlflow.db").stat().st_ino
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 0, result.stderr
    assert (workshop / "mlflow.db").stat().st_ino == inode
    with sqlite3.connect(workshop / "mlflow.db") as db:
        experiments = {name for (name,) in db.execute("SELECT name FROM experiments")}
        runs = dict(db.execute("SELECT name, status FROM runs"))
        models = dict(db.execute("SELECT name, description FROM registered_models"))
    assert {"Default", "an-earlier-tutorial", "demo-mlflow-artifacts"} <= experiments
    if what == "runs":
        assert runs == {"old-run": "FINISHED", "random_forest_breast_cancer": "FINISHED"}
    else:
        assert "another-tutorial" in experiments and models == {"an-old-model": "kept"}
        assert runs == {"random_forest_breast_cancer": "FINISHED"}
    assert "mlflow db upgrade" not in result.stdout + result.stderr
    assert "upgrade" in TROUBLESHOOTING and "in place" in TROUBLESHOOTING


def test_an_mlflow_2_file_store_in_mlruns(tmp_path, mlflow_2):
    """MLflow 2's file store in mlruns/ (an earlier tutorial in this folder)
    would make `mlflow ui` read it instead of mlflow.db: demo.py stops in one
    line, before writing anything. Done as the troubleshooting page says,
    everything works: the demo, the README's `mlflow ui`, and the old runs in
    a database of their own."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    run_old_tutorial(mlflow_2, workshop, "runs")  # MLflow 2's default: ./mlruns
    assert list(workshop.glob("mlruns/*/meta.yaml"))
    before = sorted(str(path.relative_to(workshop)) for path in workshop.rglob("*"))
    result = run_demo(workshop)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{workshop / 'mlruns'} holds an older MLflow's runs, which `mlflow ui` would show instead of mlflow.db: "
        "rename that folder (say, to mlruns-old), then run again.")
    assert sorted(str(path.relative_to(workshop)) for path in workshop.rglob("*")) == before
    (workshop / "mlruns").rename(workshop / "mlruns-old")
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    done = subprocess.run(readme_snippet("migrate-filestore"), shell=True, cwd=workshop, env=learner_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    old_ui = re.search(r"`(mlflow ui --backend-store-uri sqlite:///old-runs\.db[^`]*)`", TROUBLESHOOTING).group(1)
    for command, experiment in [(readme_snippet("ui"), "demo-mlflow-artifacts"), (old_ui, "an-earlier-tutorial")]:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with start_server(with_port(command, port), workshop, f"{base}/health", log_name="ui.log"):
            status, body = http("GET", f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
        assert status == 200, body
