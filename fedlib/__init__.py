"""DADM secure federated learning: the library, in layers by role.

Read it from the bottom up; imports only point down, and ``make lint`` enforces it
(import-linter contracts in ``pyproject.toml``):

- ``failpoints``: named points where fault tests kill the process (SIGKILL), below all;
- ``errors``, ``files``: exceptions and atomic local writes, used by every layer;
- ``wire``: byte and document formats (envelope, payload, package metadata, canonical
  JSON, compression): pure, no I/O;
- ``crypto`` and ``storage``: keys, sealing and signatures; the object-store seam;
- ``models``: feature schema, model kinds, ONNX export and scoring, local training;
- ``trust``: the TUF channel (device client apart from repository), package
  signatures, air-gap bundles (verify apart from export), the signed device config;
- ``server``: the deployment and everything only the server does (fleet, ledger,
  registry, rounds, aggregation, rollback, rotation, credentials, privacy, settings);
- ``ops``: the operator's tools over the server (``fl-admin``, the dashboard's data);
- ``integrations.airflow``: the only code that imports Airflow.

The device agent is the top-level package ``client``: it may import ``trust`` and
below, never ``server``, ``ops`` or Airflow.
"""
