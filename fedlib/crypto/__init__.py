"""Keys, sealing and signatures, only from ``cryptography`` and standard constructions.

``sealing``: Ed25519 device keys, HPKE (RFC 9180; X25519 or ML-KEM-768 + X25519) to the
server, envelope verification before any parsing. ``signing``: OpenSSF model-signing
bundles (ECDSA). ``pq_signing``: ML-DSA-65 package signatures. May import ``wire``.
"""
