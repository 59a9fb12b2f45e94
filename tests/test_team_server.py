"""The team set-up of the README: a shared tracking server on PostgreSQL, with
MLflow's basic-auth app, a proxied artifact store and the model registry.

A throw-away PostgreSQL cluster is started once per test session in a
temporary folder, listening on a free port of 127.0.0.1, and always stopped.
The README's own SQL creates the database user and databases in it, and the
README's own commands start `mlflow server` (only the port, the database URLs
and the paths are changed). Participants are real `demo.py` subprocesses.

Without PostgreSQL these tests are skipped with a hint, except under CI=true,
where they fail: CI installs PostgreSQL (`.ci/run`).
"""

import base64
import glob
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import (
    MODEL_FILES,
    expected_params,
    PLOTS,
    REPORT,
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

EXPERIMENT = "demo-mlflow-artifacts"
METRICS = ["accuracy", "roc_auc", "precision", "recall", "f1"]
TAGS = ["model_type", "dataset", "owner", "mlflow.note.content"]
DATASETS = {"breast_cancer_training": "training", "breast_cancer_testing": "testing"}
README_DB_URL = re.compile(r"postgresql\+psycopg2://(?P<user>[^:/@\s]+):(?P<password>[^@\s]+)@127\.0\.0\.1:5432/(?P<db>\w+)")
PARTICIPANTS = 12  # a workshop room's worth, all at once against one server
LOCAL_PARTICIPANTS = 4  # at once against the local SQLite store
LOAD_TIMEOUT = 600  # seconds for a whole wave of participants


# %% A throw-away PostgreSQL cluster


def postgres_bin_dir():
    """The newest Debian PostgreSQL, or one on PATH (e.g. Homebrew's)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(re.search(r"/(\d+)/bin/", path).group(1)))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def no_postgres(reason):
    message = (f"{reason}. These tests start a throw-away PostgreSQL server; install it with "
               "`sudo apt-get install postgresql` (Debian/Ubuntu), then run "
               "`python -m pytest tests/test_team_server.py`.")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Postgres:
    def __init__(self, bin_dir, folder, port):
        self.bin_dir, self.folder, self.port = bin_dir, folder, port
        self.data = folder / "data"
        # Root may not run PostgreSQL: run it as the `postgres` user then.
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def ctl(self, *args, timeout=90):
        return subprocess.run([*self.as_owner, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args],
                              capture_output=True, text=True, timeout=timeout)

    def psql(self, sql, database="postgres"):
        """Run SQL as the superuser, over the cluster's Unix socket."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-h", str(self.folder), "-p", str(self.port), "-U", "postgres",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
            input=sql, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, f"psql failed on:\n{sql}\n{result.stderr}"

    def url(self, database):
        """The README's database URL, with this cluster's port and the given database."""
        match = README_DB_URL.search(readme_snippet("team-server"))
        return f"postgresql+psycopg2://{match['user']}:{match['password']}@127.0.0.1:{self.port}/{database}"


@contextmanager
def postgres_cluster(database_sql):
    """A new PostgreSQL cluster on a free port, `database_sql` run in it, always stopped."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        no_postgres("No PostgreSQL found (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH)")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            no_postgres("Running as root, but there is no `postgres` user to run PostgreSQL as")
    folder = Path(tempfile.mkdtemp(prefix="workshop-postgres-"))
    if os.geteuid() == 0:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    pg = Postgres(bin_dir, folder, free_port())
    try:
        # Trust on the Unix socket (for the superuser setting things up), real
        # passwords over TCP (for MLflow), so the README's password is checked.
        init = subprocess.run(
            [*pg.as_owner, str(bin_dir / "initdb"), "-D", str(pg.data), "-U", "postgres", "-E", "UTF8",
             "--auth-local=trust", "--auth-host=scram-sha-256"],
            capture_output=True, text=True, timeout=120,
        )
        assert init.returncode == 0, init.stdout + init.stderr
        started = pg.ctl("start", "-w", "-t", "60", "-l", str(folder / "postgres.log"), "-o",
                         f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder}")
        assert started.returncode == 0, started.stdout + started.stderr + _read(folder / "postgres.log")
        pg.psql(database_sql)
        yield pg
    finally:
        if (pg.data / "postmaster.pid").exists():
            stopped = pg.ctl("stop", "-w", "-t", "30", "-m", "fast")
            if stopped.returncode != 0:
                pg.ctl("stop", "-w", "-t", "30", "-m", "immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    # The README's SQL, as the admin pastes it into `sudo -u postgres psql`.
    with postgres_cluster(readme_snippet("team-database")) as pg:
        yield pg


def _read(path):
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""


# %% The README's server


def exported(snippet):
    """NAME -> value of the `export NAME=value` lines of a bash snippet."""
    return {name: value.strip("'\"") for name, value in
            re.findall(r"^export (\w+)=(.*)$", "\n".join(readme_commands(snippet)), re.MULTILINE)}


ADMIN_PASSWORD = exported("team-server")["MLFLOW_AUTH_ADMIN_PASSWORD"]


def basic_auth(username, password):
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Server:
    def __init__(self, url, folder, process):
        self.url, self.folder, self.process = url, folder, process

    def participant_env(self, username, password, **more):
        """A participant's terminal after the README's `export` lines."""
        names = exported("shared-server-bash")
        assert set(names) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        return learner_env(MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_USERNAME=username,
                           MLFLOW_TRACKING_PASSWORD=password, **more)

    def create_user(self, username, password):
        """What the README's curl command does: POST users/create as the admin."""
        (curl,) = readme_commands("team-user-curl")
        path = re.search(r"http://127\.0\.0\.1:5000(/\S+)", curl).group(1)
        status, body = http("POST", self.url + path, json.dumps({"username": username, "password": password}),
                            {"Content-Type": "application/json", **basic_auth("admin", ADMIN_PASSWORD)})
        assert status == 200, body


def server_script(snippet, pg, database, port):
    """The README's server commands (the exports of `team-server`, then the
    command of `snippet`), with only the port and the database URL changed."""
    commands = readme_commands("team-server")
    if snippet != "team-server":
        commands = [line for line in commands if line.startswith("export ")] + readme_commands(snippet)
    script = with_port("\n".join(commands), port)
    script, count = README_DB_URL.subn(pg.url(database), script)
    assert count == 1, script
    return script


@contextmanager
def team_server(pg, folder, database, snippet="team-server", port=None, fresh=True):
    """Start the README's tracking server in `folder`, on fresh databases
    `database` and `database`_auth unless told otherwise, and always stop it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fresh and database != "mlflow":  # the README's SQL already made `mlflow` and `mlflow_auth`
        user = README_DB_URL.search(readme_snippet("team-server"))["user"]
        pg.psql(f"CREATE DATABASE {database} OWNER {user};\nCREATE DATABASE {database}_auth OWNER {user};\n")
    config, count = README_DB_URL.subn(pg.url(f"{database}_auth"), readme_snippet("team-auth-config"))
    assert count == 1, config
    (folder / "basic_auth.ini").write_text(config)
    port = port or free_port()
    script = server_script(snippet, pg, database, port)
    if snippet == "team-server-room":
        # The room's addresses keep their names; only the port follows the test's.
        script = script.replace(":5000", f":{port}")
        # Tests talk to 127.0.0.1 only: bind there rather than to every interface.
        script = script.replace("--host 0.0.0.0", "--host 127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    with start_server(script, folder, f"{url}/health", timeout=180) as process:
        yield Server(url, folder, process)


def server_client(monkeypatch, server, username="admin", password=ADMIN_PASSWORD):
    """An MlflowClient of the server, with credentials, as any tool would use it."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=server.url)


# %% What a complete run looks like


def check_run(client, run_id, model_id, flags):
    """Everything demo.py logs is there, and belongs to this run and these flags."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "random_forest_breast_cancer"
    # The forest's settings with these flags, defaults included, then the split.
    expected = expected_params(flags)
    for flag, value in zip(flags[::2], flags[1::2]):
        assert expected[{"--seed": "seed"}.get(flag, flag[2:].replace("-", "_"))] == value
    assert run.data.params == expected, (run_id, flags)
    assert sorted(run.data.metrics) == sorted(METRICS)
    assert all(0 < value <= 1 for value in run.data.metrics.values()), run.data.metrics
    for tag in TAGS:
        assert run.data.tags.get(tag), (run_id, tag)
    assert run.data.tags["model_type"] == "RandomForestClassifier"
    assert run.data.tags["mlflow.note.content"].startswith("RandomForestClassifier telling malignant from benign")
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags}.get("mlflow.data.context")
              for d in run.inputs.dataset_inputs}
    assert inputs == DATASETS
    artifacts = sorted(f.path for f in client.list_artifacts(run_id))
    assert artifacts == [REPORT, "plots"]
    plots = sorted(f.path for f in client.list_artifacts(run_id, "plots"))
    assert plots == PLOTS
    assert all(f.file_size > 0 for f in client.list_artifacts(run_id, "plots"))
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run_id and model.name == "model"
    files = sorted(f.path for f in client.list_logged_model_artifacts(model_id))
    assert files == MODEL_FILES, (model_id, files)
    return run


def experiment_runs(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def participant_flags(index):
    """Different flags for each participant, so a mix-up between runs shows;
    every other one keeps the default test set (`--seed` unset)."""
    seed = ["--seed", str(100 + index)] if index % 2 else []
    return ["--n-estimators", str(5 + index), "--max-depth", str(2 + index % 7), *seed]


# %% The README's commands


def test_readme_team_snippets_agree():
    """The install line brings what requirements-dev.txt pins, PowerShell sets
    the same variables as bash, and every server command uses the same database."""
    (install,) = readme_commands("team-install")
    dev = (Path(__file__).parent.parent / "requirements-dev.txt").read_text()
    for requirement in re.findall(r'"([^"]+)"', install):
        assert requirement in dev.splitlines(), requirement
    bash = exported("shared-server-bash")
    powershell = dict(re.findall(r'^\$env:(\w+) = "(.*)"$', readme_snippet("shared-server-powershell"), re.M))
    assert powershell == bash
    assert readme_commands("shared-server-bash")[-1] == "python demo.py"
    urls = {m.group(0) for s in ("team-server", "team-server-room") for m in README_DB_URL.finditer(readme_snippet(s))}
    assert len(urls) == 1
    (auth_url,) = [m.group(0) for m in README_DB_URL.finditer(readme_snippet("team-auth-config"))]
    databases = re.findall(r"CREATE DATABASE (\w+)", readme_snippet("team-database"))
    assert {README_DB_URL.match(url)["db"] for url in [*urls, auth_url]} == set(databases)


@pytest.fixture(scope="module")
def shared_server(postgres, tmp_path_factory):
    """The README's server on the README's databases, with the README's accounts."""
    with team_server(postgres, tmp_path_factory.mktemp("team") / "server", "mlflow") as server:
        admin = learner_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        code = readme_snippet("team-users").replace("http://127.0.0.1:5000", server.url)
        result = subprocess.run([sys.executable, "-c", code], env=admin, cwd=server.folder,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        server.passwords = dict(line.split() for line in result.stdout.splitlines())
        assert sorted(server.passwords) == ["alice", "bob", "carol"]
        yield server


@pytest.fixture(scope="module")
def alice_run(shared_server, tmp_path_factory):
    """alice runs the README's `python demo.py` against the server."""
    workshop = make_workshop(tmp_path_factory.mktemp("alice") / "mlflow-workshop")
    started = time.monotonic()
    result = run_demo(workshop, env=shared_server.participant_env("alice", shared_server.passwords["alice"]))
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\ndemo.py against the shared server: {time.monotonic() - started:.1f} s")
    run_id, model_id = printed_ids(result.stdout)
    return {"workshop": workshop, "stdout": result.stdout, "run_id": run_id, "model_id": model_id}


def test_request_without_credentials_is_refused(shared_server):
    status, body = http("GET", f"{shared_server.url}/api/2.0/mlflow/experiments/search?max_results=1")
    assert status == 401, body
    status, _ = http("GET", f"{shared_server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                     headers=basic_auth("alice", "not-her-password-at-all"))
    assert status == 401
    status, _ = http("GET", f"{shared_server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                     headers=basic_auth("alice", shared_server.passwords["alice"]))
    assert status == 200


def test_admin_creates_an_account_with_curl(shared_server):
    """The README's curl command, as typed (port changed), makes an account that works."""
    (curl,) = readme_commands("team-user-curl")
    result = subprocess.run(curl.replace("http://127.0.0.1:5000", shared_server.url),
                            shell=True, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user"]["username"] == "dave", result.stdout
    password = json.loads(re.search(r"--data '(.*?)'", curl).group(1))["password"]
    status, _ = http("GET", f"{shared_server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                     headers=basic_auth("dave", password))
    assert status == 200


def test_participant_logs_a_complete_run_to_the_server(shared_server, alice_run, monkeypatch):
    client = server_client(monkeypatch, shared_server, "alice", shared_server.passwords["alice"])
    check_run(client, alice_run["run_id"], alice_run["model_id"], [])
    assert f"Next, open the run page: {shared_server.url}/#/experiments/" in alice_run["stdout"]
    # Nothing local: no store beside demo.py, none in the folder it ran from.
    for folder in (alice_run["workshop"], alice_run["workshop"].parent):
        assert not (folder / "mlflow.db").exists() and not (folder / "mlruns").exists()
    # The files are on the server's disk, under --artifacts-destination.
    on_server = [p.name for p in (shared_server.folder / "mlartifacts").rglob("*") if p.is_file()]
    assert "model.skops" in on_server and "roc_curve.png" in on_server


def test_wrong_password_is_a_clear_error(shared_server, tmp_path):
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    result = run_demo(workshop, env=shared_server.participant_env("alice", "not-her-password-at-all"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert shared_server.url in result.stderr and "401" in result.stderr, result.stderr


def test_foreign_host_header_is_refused(shared_server):
    status, body = http("GET", f"{shared_server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                        headers={"Host": "attacker.example:5000", **basic_auth("admin", ADMIN_PASSWORD)})
    assert status == 403, body


def test_room_server_answers_only_its_allowed_hosts(postgres, tmp_path):
    """The room's command: its --allowed-hosts names pass, any other Host gets 403."""
    allowed = re.search(r'--allowed-hosts "([^"]+)"', readme_snippet("team-server-room")).group(1)
    with team_server(postgres, tmp_path / "room", "mlflow", "team-server-room", fresh=False) as server:
        port = server.url.rsplit(":", 1)[1]
        search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
        for host in allowed.split(","):
            status, body = http("GET", search, headers={"Host": host.replace(":5000", f":{port}"),
                                                        **basic_auth("admin", ADMIN_PASSWORD)})
            assert status == 200, (host, body)
        for host in ("attacker.example", f"localhost:{port}", f"10.0.0.5:{port}"):
            status, _ = http("GET", search, headers={"Host": host, **basic_auth("admin", ADMIN_PASSWORD)})
            assert status == 403, host


def test_registry_champion_is_served_from_the_server(shared_server, alice_run, tmp_path):
    """The README's registry snippet names the best run's model and sets
    @champion; `mlflow models serve` fetches it through the server and predicts."""
    env = shared_server.participant_env("alice", shared_server.passwords["alice"])
    result = subprocess.run([sys.executable, "-c", readme_snippet("registry-python")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "@champion" in result.stdout
    name = re.search(r'models:/([\w-]+)@champion', readme_snippet("registry-serve")).group(1)
    admin = learner_env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    check = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; c = mlflow.MlflowClient(sys.argv[1]); "
         "v = c.get_model_version_by_alias(sys.argv[2], 'champion'); print(v.version, v.run_id)",
         shared_server.url, name], env=admin, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["1", alice_run["run_id"]]  # alice's is the only run there
    assert not (tmp_path / "mlflow.db").exists()

    (serve,) = readme_commands("registry-serve")
    port = free_port()
    with start_server(with_port(serve, port), tmp_path, f"http://127.0.0.1:{port}/ping", env=env,
                      timeout=180, log_name="serve.log"):
        body = re.search(r"--data '(.*)'", readme_snippet("curl-inline").replace("\\\n", " "), re.DOTALL).group(1)
        status, answer = http("POST", f"http://127.0.0.1:{port}/invocations", body,
                              {"Content-Type": "application/json"})
    assert status == 200, answer
    assert json.loads(answer) == {"predictions": [0, 1]}


# %% A room's worth at once


def test_a_room_of_participants_at_once_on_a_fresh_server(postgres, tmp_path, monkeypatch):
    """12 participants start demo.py at the same moment against a new server
    (the experiment does not exist yet): 12 complete runs, none mixed up."""
    with team_server(postgres, tmp_path / "server", "mlflow_room") as server:
        names = [f"participant{index:02d}" for index in range(PARTICIPANTS)]
        for name in names:
            server.create_user(name, f"{name}-password")
        workshops = [make_workshop(tmp_path / name / "mlflow-workshop") for name in names]
        flags = [participant_flags(index) for index in range(PARTICIPANTS)]
        envs = [server.participant_env(name, f"{name}-password") for name in names]
        outcomes, seconds = _wave(workshops, envs, flags)
        client = server_client(monkeypatch, server)
        finished = [run for run in experiment_runs(client) if run.info.status == "FINISHED"]
        print(f"\nshared server load: {PARTICIPANTS} participants, {len(finished)} runs FINISHED, "
              f"{seconds:.1f} s")
        for code, stdout, stderr in outcomes:
            assert code == 0, stdout + stderr
        ids = [printed_ids(stdout) for _, stdout, _ in outcomes]
        assert len({run_id for run_id, _ in ids}) == PARTICIPANTS
        assert len(experiment_runs(client)) == PARTICIPANTS == len(finished)
        for (run_id, model_id), flag_list in zip(ids, flags):
            check_run(client, run_id, model_id, flag_list)
        assert len(client.search_experiments()) == 2  # Default, and one demo-mlflow-artifacts
    for workshop in workshops:
        assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()


def test_two_participants_record_the_same_data_at_one_instant(postgres, tmp_path, monkeypatch):
    """Two runs with the same split log the same dataset at the same instant.
    MLflow's server looks the dataset up, finds nothing, and both insert it:
    one insert fails on the table's unique key. demo.py tries once more, finds
    the other's record, and both runs finish with their datasets.

    The instant is made certain, not hoped for: a lock held here lets both
    look-ups through but holds both inserts until both wait on it."""
    import psycopg2

    with team_server(postgres, tmp_path / "server", "mlflow_same_data") as server:
        names = ["ann", "ben"]
        for name in names:
            server.create_user(name, f"{name}-password")
        holder = psycopg2.connect(host=str(postgres.folder), port=postgres.port, user="postgres",
                                  dbname="mlflow_same_data")
        try:
            with holder.cursor() as cursor:
                cursor.execute("LOCK TABLE datasets IN SHARE MODE")  # reads pass, inserts wait
            processes = [
                subprocess.Popen([sys.executable, str(make_workshop(tmp_path / name / "mlflow-workshop") / "demo.py")],
                                 cwd=tmp_path / name, env=server.participant_env(name, f"{name}-password"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in names
            ]
            try:
                deadline = time.monotonic() + 240
                waiting = 0
                while waiting < 2:
                    assert time.monotonic() < deadline, "both inserts never waited on the lock"
                    assert all(process.poll() is None for process in processes), \
                        [process.communicate() for process in processes]
                    time.sleep(0.2)
                    with psycopg2.connect(host=str(postgres.folder), port=postgres.port, user="postgres",
                                          dbname="mlflow_same_data") as watcher, watcher.cursor() as cursor:
                        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND query LIKE 'INSERT INTO datasets%'")
                        (waiting,) = cursor.fetchone()
                holder.commit()  # both inserts go: the second meets the first's row
                outcomes = [process.communicate(timeout=240) for process in processes]
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
        finally:
            holder.close()
        for process, (stdout, stderr) in zip(processes, outcomes):
            assert process.returncode == 0, stdout + stderr
        client = server_client(monkeypatch, server)
        runs = experiment_runs(client)
        assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
        for stdout, _ in outcomes:
            run_id, model_id = printed_ids(stdout)
            check_run(client, run_id, model_id, [])
        # One record per dataset, shared by both runs.
        with psycopg2.connect(host=str(postgres.folder), port=postgres.port, user="postgres",
                              dbname="mlflow_same_data") as reader, reader.cursor() as cursor:
            cursor.execute("SELECT name, count(*) FROM datasets GROUP BY name ORDER BY name")
            assert cursor.fetchall() == [("breast_cancer_testing", 1), ("breast_cancer_training", 1)]
            cursor.execute("SELECT count(*) FROM inputs WHERE destination_type = 'RUN'")
            assert cursor.fetchone() == (4,)


def _wave(workshops, envs, flags, in_workshop=False, during=None):
    """Each participant runs demo.py from their own copy, all at once: from the
    folder above it, or from the workshop folder itself (`in_workshop`);
    `during(processes)` runs while they work."""
    started = time.monotonic()
    processes = [
        subprocess.Popen([sys.executable, str(workshop / "demo.py"), *flag_list],
                         cwd=workshop if in_workshop else workshop.parent,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for workshop, env, flag_list in zip(workshops, envs, flags)
    ]
    outcomes = []
    try:
        if during:
            during(processes)
        for process in processes:
            remaining = max(1.0, LOAD_TIMEOUT - (time.monotonic() - started))
            stdout, stderr = process.communicate(timeout=remaining)
            outcomes.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcomes, time.monotonic() - started


def test_participants_at_once_on_a_new_local_store(tmp_path):
    """4 runs of demo.py at once in one fresh folder: the first-time creation of
    mlflow.db and of the experiment happens under a race, and all 4 runs land."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    flags = [participant_flags(index) for index in range(LOCAL_PARTICIPANTS)]
    outcomes, seconds = _wave([workshop] * LOCAL_PARTICIPANTS, [learner_env()] * LOCAL_PARTICIPANTS, flags)
    client = MlflowClient(tracking_uri=f"sqlite:///{workshop / 'mlflow.db'}")
    finished = [run for run in experiment_runs(client) if run.info.status == "FINISHED"]
    print(f"\nlocal SQLite load: {LOCAL_PARTICIPANTS} participants, {len(finished)} runs FINISHED, {seconds:.1f} s")
    for code, stdout, stderr in outcomes:
        assert code == 0, stdout + stderr
    ids = [printed_ids(stdout) for _, stdout, _ in outcomes]
    assert len(experiment_runs(client)) == LOCAL_PARTICIPANTS == len(finished)
    for (run_id, model_id), flag_list in zip(ids, flags):
        check_run(client, run_id, model_id, flag_list)
    assert len(client.search_experiments()) == 2
    # The registry snippet works on the local store too, from the workshop folder.
    result = subprocess.run([sys.executable, "-c", readme_snippet("registry-python")], env=learner_env(),
                            cwd=workshop, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    name = re.search(r'models:/([\w-]+)@champion', readme_snippet("registry-serve")).group(1)
    champion = client.get_model_version_by_alias(name, "champion")
    # Only the runs tested on the default test set compete.
    default_split = [run for run in finished if (run.data.params["seed"], run.data.params["test_size"]) == ("42", "0.25")]
    assert len(default_split) == sum("--seed" not in flag_list for flag_list in flags) == LOCAL_PARTICIPANTS // 2
    best = max(default_split, key=lambda run: run.data.metrics["accuracy"])
    assert client.get_run(champion.run_id).data.metrics["accuracy"] == best.data.metrics["accuracy"]
    assert client.get_run(champion.run_id).data.params["seed"] == "42"


# %% Faults


def test_server_restart_loses_no_run(postgres, tmp_path, monkeypatch):
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    port = free_port()
    with team_server(postgres, tmp_path / "server", "mlflow_restart", port=port) as server:
        server.create_user("erin", "erin-long-password")
        env = server.participant_env("erin", "erin-long-password")
        first = run_demo(workshop, "--n-estimators", "20", env=env)
        assert first.returncode == 0, first.stdout + first.stderr
    # The server is stopped (its whole process group); start it again, same port.
    with team_server(postgres, tmp_path / "server", "mlflow_restart", port=port, fresh=False) as server:
        second = run_demo(workshop, "--n-estimators", "30", env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        client = server_client(monkeypatch, server)
        assert len(experiment_runs(client)) == 2
        check_run(client, *printed_ids(first.stdout), ["--n-estimators", "20"])
        check_run(client, *printed_ids(second.stdout), ["--n-estimators", "30"])


def test_participant_with_server_down_gets_a_clear_error_quickly(tmp_path):
    """No PostgreSQL needed: nothing listens on the port at all."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    url = f"http://127.0.0.1:{free_port()}"
    env = learner_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="alice",
                      MLFLOW_TRACKING_PASSWORD="alice-long-password")
    started = time.monotonic()
    result = run_demo(workshop, "--n-estimators", "10", env=env, timeout=120)
    seconds = time.monotonic() - started
    print(f"\nserver down: demo.py gave up after {seconds:.1f} s")
    assert result.returncode != 0
    assert seconds < 30
    assert "Traceback" not in result.stderr, result.stderr
    assert url in result.stderr, result.stderr
    assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()
