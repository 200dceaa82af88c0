"""The team set-up of docs/deploy.md against a real server: `mlflow server --app-name basic-auth`,
READ for everyone by default, a CI identity that registers and promotes. Only the CI identity can
move an alias; a read-only person's alias change is refused by MLflow itself (so neither the UI's
alias editor nor a script can bypass Kiln's gates), and `kiln promote` as that person ends with a
clear refusal (exit 11), nothing changed."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.conftest import TINY_RECIPE, run_kiln
from tests.stores import mlflow_server

pytestmark = pytest.mark.integration
MODEL = "tiny-llama-int4"
ADMIN, CI, READER = ("admin", "admin-password-1234"), ("ci", "ci-password-12345"), ("reader", "reader-password-1234")

AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = {admin}
admin_password = {password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def as_user(user: tuple[str, str]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth_store")
    ini = root / "basic_auth.ini"
    ini.write_text(AUTH_INI.format(db=root / "basic_auth.db", admin=ADMIN[0], password=ADMIN[1]))
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "kiln-test-secret"}
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log",
                       extra_args=("--app-name", "basic-auth"), extra_env=env) as url:
        yield url


def test_only_the_ci_identity_moves_aliases(auth_server, tiny_run, monkeypatch):
    from mlflow.server import get_app_client

    for key in as_user(ADMIN):
        monkeypatch.delenv(key, raising=False)
    anonymous = run_kiln("models", "list", artifacts=tiny_run["artifacts"], env={"MLFLOW_TRACKING_URI": auth_server})
    assert anonymous.returncode == 11 and "did not authenticate" in anonymous.stdout, anonymous.stdout
    for key, value in as_user(ADMIN).items():
        monkeypatch.setenv(key, value)
    users = get_app_client("basic-auth", tracking_uri=auth_server)
    for name, password in (CI, READER):
        users.create_user(name, password)

    def kiln(user, *args):
        return run_kiln(*args, artifacts=tiny_run["artifacts"], env={"MLFLOW_TRACKING_URI": auth_server, **as_user(user)})

    built = kiln(CI, "run", str(TINY_RECIPE))
    assert built.returncode == 0, built.stdout + built.stderr
    promoted = kiln(CI, "promote", MODEL, "1", "--to", "staging")
    assert promoted.returncode == 0 and "by ci" in promoted.stdout, promoted.stdout

    for key, value in as_user(READER).items():
        monkeypatch.setenv(key, value)
    reader = MlflowClient(tracking_uri=auth_server, registry_uri=auth_server)
    assert str(reader.get_model_version_by_alias(MODEL, "staging").version) == "1"  # people can read
    for change in (lambda: reader.set_registered_model_alias(MODEL, "production", "1"),
                   lambda: reader.delete_registered_model_alias(MODEL, "staging"),
                   lambda: reader.set_model_version_tag(MODEL, "1", "kiln.validation_passed", "true")):
        with pytest.raises(MlflowException) as refused:
            change()
        assert refused.value.error_code == "PERMISSION_DENIED"
    assert set(reader.get_registered_model(MODEL).aliases) == {"staging"}

    by_reader = kiln(READER, "promote", MODEL, "1", "--to", "production")
    assert by_reader.returncode == 11 and "did not allow this change for user 'reader'" in by_reader.stdout, by_reader.stdout
    assert set(reader.get_registered_model(MODEL).aliases) == {"staging"}
    shown = kiln(READER, "models", "show", f"{MODEL}@staging")
    assert shown.returncode == 0 and "promote @staging → accepted" in shown.stdout and "ci" in shown.stdout, shown.stdout
