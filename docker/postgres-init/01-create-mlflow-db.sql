-- Runs once, when the Postgres volume is first initialised: the MLflow backend store lives beside
-- Dagster's database (POSTGRES_DB=dagster), owned by the same user.
CREATE DATABASE mlflow;
