"""Wire and document formats: what bytes mean, with no I/O and no keys.

Envelope framing and headers, the update payload, package metadata, canonical and
strict JSON, the inbox key grammar and delta compression. Imports only
:mod:`fedlib.errors` (and numpy/pydantic); everything else builds on it.
"""
