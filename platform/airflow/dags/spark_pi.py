"""Submits a PySpark job to the platform's Spark cluster (client mode: the
driver runs in the Celery worker, the executors on the Spark workers)."""
from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag


@dag(schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["spark"])
def spark_pi():
    BashOperator(
        task_id="submit",
        bash_command=(
            "spark-submit --master spark://spark-master:7077 "
            # Executors call the driver back: at this host's address when
            # the platform spans hosts (MLOPS_HOST_ADDRESS, where these
            # ports are published), else at this container's name.
            "--conf spark.driver.host=${MLOPS_HOST_ADDRESS:-$(hostname)} "
            "--conf spark.driver.bindAddress=0.0.0.0 "
            "--conf spark.driver.port=7079 "
            "--conf spark.blockManager.port=7089 "
            "--conf spark.app.name=mlops-spark-pi "
            "/opt/spark/jobs/pi.py 4"
        ),
    )


spark_pi()
