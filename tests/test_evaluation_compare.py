"""evaluation.compare on synthetic metrics.jsonl files with hand-computed crossing steps."""
import json

import numpy as np
import pytest

from evaluation import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, values, metric="fdd", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 100 * k, "images_seen": 100 * k * 256, metric: v, "swd_16": 1.0})
             for k, v in enumerate(values, 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra)
    return str(folder)


def test_crossing_steps_of_two_runs(tmp_path, capsys):
    sit = _write_run(tmp_path / "sit", [95 - 5 * k for k in range(10)])   # 95 .. 50, best 50 at 1000
    dfm = _write_run(tmp_path / "dfm", [90 - 10 * k for k in range(10)])  # 90 .. 0, best 0 at 1000
    curves = {name: compare.curve(compare.read_metrics(run), "fdd") for name, run in (("sit", sit), ("dfm", dfm))}
    rows = {(r.run, r.target_run): r for r in compare.crossing_table(curves, "fdd")}
    assert (rows["dfm", "sit"].target, rows["dfm", "sit"].target_step, rows["dfm", "sit"].reached_at) == (50, 1000, 500)
    assert rows["dfm", "sit"].speedup == 2.0
    assert rows["sit", "dfm"].reached_at is None and rows["sit", "dfm"].speedup is None
    # images_seen as the x axis scales the crossing with it
    curves_img = {"sit": compare.curve(compare.read_metrics(sit), "fdd", "images_seen"),
                  "dfm": compare.curve(compare.read_metrics(dfm), "fdd", "images_seen")}
    assert [r.reached_at for r in compare.crossing_table(curves_img, "fdd") if r.run == "dfm"] == [500 * 256]

    out, table = str(tmp_path / "plot.png"), str(tmp_path / "table.json")
    assert compare.main([sit, dfm, "--metric", "fdd", "--out", out, "--table", table]) == 0
    printed = capsys.readouterr().out
    assert "dfm reaches sit's best fdd (50 at step 1000) at step 500 (2.00x)." in printed
    assert "sit reaches dfm's best fdd (0 at step 1000): not reached." in printed
    assert open(out, "rb").read(8) == PNG_MAGIC
    assert {(r["run"], r["reached_at"]) for r in json.load(open(table))} == {("dfm", 500), ("sit", None)}


def test_higher_is_better_and_interpolation():
    xs, ys = np.array([0.0, 100, 200]), np.array([10.0, 6, 2])
    assert compare.steps_to_reach(xs, ys, 4.0) == 200
    assert compare.steps_to_reach(xs, ys, 4.0, interpolate=True) == pytest.approx(150)
    assert compare.steps_to_reach(xs, ys, 10.0, interpolate=True) == 0
    assert compare.steps_to_reach(xs, ys, 1.0) is None
    assert compare.steps_to_reach(xs, -ys, -4.0, lower=False, interpolate=True) == pytest.approx(150)
    assert not compare.lower_is_better("recall") and compare.lower_is_better("swd")


def test_reading_repeated_steps_cut_lines_and_bad_lines(tmp_path):
    run = _write_run(tmp_path / "a", [5.0, 4.0], extra=json.dumps({"step": 200, "images_seen": 1, "fdd": 3.0})
                     + "\n" + '{"step": 300, "images_')
    records = compare.read_metrics(run)
    assert [(r["step"], r["fdd"]) for r in records] == [(100, 5.0), (200, 3.0)]  # last 200 wins, cut line ignored
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1, "images_seen": 2}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a metrics record"):
        compare.read_metrics(str(tmp_path / "b"))
    with pytest.raises(ValueError, match="no such file"):
        compare.read_metrics(str(tmp_path / "missing"))
    assert compare.main([run, str(tmp_path / "b"), "--metric", "fdd"]) == 2


def test_convergence_png_of_one_run(tmp_path):
    run = _write_run(tmp_path / "r", [3.0, 2.0, 1.5])
    path = compare.plot_convergence(run)
    assert path == str(tmp_path / "r" / "convergence.png")
    assert open(path, "rb").read(8) == PNG_MAGIC
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert compare.plot_convergence(str(tmp_path / "empty")) is None


def test_the_trainers_records_survive_a_last_line_cut_short(tmp_path):
    """A crash mid-write leaves half a line; the next start drops it before appending, and the curves read."""
    import logging

    from training.logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 100, "images_seen": 25600, "fdd": 5.0, "swd": NaN}\n'
                                            '{"step": 200, "ima')
    tracker = RunLogger(str(tmp_path), logging.getLogger("test"))
    tracker.log_metrics({"images_seen": 51200, "fdd": 4.0}, 200)
    tracker.close()
    records = compare.read_metrics(str(tmp_path))
    assert [(r["step"], r["images_seen"], r["fdd"]) for r in records] == [(100, 25600, 5.0), (200, 51200, 4.0)]


