"""Typed records of a round that cross a task boundary or live in the state bucket."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """What happened to one inbox object; the ledger stores one per update, once."""

    key: str
    sha256: str
    size: int
    accepted: bool
    reason: str | None = None
    detail: str | None = None
    client_id: str | None = None
    update_id: str | None = None
    base_version: int | None = None
    num_samples: int | None = None
    weight_units: int | None = None
    norm: float | None = None
    etag: str | None = None  # of the object version that was judged
    #: DP adaptive clipping: the device's bit "norm <= C before clipping" (None: absent).
    unclipped: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}
