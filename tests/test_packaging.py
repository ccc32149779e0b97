"""The wheel as a user gets it: built from a clean copy of the checkout, installed into a fresh
virtual environment, imported and run from a directory outside the checkout, and holding no
top-level module besides the package.

The venv sees the site-packages of the environment running the tests, a virtualenv or the
system's (torch, numpy, scipy and threadpoolctl are not reinstalled: a fresh torch would take
minutes), which also hold the editable install of this checkout; the test checks that the
venv's own copy is the one imported. Skip it with
`-m "not slow"` (marker registered in pyproject.toml); it runs by default.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "distributed_shampoo"

# Not part of a source checkout's content: build outputs (a stale build/lib would leak old
# modules into the wheel), caches, VCS data, environments.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks",
    ".mypy_cache", ".ruff_cache", "*.so", "*.pyd", ".venv", "venv",
)

# Runs inside the venv, from a directory outside the checkout; prints one JSON line.
CHECK_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import distributed_shampoo
    import distributed_shampoo.shampoo_types
    import distributed_shampoo.matrix_functions_types
    import distributed_shampoo.utils.shampoo_utils
    from distributed_shampoo import _backend
    from distributed_shampoo.distributed_shampoo import DistributedShampoo
    from distributed_shampoo.shampoo_types import AdamGraftingConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = DistributedShampoo(model.parameters(), lr=0.01, betas=(0.9, 0.999), epsilon=1e-8,
                             precondition_frequency=1, start_preconditioning_step=1,
                             grafting_config=AdamGraftingConfig())
    model(torch.randn(8, 6)).square().mean().backward()
    opt.step()
    after = list(model.parameters())
    print(json.dumps({
        "package": distributed_shampoo.__file__,
        "extension": _backend._C.__file__,
        "changed": all(not torch.equal(b, a) for b, a in zip(before, after)),
        "finite": all(bool(torch.isfinite(a).all()) for a in after),
    }))
    """
)


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


def _clean_env() -> dict:
    """The environment minus what could put the checkout on the venv's import path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _see_active_environment(python: Path) -> None:
    """Lets the venv import what the environment running the tests has (torch, pip, ...).

    venv's system_site_packages means the *base* interpreter's site-packages; when the tests
    run inside a virtualenv or conda env, torch lives in that environment's site-packages
    instead. Plain directory lines in a .pth file append those directories after the venv's
    own site-packages (so the installed wheel still comes first) without running their .pth
    files, so the checkout's editable install stays invisible.
    """
    script = "import json, site; print(json.dumps(site.getsitepackages()))"
    own = json.loads(_run([str(python), "-c", script], env=_clean_env(), timeout=60).stdout)
    active = [d for d in site.getsitepackages() if Path(d).is_dir()]
    (Path(own[0]) / "_active_environment.pth").write_text("".join(f"{d}\n" for d in active))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built without build isolation (setuptools and wheel are installed here)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "wheelhouse"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(out), str(src)], env=_clean_env(), timeout=300)
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_only_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        record = zf.read(f"{dist_info.pop()}/RECORD").decode()
    recorded = [line.split(",")[0] for line in record.splitlines() if line]
    assert sorted(recorded) == sorted(names)
    top_level = {n.split("/")[0] for n in names}
    stray = {t for t in top_level if t != PACKAGE and not t.endswith(".dist-info")}
    assert not stray, f"top-level entries besides the package in {wheel.name}: {sorted(stray)}"
    assert any(n.startswith(f"{PACKAGE}/_C.") and n.endswith((".so", ".pyd")) for n in names), (
        "the compiled extension is missing from the wheel"
    )
    assert f"{PACKAGE}/utils/shampoo_utils.py" in names


@pytest.mark.slow
def test_wheel_installs_and_steps_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    python = _make_venv(env_dir)
    env = _clean_env()
    # The system's pip, run by the venv's interpreter, installs into the venv. --ignore-installed:
    # never touch (or be satisfied by) the checkout's editable install in the system site.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "-q", str(wheel)], env=env, timeout=120)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = _run([str(python), "-c", CHECK_SCRIPT], cwd=workdir, env=env, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    env_root = env_dir.resolve()
    for key in ("package", "extension"):
        where = Path(report[key]).resolve()
        assert env_root in where.parents, (
            f"{key} imported from {where}, not from the venv {env_root}: the checkout (or its "
            "editable install) shadowed the installed wheel"
        )
        assert ROOT not in where.parents, where
    assert report["changed"] and report["finite"], report


def _make_venv(env_dir: Path) -> Path:
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _see_active_environment(python)
    return python


def test_venv_sees_the_active_environments_packages(tmp_path: Path) -> None:
    """Run inside a virtualenv, the inner venv must see that virtualenv's site-packages (where
    torch is), not only the base interpreter's; the venv's own site-packages come first."""
    python = _make_venv(tmp_path / "venv")
    script = "import json, sys; print(json.dumps(sys.path))"
    inner = json.loads(_run([str(python), "-c", script], env=_clean_env(), timeout=60).stdout)
    inner = [str(Path(p).resolve()) for p in inner]
    own = str((tmp_path / "venv").resolve())
    for directory in site.getsitepackages():
        if Path(directory).is_dir():
            resolved = str(Path(directory).resolve())
            assert resolved in inner, (resolved, inner)
            first_own = next(i for i, p in enumerate(inner) if p.startswith(own))
            assert first_own < inner.index(resolved), inner
