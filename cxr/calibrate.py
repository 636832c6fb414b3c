"""Site calibration: a COVID-19 threshold set on a site's own COVID-19-negative films.

    python -m cxr calibrate SITE_NEGATIVES/ [more files or folders] --specificity 0.9 \
        [--models DIR] [--out FILE] [--force] [--batch-size 16] [--threads N]

The films go through predict's own path (cxr.api.model_inputs: the same reading,
preprocessing, lung check and crop, with the models of the bundle in --models or the ones
given), and the binary model's p(covid) of each is scored. The threshold is the smallest one
that calls at least the target share of these films negative: predict calls a film COVID-19
when p >= threshold, so with the scores sorted, p(1) <= ... <= p(n), and k = ceil(target * n),
the threshold is the next float above p(k). Films tied with p(k) are all called negative, so
the achieved specificity can exceed the target; it is reported as measured on these films.

The result, `site.json` in --models by default, names the binary checkpoint by sha256;
predict uses it instead of the bundle's threshold only for that checkpoint. With fewer than
MIN_FILMS readable films calibration is refused: the quantile would be set by one or two
films. Specificity measured on n films is a binomial proportion; its 95% Clopper-Pearson
interval is printed and stored.

Exit status: 0 calibrated, 2 bad usage, models, --out or too few films, 130 interrupted
(nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from cxr.api import covid_probability, model_inputs, read_ahead
from cxr.atomic import write_json
from cxr.bundle import SITE_FORMAT, SITE_NAME, Bundle, sha256_of
from cxr.cli import setup_logging
from cxr.errors import BundleError
from cxr.infer import configure_cpu
from cxr.inputs import Input, UsageError, collect_inputs, printable
from cxr.loading import Models, load_models, model_files
from cxr.models import CheckpointError
from cxr.outputs import check_out_file, fail
from cxr.predict_options import READ_THREADS, add_model_options, check_model_options

log = logging.getLogger(__name__)

# Below this many films a 90% quantile is set by the top one or two scores, and the 95% CI of
# the specificity measured on them spans more than 0.3 (9 of 10: 0.55-1.00).
MIN_FILMS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr calibrate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="the site's COVID-19-negative films (files or folders)"
    )
    parser.add_argument(
        "--specificity", type=float, default=0.9,
        help="share of these films to call negative (default: %(default)s)",
    )  # fmt: skip
    add_model_options(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"site calibration (default: {SITE_NAME} in --models)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an --out that is not a site calibration"
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.specificity <= 1.0:
        parser.error(f"--specificity must be in (0, 1], got {args.specificity}")
    check_model_options(parser, args)
    args.out = args.out or args.models / SITE_NAME
    return args


def threshold_for_specificity(scores: np.ndarray, target: float) -> float:
    """The smallest threshold calling at least `target` of `scores` negative (p < threshold)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    # round(): 0.56 * 25 is 14.000000000000002 in floating point, whose ceil would be 15
    k = max(1, math.ceil(round(target * len(ordered), 9)))
    return float(np.nextafter(ordered[k - 1], np.inf))


def specificity_ci(negative: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a specificity measured on n films."""
    interval = binomtest(negative, n).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def check_out(path: Path, force: bool) -> None:
    """Refuse an --out that is not JSON or holds something other than a site calibration."""
    check_out_file(path, (".json",), force, is_site_file, "a site calibration")


def is_site_file(path: Path) -> bool:
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(blob, dict) and blob.get("format") == SITE_FORMAT


def score_films(
    items: list[Input], models: Models, batch_size: int
) -> tuple[list[tuple[str, float, str]], list[dict[str, str]]]:
    """(file, p(covid), warning) of every readable film, through predict's model path, and
    {file, reason} of every file skipped."""
    scored, skipped = [], []
    for chunk, decoded in read_ahead(items, models.spec, batch_size, READ_THREADS):
        batch = model_inputs(chunk, models, decoded)
        p_covid = covid_probability(models, batch.images, batch_size)
        for row, i in enumerate(batch.where):
            scored.append((printable(str(chunk[i].path)), float(p_covid[row]), batch.warnings[i]))
        skipped += [{"file": printable(str(chunk[i].path)), "reason": printable(message)}
                    for i, message in sorted(batch.errors.items())]  # fmt: skip
    return scored, skipped


def calibration(
    scored: list[tuple[str, float, str]],
    skipped: list[dict[str, str]],
    target: float,
    binary: Path,
    bundle: Bundle | None,
) -> dict[str, Any]:
    """The site.json record: threshold, what it achieves on these films, and what was left out."""
    scores = np.array([p for _, p, _ in scored])
    n = len(scores)
    if n < MIN_FILMS:
        raise UsageError(too_few(n, target, skipped))
    threshold = threshold_for_specificity(scores, target)
    negative = int((scores < threshold).sum())
    low, high = specificity_ci(negative, n)
    record: dict[str, Any] = {
        "format": SITE_FORMAT,
        "binary": {"file": binary.name, "sha256": sha256_of(binary)},
        "threshold": threshold,
        "rule": "smallest threshold with at least the target share of these films at p(covid) "
        "< threshold (predict calls p >= threshold COVID-19); films tied at the quantile all "
        "fall below it",
        "target_specificity": target,
        "achieved_specificity": negative / n,
        "specificity_ci95": {"method": "Clopper-Pearson", "low": low, "high": high},
        "n_films": n,
        "n_called_negative": negative,
        "films_skipped": skipped,
        "films_with_warnings": [{"file": f, "warning": w} for f, _, w in scored if w],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if bundle is not None and bundle.sha256["binary"] == record["binary"]["sha256"]:
        record["bundle_threshold"] = {
            "value": bundle.threshold,
            "source": bundle.threshold_source,
            "specificity_here": float((scores < bundle.threshold).mean()),
        }
    return record


def too_few(n: int, target: float, skipped: list[dict[str, str]]) -> str:
    """Why calibration on `n` films is refused, with the uncertainty that would come with it."""
    why = (
        f"only {n} readable film(s) (at least {MIN_FILMS} needed): a {target:.0%} quantile of so "
        "few scores is set by one or two films"
    )
    if n:
        negative = min(n, math.ceil(round(target * n, 9)))
        low, high = specificity_ci(negative, n)
        why += f", and {negative} of {n} called negative has a 95% CI of {low:.2f}-{high:.2f}"
    if skipped:
        why += f"; {len(skipped)} file(s) skipped, e.g. {skipped[0]['reason']}"
    return why + "; add more of the site's COVID-19-negative films"


def report(record: dict[str, Any], out: Path) -> str:
    """What a user needs to see: films used, the threshold, what it achieves, how sure that is."""
    ci = record["specificity_ci95"]
    lines = [
        f"{record['n_films']} films scored, {len(record['films_skipped'])} skipped"
        + "".join(f"\n  skipped {s['file']}: {s['reason']}" for s in record["films_skipped"]),
        f"site threshold {record['threshold']:.4f}: {record['n_called_negative']} of "
        f"{record['n_films']} films called negative, specificity "
        f"{record['achieved_specificity']:.3f} (target {record['target_specificity']:g})",
        f"warning: a specificity measured on {record['n_films']} films is uncertain: 95% "
        f"Clopper-Pearson CI {ci['low']:.3f}-{ci['high']:.3f}",
    ]
    if record["films_with_warnings"]:
        lines.append(f"{len(record['films_with_warnings'])} films had predict warnings "
                     f"(kept; listed in {out})")  # fmt: skip
    if "bundle_threshold" in record:
        bundled = record["bundle_threshold"]
        lines.append(f"the bundle's threshold {bundled['value']:.4f} ({bundled['source']}) has "
                     f"specificity {bundled['specificity_here']:.3f} on these films")  # fmt: skip
    lines.append(f"written to {out}; predict uses it for {record['binary']['file']} (sha256 "
                 f"{record['binary']['sha256'][:12]}...)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    configure_cpu(args.threads)
    try:
        check_out(args.out, args.force)
        files, bundle = model_files(args, need_bundle=False)
        models = load_models(files["four_class"], files["binary"], files["segmenter"])
        inputs = collect_inputs(args.paths)
        scored, skipped = score_films(inputs.items, models, args.batch_size)
        record = calibration(scored, skipped, args.specificity, files["binary"], bundle)
    except (UsageError, CheckpointError, BundleError) as exc:
        fail(str(exc))
    try:
        write_json(args.out, record)
    except OSError as exc:
        fail(f"could not write {args.out} ({exc.strerror or exc}); nothing written", 1)
    print(report(record, args.out))


if __name__ == "__main__":
    main()
