"""Shared by the compatibility-matrix scripts (matrix_*.py): the broker's
ports from argv (AMQP STOMP WEB_STOMP), one JSON line per scenario, and the
restart hook (print RESTART?, wait for RESTARTED on stdin)."""
import hashlib
import json
import os
import sys
import time
import traceback

AMQP_PORT, STOMP_PORT, WS_PORT = (int(a) for a in sys.argv[1:4])
BIG = 16 * 1024 * 1024


class NotApplicable(Exception):
    """The scenario does not exist for this client (reported as n/a)."""


def restart():
    """Asks the test driver to restart the broker on the same ports; returns once it is back."""
    print("RESTART?", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "RESTARTED":
        raise RuntimeError(f"driver answered {line!r}")


def report(client, scenario, ok, detail="", secs=0.0):
    print(json.dumps({"client": client, "scenario": scenario, "ok": ok, "detail": detail, "secs": round(secs, 2)}), flush=True)


# The scenarios every client script runs, in order: (matrix name, name of
# the script's function for it).
SCENARIOS = [
    ("declare_bind", "declare_bind"),
    ("publish_consume_ack", "publish_consume_ack"),
    ("prefetch", "prefetch"),
    ("confirms", "confirms"),
    ("mandatory_return", "mandatory_return"),
    ("dead_letter", "dead_letter"),
    ("ttl", "ttl"),
    ("priority", "priority"),
    ("transactions", "transactions"),
    ("reconnect", "reconnect"),
    ("large_16mib", "large"),
    ("connections_500", "connections_500"),
]


def standard(functions):
    """(name, function) for every scenario of SCENARIOS, from a script's globals() or locals()."""
    return [(name, functions[fn]) for name, fn in SCENARIOS]


def run(client, scenarios):
    """Runs each (name, fn) independently; fn returns an optional detail string."""
    for name, fn in scenarios:
        start = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except NotApplicable as e:
            ok, detail = None, str(e)
        except BaseException as e:  # noqa: BLE001 - every failure is a matrix cell
            traceback.print_exc()
            frames = traceback.extract_tb(e.__traceback__)
            script = os.path.basename(sys.argv[0])
            where = next((f for f in reversed(frames) if os.path.basename(f.filename) == script), frames[-1])
            ok, detail = False, f"{type(e).__name__}: {e} ({os.path.basename(where.filename)} line {where.lineno})"
        report(client, name, ok, detail, time.monotonic() - start)


def wait_until(pred, timeout=5.0, step=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def big_body():
    body = os.urandom(BIG)
    return body, hashlib.sha256(body).hexdigest()


def sha(body):
    return hashlib.sha256(body).hexdigest()


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)
