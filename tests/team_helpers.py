"""What tests/test_team_server.py and tests/test_team_stack.py share: the
guides' steps run for real (docs/team-server.md and docs/team-stack.md), the
participants, and the attacks a room of strangers could try.

Every command, file and script comes from the guides through `readme_snippet`,
with only ports, folders and the room's address changed: the room is
127.0.0.2 (a loopback address that MLflow, like a public address, does not
accept without `--allowed-hosts`) instead of the guides' 192.168.1.20. Tests
talk to nothing but 127.0.0.1 and 127.0.0.2.
"""

import base64
import glob
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    EXPERIMENT,
    MODEL_FILES,
    PAGE_TIMEOUT_MS,
    PLOTS,
    README,
    REPORT,
    REPO,
    expected_params,
    free_port,
    learner_env,
    make_workshop,
    readme_commands,
    readme_snippet,
    start_server,
    stop_process_group,
)

GUIDE_ROOM = "192.168.1.20"  # the room's address in the guides
ROOM_HOST = "127.0.0.2"  # the room's address in the tests
PREFIX = EXPERIMENT + "-"  # on a server: demo-mlflow-artifacts-<account>
MODEL = "breast-cancer-classifier"
CHAMPIONS = "room-champions"
METRICS = ["accuracy", "roc_auc", "precision", "recall", "f1"]
TAGS = ["model_type", "dataset", "owner", "mlflow.note.content"]
DATASETS = {"breast_cancer_training": "training", "breast_cancer_testing": "testing"}
LOAD_TIMEOUT = 600  # seconds for a whole wave of participants


def missing(what, hint):
    """Skip with a hint (conftest.py makes it a failure under CI=true, where CI installs everything)."""
    pytest.skip(f"{what}. {hint}")


def as_typed(script):
    """A guide's script as this user can run it: root needs no sudo."""
    if os.geteuid() != 0:
        return script
    return script.replace("sudo -u postgres ", "runuser -u postgres -- ").replace("sudo ", "")


def bash(script, cwd, env=None, timeout=300, check=True):
    """Run a guide's bash lines, stopping at the first that fails."""
    result = subprocess.run(["bash", "-c", "set -e\n" + script], cwd=cwd, env=env or learner_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    return result


def read_env_file(path):
    """NAME -> value of a KEY=value file such as room.env."""
    values = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            values[name] = value.strip("'\"")
    return values


def basic_auth(username, password):
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def free_port_on(address, avoid=()):
    """A port free on `address` (and on 127.0.0.1, where servers also bind)."""
    while True:
        port = free_port()
        if port in avoid:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
        return port


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
    missing(reason, "These tests start a throw-away PostgreSQL server; install it with "
                    "`sudo apt-get install postgresql` (Debian/Ubuntu).")


class Postgres:
    def __init__(self, bin_dir, folder, port):
        self.bin_dir, self.folder, self.port = bin_dir, folder, port
        self.data = folder / "data"
        # Root may not run PostgreSQL: run it as the `postgres` user then.
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def ctl(self, *args, timeout=90):
        return subprocess.run([*self.as_owner, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args],
                              capture_output=True, text=True, timeout=timeout)

    @property
    def superuser_psql(self):
        """What stands for the guide's `sudo -u postgres psql`: the superuser
        over the cluster's Unix socket."""
        return f"{self.bin_dir / 'psql'} -h {self.folder} -p {self.port} -U postgres -v ON_ERROR_STOP=1"

    def psql(self, sql, database="postgres"):
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-h", str(self.folder), "-p", str(self.port), "-U", "postgres",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-q", "-At", "-f", "-"],
            input=sql, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, f"psql failed on:\n{sql}\n{result.stderr}"
        return result.stdout

    def postmaster_pid(self):
        return int((self.data / "postmaster.pid").read_text().split()[0])


@contextmanager
def postgres_cluster():
    """A new, empty PostgreSQL cluster on a free port of 127.0.0.1 that asks
    for passwords over TCP, as Debian's does; always stopped and removed."""
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
        init = subprocess.run(
            [*pg.as_owner, str(bin_dir / "initdb"), "-D", str(pg.data), "-U", "postgres", "-E", "UTF8",
             "--auth-local=trust", "--auth-host=scram-sha-256"],
            capture_output=True, text=True, timeout=120,
        )
        assert init.returncode == 0, init.stdout + init.stderr
        started = pg.ctl("start", "-w", "-t", "60", "-l", str(folder / "postgres.log"), "-o",
                         f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder}")
        assert started.returncode == 0, started.stdout + started.stderr
        yield pg
    finally:
        if (pg.data / "postmaster.pid").exists():
            stopped = pg.ctl("stop", "-w", "-t", "30", "-m", "fast")
            if stopped.returncode != 0:
                pg.ctl("stop", "-w", "-t", "30", "-m", "immediate")
        shutil.rmtree(folder, ignore_errors=True)


# %% The guides' steps, with the tests' ports and address


def room_address(text, https_port):
    """The guide's room address replaced with the test's: an origin or URL
    gets the port, as a browser sends it; a Host list too; a name alone not."""
    text = text.replace(f"https://{GUIDE_ROOM}", f"https://{ROOM_HOST}:{https_port}")
    text = text.replace(f'--allowed-hosts "{GUIDE_ROOM}"', f'--allowed-hosts "{ROOM_HOST}:{https_port}"')
    return text.replace(GUIDE_ROOM, ROOM_HOST)


def with_pg_port(text, pg_port):
    return text.replace("127.0.0.1:5432", f"127.0.0.1:{pg_port}")


@contextmanager
def room_folder(prefix):
    """A clone of the workshop in a folder other accounts could enter (as a
    home folder is), with the repository's .gitignore and a git repository, so
    that the guide's own `chmod` is what closes it; always removed."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    harness_logs(folder).mkdir()  # the tests' own logs, beside the room (the guide makes none)
    try:
        os.chmod(folder, 0o755)
        make_workshop(folder)
        shutil.copy(REPO / ".gitignore", folder / ".gitignore")
        subprocess.run(["git", "init", "-q", str(folder)], check=True, capture_output=True, timeout=60)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(harness_logs(folder), ignore_errors=True)


def harness_logs(folder):
    """Where the tests keep what a terminal would show (the servers' output)."""
    return Path(folder).with_name(Path(folder).name + "-terminals")


def make_secrets(folder, pg_port):
    """Step 2 of team-server.md: chmod 700, room.env and .pgpass."""
    bash(with_pg_port(readme_snippet("server-secrets"), pg_port), folder)
    return read_env_file(folder / "room.env")


def make_databases(folder, pg):
    """Step 3 of team-server.md: the user and the two databases, from .pgpass."""
    script = readme_snippet("server-database")
    assert "sudo -u postgres psql <<SQL" in script
    return bash(script.replace("sudo -u postgres psql", pg.superuser_psql), folder)


def write_auth_config(folder, pg_port):
    """Step 4 of team-server.md: basic_auth.ini, as the guide shows it."""
    (folder / "basic_auth.ini").write_text(with_pg_port(readme_snippet("server-auth-config"), pg_port))


def make_certificates(folder, keep_ca_key=False):
    """Step 6 of team-server.md: the room's CA and the server's certificate
    for the test's address (and, to test the CA, its key kept if asked)."""
    script = room_address(readme_snippet("server-certificates"), 0)
    if keep_ca_key:
        script = script.replace("rm room-ca.key", "")
    bash(script, folder)
    return folder / "room-ca.crt"


def server_script(snippet, pg_port, port, https_port, s3_port=None):
    """A guide's `mlflow server` lines with the test's ports and address."""
    script = room_address(with_pg_port(readme_snippet(snippet), pg_port), https_port)
    script = re.sub(r"--port \d+", f"--port {port}", script)
    if s3_port:
        script = script.replace("MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:8333",
                                f"MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:{s3_port}")
        assert f"127.0.0.1:{s3_port}" in script, script
    return script


def start_mlflow(folder, script, port, name):
    """A server started as the guide says, in its own process group."""
    harness_logs(folder).mkdir(exist_ok=True)
    return start_server(script, folder, f"http://127.0.0.1:{port}/health", timeout=240,
                        log_name=str(harness_logs(folder) / f"{name}.log"))


def stop_like_ctrl_c(process, timeout=120):
    """Ctrl+C in a terminal: SIGINT to the foreground process group. The
    server must stop by itself; anything left is then killed by the group."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    finally:
        stop_process_group(process)
    return process.returncode


def nginx_conf(folder, https_port, http_port, upstream_ports, upstream=None):
    """team-server.md's nginx.conf with the test's ports and address, and
    `upstream` (a guide's upstream block) in place of its own."""
    conf = room_address(readme_snippet("server-nginx"), https_port)
    if upstream is not None:
        conf, count = re.subn(r"    upstream mlflow \{.*?\n    \}\n", upstream.replace("\\", "\\\\"), conf,
                              flags=re.DOTALL)
        assert count == 1, conf
    conf, count = re.subn(r"listen 443 ssl", f"listen {ROOM_HOST}:{https_port} ssl", conf)
    assert count == 2, conf
    conf, count = re.subn(r"listen 80 default_server", f"listen {ROOM_HOST}:{http_port} default_server", conf)
    assert count == 1, conf
    guide_ports = [int(port) for port in re.findall(r"server 127\.0\.0\.1:(\d+)", conf)]
    assert len(guide_ports) == len(upstream_ports), conf
    for old, new in zip(guide_ports, upstream_ports):
        conf = conf.replace(f"server 127.0.0.1:{old}", f"server 127.0.0.1:{new}")
    (folder / "nginx.conf").write_text(conf)
    return conf


@contextmanager
def nginx(folder):
    """The guide's start command; stopped with the guide's `-s stop` line."""
    bash(as_typed(readme_snippet("server-nginx-start")), folder)
    conf = (folder / "nginx.conf").read_text()
    https_port = int(re.search(rf"listen {re.escape(ROOM_HOST)}:(\d+) ssl", conf).group(1))
    pid_file = folder / "logs" / "nginx.pid"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection((ROOM_HOST, https_port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, (folder / "logs" / "error.log").read_text()
                time.sleep(0.1)
        yield int(pid_file.read_text())
    finally:
        (stop,) = [line for line in readme_commands("server-stop") if "nginx" in line]
        master = int(pid_file.read_text())
        stopped = bash(as_typed(stop), folder, check=False)
        deadline = time.monotonic() + 60
        while _alive(master) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(master):
            os.kill(master, signal.SIGKILL)
        assert stopped.returncode == 0, stopped.stderr


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# %% The room as a whole


class Room:
    """A room's server (one, or the stack's replicas) behind nginx on
    https://127.0.0.2:<port>, with the guide's files in `folder`."""

    def __init__(self, folder, pg, https_port, http_port):
        self.folder, self.pg = folder, pg
        self.https_port, self.http_port = https_port, http_port
        self.url = f"https://{ROOM_HOST}:{https_port}"
        self.origin = self.url
        self.ca = folder / "room-ca.crt"
        self.servers = {}  # name -> Popen, each its own process group
        self.nginx_pid = None
        self.passwords = {}

    @property
    def admin_password(self):
        return read_env_file(self.folder / "room.env")["MLFLOW_AUTH_ADMIN_PASSWORD"]

    @property
    def secrets(self):
        """Every secret the guides made, as values."""
        values = read_env_file(self.folder / "room.env")
        secret = [values[name] for name in values if re.search(r"PASSWORD|SECRET", name)]
        secret.append((self.folder / ".pgpass").read_text().strip().split(":")[-1])
        return secret + list(self.passwords.values())

    def admin_env(self, **more):
        """A terminal after team-server.md's step-8 lines (address and port the test's)."""
        script = room_address(readme_snippet("server-admin-env"), self.https_port)
        env = learner_env()
        out = bash(script + "\nenv -0", self.folder, env).stdout
        env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
        env.update(more)
        return env

    def participant_env(self, workshop, username, password):
        """A participant's terminal after the README's lines, with room-ca.crt
        saved in the workshop folder."""
        names = set(re.findall(r"^export (\w+)=", readme_snippet("shared-server-bash"), re.MULTILINE))
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names
        assert "MLFLOW_TRACKING_SERVER_CERT_PATH=room-ca.crt" in README
        shutil.copy(self.ca, Path(workshop) / "room-ca.crt")
        return learner_env(MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_SERVER_CERT_PATH="room-ca.crt",
                           MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)

    def accounts(self, names, env=None):
        """team-server.md's accounts.py with these names, run as the guide
        says; {name: password} from what it prints."""
        code = readme_snippet("server-accounts")
        code, count = re.subn(r'^NAMES = \[.*?\]', f"NAMES = {names!r}", code, flags=re.MULTILINE)
        assert count == 1
        (self.folder / "accounts.py").write_text(code)
        result = subprocess.run([sys.executable, "accounts.py"], cwd=self.folder, env=env or self.admin_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        printed = dict(line.split() for line in result.stdout.splitlines())
        assert sorted(printed) == sorted(names), result.stdout
        self.passwords.update(printed)
        return printed

    def crown(self):
        """team-server.md's crown.py, as the admin."""
        (self.folder / "crown.py").write_text(readme_snippet("server-crown"))
        return subprocess.run([sys.executable, "crown.py"], cwd=self.folder, env=self.admin_env(),
                              capture_output=True, text=True, timeout=600)

    def client(self, monkeypatch, username="admin", password=None):
        from mlflow import MlflowClient

        password = password or self.admin_password
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(self.ca))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.url)  # for models:/ URIs too
        return MlflowClient(tracking_uri=self.url)

    def request(self, method, path, username=None, body=None, headers=None, timeout=60):
        """(status, text, headers) of one request to the room over https."""
        headers = dict(headers or {})
        if username:
            password = self.admin_password if username == "admin" else self.passwords[username]
            headers.update(basic_auth(username, password))
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        return https(method, self.url + path, self.ca, body, headers, timeout)

    def workshops(self, tmp_path, names):
        return [make_workshop(tmp_path / name / "mlflow-workshop") for name in names]


def https(method, url, ca_file, body=None, headers=None, timeout=60):
    """(status, text, headers) over https, trusting only the room's CA."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read().decode(errors="replace"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace"), dict(error.headers)


def build_base(folder, pg, https_port):
    """Steps 2, 3, 4 and 6 of team-server.md, shared by both guides."""
    secrets = make_secrets(folder, pg.port)
    make_databases(folder, pg)
    write_auth_config(folder, pg.port)
    make_certificates(folder)
    return secrets


# %% Participants


def participant_flags(index):
    """Different flags for each participant, so a mix-up between runs shows;
    every other one keeps the default test set (`--seed` unset)."""
    seed = ["--seed", str(100 + index)] if index % 2 else []
    return ["--n-estimators", str(5 + index), "--max-depth", str(2 + index % 7), *seed]


def wave(workshops, envs, flags, during=None):
    """Each participant runs demo.py from their workshop folder (where they
    saved room-ca.crt), all at once; `during(processes)` runs while they work."""
    started = time.monotonic()
    processes = [
        subprocess.Popen([sys.executable, "demo.py", *flag_list], cwd=workshop, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def room_runs(client):
    """Every run in the participants' experiments (demo-mlflow-artifacts-*)."""
    experiments = client.search_experiments(filter_string=f"name LIKE '{PREFIX}%'")
    ids = [experiment.experiment_id for experiment in experiments]
    return client.search_runs(ids, max_results=1000) if ids else []


def check_run(client, run_id, model_id, flags):
    """Everything demo.py logs is there, and belongs to this run and these flags."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "random_forest_breast_cancer"
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
    assert sorted(f.path for f in client.list_artifacts(run_id)) == [REPORT, "plots"]
    plots = client.list_artifacts(run_id, "plots")
    assert sorted(f.path for f in plots) == PLOTS
    assert all(f.file_size > 0 for f in plots)
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run_id and model.name == "model"
    files = sorted(f.path for f in client.list_logged_model_artifacts(model_id))
    assert files == MODEL_FILES, (model_id, files)
    return run


def check_wave(client, outcomes, names, flags):
    """Every participant's run finished, complete, in their own experiment."""
    from conftest import printed_ids

    for code, stdout, stderr in outcomes:
        assert code == 0, stdout + stderr
    for (_, stdout, _), name, flag_list in zip(outcomes, names, flags):
        run_id, model_id = printed_ids(stdout)
        run = check_run(client, run_id, model_id, flag_list)
        assert client.get_experiment(run.info.experiment_id).name == PREFIX + name
        assert run.data.tags["owner"] == name


# %% Measuring the servers


class Watch:
    """Samples, while a wave runs, the memory of each server (the sum of its
    processes' resident memory) and every process's arguments, in which no
    secret may appear (what `ps` shows every account)."""

    def __init__(self, servers, secrets):
        self.servers, self.secrets = servers, [s for s in secrets if s]
        self.peak = {name: 0 for name in servers}
        self.leaks = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for name, roots in self.servers.items():
                total = 0
                for process in tree(roots()):
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak[name] = max(self.peak[name], total)
            self.leaks += secrets_in_arguments(self.secrets)
            self._stop.wait(0.5)

    def report(self):
        return ", ".join(f"{name} {peak / 2**20:.0f} MiB" for name, peak in self.peak.items())


def tree(roots):
    """The processes with these PIDs, or in these process groups, and all their children."""
    import psutil

    found = {}
    for root in roots:
        kind, number = root
        candidates = []
        if kind == "pid":
            try:
                candidates = [psutil.Process(number)]
            except psutil.Error:
                continue
        else:  # a process group
            for process in psutil.process_iter():
                try:
                    if os.getpgid(process.pid) == number:
                        candidates.append(process)
                except (OSError, psutil.Error):
                    pass
        for process in candidates:
            try:
                for member in [process, *process.children(recursive=True)]:
                    found[member.pid] = member
            except psutil.Error:
                pass
    return list(found.values())


def secrets_in_arguments(secrets):
    """(pid, argument) of every process on the machine whose arguments hold a secret."""
    import psutil

    leaks = []
    for process in psutil.process_iter():
        try:
            arguments = " ".join(process.cmdline())
        except psutil.Error:
            continue
        leaks += [(process.pid, arguments) for secret in secrets if secret in arguments]
    return leaks


def nginx_pids(folder):
    return [("pid", int((Path(folder) / "logs" / "nginx.pid").read_text()))]


# %% Attacks: what a participant must not be able to do


def api(room, method, path, username, body=None, **more):
    status, text, _ = room.request(method, path, username, body, **more)
    return status, text


def refused(status):
    return status in (401, 403)


def attack_another_participant(room, attacker, victim, run_id, model_id, experiment_id):
    """`attacker` tries everything on `victim`'s run, experiment, logged model
    and files, and writes files where nobody's run is. Returns {what: status}
    of every attempt; the caller checks they were all refused."""
    proxy = "/api/2.0/mlflow-artifacts/artifacts"
    attempts = {
        "set a tag on the run": ("POST", "/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "owner", "value": attacker}),
        "change a metric": ("POST", "/api/2.0/mlflow/runs/log-metric",
                            {"run_id": run_id, "key": "accuracy", "value": 0.01, "timestamp": 0, "step": 0}),
        "rename the run": ("POST", "/api/2.0/mlflow/runs/update", {"run_id": run_id, "run_name": "hacked"}),
        "delete the run": ("POST", "/api/2.0/mlflow/runs/delete", {"run_id": run_id}),
        "log into the experiment": ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": experiment_id}),
        "rename the experiment": ("POST", "/api/2.0/mlflow/experiments/update",
                                  {"experiment_id": experiment_id, "new_name": "hacked"}),
        "delete the experiment": ("POST", "/api/2.0/mlflow/experiments/delete", {"experiment_id": experiment_id}),
        "grant itself the experiment": ("POST", "/api/2.0/mlflow/experiments/permissions/create",
                                        {"experiment_id": experiment_id, "username": attacker, "permission": "MANAGE"}),
        "tag the logged model": ("PATCH", f"/api/2.0/mlflow/logged-models/{model_id}/tags",
                                 {"tags": [{"key": "k", "value": "v"}]}),
        "delete the logged model": ("DELETE", f"/api/2.0/mlflow/logged-models/{model_id}", None),
        "claim the experiment's name": ("POST", "/api/2.0/mlflow/experiments/create", {"name": PREFIX + victim}),
        "overwrite the report": ("PUT", f"{proxy}/{experiment_id}/{run_id}/artifacts/{REPORT}", "hacked"),
        "add a file to the run": ("PUT", f"{proxy}/{experiment_id}/{run_id}/artifacts/extra.txt", "hacked"),
        "overwrite the model": ("PUT", f"{proxy}/{experiment_id}/models/{model_id}/artifacts/MLmodel", "hacked"),
        "delete the model's file": ("DELETE", f"{proxy}/{experiment_id}/models/{model_id}/artifacts/model.skops", None),
        "write beside the experiment": ("PUT", f"{proxy}/{experiment_id}/evil.txt", "hacked"),
        "write outside any experiment": ("PUT", f"{proxy}/evil-root.txt", "hacked"),
        "write into no experiment": ("PUT", f"{proxy}/999999/evil.txt", "hacked"),
        "write up and over": ("PUT", f"{proxy}/0/../{experiment_id}/{run_id}/artifacts/up.txt", "hacked"),
        "write up and over, encoded": ("PUT", f"{proxy}/0/%2e%2e/{experiment_id}/{run_id}/artifacts/up.txt", "hacked"),
        "start a multipart upload": ("POST", f"/api/2.0/mlflow-artifacts/mpu/create/{experiment_id}/{run_id}/artifacts/big.bin",
                                     {"path": f"{experiment_id}/{run_id}/artifacts/big.bin", "num_parts": 1}),
    }
    outcome = {}
    for what, (method, path, body) in attempts.items():
        outcome[what] = api(room, method, path, attacker, body)[0]
    return outcome


def attack_the_registry(room, attacker, model_id):
    """`attacker` tries to crown, uncrown or change the champion through the registry."""
    name = MODEL
    attempts = {
        "create a version": ("POST", "/api/2.0/mlflow/model-versions/create",
                             {"name": name, "source": f"models:/{model_id}", "model_id": model_id}),
        "move @champion": ("POST", "/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": "champion", "version": "1"}),
        "delete @champion": ("DELETE", "/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": "champion"}),
        "rename the model": ("POST", "/api/2.0/mlflow/registered-models/rename", {"name": name, "new_name": "hacked"}),
        "delete the model": ("DELETE", "/api/2.0/mlflow/registered-models/delete", {"name": name}),
        "delete version 1": ("DELETE", "/api/2.0/mlflow/model-versions/delete", {"name": name, "version": "1"}),
        "tag version 1": ("POST", "/api/2.0/mlflow/model-versions/set-tag", {"name": name, "version": "1", "key": "k", "value": "v"}),
        "describe version 1": ("PATCH", "/api/2.0/mlflow/model-versions/update", {"name": name, "version": "1", "description": "x"}),
        "grant itself the model": ("POST", "/api/2.0/mlflow/registered-models/permissions/create",
                                   {"name": name, "username": attacker, "permission": "MANAGE"}),
    }
    return {what: api(room, method, path, attacker, body)[0] for what, (method, path, body) in attempts.items()}


def model_files(room, model_id, folder):
    """{file: sha256} of a logged model's files, downloaded through the room
    (with the credentials a `room.client` put in the environment)."""
    import mlflow

    from mlflow import MlflowClient

    Path(folder).mkdir(parents=True)
    location = MlflowClient(room.url).get_logged_model(model_id).artifact_location
    folder = Path(mlflow.artifacts.download_artifacts(location, dst_path=str(folder), tracking_uri=room.url))
    return {str(path.relative_to(folder)): sha256(path) for path in folder.rglob("*") if path.is_file()}


# %% TLS, CORS, the upload cap, the UI


def tls_handshake(port, ca_file, version=None, ciphers=None):
    """(TLS version, cipher) the room's nginx agrees to, or the reason it refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    if version:
        # Let this client offer old protocols and ciphers: what is refused is nginx's doing.
        context.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
        with warnings.catch_warnings():  # Python calls them deprecated, which is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
    elif ciphers:
        context.set_ciphers(ciphers)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((ROOM_HOST, port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname=ROOM_HOST) as tls:
                return tls.version(), tls.cipher()[0]
    except ssl.SSLError as error:
        return "refused", error.reason


def check_tls(room):
    """TLS 1.3 by default; TLS 1.2 only with ECDHE and AEAD; 1.0 and 1.1 refused."""
    assert tls_handshake(room.https_port, room.ca)[0] == "TLSv1.3"
    for cipher in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"):
        assert tls_handshake(room.https_port, room.ca, ciphers=cipher) == ("TLSv1.2", cipher)
    # No forward secrecy (RSA key exchange), or no AEAD (CBC): the server refuses the handshake.
    for cipher in ("AES128-GCM-SHA256", "AES256-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"):
        assert tls_handshake(room.https_port, room.ca, ciphers=cipher) == ("refused", "SSLV3_ALERT_HANDSHAKE_FAILURE"), cipher
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        assert tls_handshake(room.https_port, room.ca, version=version) == ("refused", "TLSV1_ALERT_PROTOCOL_VERSION"), version


def check_plain_http_only_redirects(room):
    """Port 80 (here the test's): a 301 to https, and nothing from MLflow, even with a password."""
    for path in ("/", "/api/2.0/mlflow/experiments/search?max_results=1"):
        request = urllib.request.Request(f"http://{ROOM_HOST}:{room.http_port}{path}",
                                         headers=basic_auth("admin", room.admin_password))

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.build_opener(NoRedirect).open(request, timeout=30)
        assert answer.value.code == 301
        assert answer.value.headers["Location"] == f"https://{ROOM_HOST}{path}"
        assert "experiments" not in answer.value.read().decode(errors="replace")


def check_upload_cap(room, username, experiment_id, run_id):
    """A file above nginx's cap gets 413 before any of it reaches MLflow;
    one below it lands."""
    cap = re.search(r"client_max_body_size (\d+)m;", readme_snippet("server-nginx")).group(1)
    cap_bytes = int(cap) * 2**20
    path = f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts"
    password = room.passwords[username]
    # Announce one byte more than the cap: nginx answers from the headers alone.
    context = ssl.create_default_context(cafile=str(room.ca))
    with socket.create_connection((ROOM_HOST, room.https_port), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname=ROOM_HOST) as tls:
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            tls.sendall((f"PUT {path}/too-big.bin HTTP/1.1\r\nHost: {ROOM_HOST}:{room.https_port}\r\n"
                         f"Authorization: Basic {token}\r\nContent-Length: {cap_bytes + 1}\r\n"
                         "Connection: close\r\n\r\n").encode() + b"\0" * 65536)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # 1 MB goes through (the demo's model is a few of these).
    status, _, _ = room.request("PUT", f"{path}/fits.bin", username, b"\0" * 2**20)
    assert status == 200
    return cap_bytes


def check_cors(room, username):
    """The UI's origin may POST; any other origin is refused, and gets no CORS permission."""
    search = "/api/2.0/mlflow/runs/search"
    body = {"experiment_ids": ["0"], "max_results": 1}
    status, _, headers = room.request("POST", search, username, body, headers={"Origin": room.origin})
    assert status == 200
    for origin in ("https://evil.example", f"https://{ROOM_HOST}.evil.example", f"http://{ROOM_HOST}:{room.https_port}"):
        status, text, headers = room.request("POST", search, username, body, headers={"Origin": origin})
        assert status == 403 and "Cross-origin request blocked" in text, (origin, status, text)
        assert headers.get("Access-Control-Allow-Origin") in (None, room.origin), headers
    # A preflight from elsewhere gets no permission either.
    status, _, headers = room.request("OPTIONS", search, None, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert headers.get("Access-Control-Allow-Origin") not in ("*", "https://evil.example"), headers


def browser_or_fail():
    try:
        import playwright.sync_api
    except ImportError:
        missing("The playwright package is missing", "python -m pip install -r requirements-dev.txt")
    if not Path(CHROMIUM).is_file():
        missing("No Chromium found", "Install Debian's with `apt-get install chromium`.")
    return playwright.sync_api


def check_ui_in_chromium(room, username, experiments, runs, tmp_path):
    """Chromium on the room's address, as a participant: without the room's
    CA the page is a certificate error; past it, the UI lists the
    participants' experiments, and ticking them and clicking Compare shows
    their `runs` runs together; every call the page makes is answered. A page
    from another origin cannot use the participant's login."""
    sync_api = browser_or_fail()
    answers, page_errors = [], []
    with sync_api.sync_playwright() as playwright:
        # A browser that does not know the room's CA.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            with pytest.raises(sync_api.Error, match="ERR_CERT_AUTHORITY_INVALID"):
                browser.new_page().goto(room.url)
        finally:
            browser.close()
        # The participant accepted the warning for this address.
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 1280, "height": 800}, ignore_https_errors=True,
            http_credentials={"username": username, "password": room.passwords[username]},
        )
        try:
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            sync_api.expect.set_options(timeout=PAGE_TIMEOUT_MS)
            context.on("response", lambda response: answers.append((response.request.method, response.url, response.status)))
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(f"{room.url}/#/experiments")
            try:
                for name in experiments:
                    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
                    row.get_by_role("checkbox").check()
            except sync_api.TimeoutError as error:  # say what the page was answered, to tell a slow page from a refusal
                raise AssertionError(f"{error}\nanswers of 400 or more: {[a for a in answers if a[2] >= 400]}") from None
            page.get_by_role("button", name="Compare").click()
            sync_api.expect(page.get_by_text(f"Displaying Runs from {len(experiments)} Experiments")).to_be_visible()
            sync_api.expect(page.get_by_text(f"{runs} matching runs")).to_be_visible()
            sync_api.expect(page.get_by_text("random_forest_breast_cancer")).to_have_count(runs)
            sync_api.expect(page.get_by_text("Request error")).to_have_count(0)
            searches = [a for a in answers if a[0] == "POST" and a[1].endswith("/runs/search")]
            assert searches and all(status == 200 for _, _, status in searches), searches
            api_calls = [a for a in answers if "/ajax-api/" in a[1] or "/api/" in a[1]]
            assert api_calls and all(status < 400 for _, _, status in api_calls), [a for a in api_calls if a[2] >= 400]

            # A page from another origin (served here by the browser itself,
            # no network) tries to use the login the browser holds.
            evil = "https://evil.example/"
            page.route(evil, lambda route: route.fulfill(status=200, content_type="text/html", body="<p>hello</p>"))
            page.goto(evil)
            outcome = page.evaluate("""async (url) => {
                try {
                    const response = await fetch(url + "/ajax-api/2.0/mlflow/runs/search", {
                        method: "POST", credentials: "include", headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({experiment_ids: ["0"], max_results: 1})});
                    return "read " + response.status;
                } catch (error) { return "blocked"; }
            }""", room.url)
            assert outcome == "blocked", outcome
        finally:
            context.close()
    assert not page_errors, page_errors


# %% Password guessing


def check_guessing_is_slowed(room, tmp_path, upstream_ports, upstream=None):
    """A second nginx from the guide's nginx.conf (its own counters), in
    front of the room's servers. A burst of wrong passwords from one address
    is answered one per interval, while a right password passes at once; with
    every allowed request open, one more is refused before it reaches MLflow.
    Returns the seconds the burst took."""
    folder = tmp_path / "guessing"
    folder.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(room.folder / name, folder / name)
    https_port = free_port_on(ROOM_HOST, avoid=(room.https_port, room.http_port))
    http_port = free_port_on(ROOM_HOST, avoid=(room.https_port, room.http_port, https_port))
    conf = nginx_conf(folder, https_port, http_port, upstream_ports, upstream)
    interval = 60 / int(re.search(r"zone=wrong_passwords:\w+ rate=(\d+)r/m", conf).group(1))
    per_address = int(re.search(r"limit_conn per_address (\d+);", conf).group(1))
    base = f"https://{ROOM_HOST}:{https_port}/api/2.0/mlflow/experiments/search"
    # The Host the room's server answers: the room's own address.
    host = {"Host": f"{ROOM_HOST}:{room.https_port}"}
    with nginx(folder):
        guesses, statuses = 8, []

        def guess(index):
            statuses.append(https("GET", f"{base}?max_results=1", room.ca,
                                  headers={**host, **basic_auth("admin", f"guess-{index}")}, timeout=600)[0])

        started = time.monotonic()
        threads = [threading.Thread(target=guess, args=(index,)) for index in range(guesses)]
        for thread in threads:
            thread.start()
        # The right password, meanwhile, from the same address.
        right = https("GET", f"{base}?max_results=2", room.ca, headers={**host, **basic_auth("admin", room.admin_password)})[0]
        for thread in threads:
            thread.join(timeout=900)
        took = time.monotonic() - started
        assert right == 200
        assert statuses == [401] * guesses, statuses
        # nginx answers at most one wrong password per interval, after the first.
        assert took >= (guesses - 1) * interval, took
        delays = [line for line in (folder / "logs" / "error.log").read_text().splitlines()
                  if 'delaying request' in line and 'zone "wrong_passwords"' in line]
        assert delays and not any("max_results=2" in line for line in delays), delays

        # Take every request slot this address has: requests that announce a
        # body and wait for nginx's "100 Continue", which nginx sends only once
        # it has counted the request. The next request is then refused.
        context = ssl.create_default_context(cafile=str(room.ca))
        held = []
        try:
            for _ in range(per_address):
                tls = context.wrap_socket(socket.create_connection((ROOM_HOST, https_port), timeout=60),
                                          server_hostname=ROOM_HOST)
                held.append(tls)
                tls.sendall(f"PUT /held HTTP/1.1\r\nHost: {ROOM_HOST}:{https_port}\r\nContent-Length: 10\r\n"
                            "Expect: 100-continue\r\n\r\n".encode())
                assert tls.recv(100).startswith(b"HTTP/1.1 100 Continue")
            status, _, _ = https("GET", f"{base}?max_results=3", room.ca,
                                 headers={**host, **basic_auth("admin", room.admin_password)})
            assert status == 429
        finally:
            for tls in held:
                tls.close()
        assert 'limiting connections by zone "per_address"' in (folder / "logs" / "error.log").read_text()
    return took
