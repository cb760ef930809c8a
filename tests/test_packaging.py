"""The distribution installs as ``llavadi.*`` only — no generic top-level ``pipeline``,
``stages``, ``schemas`` or ``cli`` — and wheel and editable installs both give a working
``llavadi`` command from any directory."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (w,) = out.glob("llavadi-*.whl")
    return w


def test_wheel_holds_only_the_llavadi_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"llavadi", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for must in ("llavadi/cli.py", "llavadi/pipeline/runner.py", "llavadi/stages/ingest.py",
                 "llavadi/schemas/samples.py", "llavadi/stages/demo/tiny_models.py"):
        assert must in names
    assert not any(n.startswith("llavadi/tests/") for n in names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llavadi = llavadi.cli:main" in entry


def test_wheel_install_runs_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import llavadi, importlib.util as u; print(llavadi.__file__); "
            "print([m for m in ('pipeline','stages','schemas','cli') if u.find_spec(m)])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    file, generic = p.stdout.splitlines()
    assert file.startswith(str(target)) and generic == "[]"
    p = subprocess.run([str(target / "bin" / "llavadi"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0 and "ingest" in p.stdout and "status" in p.stdout


def test_editable_install_console_script_from_another_directory(tmp_path):
    exe = Path(sys.executable).with_name("llavadi")
    assert exe.exists(), "make setup installs the console script"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and "demo" in p.stdout
    code = "import importlib.util as u; print([m for m in ('pipeline','stages','schemas','cli') if u.find_spec(m)])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert p.stdout.strip() == "[]"
