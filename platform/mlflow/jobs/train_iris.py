"""Trains a small classifier with scikit-learn and logs it to the platform's
MLflow tracking server (MLFLOW_TRACKING_URI): parameters, metrics and the
model, whose files the server stores (proxied artifacts). Run by the
`mlflow_train` DAG on the ML worker, in the image's ML environment
(/opt/ml); prints the run's ID last, for the task's XCom."""
import os
import sys

import mlflow
import mlflow.sklearn
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlops-example")


def main() -> int:
    c = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    x, y = load_iris(return_X_y=True, as_frame=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=42, stratify=y)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")) as run:
        params = {"C": c, "max_iter": 500, "test_size": 0.25}
        mlflow.log_params(params)
        model = LogisticRegression(C=c, max_iter=500).fit(x_train, y_train)
        predicted = model.predict(x_test)
        mlflow.log_metrics({
            "accuracy": accuracy_score(y_test, predicted),
            "f1_macro": f1_score(y_test, predicted, average="macro"),
        })
        mlflow.sklearn.log_model(model, name="model", input_example=x_test.head(3))
    # Last, after MLflow's own lines: the DAG task's XCom.
    print(run.info.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
