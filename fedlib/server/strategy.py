"""Which aggregator a round uses: the exact streaming FedAvg sum (also under FLTrust), or
a robust coordinate-wise statistic (trimmed mean, median). One decision, one place.
"""

from __future__ import annotations

from fedlib.server.aggregation import AggregationConfig, Aggregator, StreamingAggregator
from fedlib.server.robust import RobustAggregator


def new_aggregator(dim: int, config: AggregationConfig) -> Aggregator:
    """The aggregator a config asks for: streaming FedAvg, or a robust statistic."""
    if config.robust in ("none", "fltrust"):
        return StreamingAggregator(dim, config)
    return RobustAggregator(dim, config)


def aggregator_from_bytes(data: bytes, config: AggregationConfig) -> Aggregator:
    """Read a shard's partial or a round's aggregate written by ``to_bytes``."""
    if config.robust in ("none", "fltrust"):
        return StreamingAggregator.from_bytes(data, config)
    return RobustAggregator.from_bytes(data, config)
