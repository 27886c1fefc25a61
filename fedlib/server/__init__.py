"""Everything only the server does: the deployment (keys, buckets, settings), fleet,
ledger, registry, rollback, rotation, credentials, privacy accounting, aggregation
strategies and the round. May import ``trust`` and below; never the device agent
(``client``) or Airflow.
"""
