"""The operator's tools over the server layer: ``fl-admin`` (the command line) and the
dashboard's read model (rounds, versions, quarantine). No Airflow import: the plugin
in :mod:`fedlib.integrations.airflow` serves the dashboard.
"""
