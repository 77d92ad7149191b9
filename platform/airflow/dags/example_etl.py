"""A small extract -> transform -> load pipeline (TaskFlow API)."""
from datetime import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["example"], default_args={"owner": "data-team"})
def example_etl():
    @task
    def extract() -> list[int]:
        return list(range(1, 11))

    @task
    def transform(values: list[int]) -> int:
        return sum(v * v for v in values)

    @task
    def load(total: int) -> None:
        assert total == 385, total
        print(f"sum of squares: {total}")

    load(transform(extract()))


example_etl()
