"""Stops demo.py at a chosen database call, for tests/test_interruptions.py.

Python imports this file at start-up when its folder is on PYTHONPATH. It does
nothing unless DEMO_STOP is set, to one of:

  SIGNAL:FUNCTION:K  the signal arrives as the K-th SQL statement after
                     demo.py calls mlflow.FUNCTION begins (inside SQLAlchemy);
                     FUNCTION may be dotted: sklearn.log_model;
  SIGNAL:build:K     the signal arrives as the K-th SQL statement of the Python
                     that builds mlflow.db's tables on a first run begins.

SIGINT goes to the whole process group, as a terminal's Ctrl+C does (the test
starts demo.py in a group of its own); SIGKILL too (the builder dies as well);
any other signal to demo.py alone. With DEMO_MEET=FOLDER:N, the SIGNAL MEET
makes each process wait at that statement until N processes have arrived
there (each leaves a file in FOLDER/FUNCTION): runs that do the same thing
at one instant. DEMO_MEET alone means MEET:build:1, builders meeting at their
first statement (first runs at once). DEMO_STOP may name two stops, comma
separated: the builder acts on the build one, demo.py on the other.
DEMO_COUNT=FILE writes how many statements were seen after FUNCTION began.
"""

import os
import signal
import sys
import time

meet = os.environ.get("DEMO_MEET")
stops = (os.environ.get("DEMO_STOP") or ("MEET:build:1" if meet else "")).split(",")
building = sys.argv[:1] == ["-c"]  # demo.py builds mlflow.db with `python -c ...`
stop = next((each for each in stops if each and (each.split(":")[1] == "build") == building), None)
if stop:
    import sqlalchemy

    signal_name, function, at = stop.split(":")
    seen = {"armed": building, "count": 0}

    @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
    def before_statement(*args):
        if not seen["armed"]:
            return
        seen["count"] += 1
        if seen["count"] == int(at) and signal_name == "MEET":
            folder, many = meet.rsplit(":", 1)
            folder = os.path.join(folder, function)
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 120
            while len(os.listdir(folder)) < int(many) and time.monotonic() < deadline:
                time.sleep(0.01)
        elif seen["count"] == int(at):
            number = getattr(signal, signal_name)
            if number in (signal.SIGINT, signal.SIGKILL):
                os.killpg(os.getpgrp(), number)
            else:
                os.kill(os.getpid(), number)

    if not building:
        import atexit
        import importlib

        def arm(original):
            def armed(*args, **kwargs):
                seen["armed"] = True
                return original(*args, **kwargs)
            return armed

        # mlflow.FUNCTION, and the same function where MLflow calls it itself (end_run)
        where, _, name = f"mlflow.{function}".rpartition(".")
        for module in {importlib.import_module(where), importlib.import_module("mlflow.tracking.fluent")}:
            if hasattr(module, name):
                setattr(module, name, arm(getattr(module, name)))
        if os.environ.get("DEMO_COUNT"):
            atexit.register(lambda: open(os.environ["DEMO_COUNT"], "w").write(str(seen["count"])))
