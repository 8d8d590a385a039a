"""Compatibility matrix, a real Celery app (celery_matrix_app.py): its worker
runs as a subprocess, tasks complete with retries and results (rpc://
backend), and the worker and the client survive a broker restart:
python matrix_celery.py AMQP STOMP WS."""
import os
import signal
import subprocess
import sys
import time

from matrix_common import AMQP_PORT, check, restart, run

CLIENT = "celery"
HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["MATRIX_BROKER"] = f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}//"
sys.path.insert(0, HERE)

import celery  # noqa: E402
from celery_matrix_app import add, always_fails, app, flaky  # noqa: E402

worker = subprocess.Popen(
    [sys.executable, "-m", "celery", "-A", "celery_matrix_app", "worker", "--pool=solo", "--loglevel=WARNING", "-n", "matrix@localhost"],
    cwd=HERE,
    env=dict(os.environ, PYTHONPATH=HERE),
    stdin=subprocess.DEVNULL,
    stdout=sys.stderr,
)


def worker_ping():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        check(worker.poll() is None, f"worker exited with {worker.returncode}")
        replies = app.control.ping(timeout=1)
        if replies:
            check(any("matrix@localhost" in r for r in replies), f"ping replies {replies}")
            return f"worker answered after {30 - (deadline - time.monotonic()):.1f}s"
    raise AssertionError("the worker never answered a ping")


def task_result():
    check(add.delay(2, 3).get(timeout=20) == 5, "add(2, 3)")
    results = celery.group(add.s(i, i) for i in range(10))().get(timeout=30)
    check(results == [2 * i for i in range(10)], f"group {results}")


def task_retry():
    r = flaky.delay("retry", 2).get(timeout=30)
    check(r == {"key": "retry", "runs": 3}, f"result {r}")
    res = always_fails.delay(1)
    try:
        res.get(timeout=30)
        raise AssertionError("a failing task returned a result")
    except ValueError as e:
        check("bad input 1" in str(e), str(e))
    check(res.state == "FAILURE", res.state)


def reconnect():
    restart()
    # The client publishes with retries and the worker reconnects on its own.
    r = add.apply_async((20, 22), retry=True, retry_policy={"max_retries": 30, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 1})
    check(r.get(timeout=60) == 42, "add after restart")


try:
    run(CLIENT, [
        ("worker_ping", worker_ping),
        ("task_result", task_result),
        ("task_retry", task_retry),
        ("reconnect", reconnect),
    ])
finally:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(15)
    except subprocess.TimeoutExpired:
        worker.kill()
