"""Local feature files: the only data the device trains on, and none of it leaves.

Formats: ``*.npy`` (a 2-D numeric array whose columns follow the model's feature
order) and ``*.csv`` (a header row of feature names, in any order; extra columns are
ignored). Files are read in name order and the newest ``max_rows`` rows are used.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


class FeatureError(ValueError):
    pass


def load_features(directory: Path, names: list[str], *, max_rows: int) -> np.ndarray:
    directory = Path(directory)
    if not directory.is_dir():
        raise FeatureError(f"features folder {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".csv"))
    blocks = [load_feature_file(p, names) for p in files]
    if not blocks:
        return np.zeros((0, len(names)), dtype=np.float32)
    rows = np.concatenate(blocks)[-max_rows:]
    if not np.all(np.isfinite(rows)):
        raise FeatureError("feature files hold NaN or infinite values")
    if np.any(rows < 0):
        raise FeatureError("feature files hold negative counts")
    return rows


def load_feature_file(path: Path, names: list[str]) -> np.ndarray:
    """One .npy or .csv feature file as an (N, len(names)) float array, columns by name."""
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise FeatureError(f"{path.name}: expected shape (N, {len(names)}), got {arr.shape}")
        return np.asarray(arr, dtype=np.float32)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return np.zeros((0, len(names)), dtype=np.float32)
        missing = [n for n in names if n not in header]
        if missing:
            raise FeatureError(f"{path.name}: missing columns {missing[:5]}")
        cols = [header.index(n) for n in names]
        try:
            data = [[float(row[c]) for c in cols] for row in reader if row]
        except (ValueError, IndexError) as exc:
            raise FeatureError(f"{path.name}: {exc}") from None
    return np.asarray(data, dtype=np.float32).reshape(-1, len(names))
