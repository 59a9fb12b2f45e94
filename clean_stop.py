"""How demo.py stops: with one line, never a traceback, and never with a run
left RUNNING. You need not read this file to follow the workshop.

* Ctrl-C stops the script (exit code 130) with one line that says where it
  was: before the run, during it (the run is then marked FAILED), or after it.
* A Ctrl-C that lands while MLflow is in the middle of a call waits until that
  call returns (the longest, building mlflow.db and saving the model, take
  about a second). Stopped half-way, MLflow can leave mlflow.db locked, so
  that the run cannot be marked FAILED, or catch the interruption itself and
  log on. If the call takes longer (a server that does not answer), a line
  says so after two seconds, and a second Ctrl-C stops at once.
* Once the run is settled, the script exits at once (os._exit), as it does
  after a run that finished: Python's own tidy-up of all that MLflow, pandas
  and scikit-learn loaded would add about a second. Nothing is left to tidy:
  MLflow's calls have returned, and a later run deletes whatever a stopped
  one left behind (see local_store.py).
* A full disk gives one line that says what to do. Any other error keeps the
  usual traceback.

Nothing here applies in a notebook, where the interrupt button stops only the
running cell.
"""

import os
import signal
import sys
import threading

stopping = False  # a Ctrl-C is being acted on
waiting_for = None  # the MLflow call a Ctrl-C waits for (its frame)
returned = False  # that call has returned
still_waiting = None  # a timer that says, after two seconds, that the call goes on
marking_failed = False  # the run is being marked FAILED
WAITING = "(Waiting for MLflow to finish its current call. Press Ctrl+C again to stop at once.)"


def install():
    signal.signal(signal.SIGINT, on_ctrl_c)
    sys.excepthook = disk_full_in_one_line


def on_ctrl_c(signal_number, frame):
    global stopping, waiting_for, still_waiting
    if not stopping and waiting_for is None:
        waiting_for = outermost_mlflow_call(frame)
        if waiting_for:
            # Python calls a profile function whenever a function of this
            # thread starts or returns: use it to see that call return.
            sys.setprofile(stop_when_returned)
            still_waiting = threading.Timer(2, print, [WAITING], {"file": sys.stderr, "flush": True})
            still_waiting.daemon = True
            still_waiting.start()
            return
    if stopping or (waiting_for and not returned):  # pressed again while MLflow's call goes on,
        # or while the run is being marked FAILED below
        print(f"\nInterrupted at once. {where_the_run_is(mark_failed=False)}", file=sys.stderr)
        leave(130)
    stopping = True
    sys.setprofile(None)
    if still_waiting:
        still_waiting.cancel()
    print(f"\nInterrupted. {where_the_run_is(mark_failed=True)}", file=sys.stderr)
    leave(130)  # the shell's code for "stopped by Ctrl-C"


def outermost_mlflow_call(frame):
    """The frame of the script's current call into MLflow, or into SQLAlchemy
    (MLflow's database library), or None if it is in neither."""
    outermost = None
    while frame:
        if frame.f_globals.get("__name__", "").startswith(("mlflow", "sqlalchemy")):
            outermost = frame
        frame = frame.f_back
    return outermost


def stop_when_returned(frame, event, arg):
    global returned
    if event == "return" and frame is waiting_for:
        returned = True
        sys.setprofile(None)
        signal.raise_signal(signal.SIGINT)  # the handler runs at once, and stops


def where_the_run_is(mark_failed):
    """Say where the run is, after ending a run in progress FAILED if asked."""
    global marking_failed
    mlflow = sys.modules.get("mlflow")  # None until the script imports it
    if marking_failed or mlflow and mlflow.active_run():
        if not mark_failed:
            return "The run may stay RUNNING in MLflow."
        marking_failed = True
        try:
            mlflow.end_run("FAILED")  # outside any MLflow call: safe
        except Exception as error:
            return f"The run could not be marked FAILED: {error}"
        return "The run is marked FAILED in MLflow."
    if mlflow and mlflow.tracking.fluent._last_active_run_id.get():  # set when a run ends
        return "The run had finished: everything is saved."
    return "No run had started."


def disk_full_in_one_line(kind, error, traceback):
    if "No space left on device" in str(error) or "database or disk is full" in str(error):
        print(f"Stopped: the disk is full ({error}). Free some space, then run again.", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def leave(code=0):
    """Exit now: everything is saved, or the run is settled."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
