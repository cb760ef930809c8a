"""``llavadi demo`` end to end at smoke size (what ``make demo`` runs, reduced, with the shipped
teacher): every arm is in the report with each seed's point and the learning curves, the README
block renders from results.json, and a rerun reuses the finished stages."""
import json

import pytest

from conftest import cli, status_json

ARMS = ["ce", "ce+kd", "ce+feat", "llavadi", "llavadi+regen", "llavadi+on-policy"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """One demo folder for the default run and the study: ``--study`` reuses the default run's teacher, data,
    stage-1 student and held-out cache, as it does after ``make demo``."""
    return tmp_path_factory.mktemp("demo") / "demo"


def test_demo_smoke_runs_every_arm_and_reuses_on_rerun(demo_root, tmp_path):
    root = demo_root
    p = cli("demo", "--run-dir", root, "--profile", "smoke", "--executor", "local", timeout=900)
    res = json.loads((root / "results.json").read_text())
    assert [r["arm"] for r in res["results"]] == ARMS and not any("skipped" in r for r in res["results"])
    for r in res["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["kl_to_teacher"] >= 0 and r["perplexity"] > 1
    report = (root / "report.md").read_text()
    for label in ("CE only", "logit KD", "feature KD", "LLAVADI", "regenerated", "on-policy rounds"):
        assert label in report and label in p.stdout
    png = (root / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert res["teacher"]["path"].endswith("assets/demo_teacher")
    assert set(res["curves"]) == {"ce", "llavadi"} and all(len(c) == 2 for c in res["curves"].values())
    assert all(0.0 <= p["accuracy"] <= 1.0 for c in res["curves"].values() for p in c)
    assert set(res["timings_s"]) >= {"teacher_passes", "students_train", "on_policy", "eval", "curves"}
    assert "Measured ordering" in report and "gap" in report and "Learning curves" in report
    for run in ("original", "regenerated", "heldout"):
        st = status_json(root / "runs" / run)["stages"]
        assert all(s["complete"] for s in st.values()), (run, st)
    assert status_json(root / "runs" / "regenerated")["stages"]["regenerate"]["samples"]["out"] > 0
    # the on-policy arm continued seed 0's LLAVADI student: its round answered, was scored and trained
    op = res["results"][-1]
    assert op["rounds"] == 1 and op["steps"] > 4  # the LLAVADI arm's 4 steps, then the round's
    round_1 = root / "runs" / "on-policy-s0" / "on_policy" / "round_1"
    assert json.loads((round_1 / "round.json").read_text())["init"].startswith(
        str(root / "runs" / "on-policy-s0" / "train_student" / "checkpoints"))
    # every arm starts from the stage-1 student: caption alignment moved the language model and the
    # projector, not the pre-trained vision tower (frozen, as LLaVA freezes CLIP)
    from safetensors.torch import load_file

    vis, init = (load_file(str(root / "models" / d / "model.safetensors")) for d in ("student_vision", "student_init"))
    assert vis.keys() == init.keys()
    tower = [k for k in vis if "vision_tower" in k]
    moved = [k for k in vis if not (vis[k] == init[k]).all()]
    assert tower and not set(tower) & set(moved)
    assert any("multi_modal_projector" in k for k in moved) and any("language_model" in k for k in moved)
    assert all(s["complete"] for s in status_json(root / "runs" / "student_stage1")["stages"].values())
    from llavadi.stages.demo.report import README_BEGIN, README_END, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nrest\n")
    update_readme(readme, root)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert res["date"] in text and "(1) CE only" in text and (tmp_path / "docs" / "demo_report.png").exists()
    p2 = cli("demo", "--run-dir", root, "--profile", "smoke", "--executor", "local", timeout=900)
    assert "building" not in p2.stdout and "generating" not in p2.stdout and "(0 run, 1 reused)" in p2.stdout
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]  # noqa: E731
    assert strip(json.loads((root / "results.json").read_text())["results"]) == strip(res["results"])


def test_demo_study_smoke_trains_every_arm_of_the_study_preset(demo_root, tmp_path):
    """``llavadi demo --study`` at smoke size: every arm of configs/sweeps/llavadi_study.yaml trained through
    `sweep` from one cache holding every row kind, layers -1 and 2 and the affinity; the README block renders."""
    import yaml

    from llavadi.stages.demo.study import BEGIN, END, PRESET, update_readme

    root = demo_root
    cli("demo", "--run-dir", root, "--profile", "smoke", "--study", "--executor", "local", timeout=1800)
    res = json.loads((root / "study_results.json").read_text())
    arms = list(yaml.safe_load(PRESET.read_text())["arms"])
    assert [r["arm"] for r in res["results"]] == arms and not any("skipped" in r for r in res["results"])
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["kl_to_teacher"] >= 0 for r in res["results"])
    meta = json.loads((root / "runs" / "study" / "cache_teacher" / "index.json").read_text())["meta"]
    assert (meta["positions"], meta["hidden_layers"], meta["affinity"]) == ("all", [-1, 2], True)
    m = json.loads((root / "runs" / "study" / "sweep" / "feat-layers" / "seed0" / "metrics.jsonl")
                   .read_text().splitlines()[-1])
    assert {"feat[-1,-1]", "feat[1,2]"} <= set(m)
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{BEGIN}\nold\n{END}\nb\n")
    update_readme(readme, root)
    text = readme.read_text()
    assert "old" not in text and "| released |" in text and res["date"] in text
