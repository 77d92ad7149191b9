"""Health checks of the Airflow components that serve no HTTP health page.

    python /opt/mlops/health.py job TriggererJob|DagProcessorJob
    python /opt/mlops/health.py worker

Docker runs a health check every few seconds for as long as the platform
runs. Airflow's own checks (`airflow jobs check`, `celery --app
airflow...celery_executor.app inspect ping`) import Airflow: about 2.5 s
of CPU each, every 30 s, for each of four components, a third of a core
spent on checks alone on an idle host. These ask the same questions
without importing Airflow (about 0.04 s of CPU for a job, 0.3 s for a
worker; measured in the platform's containers), so the checks can run every 10 s and a new component is found
healthy sooner.

`job`: as `airflow jobs check --job-type TYPE --hostname $(hostname)`:
the newest running job of that type on this container's host name has a
heartbeat younger than Airflow's health check threshold for it (30 s
unless the environment sets it, as Airflow reads it). The database is the
one in AIRFLOW__DATABASE__SQL_ALCHEMY_CONN.

`worker`: as `celery inspect ping -d celery@$(hostname)`: the Celery
worker of this container answers a ping through the broker in
AIRFLOW__CELERY__BROKER_URL, which proves it consumes from it.

Exit 0 when healthy, 1 with the reason on stderr otherwise. Credentials come
from the environment only, never a command line.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import parse_qsl, unquote, urlsplit

# Airflow's settings for each job type's threshold (`[section] key`, as
# airflow.jobs.job.health_check_threshold reads them), with their defaults.
THRESHOLDS = {
    "TriggererJob": ("AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD", 30.0),
    "DagProcessorJob": ("AIRFLOW__DAG_PROCESSOR__HEALTH_CHECK_THRESHOLD", 30.0),
}


def connection_args(url: str) -> dict[str, str | int]:
    """libpq's keywords for a SQLAlchemy URL (`postgresql+psycopg2://USER:
    PASSWORD@HOST:PORT/DB?libpq options`): parsed here, so that no part of
    it, the password included, is ever in an error message."""
    parts = urlsplit(url)
    args: dict[str, str | int] = dict(parse_qsl(parts.query))
    args.update(
        host=parts.hostname or "localhost",
        port=parts.port or 5432,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        dbname=unquote(parts.path.lstrip("/")),
    )
    return args


def job(job_type: str) -> str | None:
    import psycopg2

    setting, default = THRESHOLDS[job_type]
    threshold = float(os.environ.get(setting) or default)
    try:
        args = connection_args(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    except ValueError:
        return "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is not a URL this check reads"
    # Bounded: a check that hangs is Docker's timeout, with no reason given.
    conn = psycopg2.connect(**args, connect_timeout=5, options="-c statement_timeout=5000")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT extract(epoch FROM now() - latest_heartbeat) FROM job"
                " WHERE state = 'running' AND job_type = %s AND hostname = %s"
                " ORDER BY latest_heartbeat DESC NULLS LAST LIMIT 1",
                (job_type, socket.gethostname()),
            )
            row = cur.fetchone()
    finally:
        conn.close()
    if row is None:
        return f"no running {job_type} on {socket.gethostname()}"
    if row[0] is None:
        return f"the running {job_type} on {socket.gethostname()} has no heartbeat yet"
    age = float(row[0])
    if age >= threshold:
        return f"{job_type}'s last heartbeat is {age:.0f} s old (threshold {threshold:.0f} s)"
    return None


def worker() -> str | None:
    from celery import Celery

    app = Celery(broker=os.environ["AIRFLOW__CELERY__BROKER_URL"])
    app.conf.broker_connection_timeout = 5
    app.conf.broker_connection_retry = False
    name = f"celery@{socket.gethostname()}"
    replies = app.control.ping(destination=[name], timeout=5)
    if not any(name in reply for reply in replies):
        return f"{name} did not answer a ping through the broker"
    return None


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "job" and argv[1] in THRESHOLDS:
        check = lambda: job(argv[1])  # noqa: E731
    elif argv == ["worker"]:
        check = worker
    else:
        print(f"usage: health.py job {'|'.join(THRESHOLDS)} | health.py worker", file=sys.stderr)
        return 2
    try:
        problem = check()
    except Exception as e:  # a refused connection, a timeout: unhealthy, said why
        problem = f"{type(e).__name__}: {e}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
