"""How demo.py keeps its local MLflow store healthy. You need not read this file
to follow the workshop: it is the care a laptop's folder needs, kept out of the
story.

Without MLFLOW_TRACKING_URI, demo.py logs to `mlflow.db` (the backend store)
and `mlruns/` (the artifact store) beside itself. Before each run,
`open_local_store` makes sure that:

* runs started at once in one folder take turns to build or check mlflow.db;
* a first run stopped while MLflow builds mlflow.db's tables (Ctrl-C, kill -9,
  a full disk) never leaves a half-built mlflow.db behind: the tables are built
  in another file, which is then moved into place;
* a run whose process died without ending it (kill -9, a crash, a full disk)
  does not stay RUNNING for good: the next run marks it KILLED and says so in
  one line, and a model left half-logged (PENDING) is marked FAILED;
* files that MLflow 3.17 would misread or change for good stop the run before
  it logs anything, with one line that says what to do, and nothing is deleted:
  a file that is not a database, a database from an older MLflow, an old
  MLflow file store in mlruns/, and an mlflow.db copied or moved from another
  folder (it would keep sending files to the old one).

How a later run tells that a run died: each run holds an operating-system lock
on its own file in mlruns/.running/ for as long as its process lives, and
writes its run id beside it. The system frees the lock when the process ends,
however it ends. A lock that can be taken therefore belongs to a dead process.
The locks are SQLite transactions on empty files, which behave the same on
Linux, macOS and Windows.
"""

import os
import sqlite3
import sys
import uuid
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
import sqlalchemy
from mlflow.store.db.base_sql_model import Base
from mlflow.store.db.utils import _initialize_tables  # importing it fills Base with every table


def os_lock(path, wait):
    """Lock a file until the returned connection is closed or the process dies.
    Raises sqlite3.OperationalError if another process holds it for `wait` seconds."""
    connection = sqlite3.connect(path, timeout=wait, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


def open_local_store(project_dir, experiment_name):
    """Make mlflow.db and mlruns/ in project_dir ready, point MLflow at them,
    and return (the experiment's artifact location, this run's id file)."""
    database, mlruns = project_dir / "mlflow.db", project_dir / "mlruns"
    if any(mlruns.glob("*/meta.yaml")):  # `mlflow ui` and `mlflow models serve` would read it, not mlflow.db
        sys.exit(f"{mlruns} holds an older MLflow's runs (a file store). Rename that folder (say, to "
                 "mlruns-old), then run again. `mlflow migrate-filestore --source mlruns-old --target "
                 "sqlite:///old-runs.db` copies those runs into a database the UI opens.")
    check(database, project_dir, experiment_name)  # before anything is written
    (mlruns / ".running").mkdir(parents=True, exist_ok=True)
    with closing(os_lock(mlruns / ".db-lock", wait=300)):  # runs started at once take turns here
        tables, _, _ = read(database, experiment_name)
        if not set(Base.metadata.tables) <= tables:
            build(database, project_dir, tables)
        mlflow.set_tracking_uri(f"sqlite:///{database.as_posix()}")
        end_runs_of_dead_processes(mlruns / ".running")
        # This run's lock, taken while no other run can be looking at the locks.
        this_run = mlruns / ".running" / uuid.uuid4().hex
        global this_run_lock  # held until this process ends
        this_run_lock = os_lock(this_run.with_suffix(".lock"), wait=0)
    return (mlruns / experiment_name).as_uri(), this_run.with_suffix(".run")


def read(database, experiment_name):
    """mlflow.db's tables, whether it holds runs, and where it keeps the
    experiment's files (None if it has no such experiment)."""
    if not database.exists():
        return set(), False, None
    try:
        with closing(sqlite3.connect(database, timeout=60)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            holds_runs = "runs" in tables and db.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
            found = set(Base.metadata.tables) <= tables and db.execute(
                "SELECT artifact_location FROM experiments WHERE name = ?", (experiment_name,)).fetchone()
    except sqlite3.DatabaseError as error:
        if "not a database" not in str(error):
            raise
        sys.exit(f"{database} is not a database. Move it away (or delete it), then run again.")
    return tables, holds_runs, Path(url2pathname(urlparse(found[0]).path)) if found else None


def check(database, project_dir, experiment_name):
    tables, holds_runs, files_at = read(database, experiment_name)
    # A copied or moved folder: its mlflow.db still sends files to the old one.
    if files_at and files_at != project_dir / "mlruns" / experiment_name:
        sys.exit(f"{database} keeps its files in {files_at}, another folder. "
                 "To start afresh here, delete mlflow.db and mlruns/ in this folder.")
    if not set(Base.metadata.tables) <= tables and holds_runs:  # MLflow would upgrade it silently, for good
        sys.exit(f"{database} was made by an older MLflow. MLflow 3.17 can upgrade it, for good (the older "
                 f"MLflow cannot open it after): copy it first, then run `mlflow db upgrade "
                 f"sqlite:///{database.as_posix()}`. Or move it away to start afresh.")


def build(database, project_dir, tables):
    """Build MLflow's tables in another file, then move it into place, so that
    a first run stopped half-way never leaves a half-built mlflow.db."""
    if tables:
        print(f"{database} is incomplete (a first run stopped half-way?) and holds no runs: building it again.")
    building = database.with_name("mlflow.db.building")
    for leftover in project_dir.glob("mlflow.db.building*"):  # from a run stopped while building
        leftover.unlink()
    engine = sqlalchemy.create_engine(f"sqlite:///{building.as_posix()}")
    _initialize_tables(engine)  # what MLflow itself does on a first run, in the other file
    engine.dispose()
    os.replace(building, database)


def end_runs_of_dead_processes(running):
    client = mlflow.MlflowClient()
    for lock_file in running.glob("*.lock"):
        try:
            os_lock(lock_file, wait=0).close()
        except sqlite3.OperationalError:
            continue  # a run in progress, in another terminal
        run_file = lock_file.with_suffix(".run")
        try:
            run = client.get_run(run_file.read_text()) if run_file.exists() else None
        except MlflowException:  # not in this mlflow.db: it was deleted since
            run = None
        if run and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
            print(f"Run {run.info.run_id} was stopped before it finished: marked KILLED.")
        if run:  # a model left half-logged (by a kill, or by Ctrl-C inside log_model) ends FAILED
            for model in client.search_logged_models([run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{run.info.run_id}'"):
                if model.status == LoggedModelStatus.PENDING:
                    client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        for leftover in running.glob(f"{lock_file.stem}.*"):  # .lock, .run and any journal
            leftover.unlink()
