"""Trains a small scikit-learn model and logs its parameters, metrics and
the model itself to the platform's MLflow tracking server.

Needs the `mlflow` profile (`mlopsctl deploy --profile mlflow`): the
training runs on the ML worker (Celery queue `ml`), whose image has an ML
environment of its own (/opt/ml: MLflow, scikit-learn) apart from
Airflow's pinned packages. Without the profile the first task fails at
once with that hint instead of leaving the run queued."""
from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag, task

TRACKING = "http://mlflow:5000"


@dag(schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["mlflow", "ml"], params={"C": 1.0})
def mlflow_train():
    # No retries: a missing server is a deployment matter, not a blip.
    @task(retries=0)
    def check_mlflow():
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{TRACKING}/health", timeout=10).read()
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(
                f"the MLflow tracking server ({TRACKING}) does not answer ({e}); "
                "deploy the platform with `mlopsctl deploy --profile mlflow`"
            ) from e

    train = BashOperator(
        task_id="train",
        queue="ml",
        # The run's ID is the last line printed: the task's XCom. The
        # parameter reaches the script through the environment, never
        # through the shell's parsing.
        bash_command='/opt/ml/bin/python /opt/mlflow/jobs/train_iris.py "$TRAIN_C"',
        env={"MLFLOW_TRACKING_URI": TRACKING, "MLFLOW_EXPERIMENT_NAME": "mlops-example", "TRAIN_C": "{{ params.C }}"},
        append_env=True,
    )
    check_mlflow() >> train


mlflow_train()
