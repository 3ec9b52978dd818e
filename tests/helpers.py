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
