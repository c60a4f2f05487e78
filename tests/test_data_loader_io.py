"""bench.loader_io on tiny shards: every reader delivers the requested items, the accounting adds up,
and only the memory-mapping readers keep shard pages in the workers (no timing is asserted)."""
import os
import sys

import pytest

from bench import loader_io

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_loader_io_rows(tmp_path, capsys):
    rows = loader_io.main(["--dir", str(tmp_path), "--sizes", "200", "400", "--items", "150", "--workers", "1",
                           "--batch-size", "32", "--latent-size", "4", "--shard-size", "100"])
    assert [(r["items"], r["reader"]) for r in rows] == [(n, r) for n in (200, 400)
                                                         for r in ("mmap", "mmap-random", "dataset")]
    for row in rows:
        assert row["delivered"] == 150 and row["disk_mb"] >= 0 and row["worker_rss_mb"] > 0
        assert (row["shard_rss_mb"] > 0) == row["reader"].startswith("mmap"), row
    assert os.listdir(tmp_path) == []  # the temporary datasets are gone
    assert "cached before" in capsys.readouterr().out
