"""deploy/config.py: flags > TANDEM_* environment > YAML file > defaults (pydantic-settings),
errors that name the field and where it came from, and `tandem --version` / flag names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tandem.deploy.cli import build_parser, version_string
from tandem.deploy.config import ConfigError, TandemConfig, load_config, parse_config


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("TANDEM_"):
            monkeypatch.delenv(k)
    return monkeypatch


def write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_precedence_flags_over_env_over_file_over_defaults(clean_env, tmp_path):
    p = write(tmp_path, "server:\n  port: 6000\n  host: 0.0.0.0\nray:\n  num_cpus: 3\n")
    assert load_config(None).server.port == TandemConfig.model_fields["server"].default_factory().port == 50051
    cfg = load_config(p)
    assert (cfg.server.port, cfg.server.host, cfg.ray.num_cpus) == (6000, "0.0.0.0", 3)
    clean_env.setenv("TANDEM_SERVER__PORT", "7000")
    clean_env.setenv("TANDEM_DRAFT_POOL__REPLICAS", "2")
    cfg = load_config(p)
    assert (cfg.server.port, cfg.server.host, cfg.draft_pool.replicas, cfg.ray.num_cpus) == (7000, "0.0.0.0", 2, 3)
    cfg = load_config(p, overrides={"server": {"port": 8000}})
    assert (cfg.server.port, cfg.server.host) == (8000, "0.0.0.0")  # a flag replaces one field, not its section
    assert type(cfg) is TandemConfig


def test_environment_takes_json_for_lists_and_ignores_unrelated_tandem_variables(clean_env):
    clean_env.setenv("TANDEM_TARGETS", '[{"name": "a", "model": "/m/a"}, {"name": "b"}]')
    clean_env.setenv("TANDEM_AUTH_TOKEN", "secret")  # the token itself, not a config field
    clean_env.setenv("TANDEM_INSTALL_PACKS", "1")
    cfg = load_config(None)
    assert [t.name for t in cfg.targets] == ["a", "b"] and cfg.targets[0].model_ref == "/m/a"


def test_errors_name_the_field_and_the_environment(clean_env, tmp_path):
    clean_env.setenv("TANDEM_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"(?s)TANDEM_SERVER__PORT.*server\.port"):
        load_config(None)
    clean_env.setenv("TANDEM_SERVER__PORT", "99999")
    with pytest.raises(ConfigError, match=r"server\.port: Input should be less than or equal to 65535"):
        load_config(None)
    clean_env.delenv("TANDEM_SERVER__PORT")
    clean_env.setenv("TANDEM_SERVER__PROT", "1")
    with pytest.raises(ConfigError, match=r"server\.prot: Extra inputs are not permitted"):
        load_config(None)
    clean_env.delenv("TANDEM_SERVER__PROT")
    with pytest.raises(ConfigError, match=r"batch: max_actors must be >= min_actors|max_actors must be >= min_actors"):
        load_config(None, overrides={"batch": {"min_actors": 3, "max_actors": 2}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"targets\.0\.replicas"):
        load_config(write(tmp_path, "targets:\n  - name: a\n    replicas: 0\n"))


def test_parse_config_reads_no_environment(clean_env):
    """A batch actor validates what its driver already merged; its own environment must not
    change it (negative control: the same variable does change load_config)."""
    clean_env.setenv("TANDEM_SERVER__PORT", "7000")
    assert parse_config({"server": {"port": 6000}}).server.port == 6000
    assert load_config(None).server.port == 7000


def test_version_and_one_flag_name_per_concept(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("tandem 0.") and "ray 2." in out and out.strip() == version_string()
    from tandem.training.exit_report import build_parser as report_parser
    from tandem.training.train_exits import build_parser as train_parser

    parser = build_parser()
    subs = dict(next(a for a in parser._actions if a.dest == "command").choices)
    subs["train-exits"], subs["exit-report"] = train_parser(), report_parser()
    flags: dict[str, set] = {}
    for name, sub in subs.items():
        for action in sub._actions:
            for opt in action.option_strings:
                flags.setdefault(opt, set()).add((action.dest, type(action).__name__))
    # --json is a switch (print JSON) wherever it exists; where results go is --output everywhere
    assert flags["--json"] == {("json", "_StoreTrueAction")}
    assert {d for d, _ in flags["--output"]} == {"output"}
    assert {d for d, _ in flags["--address"]} == {"address"}
    assert {d for d, _ in flags["--exit-adapters"]} == {"exit_adapters"}
    assert {d for d, _ in flags["--prompts"]} == {"prompts"}
    assert not {"--out", "--ray-address", "--adapters", "--datasets", "--ray"} & flags.keys()


def test_version_runs_from_the_console_script():
    done = subprocess.run([sys.executable, "-m", "tandem.deploy.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("tandem ")


def test_shared_pools_need_a_cluster_to_join(clean_env, tmp_path):
    """ray.shared_pools on an embedded Ray would end the pools with their router: refused
    before anything starts, naming the field; the CLI says it as an error, not a trace."""
    from tandem.deploy.serve import build_engine

    clean_env.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(write(tmp_path, "ray: {shared_pools: true}\n"))
    assert cfg.ray.shared_pools
    with pytest.raises(ValueError, match="ray.shared_pools: needs a Ray cluster to join"):
        build_engine(cfg)
    no_heartbeat = load_config(write(tmp_path, "ray: {shared_pools: true, address: 'ray://nowhere:1'}\nserver: {heartbeat_s: null}\n"))
    with pytest.raises(ValueError, match="ray.shared_pools: needs server.heartbeat_s"):
        build_engine(no_heartbeat)  # refused before joining anything
    out = subprocess.run([sys.executable, "-m", "tandem.deploy.cli", "pools-down"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, timeout=120)
    assert out.returncode == 2 and "tandem pools-down: error: address:" in out.stderr and "Traceback" not in out.stderr


def test_prefix_cache_bytes_reach_the_target_pool(clean_env, tmp_path):
    """targets[].prefix_cache_bytes: the default kept per target actor, 0 turns reuse off, a
    negative count is refused naming the field; it reaches the pool's TargetSpec."""
    from tandem.actors.prefix_cache import PREFIX_CACHE_BYTES
    from tandem.deploy.serve import pool_specs

    cfg = load_config(write(tmp_path, "targets:\n  - name: a\n    model: /m/a\n  - name: b\n    model: /m/b\n    prefix_cache_bytes: 0\n"))
    _, specs = pool_specs(cfg, resolve=lambda ref: ref)
    assert [s.prefix_cache_bytes for s in specs] == [PREFIX_CACHE_BYTES, 0]
    with pytest.raises(ConfigError, match=r"targets\.0\.prefix_cache_bytes"):
        load_config(write(tmp_path, "targets:\n  - name: a\n    prefix_cache_bytes: -1\n"))


def test_draft_quantize_reaches_the_draft_pool(clean_env, tmp_path):
    """draft_pool.quantize: "auto" by default, the pack's own grid for a pack (with a resolver
    that prepares the grid) and int4 for a folder; an unknown value is refused naming the field."""
    from tandem.deploy.pack_grid import _GridResolver
    from tandem.deploy.serve import pool_specs

    def plain(ref):
        return ref

    draft, _ = pool_specs(load_config(write(tmp_path, "draft_pool: {model: qwen2.5-coder-0.5b-instruct}\n")), resolve=plain)
    assert draft.load.quantize == "pack" and isinstance(draft.load.resolve, _GridResolver)
    draft, _ = pool_specs(load_config(write(tmp_path, "draft_pool: {model: /m/d}\n")), resolve=plain)
    assert draft.load.quantize == "int4" and draft.load.resolve is plain
    draft, _ = pool_specs(load_config(write(tmp_path, "draft_pool: {model: /m/d, quantize: none}\n")), resolve=plain)
    assert draft.load.quantize is None
    with pytest.raises(ConfigError, match=r"draft_pool\.quantize"):
        load_config(write(tmp_path, "draft_pool: {quantize: int3}\n"))
