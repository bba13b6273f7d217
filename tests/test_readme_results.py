"""Every benchmark figure in the README is `vtoken bench`'s own output, committed beside it, with the
statement of what the bundled model is next to it."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtoken.zoo.card import BUNDLED_MODEL_NOTE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLOTS = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README)
RESULTS = ROOT / "demos" / "results"
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
ESTIMATE = re.compile(r"\d+\.\d+ \[\d+\.\d+, \d+\.\d+\]")  # "0.978 [0.972, 0.983]"


def _section(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0]


def _unquoted(text: str, results: str) -> set[str]:
    """Figures of ``text`` that ``results`` does not hold: each value with its interval must appear
    there as written, any other number at least as a number."""
    text = " ".join(text.split())
    estimates = set(ESTIMATE.findall(text))
    missing = {e for e in estimates if e not in results}
    rest = set(NUMBER.findall(ESTIMATE.sub(" ", text)))
    return missing | (rest - set(NUMBER.findall(results)))


def test_readme_shows_bench_plots():
    assert {Path(p).name for p in PLOTS} >= {"accuracy.png", "costs.png", "speed.png"}
    assert all(RESULTS in (ROOT / p).parents for p in PLOTS)  # demos/results and its subfolders


def test_each_readme_plot_is_a_real_image_beside_its_data():
    data = json.loads((RESULTS / "results.json").read_text())
    accuracy = data["accuracy"]["accuracy"]
    assert "baseline" in accuracy and len(accuracy) > 1
    for run in accuracy.values():
        assert all(0.0 <= e["low"] <= e["value"] <= e["high"] <= 1.0 and e["n"] > 0 for e in run.values())
    assert data["speed"] and all(min(s["prefill_ratios"]) > 0 for s in data["speed"].values())
    for plot in PLOTS:
        pixels = np.asarray(Image.open(ROOT / plot).convert("L"), dtype=float)
        assert pixels.size > 100_000 and pixels.std() > 10, f"{plot} is blank"


def test_results_json_records_the_commit_versions_and_machine():
    where = json.loads((RESULTS / "results.json").read_text())["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", where["commit"])
    assert where["versions"]["torch"] and where["versions"]["transformers"] and where["threads"] >= 1
    assert "CPU cores" in where["machine"]
    git = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", where["commit"], "HEAD"])
    if git.returncode == 128:  # not a git checkout (or a shallow one): nothing more to check
        pytest.skip("no git history here")
    assert git.returncode == 0, "results.json names a commit this checkout's history does not hold"


def test_the_readme_shows_the_committed_results_verbatim():
    results = (RESULTS / "results.md").read_text()
    command = results.splitlines()[0]
    assert command.startswith("`vtoken bench") and "--threads" in command
    assert results.strip() in README, "the Measuring section must show demos/results/results.md as written"


def test_every_figure_next_to_the_bench_comes_from_its_committed_output():
    results = (RESULTS / "results.md").read_text()
    plugin_row = next(line for line in README.splitlines() if line.startswith("| `token_pruning` |"))
    measured = _section("Measured on the bundled model", "\n\n")
    assert len(ESTIMATE.findall(" ".join(measured.split()))) >= 10
    for name, text in (("Plugins table row", plugin_row), ("measured paragraph", measured)):
        missing = _unquoted(text, results)
        assert not missing, f"{name} quotes figures that demos/results/results.md does not hold: {missing}"
    measuring = _section("## Measuring", "### On a GPU")
    rows = [line for line in measuring.splitlines() if line.startswith("| ")]
    assert rows and all(row in results for row in rows), "a table row in Measuring is not bench output"


def test_the_statement_about_the_bundled_model_stands_next_to_its_numbers():
    measured = " ".join(_section("### `token_pruning`", "## Measuring").split())
    assert BUNDLED_MODEL_NOTE in measured  # as one sentence, however the README wraps it
    assert BUNDLED_MODEL_NOTE in (RESULTS / "results.md").read_text()
    plugins = _section("## Plugins", "### `token_pruning`")
    assert "trained to put" in plugins and "favoured by construction" in plugins
    card = (ROOT / "vtoken" / "zoo" / "models" / "synth-llava-tiny" / "README.md").read_text()
    assert BUNDLED_MODEL_NOTE in card


#: figures of the zipvl section that no output holds, with the reason they are right
ZIPVL_DERIVED = {
    "0.276": "0.138 of the float32 cache is 0.276 of a float16 one",
    "0.26": "(d/2 + d/2 + 4) / 4d bytes at d = 128: the closed form of a 4-bit entry",
    "0.13": "(d/4 + d/4 + 4) / 4d bytes at d = 128: the closed form of a 2-bit entry",
}


def _figures(text: str) -> set[str]:
    """Numbers of ``text``, paper identifiers (arXiv:2410.08584) and link targets aside."""
    text = re.sub(r"\(https?://[^)]*\)|arXiv:\d+\.\d+", " ", text)
    return set(NUMBER.findall(" ".join(text.split())))


def test_every_zipvl_figure_comes_from_a_committed_output():
    """The zipvl section's numbers are in `vtoken bench`'s, `vtoken bench peers`' or the zipvl
    speed and ratio outputs, as written or rounded to the decimals the README shows."""
    section = _section("### `zipvl`", "### `spec_decoding`")
    row = next(line for line in README.splitlines() if line.startswith("| `zipvl` |"))
    sources = [(RESULTS / "results.md").read_text(), (RESULTS / "peers" / "peers.md").read_text()]
    sources += [p.read_text() for p in sorted((RESULTS / "zipvl").glob("*.json"))]
    values = [float(v) for v in NUMBER.findall(" ".join(sources))]
    for figure in sorted(_figures(section + row) - set(ZIPVL_DERIVED)):
        decimals = len(figure.split(".")[1])
        assert any(round(v, decimals) == float(figure) for v in values), f"{figure} is in no output"
    assert set(ESTIMATE.findall(" ".join(section.split()))) <= set(ESTIMATE.findall(" ".join(sources)))


#: figures of the spec_decoding section that no output holds, with the reason they are right
SPEC_DERIVED = {
    "0.1": "the paper's weight of the cross-entropy term (SpecVLM), also TrainConfig.ce_weight",
    "1.0": "the paper's weight of the feature term, also TrainConfig.feature_weight",
    "3.5": "the issue's target for tokens per round",
    "1.5": "LLaVA-1.5, a model's name",
}


def test_every_spec_decoding_figure_comes_from_its_committed_outputs():
    """The spec_decoding section's numbers are in its benchmark's and scaling curve's outputs (as
    written, or rounded to the decimals shown), or derived as listed above."""
    _assert_from_outputs("spec_decoding", "### `region_proposal`", ("**/*.json", "**/*.md"), SPEC_DERIVED)
    bench = json.loads((RESULTS / "spec_decoding" / "bench.json").read_text())
    for batch in ("batch1", "batch4"):
        assert all(v["equal_to_greedy"] for v in bench[batch].values() if isinstance(v, dict))


#: figures of the region_proposal section that no output holds, with the reason they are right
REGION_DERIVED = {
    "0.30": "the issue's target gain over the base view",
    "0.10": "the issue's target distance to the ground-truth crop",
    "0.01": "the issue's target loss on the other families",
    "0.15": "SD-RPN's threshold, also RegionProposalConfig.threshold (and the sweep's values)",
    "0.3": "a threshold of the validation sweep",
    "0.5": "a threshold of the validation sweep",
    "0.625": "RegionProposalConfig.max_side (SD-RPN's 15 of 24 cells)",
    "1.25": "RegionProposalConfig.crop_scale",
    "0.25": "RegionProposalConfig.crop_min",
    "0.62": "SD-RPN's reported throughput ratio on LLaVA-1.5-7B",
    "1.5": "LLaVA-1.5, a model's name",
    "2.5": "Qwen2.5-VL, a model's name",
    "0.1": "SD-RPN's background ratio",
    "0.2": "SD-RPN's foreground ratio",
    "0.8": "a scale of configs/region_proposal_search.yaml (refine_scales)",
    "0.65": "a scale of configs/region_proposal_search.yaml (refine_scales)",
}


def test_every_region_proposal_figure_comes_from_its_committed_outputs():
    """The region_proposal section's numbers (and its plugins-table row) are in its benchmark
    outputs (as written, or rounded to the decimals shown), or derived as listed above."""
    _assert_from_outputs("region_proposal", "### `temporal_smoother`", "*/bench.json", REGION_DERIVED)


#: figures of the temporal_smoother section that no output holds, with the reason they are right
SMOOTHER_DERIVED = {
    "0.8": "VLA-Pruner's decay, also TemporalSmootherConfig.decay",
    "0.25": "TemporalSmootherConfig.keep_ratio",
    "0.95": "the issue's target retention at 25%",
    "1.0": "TemporalSmootherConfig.level_share",
    "0.5": "a level share of the sweep",
    "1.6": "the bundled VLAs' parameter count in millions (their cards)",
    "1.5": "LLaVA-1.5, a model's name",
    "0.6": "the issue's target latency ratio at 25%",
}


def test_every_temporal_smoother_figure_comes_from_its_committed_outputs():
    """The temporal_smoother section's numbers (and its plugins-table row) are in its benchmark's
    and tuning sweep's outputs (as written, or rounded to the decimals shown), or derived above."""
    _assert_from_outputs("temporal_smoother", "## Measuring", "**/*.json", SMOOTHER_DERIVED)


def _assert_from_outputs(
    plugin: str, section_end: str, pattern: str | tuple[str, ...], derived: dict[str, str]
) -> None:
    """Every number of ``plugin``'s README section and plugins-table row is in its result files
    (as written, or rounded to the decimals shown), or in ``derived``."""
    section = _section(f"### `{plugin}`", section_end)
    row = next(line for line in README.splitlines() if line.startswith(f"| `{plugin}` |"))
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    sources = [p.read_text() for glob in patterns for p in sorted((RESULTS / plugin).glob(glob))]
    values = [float(v) for v in NUMBER.findall(" ".join(sources))]
    for figure in sorted(_figures(section + row) - set(derived)):
        decimals = len(figure.split(".")[1])
        assert any(round(v, decimals) == float(figure) for v in values), f"{figure} is in no output"
