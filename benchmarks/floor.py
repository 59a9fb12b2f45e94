"""The floor: the work a demo run cannot avoid, and nothing else.

    python benchmarks/floor.py [path/to/demo.py]

It runs demo.py's own cells up to and including the one that fits the model
(the flags at their defaults, the data, the fit), then every other import
statement of demo.py, and saves the model with `mlflow.sklearn.save_model` to
a temporary folder, with demo.py's pinned pip requirements and the forest's
one skops trusted type. No tracking store, no run, no scores, no plots, no
datasets, no input example: whatever a demo run costs beyond this is the price
of evaluating and tracking.

benchmarks/benchmark.py runs it as a subprocess beside demo.py and compares.
"""

import ast
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

DEMO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "demo.py")
CELL = "\n# %%"

cells = DEMO.read_text(encoding="utf-8").split(CELL)
fit_cell = next(index for index, cell in enumerate(cells) if "model.fit(" in cell)
namespace = {"__name__": "__main__", "__file__": str(DEMO)}
sys.argv = [str(DEMO)]  # demo.py's flags at their defaults

# The flags, the data and the fit, exactly as demo.py does them.
exec(compile(CELL.join(cells[: fit_cell + 1]), str(DEMO), "exec"), namespace)

# Every later import of demo.py (matplotlib drawing into memory, as in demo.py).
import matplotlib  # noqa: E402

matplotlib.use("Agg")
later = ast.parse(CELL.join(cells[fit_cell + 1:]))
imports = [node for node in ast.walk(later) if isinstance(node, (ast.Import, ast.ImportFrom))]
exec(compile(ast.Module(body=imports, type_ignores=[]), str(DEMO), "exec"), namespace)

# The model's files, as `log_model` writes them, without a run.
packages = ["mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas"]
assert all(f"\"{package}\"" in "".join(cells) for package in packages), "demo.py pins other packages"
with tempfile.TemporaryDirectory() as folder:
    namespace["mlflow"].sklearn.save_model(
        namespace["model"],
        Path(folder) / "model",
        skops_trusted_types=["sklearn.tree._tree.Tree"],
        pip_requirements=[f"{package}=={version(package)}" for package in packages],
    )
