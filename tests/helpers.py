"""Small helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

import json


def comparable(result: dict) -> dict:
    """A study run's result without what may differ between two executions of the same spec: wall-clock
    times and the executor's attempt count."""
    result = json.loads(json.dumps(result))
    result.pop("attempts", None)
    result.get("curve", {}).pop("seconds", None)
    result.get("final", {}).pop("seconds", None)
    for epoch in result.get("epochs", []):
        epoch.pop("time", None)
        epoch.pop("epoch_time", None)
    return result


def interruptible() -> None:
    """``preexec_fn`` for a child the test will Ctrl-C: a job started in the background (``cmd &``,
    ``nohup``) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt; restore the
    default so the child sees SIGINT as a terminal's Ctrl-C."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
