"""Configuration: defaults, validation messages, environment overrides, check-config."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import Config, load_config
from daemon.exceptions import ConfigError
from tests.conftest import OPACITYD, REPO


def _without_paths(config: Config) -> Config:
    return dataclasses.replace(config, paths=dataclasses.replace(config.paths, state_dir=""))


def test_shipped_config_toml_documents_exactly_the_embedded_defaults() -> None:
    shipped = load_config(REPO / "config.toml", env={})
    assert _without_paths(shipped) == _without_paths(load_config(None, env={}))
    assert shipped.state_dir == REPO / "state"
    assert shipped.receiver.peers[0].addresses == ("127.0.0.0/8", "::1/128")
    assert shipped.database_url == f"sqlite:///{REPO / 'state' / 'opacityd.sqlite3'}"


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.receiver.port = 1  # type: ignore[misc]


DEST = '[[destinations]]\nname = "p"\nhost = "h"\ncalled_ae = "P"\n'


@pytest.mark.parametrize(("toml", "message"), [
    ("[receiver]\nport = \"eleven\"", "receiver.port = 'eleven': expected an integer"),
    ("[receiver]\nport = 70000", "receiver.port = 70000: expected an integer from 1 to 65535"),
    ("[receiver]\nae_title = \"A_VERY_LONG_AE_TITLE_X\"", "receiver.ae_title = 'A_VERY_LONG_AE_TITLE_X'"),
    ("[receiver]\nineligible_instances = \"delete\"",
     "receiver.ineligible_instances = 'delete': expected one of 'keep', 'discard'"),
    ("[receiver]\nprot = 1", "receiver.prot: unknown key"),
    ("[receiver]\nprocesses = 0", "receiver.processes = 0: expected an integer from 1 to 64"),
    ("[[receiver.peers]]\nae_title = \"X\"\naddresses = [\"10.0.0.300/8\"]",
     "receiver.peers[0].addresses[0] = '10.0.0.300/8'"),
    ("[receiver.tls]\nenabled = true", "receiver.tls.certificate = ''"),
    ("[scheduler]\nstudy_quiet_period_s = -1", "scheduler.study_quiet_period_s = -1.0"),
    ("[logging]\nlevel = \"loud\"", "logging.level = 'loud': expected one of"),
    ("[receiver]\naccept_any_storage_class = \"yes\"", "expected true or false"),
    ("[receiver\nport = 1", "is not valid TOML"),
    (DEST + "send = [\"sr\", \"pdf\"]",
     "destinations[0].send = ['sr', 'pdf']: expected a non-empty list of distinct values from"),
    (DEST + "send = []", "destinations[0].send = []: expected a non-empty list"),
    (DEST + "send = [\"sr\", \"sr\"]", "destinations[0].send = ['sr', 'sr']"),
    ("[summary]\nenabled = \"yes\"", "expected true or false"),
    ("[worker]\ninference_threads = -1",
     "worker.inference_threads = -1: expected an integer from 0 (the backend's default, one per CPU"),
    ("[worker]\ninference_inter_op_threads = 1000",
     "worker.inference_inter_op_threads = 1000: expected an integer from 0"),
    ("[worker]\ninference_threads = \"all\"", "worker.inference_threads = 'all': expected an integer"),
    ("[worker]\nthreads = 0", "worker.threads = 0: expected an integer >= 1"),
    ("[worker]\nthreads = 999", "worker.threads = 999: expected an integer from 1 to 256"),
])
def test_bad_values_name_the_key_the_value_and_what_is_accepted(tmp_path: Path, toml: str,
                                                                 message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in str(info.value)


def test_environment_chooses_the_file_and_overrides_the_state_folder(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nstate_dir = "here"\n[receiver]\nport = 4242\n')
    from_env = load_config(None, env={"OPACITYD_CONFIG": str(path)})
    assert from_env.receiver.port == 4242
    assert from_env.state_dir == tmp_path / "here"
    moved = load_config(None, env={"OPACITYD_CONFIG": str(path),
                                   "OPACITYD_STATE_DIR": str(tmp_path / "elsewhere")})
    assert moved.state_dir == tmp_path / "elsewhere"


def test_check_config_exit_codes_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.toml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[receiver]\nport = 0\n")
    assert main(["check-config", str(bad)]) == 2
    assert "receiver.port = 0" in capsys.readouterr().err


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[receiver]\nmax_associations = 0\n")
    proc = subprocess.run([OPACITYD, "--config", str(bad), "serve"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "receiver.max_associations = 0: expected an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_http_beyond_loopback_needs_a_token_from_config_file_or_systemd_credential(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[http]\nbind_address = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="http.token"):
        load_config(cfg, env={})
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "http-token").write_text("from-systemd\n")
    assert load_config(cfg, env={"CREDENTIALS_DIRECTORY": str(credentials)}).http.token == "from-systemd"
    (tmp_path / "token").write_text("from-file\n")
    cfg.write_text(f'[http]\nbind_address = "0.0.0.0"\ntoken_file = "{tmp_path / "token"}"\n')
    assert load_config(cfg, env={}).http.token == "from-file"
    cfg.write_text('[http]\nbind_address = "127.0.0.1"\ntoken_file = "/nonexistent/token"\n')
    with pytest.raises(ConfigError, match="http.token_file"):
        load_config(cfg, env={})
    cfg.write_text('[model]\nurgent_threshold = 1.5\n')
    with pytest.raises(ConfigError, match="model.urgent_threshold = 1.5"):
        load_config(cfg, env={})
