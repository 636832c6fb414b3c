"""`python -m cxr bench --json`: the record the prepared GPU check (scripts/gpu_check.sh) collects."""

from __future__ import annotations

import json
from pathlib import Path

from cxr import bench


def test_bench_appends_one_json_record_per_run(tmp_path: Path) -> None:
    """Two runs append two lines whose ratio is their own pipeline / raw throughput.

    Watched red with the record's ratio computed as raw / pipe.
    """
    out = tmp_path / "bench.jsonl"
    args = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--rounds", "1", "--threads", "1", "--json", str(out)]  # fmt: skip
    bench.main(args)
    bench.main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["arch"] == "resnet18" and r["image_size"] == 32 and r["device"] == "CPU"
        assert r["raw_images_per_second"] > 0 and r["pipeline_images_per_second"] > 0
        expected = r["pipeline_images_per_second"] / r["raw_images_per_second"]
        assert abs(r["ratio"] - expected) < 0.01 * expected
