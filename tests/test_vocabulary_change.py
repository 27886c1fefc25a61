"""A vocabulary change is a model change: which columns carry over, and how each model
kind carries its parameters onto the new columns (``AnomalyModel.remapped``)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlib.models.logfeatures import MASK_NAMES
from fedlib.models.model import KINDS, FeatureSchema, carried_schema, create_model
from fedlib.wire.vocabulary import Template, TemplateVocabulary

PATTERNS = [
    "sshd: Accepted publickey for <USER> from <IP> port <NUM> ssh2",
    "kernel: link <*>",
    "cron: session opened for user <USER>",
    "nginx: GET <PATH> <2xx>",
    "systemd: Started <*> service",
]


def vocabulary(version: int, patterns: list[str], *, ids: list[int] | None = None, masks=None):
    ids = ids or list(range(1, len(patterns) + 1))
    return TemplateVocabulary(
        version=version,
        masks=list(MASK_NAMES) if masks is None else masks,
        templates=[Template(id=i, pattern=p, count=5) for i, p in zip(ids, patterns, strict=True)],
    )


def test_the_same_templates_under_new_ids_carry_every_column():
    old = vocabulary(1, PATTERNS)
    new = vocabulary(2, PATTERNS[::-1], ids=[11, 12, 13, 14, 15])
    carried = new.carried_features(old)
    assert set(carried) == set(new.feature_names())
    assert carried["tpl_11"] == "tpl_5" and carried["tpl_15"] == "tpl_1"
    assert carried["unknown"] == "unknown" and carried["distinct_templates"] == "distinct_templates"


def test_a_template_that_takes_or_gives_lines_does_not_carry():
    old = vocabulary(1, PATTERNS)
    # "link up" takes lines from "link <*>"; "cron" is gone (its lines may now be unknown)
    new = vocabulary(2, [*PATTERNS[:2], *PATTERNS[3:], "kernel: link up"], ids=[1, 2, 4, 5, 6])
    carried = new.carried_features(old)
    assert carried == {
        "tpl_1": "tpl_1",  # sshd: overlaps nothing that changed
        "tpl_4": "tpl_4",
        "tpl_5": "tpl_5",
        "line_rate": "line_rate",
    }  # not link <*> (overlaps link up), not the new one, not unknown nor the set statistics


def test_a_removed_template_that_overlapped_a_kept_one_stops_it_carrying():
    old = vocabulary(1, [*PATTERNS, "systemd: Started cron service"])
    new = vocabulary(2, PATTERNS)
    carried = new.carried_features(old)
    assert "tpl_5" not in carried  # systemd: Started <*> service gets the cron lines back
    assert {"tpl_1", "tpl_2", "tpl_3", "tpl_4"} <= set(carried)


def test_other_masks_carry_nothing_but_the_line_rate():
    old = vocabulary(1, PATTERNS, masks=[*MASK_NAMES[:-1]])
    assert vocabulary(2, PATTERNS).carried_features(old) == {"line_rate": "line_rate"}


def _counts(rng: np.random.Generator, rows: int, d: int) -> np.ndarray:
    return rng.poisson(rng.gamma(2.0, 2.0, size=d), size=(rows, d)).astype(np.float64)


def _trained(kind: str, vocab: TemplateVocabulary, rows: np.ndarray):
    schema = FeatureSchema.from_data(vocab.feature_names(), rows, vocabulary=vocab)
    model = create_model(kind, schema, seed=1)
    for _ in range(3 if kind != "gaussian" else 1):
        model.fit_local(rows, epochs=2, seed=2)
    return model


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_renumbered_vocabulary_scores_every_row_as_before(kind):
    """Every column carries: the remapped model is the same model with its columns
    permuted, so it scores every row exactly as the old one scores the permuted row."""
    rng = np.random.default_rng(0)
    old_vocab = vocabulary(1, PATTERNS)
    d = len(old_vocab.feature_names())
    rows = _counts(rng, 400, d)
    old = _trained(kind, old_vocab, rows)
    new_vocab = vocabulary(2, PATTERNS[::-1], ids=[11, 12, 13, 14, 15])
    schema, source = carried_schema(old.schema, new_vocab, rows)
    assert None not in source
    new = old.remapped(schema, source)
    assert new.threshold is None  # the caller calibrates
    assert schema.vocabulary == new_vocab
    probe = _counts(rng, 50, d)
    permuted = probe[:, np.asarray(source)]  # the same windows, in the new column order
    np.testing.assert_allclose(new.score(permuted), old.score(probe), rtol=1e-9, atol=1e-9)


def test_a_new_column_starts_neutral_and_independent():
    """An added template: the carried columns keep their parameters and the new column
    is N(0, 1) on its own standardization, so moving it changes only its own term."""
    rng = np.random.default_rng(1)
    old_vocab = vocabulary(1, PATTERNS)
    new_vocab = vocabulary(2, [*PATTERNS, "sudo: <USER> : TTY=<*> ; COMMAND=<PATH>"])
    d_new = len(new_vocab.feature_names())
    rows_old = _counts(rng, 400, len(old_vocab.feature_names()))
    rows_new = _counts(rng, 400, d_new)
    for kind in ("autoencoder", "gaussian"):
        old = _trained(kind, old_vocab, rows_old)
        schema, source = carried_schema(old.schema, new_vocab, rows_new)
        j = new_vocab.feature_names().index("tpl_6")
        assert source[j] is None
        for name, src in zip(schema.names, source, strict=True):
            if src is not None:  # carried columns keep their standardization
                assert schema.mean[schema.names.index(name)] == old.schema.mean[src]
        new = old.remapped(schema, source)
        probe = _counts(rng, 20, d_new)
        low, high = probe.copy(), probe.copy()
        low[:, j], high[:, j] = 0.0, 9.0
        z = schema.apply(np.vstack([low, high]))[:, j]
        term = np.square(z[20:]) - np.square(z[:20])
        # autoencoder: mean squared error over d columns (input weights 0); Gaussian:
        # Mahalanobis, which the ridge moves a little
        expected = term / d_new if kind == "autoencoder" else term
        np.testing.assert_allclose(
            new.score(high) - new.score(low), expected, rtol=2e-2 if kind == "gaussian" else 1e-9
        )


def test_remapping_refuses_what_cannot_carry():
    rng = np.random.default_rng(2)
    vocab = vocabulary(1, PATTERNS)
    rows = _counts(rng, 100, len(vocab.feature_names()))
    model = _trained("gaussian", vocab, rows)
    schema = model.schema
    with pytest.raises(ValueError, match="columns"):
        model.remapped(schema, [0, 1])
    with pytest.raises(ValueError, match="one new column"):
        model.remapped(schema, [0] * schema.dim)
    other = FeatureSchema.from_data(schema.names, rows, "identity", vocabulary=vocab)
    with pytest.raises(ValueError, match="transform"):
        model.remapped(other, list(range(schema.dim)))
