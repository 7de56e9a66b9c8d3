"""Static checks of the Compose stack, its images and `.env.example`; no Docker engine needed.

docker-compose.yaml is validated against the Compose Specification schema (tests/compose/), then
held to the project's own rules: pinned images, healthchecks, credentials only from `.env`, and
the same buckets, databases and ports wherever they are named.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE_SCHEMA = Path(__file__).parent / "compose" / "compose-spec.json"
ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"
POSTGRES_INIT = ROOT / "dockerfiles" / "postgres" / "init.sh"
RUNNER_DOCKERFILE = ROOT / "dockerfiles" / "runner.Dockerfile"
DOCKERFILES = sorted((ROOT / "dockerfiles").rglob("*Dockerfile*"))


# Every variable the library and the flows read (docs/architecture.md, configuration contract).
def _settings_variables() -> tuple[str, ...]:
    """Every variable batchscore.config.Settings reads, so a new setting cannot be forgotten."""
    from batchscore.config import Settings

    names = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.append(f"BATCHSCORE_{name.upper()}")
        else:
            names.append(alias if isinstance(alias, str) else alias.choices[0])
    return tuple(names)


LIBRARY_VARIABLES = (
    *_settings_variables(),
    "METAFLOW_USER",
    "METAFLOW_DEFAULT_DATASTORE",
    "METAFLOW_DATASTORE_SYSROOT_S3",
    "METAFLOW_S3_ENDPOINT_URL",
    "METAFLOW_DEFAULT_METADATA",
    "METAFLOW_SERVICE_URL",
)

# The credentials docker-compose.yaml takes from `.env`.
COMPOSE_CREDENTIALS = (
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "REDIS_PASSWORD",
    "POSTGRES_PASSWORD",
    "BATCHSCORE_DB_PASSWORD",
    "METAFLOW_DB_PASSWORD",
    "JUPYTER_TOKEN",
)

# (variable holding a URL, Compose service it points to, port): the runner reaches the service
# by name, the host through the port published on localhost.
SERVICE_URLS = (
    ("AWS_ENDPOINT_URL_S3", "minio", 9000),
    ("METAFLOW_S3_ENDPOINT_URL", "minio", 9000),
    ("BATCHSCORE_REDIS_URL", "redis", 6379),
    ("BATCHSCORE_DATABASE_URL", "postgres", 5432),
    ("METAFLOW_SERVICE_URL", "metaflow-metadata", 8080),
)

# Every published port: (service, container port, `.env` variable naming the host port).
PUBLISHED_PORTS = {
    ("minio", 9000): "MINIO_HOST_PORT",
    ("minio", 9001): "MINIO_CONSOLE_HOST_PORT",
    ("redis", 6379): "REDIS_HOST_PORT",
    ("api", 8000): "API_PORT",
    ("postgres", 5432): "POSTGRES_HOST_PORT",
    ("metaflow-metadata", 8080): "METADATA_HOST_PORT",
    ("metaflow-ui", 8083): "UI_HOST_PORT",
    ("runner", 8888): "JUPYTER_HOST_PORT",
}
# "127.0.0.1:${NAME:-default}:container"
PORT_MAPPING = re.compile(r"127\.0\.0\.1:\$\{([A-Z_]+):-(\d+)\}:(\d+)")

# The images the stack pulls (Docker Hub stopped serving minio/*: quay.io has the same tags).
IMAGES = {
    "minio": "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z",
    "minio-init": "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z",
    "redis": "redis:8.2.2-alpine",
    "postgres": "postgres:17.6-alpine",
    "api": "batchscore-runner:dev",
    "metaflow-metadata": "netflixoss/metaflow_metadata_service:v2.5.0",
    "metaflow-ui": "netflixoss/metaflow_metadata_service:v2.5.0",
    "runner": "batchscore-runner:dev",
}

SECRET_NAME = re.compile(r"PASSWORD|PSWD|SECRET|TOKEN|AUTH")
# ${VAR}, ${VAR:-default}, ${VAR:?error}; `$${...}` is an escaped dollar, left to the shell.
INTERPOLATED_NAME = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}")
URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]*)@")
# `NAME=value`, or a commented-out `# NAME=value` (documented, not set by default).
ENV_ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def environment(service: str) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two Compose forms it uses."""
    env = services()[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def strings(node) -> Iterator[str]:
    """Every string in the parsed Compose file, keys and values."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


@cache
def env_example() -> tuple[dict[str, str], frozenset[str]]:
    """`.env.example` as (variables set, every variable documented incl. commented-out ones),
    values as written (`${VAR}` unexpanded)."""
    values: dict[str, str] = {}
    documented = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := ENV_ASSIGNMENT.match(line.strip()):
            commented, name, value = match.groups()
            documented.add(name)
            if not commented:
                values[name] = value
    return values, frozenset(documented)


@cache
def env_example_expanded() -> dict[str, str]:
    """`.env.example` as Compose and python-dotenv read it: `${VAR}` expanded from the lines
    above (the file's own values win over the test process's environment)."""
    return {k: v or "" for k, v in dotenv_values(ENV_EXAMPLE, interpolate=True).items()}


def command_text(service: str) -> str:
    command = services()[service].get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name_and_tag = image.rsplit("/", 1)[-1]
    return ":" in name_and_tag and name_and_tag.split(":", 1)[1] not in ("", "latest")


# ---- the Compose file ------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_file_has_no_version_key():
    assert "version" not in compose()


def test_every_image_is_pinned_to_a_tag():
    for name, service in services().items():
        assert "image" in service, f"{name}: name its image (with a tag), even when built"
        assert is_pinned(service["image"]), f"{name}: {service['image']} is not pinned"


def test_images_are_the_ones_that_can_be_pulled():
    assert {name: service["image"] for name, service in services().items()} == IMAGES
    for text in strings(compose()):
        # Docker Hub answers "pull access denied" for these, and this UI tag was never found.
        assert not re.match(r"(docker\.io/)?minio/", text), text
        assert "metaflow_ui" not in text and "outerbounds" not in text, text


def test_minio_images_keep_their_release_tags_on_quay():
    for service, repository in (("minio", "minio"), ("minio-init", "mc")):
        image = services()[service]["image"]
        assert image.startswith(f"quay.io/minio/{repository}:RELEASE."), image


def test_metaflow_ui_is_served_by_the_metadata_service_image():
    ui = services()["metaflow-ui"]
    assert ui["image"] == services()["metaflow-metadata"]["image"]
    assert "services.ui_backend_service.ui_server" in command_text("metaflow-ui")
    env = environment("metaflow-ui")
    assert env["UI_ENABLED"] == "1"
    assert env.get("PATH_PREFIX", "") == ""  # UI and API on one origin, at /
    assert env["MF_UI_METADATA_PORT"] == "8083"
    assert "8083/ping" in " ".join(ui["healthcheck"]["test"])


def test_every_long_running_service_has_a_healthcheck():
    for name, service in services().items():
        if service.get("restart") == "no":  # one-shot jobs such as minio-init
            continue
        healthcheck = service.get("healthcheck", {})
        assert healthcheck.get("test") and not healthcheck.get("disable"), name


def test_minio_init_is_one_shot_and_waits_for_healthy_minio():
    minio_init = services()["minio-init"]
    assert minio_init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert minio_init["restart"] == "no"


def test_data_is_kept_in_named_volumes():
    for service, mount in [
        ("minio", "/data"),
        ("redis", "/data"),
        ("postgres", "/var/lib/postgresql/data"),
    ]:
        volumes = services()[service]["volumes"]
        named = [v.split(":", 1)[0] for v in volumes if v.endswith(f":{mount}")]
        assert named and named[0] in compose()["volumes"], f"{service}: {mount} not in a volume"


def test_redis_requires_its_password_and_persists():
    command = command_text("redis")
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD\}", command)
    assert "--appendonly yes" in command or "--save" in command
    assert environment("redis")["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD")


def test_runner_gets_every_library_variable():
    missing = set(LIBRARY_VARIABLES) - set(environment("runner"))
    assert not missing, f"runner environment lacks {sorted(missing)}"


def test_runner_uses_the_metaflow_services():
    env = environment("runner")
    assert env["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert env["METAFLOW_DEFAULT_METADATA"] == "service"
    assert services()["runner"]["build"]["dockerfile"] == "dockerfiles/runner.Dockerfile"
    assert (ROOT / services()["runner"]["build"]["context"]).resolve() == ROOT


def test_every_interpolated_variable_is_defined_in_env_example():
    values, _ = env_example()
    used = {name for text in strings(compose()) for name in INTERPOLATED_NAME.findall(text)}
    assert used, "docker-compose.yaml should take its credentials from .env"
    assert not used - set(values), f"not set in .env.example: {sorted(used - set(values))}"


def test_no_literal_secret_in_compose_file():
    for name in services():
        for key, value in environment(name).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATION.fullmatch(value), f"{name}: {key} must be ${{...}}"
    for text in strings(compose()):
        for password in URL_PASSWORD.findall(text):
            assert INTERPOLATION.fullmatch(password), f"literal password in {text!r}"
    assert INTERPOLATION.fullmatch(command_text("redis").split("--requirepass ")[1].split()[0])


# ---- agreement between the Compose file, the init script and .env.example ----------------


def test_buckets_agree():
    created = set(re.findall(r"\blocal/([a-z0-9][a-z0-9.-]*)", command_text("minio-init")))
    values = env_example_expanded()
    runner = environment("runner")
    for variable, bucket in [
        ("BATCHSCORE_STORE_URL", "batch"),
        ("METAFLOW_DATASTORE_SYSROOT_S3", "metaflow"),
    ]:
        assert bucket in created, f"minio-init does not create {bucket}"
        assert urlsplit(runner[variable]).netloc == bucket, variable
        assert values[variable] == runner[variable], variable
    sysroot = runner["METAFLOW_DATASTORE_SYSROOT_S3"]
    assert environment("metaflow-ui")["METAFLOW_DATASTORE_SYSROOT_S3"] == sysroot


def test_database_names_and_roles_agree():
    init = POSTGRES_INIT.read_text()
    databases = set(re.findall(r"CREATE DATABASE (\w+)", init))
    roles = set(re.findall(r"CREATE ROLE (\w+)", init))
    assert databases == {"batchscore", "metaflow"}

    values = env_example_expanded()
    runner_url = urlsplit(environment("runner")["BATCHSCORE_DATABASE_URL"])
    host_url = urlsplit(values["BATCHSCORE_DATABASE_URL"])
    for url in (runner_url, host_url):
        assert url.path == "/batchscore"
        assert url.username == "batchscore" and url.username in roles

    metadata = environment("metaflow-metadata")
    assert metadata["MF_METADATA_DB_NAME"] == "metaflow"
    assert metadata["MF_METADATA_DB_USER"] in roles
    assert environment("metaflow-ui")["MF_METADATA_DB_NAME"] == "metaflow"


def test_postgres_service_passes_the_passwords_its_init_script_reads():
    service = services()["postgres"]
    read = set(re.findall(r"\$\{?([A-Z_]+_PASSWORD)", POSTGRES_INIT.read_text()))
    assert read and read <= set(environment("postgres"))
    target = "/docker-entrypoint-initdb.d/"
    mounted = [v for v in service["volumes"] if target in v]
    assert mounted and mounted[0].startswith("./dockerfiles/postgres/init.sh:")


@pytest.mark.parametrize(("variable", "service", "port"), SERVICE_URLS)
def test_ports_agree(variable, service, port):
    in_network = urlsplit(environment("runner")[variable])
    assert (in_network.hostname, in_network.port) == (service, port)

    # From the host: the published port, by default the same number, and following its
    # variable when a user moves it.
    host_port = PUBLISHED_PORTS[(service, port)]
    values, documented = env_example()
    assert variable in documented
    assert f"${{{host_port}}}" in values[variable] or values[variable].startswith("${")
    from_host = urlsplit(env_example_expanded()[variable])
    assert (from_host.hostname, from_host.port) == ("localhost", port)
    moved = dotenv_values(
        stream=io.StringIO(
            ENV_EXAMPLE.read_text().replace(f"{host_port}={port}", f"{host_port}=1{port}")
        )
    )
    assert urlsplit(moved[variable]).port == int(f"1{port}")


def test_every_published_port_is_a_env_variable_with_todays_default():
    values, _ = env_example()
    found = {}
    for name, service in services().items():
        for mapping in service.get("ports", []):
            match = PORT_MAPPING.fullmatch(str(mapping))
            assert match, f"{name}: {mapping} is not 127.0.0.1:${{NAME:-default}}:port"
            variable, default, container = match.groups()
            found[(name, int(container))] = variable
            assert default == container, f"{name}: today's default is the same port number"
            assert values[variable] == default, f".env.example: {variable}={values[variable]}"
    assert found == PUBLISHED_PORTS


def test_readme_ports_table_lists_every_published_port():
    readme = README.read_text()
    for (_, port), variable in PUBLISHED_PORTS.items():
        assert f"localhost:{port}" in readme, port
        assert variable in readme, variable
    assert "localhost:3000" not in readme  # the separate UI image is gone


# ---- .env.example ------------------------------------------------------------------------


def test_env_example_documents_every_variable():
    values, documented = env_example()
    missing = (set(LIBRARY_VARIABLES) | set(COMPOSE_CREDENTIALS)) - documented
    assert not missing, f"not in .env.example: {sorted(missing)}"
    assert "METAFLOW_DEFAULT_METADATA" not in values, "service metadata needs the profile"


def test_env_example_has_a_comment_line_for_each_variable():
    lines = [line.strip() for line in ENV_EXAMPLE.read_text().splitlines()]
    for previous, line in zip(lines, lines[1:], strict=False):
        if ENV_ASSIGNMENT.match(line):
            is_prose = previous.startswith("#") and not ENV_ASSIGNMENT.match(previous)
            assert is_prose, f"no comment line above {line!r}"


def test_env_example_holds_placeholders_that_agree():
    values, _ = env_example()
    for name in COMPOSE_CREDENTIALS:
        assert values[name].startswith("change-me"), name
    expanded = env_example_expanded()
    assert expanded["AWS_ACCESS_KEY_ID"] == values["MINIO_ROOT_USER"]
    assert expanded["AWS_SECRET_ACCESS_KEY"] == values["MINIO_ROOT_PASSWORD"]
    assert urlsplit(expanded["BATCHSCORE_REDIS_URL"]).password == values["REDIS_PASSWORD"]
    database_password = urlsplit(expanded["BATCHSCORE_DATABASE_URL"]).password
    assert database_password == values["BATCHSCORE_DB_PASSWORD"]


def test_env_example_writes_each_secret_once():
    """The copies are derived with ${VAR}, so a changed password cannot drift from them."""
    text = ENV_EXAMPLE.read_text()
    values, _ = env_example()
    for name in COMPOSE_CREDENTIALS:
        written = re.findall(rf"(?<![\w-]){re.escape(values[name])}(?![\w-])", text)
        assert len(written) == 1, f"{name}'s value is written {len(written)} times"
    assert values["AWS_ACCESS_KEY_ID"] == "${MINIO_ROOT_USER}"
    assert values["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD}"
    assert "${REDIS_PASSWORD}" in values["BATCHSCORE_REDIS_URL"]
    assert "${BATCHSCORE_DB_PASSWORD}" in values["BATCHSCORE_DATABASE_URL"]


def test_runner_credentials_come_from_the_same_variables():
    runner = environment("runner")
    assert runner["AWS_ACCESS_KEY_ID"] == "${MINIO_ROOT_USER}"
    assert runner["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD}"
    assert urlsplit(runner["BATCHSCORE_REDIS_URL"]).password == "${REDIS_PASSWORD}"
    assert urlsplit(runner["BATCHSCORE_DATABASE_URL"]).password == "${BATCHSCORE_DB_PASSWORD}"


# ---- images ------------------------------------------------------------------------------


def instructions(dockerfile: Path, name: str) -> list[str]:
    parser = DockerfileParser(path=str(dockerfile))
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def test_the_runner_image_is_among_the_dockerfiles():
    assert RUNNER_DOCKERFILE in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_is_pinned_installs_requirements_and_drops_root(dockerfile):
    stages: set[str] = set()
    for value in instructions(dockerfile, "FROM"):
        words = [w for w in value.split() if not w.startswith("--")]
        image = words[0]
        assert image in stages or is_pinned(image), f"FROM {image} is not pinned"
        if len(words) == 3 and words[1].lower() == "as":
            stages.add(words[2])

    copies = " ".join(instructions(dockerfile, "COPY"))
    runs = instructions(dockerfile, "RUN")
    assert "requirements.txt" in copies
    # The dependencies of requirements.txt (its `-e .` line needs the source, installed later).
    assert any(
        re.search(r"requirements\.txt", run) and re.search(r"pip install .*-r ", run)
        for run in runs
    )

    users = instructions(dockerfile, "USER")
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_runner_image_serves_the_notebooks_with_jupyter():
    cmd = " ".join(instructions(RUNNER_DOCKERFILE, "CMD"))
    assert "jupyter" in cmd and "0.0.0.0" in cmd and "8888" in cmd and "/app/notebooks" in cmd
    assert any(str(p).endswith(":8888") for p in services()["runner"]["ports"])


def test_dockerignore_keeps_local_state_and_secrets_out_of_images():
    patterns = {line.strip().removeprefix("**/") for line in DOCKERIGNORE.read_text().splitlines()}
    for path in (".env", ".venv", ".git", ".batchscore", ".metaflow", "__pycache__"):
        assert path in patterns, path


def test_shell_export_of_env_example_derives_the_same_values():
    """The Makefile and the README export `.env` with `set -a; . ./.env`: the shell must
    expand every ${VAR} as python-dotenv (and Compose) do."""
    import subprocess

    shell = subprocess.run(
        ["sh", "-c", 'set -a; . "$0"; set +a; env -0', str(ENV_EXAMPLE)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    exported = dict(item.split("=", 1) for item in shell.stdout.split("\0") if "=" in item)
    for name, value in env_example_expanded().items():
        assert exported.get(name, "") == value, name
