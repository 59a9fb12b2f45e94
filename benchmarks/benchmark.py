"""How much a demo run costs beyond its unavoidable work, and how fast the servers start.

    python benchmarks/benchmark.py                 # 5 rounds, then the UI and the model server
    python benchmarks/benchmark.py --rounds 9 --server-rounds 5
    python benchmarks/benchmark.py --no-servers    # the three scripts only

Run it with the workshop's virtual environment active (or its python): every
measured command is a subprocess of this same interpreter, with telemetry off
(MLFLOW_DISABLE_TELEMETRY=true) and no MLFLOW_* variable of the caller's.

What it runs, in one invocation, round after round (the order rotates every
round, so that no script always runs first, or right after another one):

* floor: benchmarks/floor.py, the same imports as demo.py, the data loaded, the
  same fit, and `mlflow.sklearn.save_model` of the forest to a temporary folder
  with explicit pip requirements. This is the work a demo run cannot avoid.
* warm: `python demo.py` in a folder whose mlflow.db and mlruns/ already exist
  (one untimed run made them), as on a learner's second run.
* cold: `python demo.py` in a new folder, as on a learner's first run: MLflow
  creates mlflow.db and migrates it to the current schema first.

For each it reports the median wall time, the median CPU time (user + system:
less sensitive than wall time to whatever else the machine is doing, which on
a shared 2-core machine is a lot), and the median peak memory, and the ratios
demo/floor of the medians, against these targets:

    warm wall time <= 1.5 x floor, cold wall time <= 2.0 x floor,
    peak memory (warm and cold) <= 1.25 x floor.

How peak memory is measured: each script is started with subprocess.Popen and
reaped with os.wait4(pid), which returns the rusage of that one child. Its
ru_maxrss is the peak resident set size of the child itself, or of a
descendant it waited for if one peaked higher (Linux keeps the maximum, it
never adds). That is exact for these scripts, which are one process each (the
forest trains on threads, and explicit pip requirements spare MLflow its
requirement-inferring subprocess). What does not work is the usual
getrusage(RUSAGE_CHILDREN) before/after: its ru_maxrss is the largest child
peak so far over the whole life of this process, so after the first big child
the "delta" of any smaller one is 0. GNU time -v (/usr/bin/time) reports the
same wait4 number, but is not on every machine; psutil polling samples and
would miss a short peak.

Then the servers, started the way README.md says, each from a folder holding
an mlflow.db, in its own process group that is stopped by its PID at the end:

* `mlflow ui`: the command of the README's `ui` snippet with only the port
  changed, against the same command without `--workers 1` (the default, 4
  workers), and the README's command with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
  (no background job runner; for information). Measured: seconds from start
  until GET / answers 200, and the resident memory of the whole process group
  at that moment.
* `mlflow models serve`: the README's `serve` snippet (`--env-manager local`)
  with the model id of the warm folder's run and only the port changed;
  seconds until GET /ping answers 200.

Last, predictions from that served model, as a client sees them: the README's
`serve` command answering the example body that demo.py logged (three rows),
each request on a new connection as curl makes it. Measured: the median and
90th percentile latency of one client's requests one after another, and the
requests per second that 8 clients sending at once get in 10 seconds. Beside
them, side by side in the same run, the same three rows predicted in this
process with the loaded model (no HTTP, no JSON): the ratio says what serving
adds. Targets: one client's median <= 15 ms, 8 clients >= 50 requests/s.
"""

import argparse
import json
import os
import threading
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The tests' helpers: README snippets, free ports, stopping a process group.
sys.path.insert(0, str(REPO / "tests"))
from conftest import free_port, http, readme_snippet, stop_process_group, with_port  # noqa: E402
DEMO = REPO / "demo.py"
FLOOR = Path(__file__).resolve().parent / "floor.py"

TARGETS = [
    # (label, measure, script, limit)
    ("warm wall time", "wall", "warm", 1.5),
    ("cold wall time", "wall", "cold", 2.0),
    ("warm peak memory", "peak_mb", "warm", 1.25),
    ("cold peak memory", "peak_mb", "cold", 1.25),
]


def subprocess_env():
    """The caller's environment, with the interpreter's bin/ first on PATH (for
    `mlflow`), telemetry off, and no MLflow setting that would change the runs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def measure(command, cwd, env, log_path):
    """Run a command to the end: wall seconds, CPU seconds and peak RSS (MB)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4 reaps the child and returns its own rusage (see the docstring).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{Path(log_path).read_text()}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024}


def group_rss_mb(pgid):
    """Resident memory of every process in a process group, added up (MB)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
                total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


@contextmanager
def running(command, cwd, env, path, log_path, timeout=300):
    """Start a server command (a shell string, as typed in a terminal) in its own
    process group, on a free port, until GET `path` answers 200; yield the
    seconds that took, the group's memory then, and the server's base URL.
    The group is stopped at the end."""
    port = free_port()
    command = with_port(command, port)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                sys.exit(f"{command!r} exited with {process.returncode}:\n{Path(log_path).read_text()}")
            try:
                if http("GET", base + path, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - start > timeout:
                sys.exit(f"{command!r} did not answer {base + path} in {timeout} s:\n{Path(log_path).read_text()}")
            time.sleep(0.1)
        yield time.perf_counter() - start, group_rss_mb(process.pid), base
    finally:
        stop_process_group(process, grace=15)


def time_to_answer(command, cwd, env, path, log_path):
    """Seconds until a server started with `command` answers GET `path`, and its memory then."""
    with running(command, cwd, env, path, log_path) as (seconds, memory, _):
        return seconds, memory


def serving_figures(command, cwd, env, body, log_path, seconds=10.0, clients=8):
    """Start the serve command, then time POST /invocations with `body`: one
    client's latencies (ms), and the requests per second of `clients` at once."""
    headers = {"Content-Type": "application/json"}
    with running(command, cwd, env, "/ping", log_path) as (_, _, base):
        url = f"{base}/invocations"

        def one_request():
            started = time.perf_counter()
            status, answer = http("POST", url, body, headers)
            if status != 200:
                sys.exit(f"the served model answered {status}: {answer}")
            return (time.perf_counter() - started) * 1000

        for _ in range(20):  # warm-up: the first requests load lazily imported code
            one_request()
        latencies = sorted(one_request() for _ in range(300))
        done = [0] * clients
        stop_at = time.perf_counter() + seconds

        def client(index):
            while time.perf_counter() < stop_at:
                one_request()
                done[index] += 1

        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        per_second = sum(done) / (time.perf_counter() - started)
        return latencies, per_second


def in_process_predict_ms(model_uri, body, tracking_uri, repeats=300):
    """The same rows predicted by the loaded model in this process: the median ms."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    split = json.loads(body)["dataframe_split"]
    rows = pd.DataFrame(split["data"], columns=split["columns"])
    for _ in range(20):
        model.predict(rows)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(rows)
        timings.append((time.perf_counter() - started) * 1000)
    return median(timings)


def median(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values):6.2f} .. {max(values):6.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each script (floor, warm, cold)")
    parser.add_argument("--server-rounds", type=int, default=3, help="starts of each server variant")
    parser.add_argument("--no-servers", action="store_true", help="skip `mlflow ui` and `mlflow models serve`")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if a target fails")
    args = parser.parse_args(argv)

    env = subprocess_env()
    python = sys.executable
    root = Path(tempfile.mkdtemp(prefix="demo-benchmark-"))
    print(f"python {sys.version.split()[0]} ({python}), {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, work folder {root}")
    try:
        # The warm folder: one untimed run creates its stores. The floor runs
        # once untimed too, so that no timed run pays for a cold disk cache or
        # matplotlib's first-time font cache.
        warm = root / "warm"
        warm.mkdir()
        shutil.copy(REPO / "demo.py", warm / "demo.py")
        first = subprocess.run([python, str(warm / "demo.py")], cwd=root, env=env,
                               capture_output=True, text=True)
        if first.returncode != 0:
            sys.exit(f"demo.py failed:\n{first.stdout}{first.stderr}")
        measure([python, str(FLOOR), str(DEMO)], root, env, root / "floor.log")

        def run_floor(_):
            return measure([python, str(FLOOR), str(DEMO)], root, env, root / "floor.log")

        def run_warm(_):
            return measure([python, str(warm / "demo.py")], root, env, root / "warm.log")

        def run_cold(round_number):
            cold = root / f"cold-{round_number}"
            cold.mkdir()
            shutil.copy(REPO / "demo.py", cold / "demo.py")
            try:
                return measure([python, str(cold / "demo.py")], root, env, root / "cold.log")
            finally:
                shutil.rmtree(cold, ignore_errors=True)

        scripts = {"floor": run_floor, "warm": run_warm, "cold": run_cold}
        results = {name: [] for name in scripts}
        names = list(scripts)
        for round_number in range(args.rounds):
            order = names[round_number % len(names):] + names[:round_number % len(names)]
            for name in order:
                results[name].append(scripts[name](round_number))
            print(f"round {round_number + 1}/{args.rounds}: " + ", ".join(
                f"{name} {results[name][-1]['wall']:.2f} s {results[name][-1]['peak_mb']:.0f} MB"
                for name in order), flush=True)

        print()
        print(f"Medians of {args.rounds} rounds (min .. max of wall time in brackets):")
        print(f"  {'':6} {'wall s':>8} {'cpu s':>8} {'peak MB':>8}   wall min .. max")
        medians = {}
        for name in names:
            medians[name] = {key: median([r[key] for r in results[name]]) for key in ("wall", "cpu", "peak_mb")}
            m = medians[name]
            print(f"  {name:6} {m['wall']:8.2f} {m['cpu']:8.2f} {m['peak_mb']:8.0f}   "
                  f"[{spread([r['wall'] for r in results[name]])}]")
        print()
        print("Ratios demo/floor (of the medians):")
        for name in ("warm", "cold"):
            print(f"  {name}: wall {medians[name]['wall'] / medians['floor']['wall']:.2f}, "
                  f"cpu {medians[name]['cpu'] / medians['floor']['cpu']:.2f}, "
                  f"peak memory {medians[name]['peak_mb'] / medians['floor']['peak_mb']:.2f}")
        print()
        print("Targets:")
        failed = False
        for label, key, name, limit in TARGETS:
            ratio = medians[name][key] / medians["floor"][key]
            verdict = "PASS" if ratio <= limit else "FAIL"
            failed |= verdict == "FAIL"
            print(f"  {verdict}  {label:<17} {ratio:.3f} x floor (target <= {limit} x floor)")

        if not args.no_servers:
            model_id = re.search(r"model URI:\s+models:/(m-[0-9a-f]{32})", first.stdout).group(1)
            # The README's way (job runner off, one worker) against MLflow's
            # defaults (job runner on, four workers) and against one worker alone.
            ui_command = readme_snippet("ui").strip()
            plain_ui = ui_command.splitlines()[-1]
            default_ui = re.sub(r"\s+(--workers|-w)\s+\d+", "", plain_ui)
            serve_command = readme_snippet("serve").strip().replace("<model_id>", model_id)
            variants = [
                ("README: " + " && ".join(ui_command.splitlines()), ui_command, env, "/"),
                (f"{default_ui}   (defaults: job runner on, 4 workers)", default_ui, env, "/"),
                (f"{plain_ui}   (job runner on)", plain_ui, env, "/"),
                (serve_command, serve_command, env, "/ping"),
            ]
            starts = {label: [] for label, *_ in variants}
            for round_number in range(args.server_rounds):
                order = variants[round_number % len(variants):] + variants[:round_number % len(variants)]
                for label, command, server_env, path in order:
                    starts[label].append(time_to_answer(command, warm, server_env, path, root / "server.log"))
                print(f"server round {round_number + 1}/{args.server_rounds} done", flush=True)
            print()
            print(f"Server start, from {warm} (holds mlflow.db), until the first HTTP 200; "
                  f"medians of {args.server_rounds}:")
            for label, *_ in variants:
                seconds = [s for s, _ in starts[label]]
                memory = median([mb for _, mb in starts[label]])
                print(f"  {median(seconds):6.2f} s  [{spread(seconds)}]  {memory:5.0f} MB  {label}")
            readme_way, defaults = (median([s for s, _ in starts[label]]) for label, *_ in variants[:2])
            print(f"  MLflow's defaults / the README's way: {defaults / readme_way:.2f} x the start time")

            # Predictions from the served model, with the example body demo.py logged.
            example = next(warm.glob(f"mlruns/*/models/{model_id}/artifacts/serving_input_example.json"))
            body = example.read_text()
            latencies, per_second = serving_figures(serve_command, warm, env, body, root / "serve.log")
            in_process = in_process_predict_ms(f"models:/{model_id}", body,
                                               f"sqlite:///{(warm / 'mlflow.db').as_posix()}")
            p50, p90 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.9)]
            print()
            print(f"Predictions from `{serve_command}`, 3 rows a request, a new connection each:")
            print(f"  one client:  median {p50:.1f} ms, 90th percentile {p90:.1f} ms ({len(latencies)} requests)")
            print(f"  8 clients:   {per_second:.0f} requests/s")
            print(f"  in process:  median {in_process:.1f} ms for model.predict on the same rows; "
                  f"served / in process: {p50 / in_process:.2f} x")
            for verdict, label in [(p50 <= 15, f"one client's median {p50:.1f} ms (target <= 15 ms)"),
                                   (per_second >= 50, f"8 clients {per_second:.0f} requests/s (target >= 50)")]:
                failed |= not verdict
                print(f"  {'PASS' if verdict else 'FAIL'}  {label}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
