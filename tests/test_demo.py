"""``llavadi demo --quick`` end to end (what ``make demo`` runs), and its reuse on a rerun."""
from conftest import cli, status_json


def test_demo_quick_builds_models_data_and_ingests(tmp_path):
    run_dir = tmp_path / "demo"
    p = cli("demo", "--run-dir", run_dir, "--quick", "--executor", "local", timeout=600)
    assert "complete" in p.stdout
    for m in ("teacher", "student"):
        assert (run_dir / "models" / m / "model.safetensors").exists()
    st = status_json(run_dir / "run")["stages"]["data"]
    assert st["complete"] and st["samples"]["out"] == 400 and st["samples"]["rejected"] == 0
    p = cli("demo", "--run-dir", run_dir, "--quick", "--executor", "local")
    assert "(0 run, 1 reused)" in p.stdout and "building" not in p.stdout
