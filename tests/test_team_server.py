"""docs/team-server.md, built for real: PostgreSQL, one `mlflow server` with
the basic-auth app, the room's CA, nginx with TLS in front, the accounts
script and the champion's crowning. The guide's own commands, files and
scripts run with only ports, folders and the room's address changed (the
room is https://127.0.0.2:<port>). Participants are real demo.py
subprocesses; the attacks a room of strangers could try are sent for real,
and each must be refused.

Without PostgreSQL, nginx, openssl or Chromium these tests are skipped with a
hint, except under CI=true, where they fail: CI installs them (`.ci/run`).
"""

import json
import os
import re
import shutil
import subprocess
import socket
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import (
    PAGES,
    README,
    REPO,
    STOP_HOOK,
    WORKSHOP_FILES,
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
from team_helpers import (
    CHAMPIONS,
    EXPERIMENT,
    GUIDE_ROOM,
    MODEL,
    PREFIX,
    ROOM_HOST,
    Room,
    Watch,
    as_typed,
    attack_another_participant,
    attack_the_registry,
    bash,
    basic_auth,
    build_base,
    check_cors,
    check_guessing_is_slowed,
    check_plain_http_only_redirects,
    check_run,
    check_tls,
    check_ui_in_chromium,
    check_upload_cap,
    check_wave,
    free_port_on,
    make_certificates,
    make_secrets,
    missing,
    model_files,
    nginx,
    nginx_conf,
    nginx_pids,
    participant_flags,
    postgres_bin_dir,
    postgres_cluster,
    read_env_file,
    refused,
    room_folder,
    room_runs,
    secrets_in_arguments,
    server_script,
    start_mlflow,
    stop_like_ctrl_c,
    tree,
    wave,
)

PARTICIPANTS = 12  # a workshop room's worth, all at once
LOCAL_PARTICIPANTS = 4  # at once against the local SQLite store


def needs(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            missing(f"`{tool}` not found", "The team-server tests need nginx and openssl "
                                           "(`sudo apt-get install nginx openssl`).")


def bash_snippets(text):
    return re.findall(r"<!-- snippet: ([\w-]+) -->\s*```bash\n", text)


# %% The guide's files and commands agree with each other


def test_the_guide_is_consistent():
    """Every database URL names the guide's user and databases, carries no
    password, and the install line brings what the tests pin."""
    (install,) = [line for line in readme_commands("server-install") if "pip install" in line]
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    for requirement in re.findall(r'"([^"]+)"', install):
        assert requirement in dev, requirement
    databases = re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", readme_snippet("server-database"))
    assert databases == [("mlflow", "mlflow"), ("mlflow_auth", "mlflow")]
    urls = re.findall(r"postgresql\+psycopg2://(\S+)", readme_snippet("server-command") + readme_snippet("server-auth-config"))
    assert sorted(urls) == ["mlflow@127.0.0.1:5432/mlflow", "mlflow@127.0.0.1:5432/mlflow_auth"]
    assert "127.0.0.1:5432:*:mlflow:" in readme_snippet("server-secrets")  # .pgpass, for that user
    assert "default_permission = READ" in readme_snippet("server-auth-config")
    # The room's address is the same everywhere.
    assert f'--allowed-hosts "{GUIDE_ROOM}" --cors-allowed-origins "https://{GUIDE_ROOM}"' in readme_snippet("server-command")
    assert f"server_name {GUIDE_ROOM};" in readme_snippet("server-nginx")
    assert f"MLFLOW_TRACKING_URI=https://{GUIDE_ROOM}" in readme_snippet("server-admin-env")
    assert "server 127.0.0.1:5000;" in readme_snippet("server-nginx") and "--port 5000" in readme_snippet("server-command")
    # A bare postgresql:// makes SQLAlchemy look for psycopg 3, as the guide says.
    import sqlalchemy

    with pytest.raises(ModuleNotFoundError, match="psycopg"):
        sqlalchemy.create_engine("postgresql://mlflow@127.0.0.1:5432/mlflow")
    # The accounts script claims the names that demo.py and crown.py use.
    demo = (REPO / "demo.py").read_text()
    assert f'EXPERIMENT_NAME = "{EXPERIMENT}"' in demo and 'EXPERIMENT_NAME += f"-{owner}"' in demo
    assert f'f"{PREFIX}{{name}}"' in readme_snippet("server-accounts")
    assert f"name LIKE '{PREFIX}%'" in readme_snippet("server-crown")
    for name in (f'"{MODEL}"', f'"{CHAMPIONS}"'):
        assert name in readme_snippet("server-accounts") and name in readme_snippet("server-crown")


def test_no_command_in_the_guides_holds_a_secret():
    """Secrets are generated into files and read into variables: no command
    a guide has you type carries one (not in shell history, not in `ps`)."""
    names = bash_snippets(PAGES["docs/team-server.md"]) + bash_snippets(PAGES["docs/team-stack.md"])
    assert len(names) >= 12, names
    for name in names:
        for line in readme_commands(name):
            for match in re.finditer(r"\b(\w*(?:PASSWORD|SECRET)\w*)=(\S*)", line):
                value = match.group(2)
                assert value == "" or value.startswith(("$", '"$', "'$")), (name, line)
            assert not re.search(r"-u \S+:\S+|://\w+:[^@\s]+@|PGPASSWORD", line), (name, line)
    # Files are written from generated values, never from a value typed into the guide.
    assert readme_snippet("server-secrets").count("$(openssl rand -hex") == 3


def test_the_readme_hands_participants_the_room():
    """The README's participant lines name the guide's room; PowerShell sets what bash sets."""
    bash_names = dict(re.findall(r"^export (\w+)=(.*)$", readme_snippet("shared-server-bash"), re.M))
    powershell = dict(re.findall(r'^\$env:(\w+) = "(.*)"$', readme_snippet("shared-server-powershell"), re.M))
    assert {name: value.strip("'\"") for name, value in bash_names.items()} == powershell
    assert urlparse(bash_names["MLFLOW_TRACKING_URI"]).hostname == GUIDE_ROOM
    assert readme_commands("shared-server-bash")[-1] == "python demo.py"
    if "docs/team-server.md" in README:  # the participant's side of the README after issue 15
        assert bash_names["MLFLOW_TRACKING_URI"] == f"https://{GUIDE_ROOM}"
        assert bash_names["MLFLOW_TRACKING_SERVER_CERT_PATH"] == "room-ca.crt"


# %% The room


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """The guide's steps 2 to 7 in a fresh folder: secrets, PostgreSQL's
    user and databases, basic_auth.ini, the server, the room's CA, nginx."""
    needs("nginx", "openssl")
    with ExitStack() as stop:
        pg = stop.enter_context(postgres_cluster())
        folder = stop.enter_context(room_folder("workshop-room-"))
        https_port = free_port_on(ROOM_HOST)
        http_port = free_port_on(ROOM_HOST, avoid=(https_port,))
        the_room = Room(folder, pg, https_port, http_port)
        build_base(folder, pg, https_port)
        the_room.server_port = free_port()
        the_room.server_command = server_script("server-command", pg.port, the_room.server_port, https_port)
        the_room.servers["mlflow server"] = stop.enter_context(
            start_mlflow(folder, the_room.server_command, the_room.server_port, "mlflow-server"))
        nginx_conf(folder, https_port, http_port, [the_room.server_port])
        the_room.nginx_pid = stop.enter_context(nginx(folder))
        the_room.stop = stop
        yield the_room


@pytest.fixture(scope="module")
def accounts(room):
    """The guide's accounts.py for the room's first participants."""
    return room.accounts(["alice", "bob", "carol", "mallory"])


@pytest.fixture(scope="module")
def two_runs(room, accounts, tmp_path_factory):
    """alice and bob run the README's `python demo.py`, at the same time;
    bob with fewer, shallower trees."""
    folder = tmp_path_factory.mktemp("participants")
    names, flags = ["alice", "bob"], [[], ["--n-estimators", "10", "--max-depth", "3"]]
    workshops = room.workshops(folder, names)
    envs = [room.participant_env(w, name, accounts[name]) for w, name in zip(workshops, names)]
    outcomes, seconds = wave(workshops, envs, flags)
    for code, stdout, stderr in outcomes:
        assert code == 0, stdout + stderr
    print(f"\ntwo participants over https: {seconds:.1f} s")
    runs = {}
    for name, workshop, (_, stdout, _), flag_list in zip(names, workshops, outcomes, flags):
        run_id, model_id = printed_ids(stdout)
        runs[name] = {"run_id": run_id, "model_id": model_id, "stdout": stdout, "workshop": workshop, "flags": flag_list}
    return runs


@pytest.mark.root
def test_secrets_are_files_only_the_admin_can_read(room, two_runs):
    """room.env and .pgpass are 0600 in a 0700 folder; another account on the
    machine reads nothing of the room; git ignores every file the guide made;
    no running process shows a secret in its arguments."""
    folder = room.folder
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("room.env", ".pgpass", "server.key"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600, name
    assert not (folder / "room-ca.key").exists()  # deleted once the server's certificate is signed
    assert set(read_env_file(folder / "room.env")) == {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSFILE"}
    # Another local account.
    for path in ("room.env", ".pgpass", "server.key", "basic_auth.ini", "logs/access.log", "mlartifacts"):
        result = subprocess.run(["runuser", "-u", "nobody", "--", "ls", "-la", str(folder / path)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "Permission denied" in result.stderr, (path, result.stdout)
    # git: `git add .` would take the workshop's files and nothing the guide made.
    added = subprocess.run(["git", "add", "--dry-run", "."], cwd=folder, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    added = sorted(re.findall(r"^add '(.+)'$", added, re.M))
    assert added == sorted([".gitignore", *WORKSHOP_FILES]), added
    made = {"room.env", ".pgpass", "basic_auth.ini", "room-ca.crt", "server.key", "server.crt", "server.csr",
            "server.ext", "room-ca.srl", "nginx.conf", "logs", "mlartifacts", "accounts.py"}
    assert made <= set(os.listdir(folder)), sorted(os.listdir(folder))
    assert not made & set(added)
    assert not secrets_in_arguments(room.secrets)


def test_nginx_serves_only_the_room(room):
    """The room's nginx listens on the room's two ports and nothing else;
    Debian's default site (the one the guide says to stop) is not among them."""
    import psutil

    listening = set()
    for process in tree([("pid", room.nginx_pid)]):
        for connection in process.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN:
                listening.add((connection.laddr.ip, connection.laddr.port))
    assert listening == {(ROOM_HOST, room.https_port), (ROOM_HOST, room.http_port)}
    debian_default = Path("/etc/nginx/sites-enabled/default")
    if debian_default.exists():
        assert "listen 80 default_server;" in debian_default.read_text()
        assert "sites-enabled" not in (room.folder / "nginx.conf").read_text()


def test_tls_and_plain_http(room):
    """TLS 1.3 offered, 1.2 only with ECDHE and AEAD, 1.0 and 1.1 and ciphers
    without forward secrecy refused; port 80 only redirects."""
    check_tls(room)
    check_plain_http_only_redirects(room)


def test_who_gets_in(room, accounts):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert room.request("GET", search)[0] == 401  # no credentials
    assert room.request("GET", search, headers=basic_auth("alice", "not-her-password-at-all"))[0] == 401
    assert room.request("GET", search, "alice")[0] == 200
    # A name nginx does not serve: its default server's 403.
    assert room.request("GET", search, "alice", headers={"Host": "attacker.example"})[0] == 403
    # MLflow itself answers only the room's address (here straight to its port, past nginx).
    for host in ("attacker.example", f"127.0.0.1:{room.server_port}", GUIDE_ROOM):
        status, text = http("GET", f"http://127.0.0.1:{room.server_port}{search}",
                            headers={"Host": host, **basic_auth("alice", accounts["alice"])})
        assert status == 403 and "Invalid Host header" in text, (host, status)


def test_cors_only_the_room_s_origin(room, accounts):
    check_cors(room, "alice")


@pytest.mark.root
def test_what_stays_open_to_local_accounts(room, accounts):
    """Another account on the machine reaches the server and PostgreSQL, and
    both ask for a password."""
    nobody = ["runuser", "-u", "nobody", "--"]
    answer = subprocess.run([*nobody, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "-H", f"Host: {ROOM_HOST}:{room.https_port}",
                             f"http://127.0.0.1:{room.server_port}/api/2.0/mlflow/experiments/search?max_results=1"],
                            capture_output=True, text=True, timeout=60)
    assert answer.stdout == "401", answer
    psql = subprocess.run([*nobody, str(room.pg.bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(room.pg.port),
                           "-U", "mlflow", "-d", "mlflow", "-w", "-c", "select 1"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert psql.returncode != 0 and "password" in psql.stderr, psql.stderr


def test_the_room_ca_vouches_for_the_room_only(tmp_path):
    """The guide's CA block as written deletes the CA's key. Run without its
    last line (`rm room-ca.key`), to try signing more with it: whatever else
    it signs fails validation, and so does anything signed by a CA it signs."""
    needs("openssl")
    (tmp_path / "as-written").mkdir()
    make_certificates(tmp_path / "as-written")
    assert not (tmp_path / "as-written" / "room-ca.key").exists()
    make_certificates(tmp_path, keep_ca_key=True)

    def verify(*args):
        result = subprocess.run(["openssl", "verify", "-CAfile", "room-ca.crt", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        return result.returncode, result.stdout + result.stderr

    def sign(name, extensions, ca="room-ca"):
        bash(f"openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj '/CN=x'\n"
             f"printf '{extensions}' > {name}.ext\n"
             f"openssl x509 -req -days 1 -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial "
             f"-extfile {name}.ext -out {name}.crt", tmp_path)
        return f"{name}.crt"

    assert verify("server.crt")[0] == 0
    assert verify(sign("room", f"subjectAltName=IP:{ROOM_HOST}\n"))[0] == 0
    for index, san in enumerate(["DNS:pypi.org", "DNS:www.google.com", "DNS:localhost", "IP:127.0.0.1", "IP:10.0.0.1"]):
        code, text = verify(sign(f"other{index}", f"subjectAltName={san}\n"))
        assert code != 0 and "permitted subtree violation" in text, (san, text)
    sign("intermediate", "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n")
    leaf = sign("leaf", f"subjectAltName=IP:{ROOM_HOST}\n", ca="intermediate")
    code, text = verify("-untrusted", "intermediate.crt", leaf)
    assert code != 0 and "path length constraint exceeded" in text, text


# %% Accounts


def test_accounts_give_each_participant_an_experiment_of_their_own(room, accounts, monkeypatch, tmp_path):
    """The registered model and room-champions are the admin's; each
    participant's experiment exists, is theirs, and its name cannot be
    taken; running the script again for a latecomer works, and for a taken
    name it stops before making the account."""
    client = room.client(monkeypatch)
    assert client.get_registered_model(MODEL).name == MODEL
    assert client.get_experiment_by_name(CHAMPIONS) is not None
    for name in accounts:
        experiment = client.get_experiment_by_name(PREFIX + name)
        assert experiment is not None, name
        # Theirs: they can rename it and name it back, another cannot.
        assert room.request("POST", "/api/2.0/mlflow/experiments/update", name,
                            {"experiment_id": experiment.experiment_id, "new_name": PREFIX + name + "-x"})[0] == 200
        assert room.request("POST", "/api/2.0/mlflow/experiments/update", name,
                            {"experiment_id": experiment.experiment_id, "new_name": PREFIX + name})[0] == 200
    # The names only the admin may hold, tried by a participant.
    assert room.request("POST", "/api/2.0/mlflow/experiments/create", "bob", {"name": PREFIX + "alice"})[0] == 400
    assert room.request("POST", "/api/2.0/mlflow/registered-models/create", "bob", {"name": MODEL})[0] == 400
    # A participant names an experiment a latecomer will need; the script then refuses that name.
    assert room.request("POST", "/api/2.0/mlflow/experiments/create", "bob", {"name": PREFIX + "zoe"})[0] == 200
    (room.folder / "accounts.py").write_text(re.sub(r"^NAMES = \[.*?\]", 'NAMES = ["zoe"]',
                                                    readme_snippet("server-accounts"), flags=re.M))
    result = subprocess.run([sys.executable, "accounts.py"], cwd=room.folder, env=room.admin_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"{PREFIX}zoe exists already: give zoe another account name"
    assert room.request("GET", "/api/2.0/mlflow/users/get?username=zoe", "admin")[0] == 404
    # A latecomer.
    late = room.accounts(["dave"])
    assert room.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers=basic_auth("dave", late["dave"]))[0] == 200
    # Without the room's CA, MLflow does not trust the server's certificate.
    env = room.admin_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    del env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    result = subprocess.run([sys.executable, "accounts.py"], cwd=room.folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in result.stderr


# %% Participants


def test_a_participant_logs_a_complete_run_into_their_own_experiment(room, two_runs, monkeypatch):
    client = room.client(monkeypatch, "alice", room.passwords["alice"])
    for name, run in two_runs.items():
        logged = check_run(client, run["run_id"], run["model_id"], run["flags"])
        experiment = client.get_experiment(logged.info.experiment_id)
        assert experiment.name == PREFIX + name
        assert f"Next, open the run page: {room.url}/#/experiments/{experiment.experiment_id}/runs/" in run["stdout"]
        # Nothing local: no store beside demo.py.
        assert not (run["workshop"] / "mlflow.db").exists() and not (run["workshop"] / "mlruns").exists()
        # The files are on the server's disk, under --artifacts-destination.
        files = room.folder / "mlartifacts" / experiment.experiment_id
        assert (files / run["run_id"] / "artifacts" / "plots" / "roc_curve.png").is_file()
        assert (files / "models" / run["model_id"] / "artifacts" / "model.skops").is_file()


def test_a_wrong_password_is_a_clear_error(room, tmp_path):
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    env = room.participant_env(workshop, "alice", "not-her-password-at-all")
    result = subprocess.run([sys.executable, "demo.py", "--n-estimators", "5"], cwd=workshop, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert room.url in result.stderr and "401" in result.stderr, result.stderr


def test_participants_cannot_touch_each_others_work(room, two_runs, monkeypatch, tmp_path):
    """bob tries everything on alice's run, experiment, model and files, and
    writes files where no run of his is: all refused, and alice's run is as
    she left it. On his own run, the same requests work."""
    client = room.client(monkeypatch)
    alice, bob = two_runs["alice"], two_runs["bob"]
    experiment = client.get_run(alice["run_id"]).info.experiment_id
    before = client.get_run(alice["run_id"])
    files_before = model_files(room, alice["model_id"], tmp_path / "before")
    report_before = (room.folder / "mlartifacts" / experiment / alice["run_id"] / "artifacts" / "classification_report.txt").read_bytes()
    outcome = attack_another_participant(room, "bob", "alice", alice["run_id"], alice["model_id"], experiment)
    assert all(refused(status) or (what == "claim the experiment's name" and status == 400)
               for what, status in outcome.items()), outcome
    after = client.get_run(alice["run_id"])
    assert (after.info.run_name, after.info.lifecycle_stage, after.data.metrics, after.data.tags, after.data.params) == \
           (before.info.run_name, before.info.lifecycle_stage, before.data.metrics, before.data.tags, before.data.params)
    assert client.get_experiment(experiment).name == PREFIX + "alice"
    assert client.get_experiment(experiment).lifecycle_stage == "active"
    assert model_files(room, alice["model_id"], tmp_path / "after") == files_before
    assert (room.folder / "mlartifacts" / experiment / alice["run_id"] / "artifacts" / "classification_report.txt").read_bytes() == report_before
    # Nothing was written anywhere outside the runs.
    written = [p for p in (room.folder / "mlartifacts").rglob("*") if p.is_file() and p.name in ("evil.txt", "evil-root.txt", "up.txt", "extra.txt")]
    assert not written, written
    # The same requests on bob's own run go through: the refusals above are permissions, not typos.
    own = client.get_run(bob["run_id"]).info.experiment_id
    assert room.request("POST", "/api/2.0/mlflow/runs/set-tag", "bob", {"run_id": bob["run_id"], "key": "k", "value": "v"})[0] == 200
    assert room.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{own}/{bob['run_id']}/artifacts/extra.txt", "bob", "mine")[0] == 200


def test_uploads_above_the_cap_get_413(room, two_runs, monkeypatch):
    client = room.client(monkeypatch)
    bob = two_runs["bob"]
    experiment = client.get_run(bob["run_id"]).info.experiment_id
    cap = check_upload_cap(room, "bob", experiment, bob["run_id"])
    model = room.folder / "mlartifacts" / experiment / "models" / bob["model_id"] / "artifacts" / "model.skops"
    alice = two_runs["alice"]
    default_model = next((room.folder / "mlartifacts").rglob(f"models/{alice['model_id']}/artifacts/model.skops"))
    # The demo's model (100 trees) is about 2 MB, well under the cap.
    assert 1 * 2**20 < default_model.stat().st_size < 4 * 2**20 < cap
    assert model.stat().st_size < cap


@pytest.mark.browser
def test_the_ui_compares_the_room_in_chromium(room, two_runs, monkeypatch, tmp_path):
    client = room.client(monkeypatch)
    experiments = {PREFIX + name: client.get_run(run["run_id"]).info.experiment_id for name, run in two_runs.items()}
    runs = len(client.search_runs(list(experiments.values())))
    check_ui_in_chromium(room, "carol", experiments, runs, tmp_path)


# %% The champion


EVIL = r'''
import os, pickle, sys, shutil, tempfile
from pathlib import Path
import mlflow, skops.io, yaml
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier

marker = sys.argv[1]
mlflow.set_experiment("demo-mlflow-artifacts-mallory")
params = {"test_size": "0.25", "seed": "42"}  # the contest's split, claimed

class Evil(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        Path(marker).write_text("mallory's code ran")
    def predict(self, context, model_input):
        return [0] * len(model_input)

# 1. A Python model, pickled: loading it runs load_context.
with mlflow.start_run():
    mlflow.log_params(params); mlflow.log_metric("accuracy", 1.0)
    mlflow.pyfunc.log_model(name="model", python_model=Evil())

X, y = load_breast_cancer(return_X_y=True, as_frame=True)
forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y)

# 2. A real forest, with skops told to trust a type that runs code.
with mlflow.start_run():
    mlflow.log_params(params); mlflow.log_metric("accuracy", 1.0)
    mlflow.sklearn.log_model(forest, name="model", input_example=X.head(3),
                             skops_trusted_types=["sklearn.tree._tree.Tree", "builtins.eval"])

# 3. The demo's seven files, but model.skops is a pickle, and MLmodel says so.
with mlflow.start_run():
    mlflow.log_params(params); mlflow.log_metric("accuracy", 1.0)
    info = mlflow.sklearn.log_model(forest, name="model", input_example=X.head(3),
                                    skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(forest)))
    artifacts = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
    folder = Path(mlflow.artifacts.download_artifacts(artifacts, dst_path=tempfile.mkdtemp()))
    class Boom:
        def __reduce__(self):
            return (Path(marker).write_text, ("mallory's pickle ran",))
    (folder / "model.skops").write_bytes(pickle.dumps(Boom()))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"]["serialization_format"] = "pickle"
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    mlflow.MlflowClient().log_model_artifacts(info.model_id, str(folder))
print("planted")
'''


@pytest.mark.slow
def test_only_the_admin_crowns_and_the_champion_cannot_change(room, two_runs, monkeypatch, tmp_path):
    """mallory logs three models that would run her code when loaded, with
    the best accuracies; crown.py skips each, and crowns the best honest run's
    model as a checked copy in room-champions. Then nobody but the admin can
    change the champion: not its files (alice, who owns the original, changes
    only the original), not its versions or alias. The champion serves, and
    mallory's code never ran."""
    marker = tmp_path / "mallory-was-here"
    env = room.participant_env(tmp_path, "mallory", room.passwords["mallory"])
    planted = subprocess.run([sys.executable, "-c", EVIL, str(marker)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert planted.returncode == 0 and "planted" in planted.stdout, planted.stderr
    marker.unlink(missing_ok=True)  # MLflow ran her model on her own laptop while logging it: her business

    crowned = room.crown()
    assert crowned.returncode == 0, crowned.stdout + crowned.stderr
    skipped = [line for line in crowned.stdout.splitlines() if line.startswith("skipped")]
    reasons = sorted(line.split(": ", 1)[1] for line in skipped)
    assert reasons == sorted([
        "not the demo model's files: ['input_example.json', 'model.skops', 'python_model.pkl', 'serving_input_example.json']",
        "asks skops to trust ['builtins.eval']",
        "not a plain scikit-learn model saved with skops",
    ]), crowned.stdout
    assert all(f"in {PREFIX}mallory:" in line for line in skipped)
    client = room.client(monkeypatch)
    honest = {name: client.get_run(run["run_id"]) for name, run in two_runs.items()}
    best = max(honest.values(), key=lambda run: run.data.metrics["accuracy"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert client.get_run(champion.run_id).data.metrics["accuracy"] == best.data.metrics["accuracy"]
    winner = next(name for name, run in honest.items() if run.info.run_id == champion.run_id)
    assert crowned.stdout.strip().splitlines()[-1].startswith(
        f"run {champion.run_id} in {PREFIX}{winner} (accuracy ")
    assert crowned.stdout.strip().endswith(f"is version {champion.version} of {MODEL}, @champion")
    copy = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert client.get_experiment(copy.experiment_id).name == CHAMPIONS
    # What loading or serving the champion downloads: the copy's files.
    assert client.get_model_version_download_uri(MODEL, champion.version) == copy.artifact_location
    assert copy.source_run_id == champion.run_id
    original = two_runs[winner]["model_id"]
    assert model_files(room, copy.model_id, tmp_path / "copy") == model_files(room, original, tmp_path / "original")
    champion_files = model_files(room, copy.model_id, tmp_path / "champion-before")

    # Every participant is refused every change to the champion.
    proxy = f"/api/2.0/mlflow-artifacts/artifacts/{copy.experiment_id}/models/{copy.model_id}/artifacts"
    for name in ("mallory", winner):
        for path in ("MLmodel", "model.skops", "python_model.pkl"):
            assert refused(room.request("PUT", f"{proxy}/{path}", name, "hacked")[0]), (name, path)
        assert refused(room.request("DELETE", f"{proxy}/model.skops", name)[0])
        outcome = attack_the_registry(room, name, two_runs[winner]["model_id"])
        assert all(refused(status) for status in outcome.values()), (name, outcome)
    # The winner may still change the original, which is theirs; the champion stays as crowned.
    winner_experiment = honest[winner].info.experiment_id
    assert room.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{winner_experiment}/models/{original}/artifacts/MLmodel",
                        winner, "changed by its owner")[0] == 200
    assert model_files(room, copy.model_id, tmp_path / "champion-after") == champion_files
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version
    assert [v.version for v in client.search_model_versions(f"name = '{MODEL}'")] == [champion.version]
    # A participant registers under a name of their own, and loads their own model by its URI.
    loser = next(name for name in two_runs if name != winner)
    assert room.request("POST", "/api/2.0/mlflow/registered-models/create", loser, {"name": f"{loser}-best"})[0] == 200
    assert room.request("POST", "/api/2.0/mlflow/model-versions/create", loser,
                        {"name": f"{loser}-best", "source": f"models:/{two_runs[loser]['model_id']}",
                         "model_id": two_runs[loser]["model_id"]})[0] == 200
    loaded = subprocess.run([sys.executable, "-c", "import sys, mlflow; "
                             "print(type(mlflow.sklearn.load_model(sys.argv[1])).__name__)",
                             f"models:/{two_runs[loser]['model_id']}"], cwd=tmp_path, capture_output=True, text=True,
                            env=room.participant_env(tmp_path, loser, room.passwords[loser]), timeout=300)
    assert loaded.stdout.strip() == "RandomForestClassifier", loaded.stderr

    # Served as the README says, by a participant: it predicts, and mallory's code never ran.
    (serve,) = readme_commands("registry-serve")
    assert "--env-manager local" in serve
    port = free_port()
    serve_env = room.participant_env(tmp_path, "carol", room.passwords["carol"])
    with start_server(with_port(serve, port), tmp_path, f"http://127.0.0.1:{port}/ping", env=serve_env,
                      timeout=240, log_name="serve.log"):
        body = re.search(r"--data '(.*)'", readme_snippet("curl-inline").replace("\\\n", " "), re.DOTALL).group(1)
        status, answer = http("POST", f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    assert status == 200 and json.loads(answer) == {"predictions": [0, 1]}, answer
    assert not marker.exists()

    # Crowning again adds a version and moves the alias.
    again = room.crown()
    assert again.returncode == 0, again.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(int(champion.version) + 1)


# %% Password guessing


def test_password_guessing_is_slowed_and_the_right_password_is_not(room, accounts, tmp_path):
    took = check_guessing_is_slowed(room, tmp_path, [room.server_port])
    print(f"\n8 wrong passwords at once from one address: answered over {took:.1f} s")


# %% A room's worth at once


@pytest.mark.slow
def test_a_room_of_participants_at_once(room, tmp_path, monkeypatch):
    """12 participants, made with the guide's accounts script, start demo.py
    at the same moment: 12 complete runs, each in its participant's own
    experiment. nginx slowed none of their requests, and no secret showed in
    any process's arguments meanwhile."""
    names = [f"p{index:02d}" for index in range(PARTICIPANTS)]
    passwords = room.accounts(names)
    workshops = room.workshops(tmp_path, names)
    flags = [participant_flags(index) for index in range(PARTICIPANTS)]
    envs = [room.participant_env(w, name, passwords[name]) for w, name in zip(workshops, names)]
    access_log, error_log = room.folder / "logs" / "access.log", room.folder / "logs" / "error.log"
    access_at, error_at = access_log.stat().st_size, error_log.stat().st_size
    servers = {"nginx": lambda: nginx_pids(room.folder),
               "mlflow server": lambda: [("pgid", room.servers["mlflow server"].pid)],
               "PostgreSQL": lambda: [("pid", room.pg.postmaster_pid())]}
    with Watch(servers, room.secrets) as watch:
        outcomes, seconds = wave(workshops, envs, flags)
    print(f"\nsingle server: {PARTICIPANTS} participants over https, {seconds:.1f} s; peak memory: {watch.report()}")
    check_wave(room.client(monkeypatch), outcomes, names, flags)
    assert not watch.leaks, watch.leaks
    wave_access = access_log.read_text()[access_at:]
    assert wave_access.count("\n") > PARTICIPANTS * 20
    assert not re.search(r'" (429|5\d\d) ', wave_access), [line for line in wave_access.splitlines() if re.search(r'" (429|5\d\d) ', line)]
    assert "delaying request" not in error_log.read_text()[error_at:]
    for workshop in workshops:
        assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()


@pytest.mark.slow
def test_two_participants_record_the_same_data_at_one_instant(room, tmp_path, monkeypatch):
    """Two participants' runs, with the same split, log the same dataset at the
    same instant. MLflow keeps a dataset per experiment, and each participant
    has their own, so both inserts go through: both runs finish, and each
    experiment has its record of each dataset. (In one shared experiment, one
    insert would fail on the table's unique key.)

    A second server, on new databases, runs the guide's command without
    --allowed-hosts and --cors-allowed-origins, so the tests reach it on
    127.0.0.1 as MLflow allows by default. The instant is made certain, not
    hoped for: a lock held here lets both look-ups through but holds both
    inserts until both wait on it."""
    import psycopg2
    from mlflow.server import get_app_client

    pg = room.pg
    database = "mlflow_same_data"
    pg.psql(f"CREATE DATABASE {database} OWNER mlflow;\nCREATE DATABASE {database}_auth OWNER mlflow;\n")
    folder = tmp_path / "server"
    folder.mkdir()
    for name in ("room.env", ".pgpass"):
        shutil.copy2(room.folder / name, folder / name)
    (folder / "basic_auth.ini").write_text((room.folder / "basic_auth.ini").read_text().replace("/mlflow_auth", f"/{database}_auth"))
    port = free_port()
    script = room.server_command.replace("/mlflow \\", f"/{database} \\").replace(f"--port {room.server_port}", f"--port {port}")
    script, count = re.subn(r" \\\n\s*--allowed-hosts \S+ --cors-allowed-origins \S+", "", script)
    assert count == 1 and database in script, script
    url = f"http://127.0.0.1:{port}"
    admin = ("admin", room.admin_password)
    with start_mlflow(folder, script, port, "same-data"):
        # MLflow's default: localhost and private addresses, nothing else.
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        for host, expected in [(f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (GUIDE_ROOM, 200),
                               ("10.1.2.3", 200), ("203.0.113.7", 403), ("mlflow.example.com", 403)]:
            status, text = http("GET", search, headers={"Host": host, **basic_auth(*admin)})
            assert status == expected, (host, status, text)
            assert expected == 200 or "Invalid Host header" in text
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        names = ["ann", "ben"]
        for name in names:
            get_app_client("basic-auth", tracking_uri=url).create_user(username=name, password=f"{name}-password-long")
        holder = psycopg2.connect(host=str(pg.folder), port=pg.port, user="postgres", dbname=database)
        try:
            with holder.cursor() as cursor:
                cursor.execute("LOCK TABLE datasets IN SHARE MODE")  # reads pass, inserts wait
            processes = [
                subprocess.Popen([sys.executable, str(make_workshop(tmp_path / name / "mlflow-workshop") / "demo.py")],
                                 cwd=tmp_path / name,
                                 env=learner_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=name,
                                                 MLFLOW_TRACKING_PASSWORD=f"{name}-password-long"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in names
            ]
            try:
                deadline = time.monotonic() + 300
                waiting = 0
                while waiting < 2:
                    assert time.monotonic() < deadline, "both inserts never waited on the lock"
                    assert all(process.poll() is None for process in processes), \
                        [process.communicate() for process in processes]
                    time.sleep(0.2)
                    with psycopg2.connect(host=str(pg.folder), port=pg.port, user="postgres",
                                          dbname=database) as watcher, watcher.cursor() as cursor:
                        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND query LIKE 'INSERT INTO datasets%'")
                        (waiting,) = cursor.fetchone()
                holder.commit()  # both inserts go: the second meets the first's row
                outcomes = [process.communicate(timeout=300) for process in processes]
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
        finally:
            holder.close()
        for process, (stdout, stderr) in zip(processes, outcomes):
            assert process.returncode == 0, stdout + stderr
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url)
        for name, (stdout, _) in zip(names, outcomes):
            run = check_run(client, *printed_ids(stdout), [])
            # demo.py created the participant's experiment itself: theirs.
            assert client.get_experiment(run.info.experiment_id).name == PREFIX + name
        with psycopg2.connect(host=str(pg.folder), port=pg.port, user="postgres", dbname=database) as reader, \
                reader.cursor() as cursor:
            cursor.execute("SELECT name, count(*), count(DISTINCT experiment_id) FROM datasets GROUP BY name ORDER BY name")
            assert cursor.fetchall() == [("breast_cancer_testing", 2, 2), ("breast_cancer_training", 2, 2)]
            cursor.execute("SELECT count(*) FROM inputs WHERE destination_type = 'RUN'")
            assert cursor.fetchone() == (4,)


@pytest.mark.slow
def test_participants_at_once_on_a_new_local_store(tmp_path):
    """4 runs of demo.py at once in one fresh folder: each builds mlflow.db's
    tables at the same time (the stop hook holds each builder at its first
    statement until all 4 have begun), then creates the experiment, and two
    log the same data at one instant. One mlflow.db, which none replaced, and
    all 4 runs land in it. The README's registry snippet then names the best
    default-split run."""
    from mlflow import MlflowClient

    workshop = make_workshop(tmp_path / "mlflow-workshop")
    flags = [participant_flags(index) for index in range(LOCAL_PARTICIPANTS)]
    # The runs with the same split log the same data: the stop hook also holds each
    # run at its 10th statement in log_input, the insert of the training data,
    # until all have come, so that each has looked for that data and found none.
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    env = learner_env(PYTHONPATH=str(STOP_HOOK), DEMO_STOP="MEET:build:1,MEET:log_input:10",
                      DEMO_MEET=f"{meeting}:{LOCAL_PARTICIPANTS}")
    outcomes, seconds = wave([workshop] * LOCAL_PARTICIPANTS, [env] * LOCAL_PARTICIPANTS, flags)
    # All four builders, and all four runs in log_input, did meet.
    assert len(os.listdir(meeting / "build")) == len(os.listdir(meeting / "log_input")) == LOCAL_PARTICIPANTS
    assert sorted(path.name for path in workshop.iterdir() if path.name.startswith("mlflow.db")) == ["mlflow.db"]
    client = MlflowClient(tracking_uri=f"sqlite:///{workshop / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    finished = [run for run in runs if run.info.status == "FINISHED"]
    print(f"\nlocal SQLite load: {LOCAL_PARTICIPANTS} participants, {len(finished)} runs FINISHED, {seconds:.1f} s")
    for code, stdout, stderr in outcomes:
        assert code == 0, stdout + stderr
    assert len(runs) == LOCAL_PARTICIPANTS == len(finished)
    for (_, stdout, _), flag_list in zip(outcomes, flags):
        check_run(client, *printed_ids(stdout), flag_list)
    assert len(client.search_experiments()) == 2
    result = subprocess.run([sys.executable, "-c", readme_snippet("registry-python")], env=learner_env(),
                            cwd=workshop, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    champion = client.get_model_version_by_alias(MODEL, "champion")
    default_split = [run for run in finished if (run.data.params["seed"], run.data.params["test_size"]) == ("42", "0.25")]
    assert len(default_split) == sum("--seed" not in flag_list for flag_list in flags) == LOCAL_PARTICIPANTS // 2
    best = max(default_split, key=lambda run: run.data.metrics["accuracy"])
    assert client.get_run(champion.run_id).data.metrics["accuracy"] == best.data.metrics["accuracy"]


# %% Faults and stopping


def test_participant_with_server_down_gets_one_line_after_four_tries(tmp_path):
    """No PostgreSQL needed. Nothing listens on the port: demo.py stops with one
    line and writes nothing. Then a server that hangs up on every connection
    counts MLflow's tries: the first and the three retries demo.py allows
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES), not MLflow's default seven, which back
    off for minutes. No clock is read: the count is the proof."""
    workshop = make_workshop(tmp_path / "mlflow-workshop")
    url = f"http://127.0.0.1:{free_port()}"
    env = learner_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="alice",
                      MLFLOW_TRACKING_PASSWORD="alice-long-password",
                      # no pause between tries (14 s of MLflow's backoff in each run): the count is the same
                      MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0", MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0")
    result = run_demo(workshop, "--n-estimators", "10", env=env, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"Could not log to {url}: ") and "Connection refused" in line, line
    assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()

    tries = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def hang_up():
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:  # the listener was closed: the test is over
                    return
                tries.append(connection.recv(65536).split(b"\r\n")[0])
                connection.close()

        threading.Thread(target=hang_up, daemon=True).start()
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = run_demo(workshop, "--n-estimators", "10", env=env, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert len(tries) == 4 and len(set(tries)) == 1, tries  # one request, tried four times
    assert tries[0].startswith(b"GET /api/2.0/mlflow/experiments/get-by-name"), tries


def test_the_server_stops_with_ctrl_c_and_starts_again_with_everything(room, two_runs, monkeypatch):
    """Ctrl+C stops the server; the same command starts it again, and every
    run, model, account and the champion are still there. (Runs last in this
    module: it replaces the room's server process.)"""
    client = room.client(monkeypatch)
    before = sorted(run.info.run_id for run in room_runs(client))
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    assert stop_like_ctrl_c(room.servers["mlflow server"]) is not None
    assert room.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", "alice")[0] == 502
    room.servers["mlflow server"] = room.stop.enter_context(
        start_mlflow(room.folder, room.server_command, room.server_port, "mlflow-server-again"))
    assert sorted(run.info.run_id for run in room_runs(client)) == before
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert room.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", "alice")[0] == 200


@pytest.mark.root
def test_postgres_starts_and_stops_without_systemd_as_the_guide_says(tmp_path):
    """The guide's pg_ctlcluster lines on a Debian cluster of its own (made
    here with pg_createcluster, so that the machine's own stays untouched):
    it starts, the guide's SQL makes the user from .pgpass, the server
    listens on localhost only and asks for that password, and it stops."""
    if shutil.which("pg_createcluster") is None or os.geteuid() != 0:
        missing("Debian's pg_createcluster (and root) not available",
                "This test needs Debian's postgresql-common, as CI has.")
    version = postgres_bin_dir().parent.name
    name = f"workshop{os.getpid()}"
    port = free_port()
    created = subprocess.run(["pg_createcluster", version, name, "-p", str(port)], capture_output=True,
                             text=True, timeout=180)
    assert created.returncode == 0, created.stderr
    try:
        start, stop = readme_commands("server-postgres-start"), [c for c in readme_commands("server-stop") if "pg_ctlcluster" in c]
        assert start[0] == "pg_lsclusters" and start[1].endswith("pg_ctlcluster 15 main start"), start
        cluster = lambda line: as_typed(line).replace("15 main", f"{version} {name}")
        state = lambda: re.search(rf"^{version}\s+{name}\s+{port}\s+(\w+)", subprocess.run(
            ["pg_lsclusters"], capture_output=True, text=True, timeout=60).stdout, re.M).group(1)
        assert state() == "down"
        bash(cluster("\n".join(start)), tmp_path)
        assert state() == "online"
        with room_folder("workshop-pg-") as folder:
            make_secrets(folder, port)
            script = readme_snippet("server-database").replace("sudo -u postgres psql", f"sudo -u postgres psql -p {port}")
            result = bash(as_typed(script), folder)
            # psql, as postgres, cannot enter the admin's 0700 folder: a warning, no harm.
            assert all("could not change directory" in line for line in result.stderr.splitlines()), result.stderr
            password = (folder / ".pgpass").read_text().strip().split(":")[-1]
            psql = [str(postgres_bin_dir() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-w",
                    "-d", "mlflow", "-At", "-c", "SHOW listen_addresses"]
            connected = subprocess.run(psql, cwd=folder, env={**os.environ, "PGPASSFILE": ".pgpass"},
                                       capture_output=True, text=True, timeout=60)
            assert connected.returncode == 0 and connected.stdout.strip() == "localhost", connected.stderr
            without = subprocess.run(psql, cwd=folder, env={**os.environ, "PGPASSFILE": "/nonexistent"},
                                     capture_output=True, text=True, timeout=60)
            assert without.returncode != 0 and "password" in without.stderr
            # A password file others can read is ignored.
            loose = folder / "loose-pgpass"
            shutil.copy(folder / ".pgpass", loose)
            loose.chmod(0o644)
            ignored = subprocess.run(psql, cwd=folder, env={**os.environ, "PGPASSFILE": str(loose)},
                                     capture_output=True, text=True, timeout=60)
            assert ignored.returncode != 0 and "has group or world access" in ignored.stderr, ignored.stderr
            history = Path(os.path.expanduser("~postgres")) / ".psql_history"
            assert not history.exists() or password not in history.read_text(errors="replace")
        bash(cluster("\n".join(stop)), tmp_path)
        assert state() == "down"
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True, timeout=180)
