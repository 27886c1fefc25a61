"""What a device may trust, and how the server makes it trustworthy.

The TUF channel (``channel_client`` for devices apart from ``channel_repository`` for
the server, ``channel_layout`` shared), package signatures (``package``), the signed
device config, air-gap bundles (``airgap`` verifies, ``airgap_export`` builds). May
import ``models``, ``crypto``, ``storage`` and ``wire``; never ``server``.
"""
