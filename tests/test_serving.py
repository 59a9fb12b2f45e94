"""`mlflow models serve` started with the README's command, fed the README's request bodies."""

import json
import re
import shlex
import subprocess

import pytest

from conftest import README, free_port, http, readme_commands, readme_snippet, start_server, with_port


@pytest.fixture(scope="module")
def server(demo_workshop):
    """The README's serve command, run in the workshop folder with only the port changed."""
    (command,) = readme_commands("serve")
    command = with_port(command.replace("<model_id>", demo_workshop["model_id"]), free_port())
    port = re.search(r"--port (\d+)", command).group(1)
    base = f"http://127.0.0.1:{port}"
    with start_server(command, demo_workshop["path"], f"{base}/ping", log_name="serve.log"):
        yield {"url": f"{base}/invocations", "workshop": demo_workshop["path"],
               "model_id": demo_workshop["model_id"]}


def readme_curl(snippet, server):
    """The README's curl command, as arguments, aimed at the test's server."""
    command = readme_snippet(snippet).replace("\\\n", " ")
    command = command.replace("<model_id>", server["model_id"])
    command = command.replace("http://127.0.0.1:5001/invocations", server["url"])
    return shlex.split(command)


def curl(arguments, server):
    """Run curl exactly as the README writes it, from the workshop folder; also
    report the HTTP status, which the README's command does not print."""
    result = subprocess.run(arguments + ["--write-out", "\n%{http_code}"], cwd=server["workshop"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    body, status = result.stdout.rsplit("\n", 1)
    return int(status), body


def test_logged_serving_example_gets_predictions(server):
    status, body = curl(readme_curl("curl-example", server), server)
    assert status == 200, body
    example = json.loads((server["workshop"] / "mlruns" / "demo-mlflow-artifacts" / "models"
                          / server["model_id"] / "artifacts" / "serving_input_example.json").read_text())
    predictions = json.loads(body)["predictions"]
    assert len(predictions) == len(example["dataframe_split"]["data"]) == 3
    assert set(predictions) <= {0, 1}
    # The README shows the answer a learner gets.
    assert f'```json\n{body}\n```' in README


def test_inline_body_gets_the_predictions_the_readme_promises(server):
    status, body = curl(readme_curl("curl-inline", server), server)
    assert status == 200, body
    promised = re.search(r"expect `(\{\"predictions\": [^`]*\})`", README).group(1)
    assert json.loads(body) == json.loads(promised)


def test_old_mlflow_1_format_gets_400_that_names_the_valid_fields(server):
    status, body = curl(readme_curl("curl-old-format", server), server)
    assert status == 400
    message = json.loads(body)["message"]
    for field in ("dataframe_split", "dataframe_records", "inputs", "instances"):
        assert field in message
    # The README quotes the start of this message.
    assert message[:60] in README


def test_wrong_columns_get_400_naming_the_missing_inputs(server):
    body = json.dumps({"dataframe_split": {"columns": ["radius", "texture"], "data": [[1.0, 2.0]]}})
    status, text = http("POST", server["url"], body, {"Content-Type": "application/json"})
    assert status == 400
    message = json.loads(text)["message"]
    assert "Model is missing inputs ['mean radius'" in message
    assert "Model is missing inputs ['mean radius'" in " ".join(README.split())


def test_a_value_that_is_not_a_number_gets_400(server):
    arguments = readme_curl("curl-inline", server)
    inline = json.loads(arguments[arguments.index("--data") + 1])
    inline["dataframe_split"]["data"][0][0] = "large"
    status, text = http("POST", server["url"], json.dumps(inline), {"Content-Type": "application/json"})
    assert status == 400
    assert "mean radius" in json.loads(text)["message"]
