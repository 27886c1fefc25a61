"""The Airflow 3 integration: the only code in the project that imports Airflow.

``runtime``: settings, the ``fl_s3`` connection and the deployment as tasks build them;
``dashboard_app``: the FastAPI app the plugin mounts. DAG files in ``dags/`` and the
plugin in ``plugins/`` are wiring over these.
"""
