"""The perceptual near-duplicate guard: a re-encoded picture is found, and may not cross splits."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr.duplicates import THRESHOLD, near_duplicate_pairs
from cxr.images import Preprocessing, decode, preprocess
from cxr.splits import LeakageError, check_near_duplicates, resolve_duplicates

SPEC = Preprocessing(image_size=64)


def real_images(mirror, n: int) -> list[bytes]:
    """The bytes of n real sample radiographs of different patients (adult ieee8023 and rsna)."""
    sources = pd.read_csv(mirror / "sources.csv", keep_default_na=False, dtype=str)
    rows = sources[(sources["sample"] == "1") & sources["dataset"].isin(["ieee8023", "rsna"])]
    rows = rows.drop_duplicates("group_id").head(n)
    return [(mirror / p).read_bytes() for p in rows["path"]]


def reencode(data: bytes) -> bytes:
    """The same picture as another source would publish it: RGB, resized a little, JPEG q85."""
    img = decode(data).convert("RGB")
    img = img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def arrays(blobs: list[bytes]) -> np.ndarray:
    return np.stack([preprocess(decode(b), SPEC) for b in blobs])


def test_a_reencoded_copy_is_found_and_distinct_pictures_are_not(mirror):
    originals = real_images(mirror, 12)
    copy = reencode(originals[3])
    assert copy != originals[3]  # different bytes, so sha256 cannot see it
    pairs = near_duplicate_pairs(arrays([*originals, copy]))
    assert [(p.i, p.j) for p in pairs] == [(3, 12)]
    assert pairs[0].correlation >= THRESHOLD


def table(splits: list[str], cohorts: list[str] | None = None) -> pd.DataFrame:
    n = len(splits)
    return pd.DataFrame({
        "path": [f"img{i}.png" for i in range(n)], "split": splits,
        "cohort": cohorts or ["main"] * n, "label": ["covid"] * n,
        "group_id": [f"g{i}" for i in range(n)],
    })  # fmt: skip


def test_guard_names_the_pair_when_a_copy_crosses_from_train(mirror):
    originals = real_images(mirror, 6)
    pairs = near_duplicate_pairs(arrays([*originals, reencode(originals[1])]))
    crossing = table(["train", "train", "val", "test", "test", "val", "test"])
    with pytest.raises(LeakageError, match=r"img1\.png and img6\.png"):
        check_near_duplicates(crossing, pairs)
    # the same picture twice in test (or test and a case) is no training leak
    check_near_duplicates(table(["train", "test", "val", "test", "test", "val", "test"]), pairs)


def test_conflicting_labels_are_dropped_same_labels_merged_case_twins_forced_to_test():
    from cxr.duplicates import Pair

    t = table(["", ""] * 3, ["main", "main", "main", "main", "main", "cases"])
    t.loc[1, "label"] = "normal"  # rows 0, 1: one picture with two labels
    pairs = [Pair(0, 1, 1.0), Pair(2, 3, 0.995), Pair(4, 5, 1.0)]
    out, forced, report = resolve_duplicates(t, pairs, twin_groups={"g2"})
    assert 0 not in out.index and 1 not in out.index
    assert out.at[2, "group_id"] == out.at[3, "group_id"] == "g2"  # merged
    assert out.at[3, "source_group_id"] == "g3"
    assert forced == {"g2", "g4"}  # the case twin's group, and g4 (a picture of the case)
    assert report["rows_dropped_conflicting_labels"] == 2 and report["groups_merged"] == 1


def test_merged_groups_take_their_components_smallest_id_whatever_the_pair_order():
    """A chain of near-duplicates (g5-g6, g6-g3, g3-g4) is one patient, named g3, its smallest
    id, however the pairs were ordered; g1-g2 is another and g0 stays alone.

    Watched red with the largest id in place of the smallest (np.maximum.at) and with pairs
    merged only directly (g5 left apart from g3)."""
    from itertools import permutations

    from cxr.duplicates import Pair

    pairs = [Pair(5, 6, 1.0), Pair(1, 2, 1.0), Pair(6, 3, 1.0), Pair(3, 4, 1.0)]
    for order in permutations(pairs):
        out, _, report = resolve_duplicates(table([""] * 7), list(order), twin_groups=set())
        assert out["group_id"].tolist() == ["g0", "g1", "g1", "g3", "g3", "g3", "g3"]
        assert out["source_group_id"].tolist() == [f"g{i}" for i in range(7)]
        assert report["groups_merged"] == 4
