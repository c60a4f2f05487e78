"""Benchmark results as aligned text tables on stdout, one row printed as soon as it is measured."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

# (result key, column header)
TRAIN_COLUMNS = [("model", "model"), ("batch", "batch"), ("variant", "variant"), ("images_per_sec", "img/s"),
                 ("step_ms", "step ms"), ("train_gflop_per_image", "GFLOP/img"), ("achieved_tflops", "TFLOP/s"),
                 ("mfu", "MFU"), ("peak_memory_gib", "peak GiB"), ("final_loss", "loss")]
SAMPLE_COLUMNS = [("model", "model"), ("batch", "batch"), ("variant", "variant"), ("nfe", "NFE"),
                  ("images_per_sec", "img/s"), ("max_abs_error_vs_fp32", "max |err| vs fp32"),
                  ("latent_psnr_vs_fp32_db", "PSNR dB")]
ELIT_COLUMNS = [("kind", "kind"), ("model", "model"), ("budget", "budget"), ("batch", "batch"),
                ("variant", "variant"), ("images_per_sec", "img/s"), ("train_gflop_per_image", "train GFLOP/img"),
                ("gflop_per_forward_per_image", "GFLOP/forward")]
LOADER_COLUMNS = [("workers", "workers"), ("items_per_sec", "items/s"), ("items_per_sec_per_core", "items/s/core")]


def format_value(value) -> str:
    """4 significant digits for floats, "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


class Table:
    """`add(row)` prints the row (the title and header first). Columns holding numbers in the first
    row are right-aligned, text columns left-aligned and wide enough for model names."""

    def __init__(self, title: str, columns: Sequence[Tuple[str, str]], out=None):
        self.title = title
        self.columns = list(columns)
        self.out = out or (lambda line: print(line, flush=True))
        self.rows: List[Dict] = []
        self._numeric: List[bool] = []

    def _line(self, values: Sequence[str]) -> str:
        cells = []
        for (_, header), numeric, value in zip(self.columns, self._numeric, values):
            width = max(len(header), 10 if numeric else 18)  # "DFM-ELIT-SiT-XL/2"
            cells.append(value.rjust(width) if numeric else value.ljust(width))
        return "  ".join(cells).rstrip()

    def add(self, row: Dict) -> None:
        values = [row.get(key) for key, _ in self.columns]
        if not self.rows:
            self._numeric = [isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values]
            self.out(f"\n{self.title}")
            self.out(self._line([header for _, header in self.columns]))
        self.rows.append(row)
        self.out(self._line([format_value(v) for v in values]))

    def add_all(self, rows: Optional[Sequence[Dict]]) -> None:
        for row in rows or []:
            self.add(row)
