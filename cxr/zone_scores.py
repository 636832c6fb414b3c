"""Where a map lies relative to the lungs: in-lung share, zone lift and the pointing game against
the lung zones a radiologist named (cxr.lungs draws the zones), and their summaries with CIs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr import lungs
from cxr.faithfulness import finite_or_none

# --- where the map lies relative to the lungs ------------------------------------------------


def case_zone_scores(cams: np.ndarray, masks: np.ndarray, named: list[str]) -> list[dict[str, Any]]:
    """Per case: in-lung share of the map, the lungs' area share, and agreement with the
    zones the radiologist named (`zones` strings like "R-upper;L-lower", patient's side).

    `pointing_hit`: the map's maximum within the lungs lies in a named zone; `chance` is the
    named zones' share of the lung area, the hit rate of a maximum dropped at random inside the
    lungs (and the in-lung mass share a flat map gives them). Whether the map's overall maximum
    lies inside the lungs at all is `peak_in_lungs`, scored for every case with lungs.
    Zone scores are None for a case naming no zone; a case naming all six scores lift 1, hit
    and chance 1 by construction (flagged `all_zones`).
    """
    out = []
    for cam, mask, zones_text in zip(cams, masks, named, strict=True):
        ids = lungs.zone_ids(str(zones_text))
        zones = lungs.lung_zones(mask)
        row: dict[str, Any] = {
            "in_lung_share": finite_or_none(lungs.in_lung_share(cam, mask)),
            "lung_area_share": float(lungs.lung_area_share(mask)),
            "zones": ";".join(lungs.ZONES[i - 1] for i in ids),
            "all_zones": len(set(ids)) == len(lungs.ZONES),
            "peak_in_lungs": None, "zone_lift": None, "pointing_hit": None, "chance": None,
        }  # fmt: skip
        if (zones > 0).any():
            row["peak_in_lungs"] = lungs.peak_in_lungs(cam, zones)
        if ids and (zones > 0).any():
            row["zone_lift"] = finite_or_none(lungs.zone_lift(cam, zones, row["zones"]))
            row["pointing_hit"] = lungs.pointing_hit(cam, zones, row["zones"])
        if row["pointing_hit"] is not None:  # the baseline of exactly the cases scored
            row["chance"] = float(np.isin(zones, ids).sum() / (zones > 0).sum())
        out.append(row)
    return out


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def lung_checks(
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    class_names: list[str],
    case_scores: list[dict[str, Any]],
    case_names: list[str],
    *,
    bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The lung part of metrics/gradcam.json.

    `test` = (maps, predicted lung masks, predicted classes) of test images: in-lung share of
    the maps per predicted class, next to the lungs' area share (what a flat map would score).
    Cases: the same, plus zone lift and pointing hit per case and their means with bootstrap
    CIs, over all cases and over the cases that name only some zones (the informative ones);
    the hit rate (maximum within the lungs) beside its chance over the same cases, and apart
    from it how many maps peak outside the lungs.
    """
    cams, masks, pred = test
    shares, areas = lungs.in_lung_share(cams, masks), lungs.lung_area_share(masks)

    def summary(keep: np.ndarray) -> dict[str, Any]:
        return {"n": int(keep.sum()), "in_lung_share": _mean(list(shares[keep])),
                "lung_area_share": _mean(list(areas[keep]))}  # fmt: skip

    by_class = {name: summary(pred == c) for c, name in enumerate(class_names) if (pred == c).any()}
    ci = {"n_resamples": bootstrap, "seed": seed}
    specific = [r for r in case_scores if not r["all_zones"]]

    def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
        lift = [np.nan if r["zone_lift"] is None else r["zone_lift"] for r in rows]
        hits = [float(r["pointing_hit"]) for r in rows if r["pointing_hit"] is not None]
        outside = [not r["peak_in_lungs"] for r in rows if r["peak_in_lungs"] is not None]
        return {
            "zone_lift": lungs.mean_ci(np.array(lift, dtype=float), **ci),
            "pointing_hit": lungs.mean_ci(np.array(hits, dtype=float), **ci),
            "pointing_chance": _mean([r["chance"] for r in rows]),
            "peak_outside_lungs": {
                "count": int(sum(outside)),
                "n": len(outside),
                "rate": _mean([float(o) for o in outside]),
            },
        }

    return {
        "test": {"all": summary(np.ones(len(pred), dtype=bool)), "by_predicted_class": by_class},
        "cases": {
            "in_lung_share": _mean([r["in_lung_share"] for r in case_scores]),
            "lung_area_share": _mean([r["lung_area_share"] for r in case_scores]),
            "all_cases": agreement(case_scores),
            "cases_naming_some_zones": agreement(specific),
            "per_case": dict(zip(case_names, case_scores, strict=True)),
        },
    }
