"""The object-store seam: one protocol, an S3 implementation and a directory one.

Every byte the system keeps goes through :class:`~fedlib.storage.store.ObjectStore`
(write-once PUT, GET with a size cap, LIST, DELETE, COPY). May import ``wire``.
"""
