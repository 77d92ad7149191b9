"""Estimates pi on the Spark cluster (the classic Monte Carlo example)."""
import random
import sys
from operator import add

from pyspark.sql import SparkSession

if __name__ == "__main__":
    partitions = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    spark = SparkSession.builder.appName("mlops-spark-pi").getOrCreate()
    n = 100_000 * partitions

    def inside(_: int) -> int:
        x, y = random.random() * 2 - 1, random.random() * 2 - 1
        return 1 if x * x + y * y <= 1 else 0

    count = spark.sparkContext.parallelize(range(1, n + 1), partitions).map(inside).reduce(add)
    print(f"Pi is roughly {4.0 * count / n}")
    spark.stop()
