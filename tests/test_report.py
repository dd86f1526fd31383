"""`hfgen report`: one self-contained HTML page whose plots and tables show every run given."""

import base64
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import ASCII_LOCALE, run_hfgen
from hfgen import tracking
from hfgen.cli import main as hfgen
from hfgen.errors import UserError, unwritable_exits_2
from hfgen.report import Run, curve_figure, load_run, metric_groups, png_base64, write_report


def make_run(path, learning_rate, slope, ppo=False):
    """A run dir as the stages write it: recipe, metrics.jsonl, eval.json, samples.jsonl, COMPLETE."""
    tracking.write_run_records(
        path, f"stage: {'ppo' if ppo else 'pretrain'}\nlearning_rate: {learning_rate}\nseed: 1\n"
    )
    logger = tracking.MetricsLogger(path)
    for step in range(0, 50, 10):
        metrics = {"loss": 5.0 - slope * step, "learning_rate": learning_rate, "epoch": step / 50}
        if ppo:
            metrics |= {"ppo/reward": slope * step, "ppo/oracle": 0.5 * slope * step, "ppo/kl": 0.01 * step,
                        "ppo/entropy": 2.0 - 0.01 * step}  # fmt: skip
        logger.log(step, **metrics)
    logger.log(50, train_runtime=12.5)  # a one-off summary figure: not a curve
    tracking.update_eval(path, {"quality/perplexity": 10.0 / slope, "diversity/distinct_2": 0.5, "eval_loss": 2.0})
    tracking.write_jsonl(path / "samples.jsonl", [{"prompt": "the cat", "response": f"the cat is happy {slope}"}])
    tracking.mark_complete(path)
    return path


@pytest.fixture
def two_runs(tmp_path):
    return [make_run(tmp_path / "lr_low", 1e-4, 0.02), make_run(tmp_path / "lr_high", 3e-4, 0.05, ppo=True)]


def embedded_pngs(page: str) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_each_plot_has_one_labelled_line_per_run(two_runs):
    runs = [load_run(path, path.name) for path in two_runs]
    groups = dict(metric_groups(runs))
    assert groups["Loss"] == ["loss"]
    assert groups["Reward and scores"] == ["ppo/reward", "ppo/oracle"]
    assert groups["KL divergence"] == ["ppo/kl"] and groups["Entropy"] == ["ppo/entropy"]
    assert "train_runtime" not in sum(groups.values(), []) and "epoch" not in sum(groups.values(), [])
    axis = curve_figure(runs, ["loss"], "Loss").axes[0]
    assert [line.get_label() for line in axis.get_lines()] == ["lr_low", "lr_high"]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["lr_low", "lr_high"]
    assert list(axis.get_lines()[1].get_ydata()) == [5.0 - 0.05 * s for s in range(0, 50, 10)]
    # PPO-only curves are drawn for the run that has them
    reward_axis = curve_figure(runs, ["ppo/reward"], "Reward").axes[0]
    (line,) = reward_axis.get_lines()
    assert line.get_label() == "lr_high" and line.get_color() == axis.get_lines()[1].get_color()


def test_a_run_name_or_metric_key_is_shown_as_written_in_the_plots(tmp_path):
    # matplotlib left a line labelled `_lr1e-3` out of the legend, read `lr_$2$_run` as TeX (an italic 2) and
    # stopped the report on an unbalanced `$x^$` with a ParseSyntaxException (probe 45 B5)
    names, key = ["_lr1e-3", "lr_$2$_run", "price $x^$ and $y$"], "loss $x^$"
    runs = [Run(name=name, path=tmp_path, metrics=[{"step": i, key: 5.0 - i} for i in range(3)]) for name in names]
    figure = curve_figure(runs, [key], "Loss")
    (axis,) = figure.axes
    assert [text.get_text() for text in axis.get_legend().get_texts()] == names
    png_base64(figure)  # (drawn: TeX is parsed then)
    assert axis.get_title() == key


def test_a_curve_past_what_a_float_plots_is_drawn_with_a_gap(tmp_path):
    # 1e308 and -1e308 in one panel made matplotlib's ticker raise "arange: cannot compute length", an integer past
    # 1.8e308 an OverflowError: a traceback for the whole report (probe 45 B6)
    for values, drawn in (([1e308, -1e308, 1.0], [None, None, 1.0]), ([10**400, 1, 2], [None, 1, 2])):
        run = tmp_path / f"run{len(values)}{drawn[1]}"
        run.mkdir()
        tracking.write_jsonl(run / "metrics.jsonl", [{"step": i, "grad_norm": v} for i, v in enumerate(values)])
        assert len(embedded_pngs(write_report([run], tmp_path / "r.html").read_text())) == 1
        (line,) = curve_figure([load_run(run, "run")], ["grad_norm"], "Optimisation").axes[0].get_lines()
        assert [None if math.isnan(v) else v for v in line.get_ydata()] == drawn


def test_ppo_and_trainer_metrics_land_in_sensible_groups(tmp_path):
    keys = ["objective/kl", "policy/approxkl_avg", "objective/rlhf_reward", "oracle/score", "policy/entropy_avg",
            "speed/generation_tokens_per_s", "time/generation_s", "val/ratio", "grad_norm", "val/eos_rate"]  # fmt: skip
    run = Run("ppo", tmp_path, metrics=[{"step": step, **dict.fromkeys(keys, 1.0 * step)} for step in (1, 2)])
    assert dict(metric_groups([run])) == {
        "KL divergence": ["objective/kl", "policy/approxkl_avg"],
        "Reward and scores": ["objective/rlhf_reward", "oracle/score"],
        "Entropy": ["policy/entropy_avg"],
        "Optimisation": ["val/ratio", "grad_norm"],
        "Speed and time": ["speed/generation_tokens_per_s", "time/generation_s"],
        "Other": ["val/eos_rate"],
    }


def test_page_holds_both_runs_plots_eval_table_and_samples(two_runs, tmp_path):
    out = tmp_path / "report.html"
    assert hfgen(["report", *map(str, two_runs), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "lr_low" in page and "lr_high" in page
    images = embedded_pngs(page)
    assert len(images) == 5  # loss, rewards, KL, entropy, optimisation: one figure each
    assert all(image.format == "PNG" and image.width > 300 for image in images)
    evaluation = page[page.index('<table class="eval">') :]
    assert "quality/perplexity" in evaluation and "500" in evaluation and "200" in evaluation
    assert evaluation.index("quality/perplexity") < evaluation.index("eval_loss")  # criteria first
    differences = page[page.index('<table class="recipe">') :]
    assert "learning_rate" in differences and "seed" not in differences.split("</table>")[0]
    assert "the cat is happy 0.02" in page and "the cat is happy 0.05" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_reward_hacking_alerts_have_their_own_table(two_runs, tmp_path):
    alert = {"step": 7, "onset": 6, "signal": "repetition", "message": "distinct_2 0.5 against 1 at the start"}
    tracking.update_eval(two_runs[1], {"monitor/alerts": [alert], "stopped_early": True, "stopped_at_step": 7,
                                       "stop_reason": alert["message"]})  # fmt: skip
    page = write_report(two_runs, tmp_path / "r.html").read_text()
    alerts = page[page.index('<table class="alerts">') :].split("</table>")[0]
    assert "repetition" in alerts and "distinct_2 0.5 against 1" in alerts and "stopped early" in alerts
    assert "lr_high" in alerts and "lr_low" not in alerts
    assert '<table class="alerts">' not in write_report(two_runs[:1], tmp_path / "quiet.html").read_text()


def test_a_report_made_under_a_non_utf8_locale_is_utf8_as_its_page_says(tmp_path):
    # the page was written in the locale's encoding: a UnicodeEncodeError under ASCII or Latin-1 at its first "—"
    # or CJK sample, and Latin-1 bytes under <meta charset="utf-8"> otherwise (probe 42 C1)
    run = make_run(tmp_path / "run", 1e-4, 0.02)
    tracking.write_jsonl(run / "samples.jsonl", [{"prompt": "le café", "response": "très bon — 猫 🐱"}])
    out = tmp_path / "report.html"
    result = run_hfgen("report", run, "--out", out, env=ASCII_LOCALE)
    assert result.returncode == 0, result.stderr[-2000:]
    page = out.read_bytes().decode("utf-8")
    assert '<meta charset="utf-8">' in page and "le café" in page and "très bon — 猫 🐱" in page


def test_runs_without_records_are_shown_and_images_embedded(two_runs, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    images_run = tmp_path / "t2i"
    (images_run / "samples").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images_run / "grid.png")
    Image.new("RGB", (8, 8), (30, 30, 200)).save(images_run / "samples" / "0.png")
    page = write_report([two_runs[0], empty, images_run], tmp_path / "r.html").read_text()
    assert "empty_run" in page and "unfinished" in page
    sizes = {image.size for image in embedded_pngs(page)}
    assert (32, 32) in sizes and (8, 8) in sizes


def test_missing_run_dir_is_a_user_error(two_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["report", str(two_runs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")])
    assert exit_info.value.code == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_run_killed_mid_line_reports_and_a_damaged_file_is_named(two_runs, tmp_path, capsys):
    # a SIGKILL while metrics.jsonl is appended leaves half a line: the report shows the rows before it
    with (two_runs[0] / "metrics.jsonl").open("a") as f:
        f.write('{"step": 60, "lo')
    assert len(load_run(two_runs[0], "killed").metrics) == 6
    (two_runs[1] / "eval.json").write_text('{"quality/perplexity": 2.')
    assert hfgen(["report", *map(str, two_runs), "--out", str(tmp_path / "r.html")]) == 0  # shown without it
    assert "eval.json' is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # was an IsADirectoryError, with a stray .tmp file left
        hfgen(["report", str(two_runs[0]), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a directory" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes find the disk full")
def test_a_report_that_finds_the_disk_full_exits_2_naming_the_file_and_leaves_nothing(two_runs, tmp_path, capsys):
    # was an OSError traceback (exit 1) with a truncated r.html.tmp left beside
    (tmp_path / "r.html.tmp").symlink_to("/dev/full")  # where the page is written before it is moved into place
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["report", *map(str, two_runs), "--out", str(tmp_path / "r.html")])
    assert exit_info.value.code == 2
    assert f"the disk is full: writing '{tmp_path / 'r.html'}' failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in two_runs)  # no r.html, no tmp


def test_a_report_written_to_a_read_only_disk_exits_2_naming_the_file(two_runs, tmp_path, capsys, read_only_disk):
    """`hfgen report --out` (and eval's output beside a model on a read-only share) ended in an OSError traceback,
    the tmp file's cleanup raising again over the first error (probe 41 C5)."""
    disk = read_only_disk
    with pytest.raises(SystemExit) as exit_info:
        hfgen(["report", *map(str, two_runs), "--out", str(disk / "r.html")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"--out '{disk / 'r.html'}': '{disk}' cannot be written to" in err  # said before the report is built
    with pytest.raises(UserError, match=r"r.html': Read-only file system .*an output path elsewhere"):
        with unwritable_exits_2(disk / "r.html"):  # a write past the start's check (its tmp's cleanup fails too)
            tracking.write_text(disk / "r.html", "")
    # a file that is not the command's output (a class_data_dir, a cache) gets no advice about an output
    with pytest.raises(UserError, match=r"ro/cls': Read-only file system .*make it writable") as refused:
        with unwritable_exits_2(tmp_path / "r.html"):
            (disk / "cls").mkdir()
    assert "output" not in str(refused.value)


def test_a_run_with_malformed_files_is_shown_without_them_and_each_is_named(two_runs, tmp_path, capsys):
    # each was a traceback (AttributeError, TypeError, UnicodeDecodeError); the README promises a run lacking a file
    # is shown without it
    low, high = two_runs
    (low / "recipe.yaml").write_text("- a\n- b\n")
    (low / "eval.json").write_text("[1]")
    (high / "recipe.yaml").write_text("stage: [unclosed\n")
    (high / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\n')
    (high / "samples.jsonl").write_text('[1, 2]\n"text"\n')
    out = tmp_path / "r.html"
    assert hfgen(["report", str(low), str(high), "--out", str(out)]) == 0
    error = capsys.readouterr().err
    assert "Traceback" not in error
    for file in (low / "recipe.yaml", low / "eval.json", high / "recipe.yaml", high / "metrics.jsonl",
                 high / "samples.jsonl"):  # fmt: skip
        assert str(file) in error and f"shown without {file.name}" in error, (file, error)
    page = out.read_text()
    assert "Unreadable files" in page and "lr_low" in page and "lr_high" in page
    assert load_run(low, "low").metrics and not load_run(high, "high").metrics  # the good file of a run is kept
    (low / "metrics.jsonl").write_text('{"step": 1}\n[1]\n')
    assert load_run(low, "low").metrics == [] and "rows that are JSON objects" in load_run(low, "low").warnings[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package `chromium`) is not installed")
def test_page_renders_in_headless_chromium(two_runs, tmp_path):
    out = write_report(two_runs, tmp_path / "report.html")
    screenshot = tmp_path / "screenshot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1200,1600", out.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert screenshot.is_file(), result.stderr[-2000:]
    image = Image.open(screenshot).convert("L")
    histogram = image.histogram()
    background = max(histogram) / sum(histogram)
    assert background < 0.97, "screenshot is (almost) blank"
    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, lines and plot colours, not a flat page


def test_a_null_figure_is_a_gap_in_its_line_and_a_figure_never_drawn_has_no_panel(tmp_path):
    # hfgen writes a non-finite figure (a step skipped under nan_tolerance) as null: the line ran straight through
    # that step, where NaN in older runs' records was a gap (review 45 #3)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 2.0, "unscored": None}, {"step": 2, "loss": None, "unscored": None}]
    tracking.write_jsonl(run / "metrics.jsonl", rows + [{"step": 3, "loss": 1.0, "unscored": None}])
    loaded = load_run(run, "run")
    (line,) = curve_figure([loaded], ["loss"], "Loss").axes[0].get_lines()
    assert [None if math.isnan(v) else v for v in line.get_ydata()] == [2.0, None, 1.0]
    assert "unscored" not in dict(metric_groups([loaded])).get("Other", [])
