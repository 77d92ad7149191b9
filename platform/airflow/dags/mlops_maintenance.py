"""Keeps the platform's Airflow data from growing without bound. Daily:

- `logs`: deletes the files under the logs volume (task logs, the DAG
  processor's logs, earlier database exports) older than
  MLOPS_AIRFLOW_LOG_RETENTION_DAYS, then the directories left empty;
- `metadata`: removes history rows (DAG runs and their task instances,
  XComs, jobs, the audit log...) older than MLOPS_AIRFLOW_DB_RETENTION_DAYS
  with `airflow db clean`, exports what it removed as CSV files under the
  logs volume's db-archive/ (deleted in turn with the logs) and drops the
  archive tables. DAGs and their versions are definitions, not history:
  they stay.

Both ages are set in the platform's .env beside compose.yaml and reach
Airflow as the variables mlops_airflow_log_retention_days and
mlops_airflow_db_retention_days; a run triggered with the conf
{"log_days": N, "db_days": M} uses those instead.

On a platform split across hosts each worker host keeps its own logs
volume, and `logs` cleans the one of the worker that runs it.
"""
from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag

# Both tasks refuse an age that is not a whole number of days (a typo in
# .env must not delete everything).
DAYS = """
case "$days" in ''|*[!0-9]*) echo "retention must be a whole number of days, not '$days'" >&2; exit 1 ;; esac
"""

HISTORY = ",".join(
    [
        "dag_run",
        "task_instance",
        "task_instance_history",
        "task_reschedule",
        "xcom",
        "log",
        "job",
        "import_error",
        "trigger",
        "callback",
        "asset_event",
        "deadline",
        "revoked_token",
        "celery_taskmeta",
        "celery_tasksetmeta",
    ]
)


@dag(schedule="@daily", start_date=datetime(2024, 1, 1), catchup=False, max_active_runs=1, tags=["maintenance"])
def mlops_maintenance():
    BashOperator(
        task_id="logs",
        env={"days": "{{ dag_run.conf.get('log_days') or var.value.mlops_airflow_log_retention_days }}"},
        append_env=True,
        bash_command="set -eu" + DAYS + """
cd /opt/airflow/logs
minutes=$((days * 1440))
echo "deleting files older than $days day(s) under $(pwd): $(find . -xdev -type f -mmin +"$minutes" | wc -l)"
find . -xdev -type f -mmin +"$minutes" -delete
find . -xdev -mindepth 1 -type d -empty -delete
""",
    )
    BashOperator(
        task_id="metadata",
        env={"days": "{{ dag_run.conf.get('db_days') or var.value.mlops_airflow_db_retention_days }}"},
        append_env=True,
        # Airflow 3 keeps task processes off the metadata database (it
        # replaces the connection in their environment); this task is the
        # exception, through the platform's own connection, which reaches
        # it in the environment (never on a command line).
        bash_command="set -eu" + DAYS + """
conn=${AIRFLOW_CONN_MLOPS_POSTGRES#postgresql://}
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="postgresql+psycopg2://$conn"
export AIRFLOW__CORE__SQL_ALCHEMY_CONN="$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
before=$(date -u -d "$days days ago" '+%Y-%m-%d %H:%M:%S+00:00')
echo "removing history older than $before"
airflow db clean --clean-before-timestamp "$before" --tables """ + HISTORY + """ --error-on-cleanup-failure --yes
out=/opt/airflow/logs/db-archive/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
airflow db export-archived --export-format csv --output-path "$out" --drop-archives --yes
echo "exported to $out: $(ls "$out" | tr '\\n' ' ')"
""",
    )


mlops_maintenance()
