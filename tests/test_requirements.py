"""The logged model's environment pins what is installed, so it can be rebuilt.

`mlflow models serve --env-manager virtualenv` (the default) builds a new
environment from the model's python_env.yaml and requirements.txt. That only
gives a working server if those files name the Python version and the exact
versions of every package that loading the model needs, as they were when the
model was trained: a newer scikit-learn or skops may not read the file back.
"""

import json
import platform
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import learner_env, model_folder

# What mlflow.pyfunc.load_model imports to read a skops-saved forest and
# answer a prediction: MLflow itself, scikit-learn, skops (the file format),
# and the numpy, scipy and pandas that the model and its input are made of.
LOADER_PACKAGES = ["mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas"]


@pytest.fixture(scope="module")
def model_dir(demo_workshop):
    """The files of the model that the README's run logged (the tests only read them)."""
    folder = model_folder(demo_workshop["path"], demo_workshop["model_id"])
    assert (folder / "MLmodel").is_file(), f"no model in {folder}"
    return folder


def pins(lines):
    """{canonical package name: pinned version} of requirement lines, which must all be `==` pins."""
    pinned = {}
    for line in lines:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier  # exactly one version specifier
        assert specifier.operator == "==", f"{line!r} is not pinned to one version"
        pinned[canonicalize_name(requirement.name)] = specifier.version
    return pinned


def test_requirements_pin_the_installed_versions(model_dir):
    lines = [line.strip() for line in (model_dir / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    pinned = pins(lines)
    for package in LOADER_PACKAGES:
        assert canonicalize_name(package) in pinned, f"{package} is not in requirements.txt: {lines}"
    for package, pinned_version in pinned.items():
        assert pinned_version == version(package), (
            f"requirements.txt pins {package}=={pinned_version}, but {version(package)} is installed"
        )


def test_python_env_names_the_running_python(model_dir):
    python_env = yaml.safe_load((model_dir / "python_env.yaml").read_text())
    assert python_env["python"] == platform.python_version()
    assert python_env["dependencies"] == ["-r requirements.txt"]


def test_conda_env_agrees_with_requirements(model_dir):
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    assert f"python={platform.python_version()}" in conda["dependencies"]
    (pip_section,) = [entry for entry in conda["dependencies"] if isinstance(entry, dict)]
    requirements = [line.strip() for line in (model_dir / "requirements.txt").read_text().splitlines()
                    if line.strip()]
    assert pip_section["pip"] == requirements


def test_loading_the_model_imports_the_pinned_packages(model_dir):
    """In a fresh interpreter, load the model as `mlflow models serve` does and
    predict its input example: each pinned loader package is really imported,
    so the list in demo.py is not a guess."""
    probe = f"""
import json, sys
from importlib.metadata import packages_distributions
import pandas as pd
import mlflow.pyfunc
model = mlflow.pyfunc.load_model({str(model_dir)!r})
example = pd.read_json({str(model_dir / 'input_example.json')!r}, orient="split")
owners = packages_distributions()
print(json.dumps({{
    "predictions": [int(p) for p in model.predict(example)],
    "distributions": sorted({{d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}}),
}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], env=learner_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["predictions"]) == 3
    imported = {canonicalize_name(name) for name in report["distributions"]}
    for package in LOADER_PACKAGES:
        assert canonicalize_name(package) in imported, f"loading the model did not import {package}"
