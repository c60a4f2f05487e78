"""bench.scale at tiny sizes: every row is produced and the checks it times agree (no timing is asserted)."""
import sys

import pytest

from bench import scale

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_resume_check_rows(tmp_path):
    rows = scale.main(["resume-check", "--images", "5", "12", "--size", "8", "--dir", str(tmp_path)])
    assert [(r["images"], r["cache"], r["check"]) for r in rows] == [
        (n, cache, check) for n in (5, 12) for cache in ("warm", "cold") for check in ("decode (before)", "find_missing")]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert list(tmp_path.iterdir()) == []


def test_per_image_rows(tmp_path):
    rows = scale.main(["per-image", "--items", "3000", "--batches", "3", "--batch-size", "8", "--workers", "1",
                       "--dir", str(tmp_path)])
    [row] = rows
    assert row["items"] == 3000 and row["worker_private_last_mib"] > 0 and row["peak_extra_mib"] >= 0
    assert list(tmp_path.iterdir()) == []
