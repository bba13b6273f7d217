"""``vtoken eval rollout``: conditions, the paired statistics by hand, and 3-episode smoke rollouts on
both task suites giving identical per-seed results in this process, in worker processes and on a
local Ray instance."""

from __future__ import annotations

import json

import pytest

from vtoken.errors import ConfigError, VTokenError
from vtoken.robot.conditions import (
    BASELINE,
    Condition,
    conditions_from_args,
    load_conditions,
    parse_condition,
)
from vtoken.robot.episodes import EpisodeRecord
from vtoken.robot.report import mcnemar_exact, paired, retained, summary

FASTV = "configs/token_pruning_fastv.yaml"


def test_mcnemar_exact_by_hand():
    # b = 3, c = 0: P(X <= 0) = 1/8 for X ~ Bin(3, 1/2), two-sided 2/8
    assert mcnemar_exact(3, 0) == pytest.approx(0.25)
    # b = 5, c = 1: P(X <= 1) = (1 + 6) / 64, two-sided 14/64
    assert mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact(2, 2) == 1.0 and mcnemar_exact(0, 0) == 1.0


def _records(successes, steps=2):
    return [
        EpisodeRecord(s, bool(w), steps, "t", call_ms=[10.0 * (s + 1)] * steps, env_ms=1.0 * steps)
        for s, w in enumerate(successes)
    ]


def test_paired_comparison_and_summary_by_hand():
    base, other = _records([1, 1, 0, 1, 1, 0]), _records([1, 0, 0, 1, 0, 1])
    p = paired(base, other)
    assert p.difference == pytest.approx(-1 / 6)
    assert (p.only_baseline, p.only_condition) == (2, 1)
    assert p.p_value == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8
    assert p.low < p.difference < p.high and p.low >= -1 and p.high <= 1
    s = summary(base)
    assert s["success"] == pytest.approx(4 / 6) and s["episodes"] == 6 and s["mean_steps"] == 2
    # calls: 10, 10, 20, 20, ..., 60, 60 ms; per env step: mean call + 1 ms of simulation
    assert s["call_ms_p50"] == pytest.approx(35.0) and s["env_step_ms"] == pytest.approx(36.0)
    with pytest.raises(ValueError, match="same seeds"):
        paired(base, other[::-1])


def test_retention_and_comparisons_between_conditions():
    from vtoken.robot.report import RolloutResult

    base, a, b = _records([1, 1, 0, 1, 1, 0]), _records([1, 0, 0, 1, 0, 1]), _records([0, 0, 0, 1, 0, 1])
    kept = retained(base, a)
    assert kept.value == pytest.approx(3 / 4) and kept.low <= kept.value <= kept.high
    assert retained(_records([0, 0]), _records([1, 0])) is None  # the baseline never succeeded
    conditions = [Condition(BASELINE), parse_condition("a=token_pruning"), parse_condition("b=token_pruning")]
    episodes = {BASELINE: base, "a": a, "b": b}
    result = RolloutResult.of("m", "env", conditions, episodes, compare=[("a", "b")])
    versus = result.comparisons["a vs b"]
    assert versus.difference == pytest.approx(1 / 6) and (versus.only_baseline, versus.only_condition) == (
        0,
        1,
    )
    assert result.retention["b"].value == pytest.approx(2 / 4)
    text = result.format()
    assert "retention of baseline" in text and "a vs b: +0.167" in text
    with pytest.raises(ConfigError, match="unknown conditions.*'c'"):
        RolloutResult.of("m", "env", conditions, episodes, compare=[("a", "c")])


def test_conditions_from_names_yaml_and_overrides(tmp_path):
    c = parse_condition("f10=token_pruning,token_pruning.scorer=fastv,token_pruning.keep_ratio=0.1")
    assert c.name == "f10" and dict(c.plugins[0][1]) == {"scorer": "fastv", "keep_ratio": 0.1}
    assert parse_condition(f"fv={FASTV},token_pruning.keep_ratio=0.5").create()[0].config.keep_ratio == 0.5
    path = tmp_path / "conditions.yaml"
    rnd_yaml = "  rnd:\n    - name: token_pruning\n      scorer: random\n      keep_ratio: 0.3\n"
    path.write_text("conditions:\n" + rnd_yaml)
    (rnd,) = load_conditions(path)
    assert rnd.create()[0].config.scorer == "random"
    shipped = load_conditions("configs/rollout_token_pruning.yaml")
    assert [c.name for c in shipped] == ["fastv25", "text_guided25", "random25"]
    assert all(c.create()[0].config.keep_ratio == 0.25 for c in shipped)
    made = conditions_from_args(
        [f"fv={FASTV}"], [str(path)], ["token_pruning"], [], ["token_pruning.keep_ratio=0.2"]
    )
    assert [m.name for m in made] == [BASELINE, "rnd", "fv", "plugged"] and made[0] == Condition(BASELINE)
    for bad, message in [
        ("fv", "must look like NAME="),
        ("baseline=token_pruning", "other than 'baseline'"),
        ("x=token_pruning,token_pruning.keep_ratio=7", "keep_ratio"),
        ("x=no_such_plugin", "Unknown plugin 'no_such_plugin'"),
    ]:
        with pytest.raises(VTokenError, match=message):
            parse_condition(bad)
    with pytest.raises(ConfigError, match="unique"):
        conditions_from_args([f"a={FASTV}", f"a={FASTV}"], [], [], [], [])


# --- smoke rollouts: both suites, three executors --------------------------------------------------


def _tiny_vla(folder, vocabulary: str, dims: int) -> str:
    """A random-weight VLA saved like an exported one (folder + action_tokenizer.json)."""
    from vtoken.zoo.vla.model import VLAModelConfig, save_random_vla

    sizes = {"vision_hidden": 32, "vision_layers": 1, "text_hidden": 32, "text_layers": 4}
    return save_random_vla(VLAModelConfig(**sizes, action_dims=dims, vocabulary=vocabulary), folder)


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    envs = pytest.importorskip("vtoken.robot.envs")
    pytest.importorskip("metaworld")
    root = tmp_path_factory.mktemp("vla")
    return {
        envs.ENV_IDS["reach"]: _tiny_vla(root / "tabletop", "tabletop", 2),
        envs.METAWORLD_IDS["reach-v3"]: _tiny_vla(root / "metaworld", "metaworld", 4),
    }


CONDITIONS = [Condition(BASELINE), parse_condition(f"fastv25={FASTV}")]


def _per_seed(result) -> dict:
    """What must not depend on the executor: per condition and seed, outcome, steps and tokens."""
    return {
        name: [(e.seed, e.success, e.steps, e.task, e.visual_tokens, e.visual_kept) for e in records]
        for name, records in result.episodes.items()
    }


@pytest.mark.parametrize("suite", ["tabletop", "metaworld"])
def test_three_episode_rollouts_match_across_executors(suite, suites, ray_cluster, tmp_path):
    from vtoken.robot.evaluation import evaluate_rollouts

    env_id = next(e for e in suites if ("MetaWorld" in e) == (suite == "metaworld"))

    def run(**kw):
        short = (("max_steps", 12),)  # an untrained policy fails: 12 steps, not the task's 30 or 150
        return evaluate_rollouts(
            suites[env_id], env_id, CONDITIONS, 3, seed0=5, shard_size=2, env_kwargs=short, **kw
        )

    here = run(gifs=1, out_dir=tmp_path)
    assert here.seeds == [5, 6, 7] and list(here.episodes) == [BASELINE, "fastv25"]
    assert _per_seed(run(workers=2)) == _per_seed(here)
    assert _per_seed(run(ray_address=ray_cluster)) == _per_seed(here)
    base, fastv = here.summaries[BASELINE], here.summaries["fastv25"]
    assert base["visual_tokens"] == fastv["visual_tokens"] == 64
    assert base["visual_kept"] == 64 and fastv["visual_kept"] < 64
    assert fastv["gflops_per_call"] < base["gflops_per_call"]
    assert all(len(e.call_ms) == e.steps > 0 for e in here.episodes["fastv25"])
    gif = tmp_path / "gifs" / "fastv25" / "seed_5.gif"
    from PIL import Image

    with Image.open(gif) as image:  # the frame and, beside it, the kept tokens; 100 ms per step
        durations = []  # (the GIF writer merges identical consecutive frames, adding their durations)
        for k in range(image.n_frames):
            image.seek(k)
            durations.append(image.info["duration"])
        assert sum(durations) == 100 * here.episodes["fastv25"][0].steps and image.size == (512, 256)
    assert not (tmp_path / "gifs" / "fastv25" / "seed_6.gif").exists()


def test_cli_writes_table_json_and_plot(suites, tmp_path, capsys):
    from vtoken.cli import main

    env_id = next(e for e in suites if "Tabletop" in e)
    code = main(
        ["eval", "rollout", "--model", suites[env_id], "--env", env_id, "--episodes", "2",
         "--condition", f"fastv25={FASTV}", "--out-dir", str(tmp_path), "--env-arg", "max_steps=5"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "success [95% Wilson]" in out and "fastv25: token_pruning(" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["seeds"] == [0, 1] and set(data["paired"]) == {"fastv25"}
    assert all(e["steps"] <= 5 for e in data["episodes"]["baseline"])
    assert data["provenance"]["threads"] == 1 and (tmp_path / "success.png").stat().st_size > 0


def test_bad_rollout_requests_are_named(suites):
    from vtoken.robot.evaluation import evaluate_rollouts

    env_id = next(iter(suites))
    with pytest.raises(ConfigError, match="first condition must be the unplugged"):
        evaluate_rollouts(suites[env_id], env_id, CONDITIONS[1:], 2)
    with pytest.raises(ConfigError, match="--out-dir"):
        evaluate_rollouts(suites[env_id], env_id, CONDITIONS, 2, gifs=1)
    with pytest.raises(ConfigError, match="episodes must be >= 1"):
        evaluate_rollouts(suites[env_id], env_id, CONDITIONS, 0)
    with pytest.raises(ConfigError, match="expert policy has no model"):
        evaluate_rollouts("expert", env_id, CONDITIONS, 1)
    with pytest.raises(VTokenError, match="'synth-llava-tiny' is not a VLA"):
        evaluate_rollouts("synth-llava-tiny", env_id, CONDITIONS, 1)
    with pytest.raises(ConfigError, match="unknown env 'vtoken/Nope-v0'"):
        evaluate_rollouts(suites[env_id], "vtoken/Nope-v0", CONDITIONS, 1)


def test_a_cut_run_resumes_from_its_stored_episodes(suites, tmp_path, monkeypatch, caplog):
    """Episodes finished before a cut are read back, only the missing seeds run (whatever the shard
    size), a condition added later runs alone, and the result equals an uncut run's."""
    from vtoken.robot import evaluation

    env_id = next(e for e in suites if "Tabletop" in e)
    short = (("max_steps", 6),)
    ran: list[tuple[str, tuple[int, ...]]] = []

    def counted(job):
        ran.append((job.condition.name, job.seeds))
        return evaluation.run_job.__wrapped__(job)

    counted.__wrapped__ = evaluation.run_job
    monkeypatch.setattr(evaluation, "run_job", counted)

    def run(conditions, shard_size, out_dir=tmp_path):
        return evaluation.evaluate_rollouts(
            suites[env_id], env_id, conditions, 3, shard_size=shard_size, env_kwargs=short, out_dir=out_dir
        )

    uncut = run(CONDITIONS, 3, out_dir=tmp_path / "uncut")
    ran.clear()
    run(CONDITIONS[:1], 2)  # the baseline alone, stored as seeds 0-1 and 2
    (tmp_path / "episodes" / BASELINE / "2-2.json").unlink()  # as if cut before the last shard
    assert ran == [(BASELINE, (0, 1)), (BASELINE, (2,))]
    ran.clear()
    resumed = run(CONDITIONS, 1)
    assert ran == [("fastv25", (0,)), ("fastv25", (1,)), (BASELINE, (2,)), ("fastv25", (2,))]
    assert _per_seed(resumed) == _per_seed(uncut) and resumed.seeds == [0, 1, 2]
    ran.clear()
    assert _per_seed(run(CONDITIONS, 2)) == _per_seed(uncut) and ran == []  # all stored: nothing runs
    with caplog.at_level("WARNING", logger="vtoken.robot.evaluation"):  # stored: no GIF can be made
        evaluation.evaluate_rollouts(
            suites[env_id], env_id, CONDITIONS, 3, shard_size=2, env_kwargs=short, out_dir=tmp_path, gifs=1
        )
    assert "no GIF for baseline/seed_0, fastv25/seed_0" in caplog.text and ran == []
    other = [CONDITIONS[0], parse_condition("fastv25=token_pruning,token_pruning.keep_ratio=0.5")]
    with pytest.raises(ConfigError, match="holds episodes of another run.*delete"):
        run(other, 2)


def test_gifs_add_what_a_plugin_draws(suites, tmp_path):
    from PIL import Image

    from vtoken.robot.evaluation import evaluate_rollouts

    env_id = next(e for e in suites if "Tabletop" in e)
    smoother = parse_condition("smoother=temporal_smoother,temporal_smoother.window=1")
    evaluate_rollouts(
        suites[env_id], env_id, [Condition(BASELINE), smoother], 1, gifs=1, out_dir=tmp_path,
        env_kwargs=(("max_steps", 3),),
    )  # fmt: skip
    with Image.open(tmp_path / "gifs" / "smoother" / "seed_0.gif") as gif:
        assert gif.size[1] == 256 and gif.size[0] > 512  # frame | kept tokens | the smoother's maps
    with Image.open(tmp_path / "gifs" / BASELINE / "seed_0.gif") as gif:
        assert gif.size == (512, 256)


def test_every_shipped_rollout_config_loads_and_subsets_share_their_specs():
    from pathlib import Path

    shipped = {p.name: load_conditions(p) for p in sorted(Path("configs").glob("rollout_*.yaml"))}
    assert len(shipped) >= 4 and all(shipped.values())
    full = {c.name: c.describe() for c in shipped["rollout_temporal_smoother.yaml"]}
    core = {c.name: c.describe() for c in shipped["rollout_temporal_smoother_core.yaml"]}
    assert core.items() <= full.items()  # same names, same stacks: the stored episodes are shared
