"""The floor: the work a demo run cannot avoid, and nothing else.

    python benchmarks/floor.py [path/to/demo.py]

It imports demo.py (which runs nothing but demo.py's own imports and
constants), loads the data and fits the forest with demo.py's own functions and
default flags, then saves the model with `mlflow.sklearn.save_model` to a
temporary folder, with the same explicit, pinned pip requirements and skops
trusted types as demo.py. No tracking store, no run, no plots, no datasets, no
input example: whatever a demo run costs beyond this is the price of tracking.

benchmarks/benchmark.py runs it as a subprocess beside demo.py and compares.
"""

import importlib.util
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

DEMO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "demo.py")

# Importing demo.py does exactly its imports (mlflow, scikit-learn, matplotlib
# with the Agg backend, ...) and nothing else: main() runs only as a script.
spec = importlib.util.spec_from_file_location("demo", DEMO)
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

defaults = demo.parse_args([])
params = {
    "n_estimators": defaults.n_estimators,
    "max_depth": defaults.max_depth,
    "min_samples_leaf": defaults.min_samples_leaf,
    "random_state": defaults.seed,
}
X_train, X_test, y_train, y_test, class_names = demo.load_data(defaults.test_size, defaults.seed)
model = demo.train(X_train, y_train, params)

with tempfile.TemporaryDirectory() as folder:
    demo.mlflow.sklearn.save_model(
        model,
        Path(folder) / "model",
        skops_trusted_types=["sklearn.tree._tree.Tree"],
        pip_requirements=[f"{package}=={version(package)}" for package in demo.MODEL_REQUIREMENTS],
    )
