"""Reads a table of the platform's PostgreSQL over JDBC and writes an
aggregate back: DAG runs per DAG and state, from Airflow's own `dag_run`,
into `mlops_examples.dag_run_summary` (replaced on each run).

The JDBC driver is Debian's (in Spark's jars, on every driver and executor).
The connection is the Airflow connection `mlops_postgres`, which the
platform defines in the Celery worker's environment
(AIRFLOW_CONN_MLOPS_POSTGRES; Airflow 3 keeps tasks off the metadata
database's own setting): the password goes to the executors inside the
job, never on a command line, but it does travel
over Spark's RPC, which is not authenticated or encrypted (see the README
on splitting the platform between hosts). Jobs of your own should use a
role of their own with only the rights they need, not Airflow's."""
import os
import sys
from urllib.parse import unquote, urlsplit

from pyspark.sql import SparkSession, functions as F

SCHEMA = "mlops_examples"
TABLE = f"{SCHEMA}.dag_run_summary"


def connection():
    url = urlsplit(os.environ["AIRFLOW_CONN_MLOPS_POSTGRES"])
    jdbc = f"jdbc:postgresql://{url.hostname}:{url.port or 5432}{url.path}"
    return jdbc, unquote(url.username or ""), unquote(url.password or "")


def main() -> int:
    jdbc, user, password = connection()
    spark = SparkSession.builder.appName("mlops-jdbc-summary").getOrCreate()
    # The schema, through the driver's own JDBC connection (Spark's writer
    # creates tables, not schemas).
    jvm = spark.sparkContext._jvm
    conn = jvm.java.sql.DriverManager.getConnection(jdbc, user, password)
    try:
        conn.createStatement().execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    finally:
        conn.close()
    options = {"url": jdbc, "user": user, "password": password, "driver": "org.postgresql.Driver"}
    # A query of the columns used: Spark reads the schema of whatever it is
    # given, and `dag_run` has columns (JSON, Airflow's own types) that need
    # not be mapped to be counted.
    query = "SELECT dag_id, state, end_date FROM public.dag_run"
    runs = spark.read.format("jdbc").options(query=query, **options).load()
    summary = (
        runs.groupBy("dag_id", "state")
        .agg(F.count("*").alias("runs"), F.max("end_date").alias("last_end"))
        .withColumn("computed_at", F.current_timestamp())
    )
    # Overwrite with truncate: the table (and grants on it) stays; its rows are replaced.
    summary.write.format("jdbc").options(dbtable=TABLE, truncate="true", **options).mode("overwrite").save()
    written = spark.read.format("jdbc").options(dbtable=TABLE, **options).load()
    total = written.agg(F.sum("runs")).first()[0] or 0
    print(f"{written.count()} (dag, state) rows, {total} runs, written to {TABLE}")
    spark.stop()
    return 0 if total > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
