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
            "--conf spark.driver.host=$(hostname) "
            "--conf spark.app.name=mlops-spark-pi "
            "/opt/spark/jobs/pi.py 4"
        ),
    )


spark_pi()
