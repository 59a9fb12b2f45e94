"""A learner's laptop interrupts, fills up and keeps old files: after any of it,
the next `python demo.py` works, no run stays RUNNING, and nothing is lost.

Everything is real: demo.py subprocesses stopped with SIGINT (Ctrl-C) or
SIGKILL (kill -9), a real tmpfs that fills up (root only, as in CI), and
databases and file stores made by a real MLflow 2.22 in a venv of its own.
"""

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    README,
    free_port,
    http,
    learner_env,
    make_workshop,
    readme_snippet,
    run_demo,
    start_server,
    with_port,
)

MLFLOW_LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) mlflow")
# The one line of a Ctrl-C, and the status it leaves the run in (None: no run).
INTERRUPTED = {"Interrupted. The run is marked FAILED in MLflow.": "FAILED",
               "Interrupted. No run had started.": None,
               "Interrupted. The run had finished: everything is saved.": "FINISHED"}
INSTANTS = 10  # Ctrl-C instants, spread evenly over a run
README_FLAT = " ".join(README.split())


def statuses(workshop):
    """run id -> status, read straight from mlflow.db."""
    with sqlite3.connect(f"file:{Path(workshop) / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        return dict(db.execute("SELECT run_uuid, status FROM runs"))


def model_statuses(workshop):
    with sqlite3.connect(f"file:{Path(workshop) / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        return dict(db.execute("SELECT model_id, status FROM logged_models"))


def start_demo(workshop, *flags):
    return subprocess.Popen([sys.executable, str(Path(workshop) / "demo.py"), *flags], cwd=Path(workshop).parent,
                            env=learner_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, out, err


def wait_for(condition, process, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, (what, process.communicate())
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.02)


def next_run_works(workshop, before):
    """The next run finishes; every run is still there; none is RUNNING. Its
    printout: one line per run it ended KILLED."""
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    after = statuses(workshop)
    assert set(before) <= set(after), "a run was lost"
    assert len(after) == len(before) + 1
    assert "RUNNING" not in after.values(), after
    killed = [run_id for run_id, status in before.items() if status == "RUNNING"]
    assert "`Run <run_id> was stopped before it finished: marked KILLED.`" in README_FLAT
    for run_id in killed:
        assert after[run_id] == "KILLED"
        assert f"Run {run_id} was stopped before it finished: marked KILLED." in result.stdout
    assert 1 not in model_statuses(workshop).values(), "a model left PENDING"  # 1: PENDING
    return result


def only_one_line(stderr):
    """What demo.py itself wrote to stderr (MLflow's own log lines left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not MLFLOW_LOG_LINE.match(line)]


# %% Ctrl-C at any instant


def one_line_and_a_true_one(workshop, code, err, earlier, at):
    """A Ctrl-C gave exit code 130 and one line, never a traceback, and the
    line is true: the interrupted run is FAILED, or FINISHED if it had
    finished, or there is none. Returns every run's status."""
    assert code == 130, (at, err)  # never swallowed
    lines = only_one_line(err)
    assert len(lines) == 1 and lines[0] in INTERRUPTED, (at, err)
    assert f"`{lines[0]}`" in README_FLAT
    after = statuses(workshop) if (workshop / "mlflow.db").exists() else {}
    assert {run_id: after[run_id] for run_id in earlier} == earlier, "an earlier run changed"
    new = [status for run_id, status in after.items() if run_id not in earlier]
    assert new == ([INTERRUPTED[lines[0]]] if INTERRUPTED[lines[0]] else []), (at, lines, after)
    return after


def run_seconds(workshop):
    started = time.monotonic()
    result = run_demo(workshop)
    assert result.returncode == 0, result.stderr
    return time.monotonic() - started


@pytest.mark.parametrize("which", ["first run", "later run"])
def test_ctrl_c_at_any_instant(tmp_path, which):
    """SIGINT at instants spread evenly over a run (a first run in a new folder,
    or a later one): exit 130, one line, never a traceback; then the next run
    works and leaves no run RUNNING."""
    measured = make_workshop(tmp_path / "measured" / "mlflow-workshop")
    seconds = run_seconds(measured)  # how long a run takes here (a first one)
    interrupted = 0
    for index in range(INSTANTS):
        at = seconds * (index + 0.5) / INSTANTS
        workshop = make_workshop(tmp_path / f"at-{index}" / "mlflow-workshop")
        if which == "later run":  # an earlier run made the stores (a copy would point at another folder)
            assert run_demo(workshop, "--n-estimators", "10").returncode == 0
        earlier = statuses(workshop) if which == "later run" else {}
        process = start_demo(workshop)
        time.sleep(at)
        if process.poll() is not None:  # it had finished: no Ctrl-C
            assert process.returncode == 0, process.communicate()
            continue
        process.send_signal(signal.SIGINT)
        interrupted += 1
        code, out, err = finish(process)
        before = one_line_and_a_true_one(workshop, code, err, earlier, at)
        next_run_works(workshop, before)
    print(f"\n{which}: {interrupted} of {INSTANTS} instants interrupted a {seconds:.1f} s run")
    assert interrupted >= INSTANTS - 2


# Runs demo.py as `python demo.py` does, and sends itself SIGINT (a real
# Ctrl-C) as its AT-th call of a function of SQLAlchemy, MLflow's database
# library, begins. With AT=0 it prints how many such calls a run makes, and
# how many come before the run starts.
CTRL_C_AT_A_DATABASE_CALL = """
import os, runpy, signal, sys

demo, at = sys.argv[1], int(sys.argv[2])
calls, before_the_run = 0, None


def count(frame, event, arg):
    global calls, before_the_run
    if event != "call":
        return
    module = frame.f_globals.get("__name__", "")
    if before_the_run is None and module == "mlflow.tracking.fluent" and frame.f_code.co_name == "start_run":
        before_the_run = calls
    if module.startswith("sqlalchemy"):
        calls += 1
        if calls == at:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)


sys.argv = [demo]
sys.path.insert(0, os.path.dirname(demo))
if at == 0:
    import clean_stop

    leave = clean_stop.leave
    clean_stop.leave = lambda: (print("CALLS", calls, before_the_run), leave())
sys.setprofile(count)
runpy.run_path(demo, run_name="__main__")
"""


def test_ctrl_c_inside_a_database_call(tmp_path):
    """CI once pressed Ctrl-C while SQLAlchemy was reading a row: the cursor it
    left open kept mlflow.db locked, and 20 s later marking the run FAILED
    failed with "database is locked" and a traceback. Timed signals rarely
    land there; this one lands as a chosen database call begins, at instants
    spread over a later run's logging. Each time: exit 130, one true line, and
    the next run works."""
    driver = tmp_path / "ctrl_c_at_a_database_call.py"
    driver.write_text(CTRL_C_AT_A_DATABASE_CALL)

    def later_run(folder, at):
        """Statuses after a first run, and the result of a later run driven to `at`."""
        workshop = make_workshop(tmp_path / folder / "mlflow-workshop")
        assert run_demo(workshop, "--n-estimators", "10").returncode == 0
        earlier = statuses(workshop)
        return workshop, earlier, subprocess.run([sys.executable, str(driver), str(workshop / "demo.py"), str(at)],
                                                 cwd=tmp_path, env=learner_env(), capture_output=True, text=True,
                                                 timeout=300)

    _, _, counted = later_run("counted", 0)
    assert counted.returncode == 0, counted.stderr
    calls, before_the_run = map(int, counted.stdout.split("CALLS")[1].split())
    for index in range(INSTANTS):
        at = before_the_run + (calls - before_the_run) * (2 * index + 1) // (2 * INSTANTS)
        workshop, earlier, result = later_run(f"at-{index}", at)
        before = one_line_and_a_true_one(workshop, result.returncode, result.stderr, earlier, at)
        next_run_works(workshop, before)


def test_a_second_ctrl_c_stops_at_once_when_mlflow_hangs(tmp_path):
    """A tracking server that takes the connection and never answers: the first
    Ctrl-C waits for MLflow's call and, two seconds on, says so; the second
    stops at once."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    with socket.socket() as black_hole, open(tmp_path / "stderr.txt", "w+") as stderr:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen()
        black_hole.settimeout(120)
        env = learner_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{black_hole.getsockname()[1]}")
        process = subprocess.Popen([sys.executable, str(workshop / "demo.py")], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            connection, _ = black_hole.accept()  # MLflow's first request, never answered
            process.send_signal(signal.SIGINT)
            waiting = "(Waiting for MLflow to finish its current call. Press Ctrl+C again to stop at once.)"
            wait_for(lambda: waiting in Path(stderr.name).read_text(), process, "the line about waiting", timeout=60)
            assert process.poll() is None  # the first Ctrl-C waits
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        connection.close()
    err = Path(stderr.name).read_text()
    assert only_one_line(err) == [waiting, "Interrupted at once. No run had started."], err
    assert f"`{waiting}`" in README_FLAT and "`Interrupted at once.`" in README_FLAT


# %% kill -9


@pytest.mark.parametrize("stop, delay", [(signal.SIGKILL, 0.3), (signal.SIGINT, 0.05), (signal.SIGINT, 0.3),
                                         (signal.SIGINT, 0.6)], ids=["kill -9", "Ctrl-C 0.05 s", "Ctrl-C 0.3 s",
                                                                     "Ctrl-C 0.6 s"])
def test_stopped_while_the_first_run_builds_the_database(tmp_path, stop, delay):
    """kill -9 or Ctrl-C while MLflow builds the tables: no half-built
    mlflow.db is left, Ctrl-C is never swallowed, and the next run builds the
    database and finishes."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    process = start_demo(workshop)
    wait_for(lambda: (workshop / "mlflow.db.building").exists(), process, "the tables being built")
    time.sleep(delay)  # inside the migrations
    process.send_signal(stop)
    code, _, err = finish(process)
    if stop == signal.SIGINT:
        assert code == 130 and only_one_line(err) == ["Interrupted. No run had started."], err
    assert not (workshop / "mlflow.db").exists()
    next_run_works(workshop, {})
    assert not list(workshop.glob("mlflow.db.building*"))


def test_kill_9_mid_run_then_the_next_run_ends_it_killed(tmp_path):
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    process = start_demo(workshop)
    # Mid-run: the run is RUNNING and its model is being written (PENDING).
    wait_for(lambda: 1 in model_statuses(workshop).values(), process, "a model being logged")
    process.kill()
    process.wait()
    before = statuses(workshop)
    assert sorted(before.values()) == ["FINISHED", "RUNNING"]
    next_run_works(workshop, before)


def test_a_run_in_another_terminal_is_left_alone(tmp_path):
    """A run that is alive (in another terminal) is not taken for a dead one,
    however long it takes: here a copy of demo.py that waits two minutes
    inside its run, in the same folder."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    source = (workshop / "demo.py").read_text()
    marker = "        this_run_file.write_text(run.info.run_id)\n"
    assert source.count(marker) == 1
    (workshop / "slow_demo.py").write_text(source.replace(marker, marker + "        __import__('time').sleep(120)\n"))
    slow = subprocess.Popen([sys.executable, str(workshop / "slow_demo.py"), "--n-estimators", "10"],
                            cwd=tmp_path, env=learner_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "RUNNING" in statuses(workshop).values() and list(workshop.glob("mlruns/.running/*.run")),
                 slow, "the slow run started")
        result = run_demo(workshop, "--n-estimators", "10")
        assert result.returncode == 0, result.stderr
        assert "KILLED" not in result.stdout
        assert sorted(statuses(workshop).values()) == ["FINISHED", "FINISHED", "RUNNING"]
        assert slow.poll() is None
    finally:
        slow.send_signal(signal.SIGINT)
        code, _, err = finish(slow)
    assert code == 130, err
    assert only_one_line(err) == ["Interrupted. The run is marked FAILED in MLflow."]
    assert sorted(statuses(workshop).values()) == ["FAILED", "FINISHED", "FINISHED"]


# %% A full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs of the test's own (root only; CI runs as root)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk, leave_bytes):
    """Fill the disk with a ballast file until `leave_bytes` are free."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as file:
        file.truncate(0)
        chunk = b"\0" * 2**20
        remaining = free - leave_bytes
        while remaining > 0:
            remaining -= file.write(chunk[:min(len(chunk), remaining)])
    return ballast


def test_a_full_disk_ends_in_one_line_and_the_next_run_works(small_disk):
    workshop = make_workshop(small_disk / "mlflow-workshop")
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    ballast = fill(small_disk, 100 * 1024)  # 100 KB: not enough for the plots and the model
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode != 0
    lines = only_one_line(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Stopped: the disk is full ("), result.stderr
    assert lines[0].endswith("Free some space, then run again."), lines
    assert "`Stopped: the disk is full (...)`" in README_FLAT
    assert "Traceback" not in result.stderr
    ballast.unlink()
    before = statuses(workshop)
    assert "FINISHED" in before.values() and len(before) == 2
    next_run_works(workshop, before)


# %% Stale and foreign files


def test_a_file_that_is_not_a_database(tmp_path):
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    garbage = b"my notes, saved under the wrong name\n" * 100
    (workshop / "mlflow.db").write_bytes(garbage)
    result = run_demo(workshop)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"{workshop / 'mlflow.db'} is not a database. "
                                     "Move it away (or delete it), then run again.")
    assert (workshop / "mlflow.db").read_bytes() == garbage
    assert not (workshop / "mlruns" / "demo-mlflow-artifacts").exists()


def test_a_half_built_database_with_no_runs_is_built_again(tmp_path):
    """A database left half-built, as an older demo.py could leave it when
    stopped while MLflow built it (MLflow's first tables, a migration's
    temporary table), that holds no runs: one line, then built again."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    workshop = make_workshop(tmp_path / "mlflow-workshop")
    engine = sqlalchemy.create_engine(f"sqlite:///{workshop / 'mlflow.db'}")
    InitialBase.metadata.create_all(engine)  # what MLflow does first, before its migrations
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)"))
    engine.dispose()
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 0, result.stderr
    assert (f"{workshop / 'mlflow.db'} is incomplete (a first run stopped half-way?) and holds no runs: "
            "building it again.") in result.stdout
    assert list(statuses(workshop).values()) == ["FINISHED"]


@pytest.fixture(scope="module")
def mlflow_2(tmp_path_factory):
    """A venv with MLflow 2.22 (the skinny package and its database driver)."""
    venv = tmp_path_factory.mktemp("mlflow-2.22")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "mlflow-skinny==2.22.*",
         "sqlalchemy<2.1", "alembic"], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv / "bin" / "python"


OLD_TUTORIAL = """
import mlflow
mlflow.set_experiment("an-earlier-tutorial")
with mlflow.start_run(run_name="old-run"):
    mlflow.log_param("alpha", 0.5)
    mlflow.log_metric("rmse", 0.75)
print(mlflow.__version__)
"""


def run_old_tutorial(python, folder, tracking_uri=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    result = subprocess.run([str(python), "-c", OLD_TUTORIAL], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2.22."), result.stdout


def test_a_database_from_mlflow_2_is_never_upgraded_silently(tmp_path, mlflow_2):
    """One line before anything changes; the command it names upgrades the
    database; then demo.py runs and the old run is still there."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    run_old_tutorial(mlflow_2, workshop, "sqlite:///mlflow.db")
    old = (workshop / "mlflow.db").read_bytes()
    result = run_demo(workshop)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(f"{workshop / 'mlflow.db'} was made by an older MLflow."), line
    assert "\n" not in line
    assert (workshop / "mlflow.db").read_bytes() == old
    upgrade = re.search(r"`(mlflow db upgrade [^`]+)`", line).group(1)
    done = subprocess.run(upgrade, shell=True, cwd=workshop, env=learner_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = run_demo(workshop, "--n-estimators", "10")
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(workshop / "mlflow.db") as db:
        runs = dict(db.execute("SELECT name, status FROM runs"))
    assert runs == {"old-run": "FINISHED", "random_forest_breast_cancer": "FINISHED"}


def test_an_mlflow_2_file_store_in_mlruns(tmp_path, mlflow_2):
    """MLflow 2's file store in mlruns/ (an earlier tutorial in this folder)
    would make `mlflow ui` read it instead of mlflow.db: demo.py stops in one
    line, before writing anything. Done as the line says, everything works:
    the demo, the README's `mlflow ui`, and the old runs under the new name."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    run_old_tutorial(mlflow_2, workshop)  # MLflow 2's default: ./mlruns
    assert list(workshop.glob("mlruns/*/meta.yaml"))
    before = sorted(str(path.relative_to(workshop)) for path in workshop.rglob("*"))
    result = run_demo(workshop)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line == (f"{workshop / 'mlruns'} holds an older MLflow's runs (a file store). Rename that folder (say, "
                    "to mlruns-old), then run again. `mlflow migrate-filestore --source mlruns-old --target "
                    "sqlite:///old-runs.db` copies those runs into a database the UI opens.")
    assert sorted(str(path.relative_to(workshop)) for path in workshop.rglob("*")) == before
    (workshop / "mlruns").rename(workshop / "mlruns-old")
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    migrate = re.search(r"`(mlflow migrate-filestore [^`]+)`", line).group(1)
    done = subprocess.run(migrate, shell=True, cwd=workshop, env=learner_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for command, experiment in [(readme_snippet("ui"), "demo-mlflow-artifacts"),
                                (re.search(r"`(mlflow ui --backend-store-uri sqlite:///old-runs\.db)`",
                                           README_FLAT).group(1) + " --port 5000",
                                 "an-earlier-tutorial")]:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with start_server(with_port(command, port), workshop, f"{base}/health", log_name="ui.log"):
            status, body = http("GET", f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
        assert status == 200, body


def test_a_moved_folder_stops_before_logging(tmp_path):
    """The folder renamed after a run: its mlflow.db still names the old folder.
    demo.py stops in one line, and never re-creates the old folder."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    assert run_demo(workshop, "--n-estimators", "10").returncode == 0
    moved = tmp_path / "renamed-workshop"
    workshop.rename(moved)
    result = run_demo(moved)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{moved / 'mlflow.db'} keeps its files in {workshop / 'mlruns' / 'demo-mlflow-artifacts'}, another "
        "folder. To start afresh here, delete mlflow.db and mlruns/ in this folder.")
    assert not workshop.exists()
