"""A Spark job that reads a table of the platform's PostgreSQL over JDBC
(Airflow's `dag_run`) and writes an aggregate back
(`mlops_examples.dag_run_summary`), with Debian's PostgreSQL JDBC driver
from the image. Jars of your own go to the stack's spark/jars/; submitted
as spark_pi is (client mode, the driver in the Celery worker)."""
from datetime import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag


@dag(schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["spark", "jdbc"])
def spark_jdbc():
    BashOperator(
        task_id="summarize",
        bash_command=(
            "spark-submit --master spark://spark-master:7077 "
            "--conf spark.driver.host=${MLOPS_HOST_ADDRESS:-$(hostname)} "
            "--conf spark.driver.bindAddress=0.0.0.0 "
            "--conf spark.driver.port=7079 "
            "--conf spark.blockManager.port=7089 "
            "--conf spark.app.name=mlops-jdbc-summary "
            "/opt/spark/jobs/jdbc_summary.py"
        ),
    )


spark_jdbc()
