"""The fleet-wide log template vocabulary: which template each log line counts toward.

Federated averaging only averages meaning when column ``j`` is the same event on every
device, so the vocabulary travels inside the signed model package (``metadata.json``,
beside the feature schema it defines) and a device maps a line to a feature only
through it. It is mined from sample logs the operator already has
(``fl-admin templates learn``), reviewed as a file, then published with a model.

A template is a sequence of whitespace-separated tokens over the *masked* message
(:mod:`fedlib.models.logfeatures` masks IPs, numbers, ids, paths, users first): a
literal token matches itself, ``<*>`` matches any one token. The features a window
yields are one count per template, the count of lines no template matched
(``unknown``), and a few window statistics (:data:`WINDOW_STATS`).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlib.wire.protocol import canonical_json

VOCABULARY_SCHEMA: Final = "dadm.template-vocabulary.v1"
WILDCARD: Final = "<*>"
UNKNOWN_FEATURE: Final = "unknown"
#: Per-window statistics appended after the template counts, in this order.
WINDOW_STATS: Final = ("line_rate", "distinct_templates", "unknown_share")
MAX_TEMPLATES: Final = 4096
MAX_TEMPLATE_TOKENS: Final = 256
MAX_PATTERN_CHARS: Final = 4096


class Template(BaseModel):
    """One template: a stable id (the feature ``tpl_<id>``), its pattern, and how many
    sample lines it covered when it was mined (for review; not used on devices)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[int, Field(ge=1, le=10_000_000)]
    pattern: Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]
    count: Annotated[int, Field(ge=0)] = 0

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(self.pattern.split())

    @property
    def feature(self) -> str:
        return f"tpl_{self.id}"


class TemplateVocabulary(BaseModel):
    """A versioned set of templates; ids are never reused for another pattern."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["dadm.template-vocabulary.v1"] = Field(
        default=VOCABULARY_SCHEMA, alias="schema"
    )
    version: Annotated[int, Field(ge=1)]
    #: The masking rules the patterns were mined with (:data:`fedlib.models.logfeatures.MASKS`
    #: names, in order); a device with other rules refuses the vocabulary.
    masks: list[str]
    templates: Annotated[list[Template], Field(min_length=1, max_length=MAX_TEMPLATES)]

    @model_validator(mode="after")
    def _distinct(self) -> TemplateVocabulary:
        ids = [t.id for t in self.templates]
        if len(set(ids)) != len(ids):
            raise ValueError("template ids must be distinct")
        patterns = [" ".join(t.tokens) for t in self.templates]
        if len(set(patterns)) != len(patterns):
            raise ValueError("template patterns must be distinct")
        if any(not 0 < len(t.tokens) <= MAX_TEMPLATE_TOKENS for t in self.templates):
            raise ValueError(f"a template has 1 to {MAX_TEMPLATE_TOKENS} tokens")
        return self

    def feature_names(self) -> list[str]:
        """The model's feature columns, in order: templates by id, unknown, statistics."""
        ordered = sorted(self.templates, key=lambda t: t.id)
        return [t.feature for t in ordered] + [UNKNOWN_FEATURE, *WINDOW_STATS]

    def carried_features(self, previous: TemplateVocabulary) -> dict[str, str]:
        """This vocabulary's feature columns that count exactly what a column of
        ``previous`` counted, each mapped to that column's name (a template may have a
        new id): a model's parameters for them carry over when this vocabulary replaces
        ``previous``.

        ``line_rate`` always survives. A template column survives when the same pattern
        is in both (under the same masks) and no template only one of them has could
        match a line it matches: an added ``link up`` takes lines from ``link <*>``, a
        removed one gives them back, and either changes what ``link <*>`` counts. The
        columns that depend on the whole set (``unknown``, ``distinct_templates``,
        ``unknown_share``) survive only when the template set is unchanged.
        """
        carried = {"line_rate": "line_rate"}
        if self.masks != previous.masks:
            return carried
        now = {" ".join(t.tokens): t for t in self.templates}
        then = {" ".join(t.tokens): t for t in previous.templates}
        changed = [tuple(p.split()) for p in set(now) ^ set(then)]
        for pattern in set(now) & set(then):
            tokens = tuple(pattern.split())
            if not any(_overlap(tokens, other) for other in changed):
                carried[now[pattern].feature] = then[pattern].feature
        if not changed:
            for name in (UNKNOWN_FEATURE, *WINDOW_STATS):
                carried[name] = name
        return carried

    def to_json(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", by_alias=True))

    def digest(self) -> str:
        """SHA-256 of the canonical document: names the vocabulary a window was counted with."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> TemplateVocabulary:
        return cls.model_validate_json(data)


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether some message could match both patterns (``<*>`` is one token)."""
    return len(a) == len(b) and all(x == y or WILDCARD in (x, y) for x, y in zip(a, b, strict=True))
