"""How demo.py stops: with one line, never a traceback, and never with a run
left RUNNING. You need not read this file to follow the workshop.

* Ctrl-C stops the script (exit code 130) with one line that says where it
  was: before the run, during it (the run is then marked FAILED), or after it.
* A Ctrl-C that lands while MLflow is in the middle of a call stops the script
  the moment that call returns (log_model, the longest, takes about a second).
  Stopped half-way, MLflow can leave mlflow.db locked, so that the run cannot
  be marked FAILED, or catch the interruption itself and log on. If the call
  takes longer (a server that does not answer), a line says so after two
  seconds, and a second Ctrl-C stops at once.
* A full disk gives one line that says what to do. Any other error keeps the
  usual traceback.
* `leave()` ends the script as soon as everything is saved. Python's own
  tidy-up of all that MLflow, pandas and scikit-learn loaded would add about a
  second, deaf to Ctrl-C.

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
WAITING = "(Waiting for MLflow to finish its current call. Press Ctrl+C again to stop at once.)"


def install():
    signal.signal(signal.SIGINT, on_ctrl_c)
    sys.unraisablehook = not_swallowed
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
    sys.setprofile(None)
    if waiting_for is not None:
        still_waiting.cancel()
        if not returned:  # a second Ctrl-C while MLflow's call goes on: stop now, whatever state it is in
            print(f"\nInterrupted at once. {where_the_run_is(mark_failed=False)}", file=sys.stderr, flush=True)
            os._exit(130)
    if not stopping:
        stopping = True
        print(f"\nInterrupted. {where_the_run_is(mark_failed=True)}", file=sys.stderr)
    sys.exit(130)  # the shell's code for "stopped by Ctrl-C"


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
        # The handler runs at once, here; its SystemExit comes out of the call
        # that just returned, in the code that made it.
        signal.raise_signal(signal.SIGINT)


def where_the_run_is(mark_failed):
    """Say where the run is, after ending a run in progress FAILED if asked."""
    mlflow = sys.modules.get("mlflow")  # None until the script imports it
    if mlflow and mlflow.active_run():
        if not mark_failed:
            return "The run may stay RUNNING in MLflow."
        try:
            mlflow.end_run("FAILED")  # outside any MLflow call: safe
        except Exception as error:
            return f"The run could not be marked FAILED: {error}"
        return "The run is marked FAILED in MLflow."
    if mlflow and mlflow.tracking.fluent._last_active_run_id.get():  # set when a run ends
        return "The run had finished: everything is saved."
    return "No run had started."


def not_swallowed(unraisable):
    # A Ctrl-C that lands in a clean-up callback (a __del__, a weakref callback) is
    # ignored there by Python: signal it again a moment later, to stop once out of it.
    if stopping and unraisable.exc_type is SystemExit:
        threading.Timer(0.01, signal.raise_signal, [signal.SIGINT]).start()
    else:
        sys.__unraisablehook__(unraisable)


def disk_full_in_one_line(kind, error, traceback):
    if "No space left on device" in str(error) or "database or disk is full" in str(error):
        print(f"Stopped: the disk is full ({error}). Free some space, then run again.", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def leave():
    """Exit now, with code 0: everything is saved."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
