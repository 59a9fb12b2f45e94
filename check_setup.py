"""Is this laptop ready for the workshop? Run this before the day.

    python check_setup.py

Run it in the repository folder, with the virtual environment active. It
answers in a second, prints one line per check (and what to do about a
problem), and exits with status 1 if any check fails. It changes nothing.
"""

import argparse
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

HERE = Path(__file__).resolve().parent
LOCK = HERE / "requirements-lock.txt"
SUPPORTED = ((3, 10), (3, 13))  # the Python versions the README promises
FREE_DISK_GB = 2  # the packages take about 1 GB; runs and models add a little
INSTALL = "python -m pip install -r requirements-lock.txt"  # or the set-up command you used


def check_python():
    found = "Python {}.{}.{}".format(*sys.version_info[:3])
    if not SUPPORTED[0] <= sys.version_info[:2] <= SUPPORTED[1]:
        return False, f"{found}: the workshop needs Python 3.10 to 3.13; install one from python.org"
    return True, found


def locked_pins(environment=None):
    """(name, version) of each pin of requirements-lock.txt that applies to this
    Python, or to the one `environment` describes (marker values, as
    tools/wheelhouse.py passes them). Needs `packaging`, which MLflow brings."""
    from packaging.requirements import Requirement

    pins = []
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith((" ", "#")):
            pin = Requirement(line)
            if pin.marker is None or pin.marker.evaluate(environment):  # else for another Python or system
                (wanted,) = [spec.version for spec in pin.specifier]
                pins.append((pin.name, wanted))
    return pins


def check_packages():
    if sys.prefix == sys.base_prefix:
        return False, "no virtual environment is active: run `source .venv/bin/activate` (PowerShell: `.venv\\Scripts\\Activate.ps1`)"
    try:
        from importlib.metadata import PackageNotFoundError, version

        pins = locked_pins()
    except ImportError:
        return False, f"the workshop's packages are not installed: run `{INSTALL}`"
    wrong = []
    for name, wanted in pins:
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != wanted:
            wrong.append(f"{name} {installed} (the lock says {wanted})")
    if wrong:
        more = f", and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        return False, f"{', '.join(wrong[:3])}{more}: run `{INSTALL}` (or the set-up command you used)"
    return True, "every package matches requirements-lock.txt"


def holder(port):
    """The program listening on a port, if `lsof` can tell (macOS, Linux)."""
    if not shutil.which("lsof"):
        return "another program"
    found = subprocess.run(["lsof", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fc"],
                           capture_output=True, text=True).stdout
    names = sorted({line[1:] for line in found.splitlines() if line.startswith("c")})
    return " and ".join(names) or "another program"


def check_ports(ports):
    busy = []
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                busy.append(f"{port} is taken by {holder(port)}")
    if busy:
        return False, (f"{'; '.join(busy)}. Stop it, or use another port in the commands (--port 5050) and "
                       "check that one: python check_setup.py --ports 5050 5001. On macOS, 5000 is often the "
                       "AirPlay Receiver: System Settings > General > AirDrop & Handoff")
    return True, f"ports {' and '.join(map(str, ports))} are free"


def check_folder():
    try:
        with tempfile.TemporaryFile(dir=HERE):
            pass
    except OSError as error:
        return False, f"cannot write in {HERE} ({error.strerror}): clone the repository into a folder of your own"
    return True, f"{HERE} is writable"


def check_disk():
    free_gb = shutil.disk_usage(HERE).free / 1e9
    if free_gb < FREE_DISK_GB:
        return False, f"{free_gb:.1f} GB free in {HERE}: free at least {FREE_DISK_GB} GB"
    return True, f"{free_gb:.0f} GB free"


def check_old_store():
    old = sorted(str(path.parent) for path in HERE.glob("mlruns/*/meta.yaml"))
    if old:
        return False, (f"{old[0]} is an old MLflow file store, which `mlflow ui` would show instead of "
                       "mlflow.db: move the mlruns/ folder elsewhere")
    if (HERE / "mlflow.db").exists():  # copied from another folder, it still sends files there
        with sqlite3.connect(f"file:{HERE / 'mlflow.db'}?mode=ro", uri=True) as database:
            try:
                found = database.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                         ("demo-mlflow-artifacts",)).fetchone()
            except sqlite3.DatabaseError as error:
                if "not a database" in str(error):
                    return False, "mlflow.db is not a database: move it away (or delete it)"
                found = None
        files_at = Path(url2pathname(urlparse(found[0]).path)) if found else HERE
        if HERE != files_at and HERE not in files_at.parents:
            return False, (f"mlflow.db was made in another folder (its files go to {files_at}): "
                           "delete mlflow.db and mlruns/ here to start afresh")
    return True, "nothing in this folder that MLflow would misread"


def main():
    parser = argparse.ArgumentParser(description="Check that this laptop is ready for the workshop.")
    parser.add_argument("--ports", type=int, nargs="+", default=[5000, 5001],
                        help="the ports the MLflow UI and the model server will use")
    args = parser.parse_args()
    checks = [("python", check_python), ("packages", check_packages), ("ports", lambda: check_ports(args.ports)),
              ("folder", check_folder), ("disk", check_disk), ("old files", check_old_store)]
    failed = 0
    for name, check in checks:
        ok, message = check()
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {name:<10} {message}")
    print("Ready for the workshop." if not failed else f"{failed} check(s) failed: see above.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
