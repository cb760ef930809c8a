import pytest

from llavadi.pipeline.config import ConfigError, changed_keys, fingerprint, load_config, parse_override, to_dict
from llavadi.stages.ingest import STAGE as INGEST

from conftest import cli


def test_override_values_are_typed():
    assert parse_override("ingest.shard_size=500") == (["ingest", "shard_size"], 500)
    assert parse_override("run.ray_address=null") == (["run", "ray_address"], None)
    assert parse_override("ingest.inputs=[a.json, b.jsonl]") == (["ingest", "inputs"], ["a.json", "b.jsonl"])
    cfg = load_config({}, ["ingest.shard_size=7", "run.executor=local"])
    assert cfg.ingest.shard_size == 7 and cfg.run.executor == "local"


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config({"ingest": {"shard_sise": 3, "max_chars": "many"}, "run": {"executor": "spark"}}, ["bogus.key=1"])
    msg = str(e.value)
    assert len(e.value.problems) == 4, e.value.problems
    assert "ingest.shard_sise: unknown key (did you mean ingest.shard_size?)" in msg
    assert "ingest.max_chars: expected an integer" in msg
    assert "run.executor: 'spark' is not one of 'ray', 'local'" in msg
    assert "bogus: unknown key" in msg


def test_range_checks_after_types():
    with pytest.raises(ConfigError) as e:
        load_config({}, ["ingest.shard_size=0", "run.num_workers=0"])
    assert {"ingest.shard_size must be >= 1", "run.num_workers must be >= 1"} <= set(e.value.problems)


def test_fingerprint_covers_stage_section_and_upstream_not_run_section(tmp_path):
    a = load_config({}, ["ingest.image_root=/x"])
    b = load_config({}, ["ingest.image_root=/x", "run.executor=local", "run.num_workers=1"])
    c = load_config({}, ["ingest.image_root=/x", "ingest.max_chars=10"])
    ma, mb, mc = (INGEST.material(x, tmp_path) for x in (a, b, c))
    assert fingerprint(ma, None) == fingerprint(mb, None)
    assert fingerprint(ma, None) != fingerprint(mc, None)
    assert fingerprint(ma, "up1") != fingerprint(ma, "up2")
    assert changed_keys(ma, mc) == ["max_chars"]


def test_dry_run_prints_resolved_config_and_writes_nothing(tmp_path, synth):
    train, root = synth
    run = tmp_path / "run"
    p = cli("ingest", run, "--input", train, "--image-root", root, "--dry-run", "ingest.shard_size=33", "run.executor=local")
    import yaml

    printed = yaml.safe_load(p.stdout)
    assert printed["ingest"]["shard_size"] == 33
    assert printed["ingest"]["inputs"] == [str(train)]
    assert printed["run"]["executor"] == "local"
    assert printed == to_dict(load_config(printed))  # what is printed is complete and valid
    assert not (run / "data").exists()


def test_cli_config_error_lists_problems(tmp_path, synth):
    train, root = synth
    p = cli("ingest", tmp_path / "r", "--input", train, "--image-root", root, "ingest.shard_size=x", "run.executor=spark",
            check=False)
    assert p.returncode == 2
    assert "ingest.shard_size: expected an integer" in p.stderr and "run.executor" in p.stderr


@pytest.mark.parametrize("preset", ["tiny.yaml", "llava13b_to_mobilellama2.7b.yaml"])
def test_presets_are_valid(preset):
    from pathlib import Path

    from llavadi.pipeline.config import load_yaml

    cfg = load_config(load_yaml(str(Path(__file__).resolve().parents[1] / "configs" / preset)))
    assert cfg.train_student.ce_weight == cfg.train_student.kd_weight == cfg.train_student.feature_weight == 1.0
    assert cfg.train_student.kd.kind == "fkl" and cfg.train_student.feature.projector == "mlp"
