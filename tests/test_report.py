"""`align report`: report.md, real PNG plots, the forgetting heat map, HTML, samples."""

import base64
import html
import json
import re
import shutil
import struct
import sys

import pytest

from align.cli import cli
from tests.conftest import assert_one_line_error
from tests.test_tools import greedy, step, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """A real PNG's (width, height), read from its IHDR chunk."""
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def assert_real_png(path, min_side=200):
    import matplotlib.image

    width, height = png_size(path.read_bytes())
    assert width >= min_side and height >= min_side / 2, (path, width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # something is drawn, not a blank canvas


def image_links(markdown):
    return re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", markdown)


def test_report_of_a_real_run_writes_markdown_plots_and_samples(runner, tiny_run, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = runner.invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    markdown = (run / "report.md").read_text()
    links = image_links(markdown)
    forgetting = json.loads((run / "summary.json").read_text())["forgetting"]["metrics"]
    assert sorted(links) == sorted(
        [
            "plots/gates.png",
            "plots/loss.png",
            "plots/metric_quiz.accuracy.png",
            "plots/metric_quiz.margin.png",
            "plots/metric_voice.margin.png",
            "plots/metric_voice.score.png",
        ]
        + [f"plots/forgetting_{metric}.png" for metric in forgetting]
    )
    assert {"quiz.accuracy", "voice.score"} <= set(forgetting)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(link[6:] for link in links)
    for link in links:
        assert_real_png(run / link)
    assert "- first: dpo ran (quiz.accuracy" in markdown
    assert "summary.json has no forgetting matrix" not in markdown
    # Samples: the first 2 voice prompts of each topic (the second topic has 3), bare and adapted,
    # as transformers answers them greedily with the chat template.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapters" / "second"
    )
    samples = markdown.split("### second\n", 1)[1]
    assert "Prompt: Hi?" in samples and "Prompt: Where do you live?" in samples
    assert "A third?" not in samples
    for prompt in ("Hi?", "Where do you live?"):
        answer = greedy(tuned, tokenizer, prompt, 48)
        assert f"with the second adapter:\n\n> {answer.splitlines()[0]}" in samples
        bare_answer = greedy(bare, tokenizer, prompt, 48) or "(empty)"
        assert f"bare model:\n\n> {bare_answer.splitlines()[0]}" in samples


FORGETTING_SUMMARY = {
    "home": [
        step("before", **{"quiz.accuracy": 0.25, "voice.score": 0.0}),
        step("dpo", "train", "skipped")
        | {"gate": {"gate": "threshold", "passed": False, "reason": "voice.score 0.80 < 0.75 is false"}},
        step("after_dpo", **{"quiz.accuracy": 0.75, "voice.score": 0.8}),
    ],
    "work": [
        step("before", **{"quiz.accuracy": 0.5, "voice.score": 0.25}),
        step("dpo", "train", **{"dpo.loss": 0.6})
        | {"gate": {"gate": "threshold", "passed": True, "reason": "voice.score 0.25 < 0.75"}},
        step("after_dpo", **{"quiz.accuracy": 1.0, "voice.score": 0.5}),
    ],
    "garden": [step("before", **{"quiz.accuracy": 0.0, "voice.score": 0.5})],
}
FORGETTING = {
    "topics": ["home", "work", "garden"],
    "metrics": {
        "quiz.accuracy": [[0.75, None, None], [0.5, 1.0, None], [0.25, 0.75, 0.5]],
        "voice.score": [[0.8, None, None], [0.6, 0.5, None], [0.4, 0.5, 0.75]],
    },
}


def test_report_draws_the_forgetting_matrix_and_embeds_images_in_html(runner, tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", FORGETTING_SUMMARY, steps=("before", "dpo", "after_dpo"))
    summary = json.loads((run / "summary.json").read_text())
    summary["forgetting"] = FORGETTING
    (run / "summary.json").write_text(json.dumps(summary))
    import align.tools.loading

    monkeypatch.setattr(
        align.tools.loading, "load", lambda *a, **k: pytest.fail("--no-samples loaded a model")
    )
    result = runner.invoke(cli, ["report", str(run), "--html", "--no-samples"])
    assert result.exit_code == 0, result.output
    markdown = (run / "report.md").read_text()
    for metric in ("quiz.accuracy", "voice.score"):
        assert f"plots/forgetting_{metric}.png" in image_links(markdown)
        assert_real_png(run / "plots" / f"forgetting_{metric}.png")
    assert "| work | 0.50 | 1.00 |  |" in markdown  # row: after training work; garden not trained yet
    assert "| garden | 0.25 | 0.75 | 0.50 |" in markdown
    assert "- home: dpo skipped (voice.score 0.80 < 0.75 is false)" in markdown
    assert "No training logs in metrics.jsonl" in markdown
    assert "Samples" not in markdown
    page = (run / "report.html").read_text()
    assert "plots/" not in page  # self-contained
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(image_links(markdown)) == 5  # 2 metric bars + gates + 2 heat maps
    for data in images:
        width, height = png_size(base64.b64decode(data))
        assert width >= 200 and height >= 100


def test_the_reports_metrics_block_fits_a_40_character_topic_name(runner, tmp_path):
    long = "docklands_tram_driver_and_amateur_astron"
    run = write_run(tmp_path / "run", {long: [step("before", **{"quiz.accuracy": 0.25})]}, steps=["before"])
    result = runner.invoke(cli, ["report", str(run), "--no-samples"])
    assert result.exit_code == 0, result.output
    lines = (run / "report.md").read_text().splitlines()
    assert f"{'topic':<42}metric              before" in lines
    assert f"{long}  quiz.accuracy         0.25" in lines


def test_a_second_report_replaces_plots_that_no_longer_apply(runner, tmp_path):
    run = write_run(tmp_path / "run", FORGETTING_SUMMARY, steps=("before", "dpo", "after_dpo"))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "forgetting": FORGETTING}))
    assert runner.invoke(cli, ["report", str(run), "--no-samples"]).exit_code == 0
    (run / "summary.json").write_text(json.dumps(summary))
    assert runner.invoke(cli, ["report", str(run), "--no-samples"]).exit_code == 0
    assert not list((run / "plots").glob("forgetting_*"))
    assert sorted(p.name for p in run.iterdir()) == ["plots", "report.md", "summary.json"]


def test_report_without_matplotlib_says_what_to_install(runner, tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", FORGETTING_SUMMARY)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(cli, ["report", str(run)])
    assert_one_line_error(result, 'pip install "mindprint-align[report]"')
    assert not (run / "report.md").exists()


def test_report_mistakes_are_one_line_errors(runner, tmp_path):
    assert_one_line_error(
        runner.invoke(cli, ["report", str(tmp_path / "nope")]), "nope: run directory not found"
    )
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert_one_line_error(runner.invoke(cli, ["report", str(tmp_path)]), "summary.json: not found")


@pytest.mark.slow
def test_report_samples_on_the_packaged_smollm2(runner, tmp_path):
    """A run directory whose config names the default model, with an adapter as initialised
    (LoRA B = 0): the report answers the topic's first two voice prompts with real text, and
    the identity adapter's answers are the bare model's."""
    from align.core.topics import load_topic_file
    from align.hf.loading import attach_adapter, load_model
    from align.hf.source import packaged_gguf
    from tests.conftest import REPO

    packaged_gguf()
    topic = load_topic_file(REPO / "align" / "demo" / "topics" / "01_early_life.yaml")
    run = write_run(
        tmp_path / "run", {"early_life": [step("before", **{"quiz.accuracy": 0.43})]}, steps=("before",)
    )
    summary = json.loads((run / "summary.json").read_text())
    summary["topics"][0]["adapter"] = "adapters/early_life"
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text("model:\n  path: smollm2\n")
    (run / "topics.json").write_text(json.dumps([topic.to_dict()]))
    model, _ = load_model("smollm2")
    attach_adapter(model, rank=1, alpha=1.0, dropout=0.0, target_modules=["o_proj"]).save_pretrained(
        run / "adapters" / "early_life"
    )
    result = runner.invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    samples = (run / "report.md").read_text().split("### early_life\n", 1)[1]
    for pair in topic.voice_pairs[:2]:
        block = samples.split(f"Prompt: {pair.prompt}\n", 1)[1]
        bare = block.split("bare model:\n\n", 1)[1].split("\n\nwith the", 1)[0]
        tuned = block.split("with the early_life adapter:\n\n", 1)[1].split("\n\n", 1)[0]
        assert sum(c.isalpha() for c in bare) > 10 and tuned.strip() == bare.strip()
    assert f"Prompt: {topic.voice_pairs[2].prompt}" not in samples


def test_report_of_a_run_that_stopped_early_draws_the_rows_it_has(runner, tmp_path):
    """The engine writes a row per finished topic: two of three here."""
    run = write_run(tmp_path / "run", FORGETTING_SUMMARY, steps=("before", "dpo", "after_dpo"))
    summary = json.loads((run / "summary.json").read_text())
    rows = FORGETTING["metrics"]["quiz.accuracy"][:2]
    partial = {"topics": FORGETTING["topics"], "metrics": {"quiz.accuracy": rows}}
    (run / "summary.json").write_text(json.dumps({**summary, "forgetting": partial}))
    result = runner.invoke(cli, ["report", str(run), "--no-samples"])
    assert result.exit_code == 0, result.output
    markdown = (run / "report.md").read_text()
    assert "| work | 0.50 | 1.00 |  |" in markdown and "\n| garden |" not in markdown  # no row yet
    assert_real_png(run / "plots" / "forgetting_quiz.accuracy.png")


LONG_TOPIC = "docklands_tram_driver_and_amateur_astron"
ROLLBACK_REASON = (
    "quiz.accuracy fell from 0.83 to 0.67 after dpo, more than the 0.05 allowed by rollback.max_drop; "
    "the adapter is back to where it was after sft"
)


def page_run(tmp_path):
    """A run whose metrics block holds a 40-character topic and a long rollback line, and whose
    voice scores are all 0."""
    after = step("after_dpo", **{"quiz.accuracy": 0.67, "voice.score": 0.0})
    after["rollback"] = {"step": "dpo", "reason": ROLLBACK_REASON}
    topics = {
        LONG_TOPIC: [step("before", **{"quiz.accuracy": 0.5, "voice.score": 0.0}), after],
        "home": [
            step("before", **{"quiz.accuracy": 1.0, "voice.score": 0.0}),
            step("after_dpo", **{"quiz.accuracy": 1.0, "voice.score": 0.0}),
        ],
    }
    run = write_run(tmp_path / "run", topics, steps=("before", "after_dpo"))
    summary = json.loads((run / "summary.json").read_text())
    summary["forgetting"] = {
        "topics": [LONG_TOPIC, "home"],
        "metrics": {"quiz.accuracy": [[0.67, None], [0.5, 1.0]]},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_the_html_report_wraps_the_metrics_block_and_gives_plots_the_page_width(runner, tmp_path):
    run = page_run(tmp_path)
    result = runner.invoke(cli, ["report", str(run), "--html", "--no-samples"])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    rules = dict(re.findall(r"([a-z,]+)\{([^}]*)\}", style))
    assert "white-space:pre-wrap" in rules["pre"] and "overflow-x" not in rules["pre"]
    assert "width:100%" in rules["img"]
    block = re.search(r"<pre>(.*?)</pre>", page, re.S).group(1)
    assert f"rolled back dpo: {ROLLBACK_REASON}" in " ".join(block.split())


def captured_figures(monkeypatch):
    import align.report.plots

    figures = []
    monkeypatch.setattr(align.report.plots, "_save", lambda plt, fig, path: figures.append(fig))
    return figures


def test_a_metric_that_is_0_everywhere_is_drawn_as_zeros(monkeypatch, tmp_path):
    from align.report import plot_metric, pyplot

    figures = captured_figures(monkeypatch)
    values = {"before": {"a": 0.0, "b": 0.0}, "after_dpo": {"a": 0.0, "b": 0.0}}
    plot_metric(pyplot(), "voice.score", values, ["a", "b"], tmp_path / "x.png")
    (ax,) = figures[0].axes
    assert [text.get_text() for text in ax.texts] == ["0.00"] * 4  # each bar labelled
    assert ax.get_ylim() == (0.0, 1.12)  # the score's whole scale, not an empty plot around 0
    assert all(bar.get_linewidth() > 0 for bar in ax.patches)  # an outline, even at height 0


def test_the_heat_maps_labels_are_dark_on_light_cells(monkeypatch, tmp_path):
    from align.report import plot_forgetting, pyplot

    figures = captured_figures(monkeypatch)
    plot_forgetting(pyplot(), "quiz.accuracy", ["a", "b"], [[1.0, None], [0.0, 0.5]], tmp_path / "x.png")
    colors = {text.get_text(): text.get_color() for text in figures[0].axes[0].texts}
    assert colors == {"1.00": "black", "0.00": "white", "0.50": "black"}  # yellow, dark purple, teal


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Appended to a copy of the page: after layout, the body says whether anything is wider than its box.
MEASURE = """<script>
const wide = [document.documentElement, ...document.querySelectorAll('pre, img, table')]
  .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.tagName);
const imgs = [...document.querySelectorAll('img')].map(i => i.getBoundingClientRect().width);
const page = document.querySelector('body').getBoundingClientRect().width;
document.body.insertAdjacentHTML('beforeend',
  `<p id="measured">wide=${wide.join(',') || 'none'} narrow_images=${imgs.filter(w => w < page - 40).length}</p>`);
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_html_report_in_a_headless_browser_fits_the_window(runner, tmp_path):
    import subprocess

    run = page_run(tmp_path)
    assert runner.invoke(cli, ["report", str(run), "--html", "--no-samples"]).exit_code == 0
    page = (run / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", MEASURE + "</body>"))
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1024,4000"]
    dom = subprocess.run(
        [*browser, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'id="measured">wide=none narrow_images=0<' in dom
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", (run / "report.html").as_uri()], timeout=120)
    assert_real_png(shot)


def test_the_reports_samples_flag_an_answer_that_loops(runner, tmp_path, monkeypatch):
    import align.report

    run = write_run(tmp_path / "run", {"home": [step("before", **{"quiz.accuracy": 0.5})]}, steps=["before"])
    (run / "topics.json").write_text("[]")
    rows = [{"prompt": "Hi?", "bare": "Hello.", "adapter": "friend, " * 20, "person": "Ahoy, gull."}]
    monkeypatch.setattr(align.report, "sample_answers", lambda run, summary: {"home": rows})
    result = runner.invoke(cli, ["report", str(run), "--html"])
    assert result.exit_code == 0, result.output
    markdown = (run / "report.md").read_text()
    flag = "with the home adapter (repeats itself (a word or phrase loops), which is not the person's voice):"
    assert flag in markdown
    assert "bare model:\n" in markdown  # not flagged
    assert html.escape(flag) in (run / "report.html").read_text()
