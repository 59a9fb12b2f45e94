"""`mlflow models serve` started with the README's command, fed the request bodies of
the README and of docs/serving.md, the serving reference."""

import json
import re
import shlex
import subprocess

import pytest

from conftest import PAGES, README, flat, free_port, http, model_folder, readme_commands, readme_snippet, start_server, with_port

SERVING = PAGES["docs/serving.md"]


@pytest.fixture(scope="module")
def server(demo_workshop):
    """The README's serve command, run in the workshop folder with only the port changed."""
    (command,) = readme_commands("serve")
    command = with_port(command.replace("<model_id>", demo_workshop["model_id"]), free_port())
    port = re.search(r"--port (\d+)", command).group(1)
    base = f"http://127.0.0.1:{port}"
    with start_server(command, demo_workshop["path"], f"{base}/ping", log_name="serve.log"):
        yield {"url": f"{base}/invocations", "port": port, "workshop": demo_workshop["path"],
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


def test_the_server_prints_the_line_the_readme_waits_for(server):
    """The README says to send the request once the server prints its
    "Uvicorn running on" line: it does, with the port it was given."""
    ready = re.search(r"`(Uvicorn running on http://127\.0\.0\.1:)5001`", flat(README)).group(1)
    assert ready + server["port"] in (server["workshop"] / "serve.log").read_text()


def test_logged_serving_example_gets_predictions(server):
    status, body = curl(readme_curl("curl-example", server), server)
    assert status == 200, body
    example = json.loads((model_folder(server["workshop"], server["model_id"]) / "serving_input_example.json").read_text())
    predictions = json.loads(body)["predictions"]
    assert len(predictions) == len(example["dataframe_split"]["data"]) == 3
    assert set(predictions) <= {0, 1}
    # The README shows the answer a learner gets.
    assert f'```json\n{body}\n```' in README


def test_inline_body_gets_the_predictions_the_page_promises(server):
    status, body = curl(readme_curl("curl-inline", server), server)
    assert status == 200, body
    promised = re.search(r"expect `(\{\"predictions\": [^`]*\})`", SERVING).group(1)
    assert json.loads(body) == json.loads(promised)


def test_old_mlflow_1_format_gets_400_that_names_the_valid_fields(server):
    status, body = curl(readme_curl("curl-old-format", server), server)
    assert status == 400
    message = json.loads(body)["message"]
    for field in ("dataframe_split", "dataframe_records", "inputs", "instances"):
        assert field in message
    # The serving page quotes the start of this message.
    assert message[:60] in SERVING


def test_wrong_columns_get_400_naming_the_missing_inputs(server):
    body = json.dumps({"dataframe_split": {"columns": ["radius", "texture"], "data": [[1.0, 2.0]]}})
    status, text = http("POST", server["url"], body, {"Content-Type": "application/json"})
    assert status == 400
    message = json.loads(text)["message"]
    assert "Model is missing inputs ['mean radius'" in message
    assert "Model is missing inputs ['mean radius'" in flat(SERVING)


def test_a_value_that_is_not_a_number_gets_400(server):
    arguments = readme_curl("curl-inline", server)
    inline = json.loads(arguments[arguments.index("--data") + 1])
    inline["dataframe_split"]["data"][0][0] = "large"
    status, text = http("POST", server["url"], json.dumps(inline), {"Content-Type": "application/json"})
    assert status == 400
    assert "mean radius" in json.loads(text)["message"]


# %% The serving page's table of refused requests, row by row


def refused_requests_table():
    """docs/serving.md's table: request -> (status, what the message says)."""
    block = SERVING.split("<!-- table: refused-requests -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines()[2:]:  # after the header and its --- line
        request, status, says = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows[request] = (int(status.strip("`")), says.split("`")[1])
    return rows


def inline_body(server, change=None):
    """The serving page's inline request body (two tumours), changed by `change`."""
    arguments = readme_curl("curl-inline", server)
    body = json.loads(arguments[arguments.index("--data") + 1])
    if change:
        change(body["dataframe_split"])
    return json.dumps(body)


def post_without_content_type(server, body):
    """http.client sends only the headers it is given: no Content-Type at all."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server["url"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("POST", url.path, body.encode())
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def curl_without_header(server):
    """The serving page's inline curl command with its -H "Content-Type: ..." left out."""
    arguments = readme_curl("curl-inline", server)
    at = arguments.index("-H")
    assert arguments[at + 1] == "Content-Type: application/json"
    return curl(arguments[:at] + arguments[at + 2:], server)


def rename_first_column(split):
    split["columns"][0] = "mean radis"


def drop_last_value(split):
    for row in split["data"]:
        row.pop()


def first_value(value):
    def change(split):
        split["data"][0][0] = value
    return change


def json_post(server, body):
    return http("POST", server["url"], body, {"Content-Type": "application/json"})


REFUSED = {
    # The table's first column, word for word -> the request it describes.
    "no `Content-Type` header at all": lambda s: post_without_content_type(s, inline_body(s)),
    "`curl` without `-H \"Content-Type: application/json\"`": curl_without_header,
    "a body that is not JSON": lambda s: json_post(s, "{not json"),
    "the MLflow 1.x format above": lambda s: curl(readme_curl("curl-old-format", s), s),
    "a column missing (or misspelled)": lambda s: json_post(s, inline_body(s, rename_first_column)),
    "a row with fewer values than columns": lambda s: json_post(s, inline_body(s, drop_last_value)),
    "a value that is not a number, such as `\"large\"`": lambda s: json_post(s, inline_body(s, first_value("large"))),
    "no rows at all": lambda s: json_post(s, inline_body(s, lambda split: split.update(data=[]))),
}


def test_the_serving_page_lists_exactly_what_the_server_refuses(server):
    """Each row of docs/serving.md's table, sent for real: the status and the
    words the page gives. Then a good request is still answered."""
    table = refused_requests_table()
    assert list(table) == list(REFUSED)
    for request, (status, says) in table.items():
        got_status, got_body = REFUSED[request](server)
        assert (got_status, request) == (status, request), got_body
        assert says in got_body, (request, got_body)
    promised = re.search(r"expect `(\{\"predictions\": [^`]*\})`", SERVING).group(1)
    status, body = json_post(server, inline_body(server))
    assert status == 200 and json.loads(body) == json.loads(promised)


def gets_through():
    """The serving page's list of what gets through, its lines folded."""
    return flat(SERVING.split("## What gets through", 1)[1].split("\n## ", 1)[0])


@pytest.mark.parametrize("value", [None, float("nan"), "17.99"], ids=["null", "NaN", "quoted number"])
def test_what_the_serving_page_says_gets_through(server, value):
    """A missing value and a number in quotes get a prediction, as the page warns."""
    assert all(shown in gets_through() for shown in ("`null`", "`NaN`", '`"17.99"`'))
    status, body = json_post(server, inline_body(server, first_value(value)))
    assert status == 200, body
    assert set(json.loads(body)["predictions"]) <= {0, 1}


def test_an_extra_column_is_ignored(server):
    assert "extra column" in gets_through().lower()

    def add_column(split):
        split["columns"].append("tumour colour")
        for row in split["data"]:
            row.append(1.0)

    status, body = json_post(server, inline_body(server, add_column))
    promised = re.search(r"expect `(\{\"predictions\": [^`]*\})`", SERVING).group(1)
    assert status == 200 and json.loads(body) == json.loads(promised)
