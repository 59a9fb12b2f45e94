"""demo.py with MLFLOW_TRACKING_URI set: everything goes to the server, nothing stays local.

A plain `mlflow server` on SQLite, so this runs anywhere; tests/test_team_server.py
covers the README's full team set-up (PostgreSQL, authentication, many participants).
"""

from mlflow import MlflowClient

from conftest import (MODEL_FILES, PLOTS, WORKSHOP_FILES, free_port, learner_env, make_workshop, printed_ids,
                      run_demo, start_server)


def test_demo_logs_everything_to_the_server_and_nothing_locally(tmp_path):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = (f"mlflow server --backend-store-uri sqlite:///server.db "
               f"--artifacts-destination ./artifacts --host 127.0.0.1 --port {port} --workers 1")
    workshop = make_workshop(tmp_path / "participant")
    with start_server(command, server_dir, f"{url}/health"):
        result = run_demo(workshop, "--n-estimators", "20", env=learner_env(MLFLOW_TRACKING_URI=url))
        assert result.returncode == 0, result.stderr
        run_id, model_id = printed_ids(result.stdout)
        assert f"{url}/#/experiments/" in result.stdout

        client = MlflowClient(tracking_uri=url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["n_estimators"] == "20"
        assert {"accuracy", "roc_auc"} <= set(run.data.metrics)
        assert len(run.inputs.dataset_inputs) == 2
        listed = {item.path for item in client.list_artifacts(run_id, "plots")}
        assert listed == set(PLOTS)

        model = client.get_logged_model(model_id)
        assert model.source_run_id == run_id
        model_files = {item.path for item in client.list_logged_model_artifacts(model_id)}
        assert set(MODEL_FILES) <= model_files

    # The files are on the server's side, proxied through it ...
    assert (server_dir / "server.db").is_file()
    assert any((server_dir / "artifacts").rglob("model.skops"))
    # ... and the participant's folder holds only what `git clone` gave it.
    assert sorted(path.name for path in workshop.iterdir()) == sorted(WORKSHOP_FILES)
