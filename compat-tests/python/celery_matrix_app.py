"""The Celery app of the compatibility matrix (matrix_celery.py): broker
amqp:// (the real sluice), results over the rpc:// backend (AMQP too)."""
import os

from celery import Celery

app = Celery("matrix", broker=os.environ["MATRIX_BROKER"], backend="rpc://")
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=100,
    worker_hijack_root_logger=False,
)


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=5)
def flaky(self, key, fails):
    """Fails the first `fails` runs (retrying itself), then returns how many runs it took."""
    if self.request.retries < fails:
        raise self.retry(exc=RuntimeError(f"{key}: transient failure {self.request.retries}"), countdown=0.1)
    return {"key": key, "runs": self.request.retries + 1}


@app.task(autoretry_for=(ValueError,), retry_kwargs={"max_retries": 2, "countdown": 0.1})
def always_fails(x):
    raise ValueError(f"bad input {x}")
