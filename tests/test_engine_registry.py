"""A new engine is its adapter class and a YAML space: the CLI, sweep specs and exports find it in the registry."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import ClassVar

import optuna
import pytest

from tuner.cli import main
from tuner.engines import engine_names, get_engine, registry
from tuner.engines.base import Engine, Launch
from tuner.errors import InputError
from tuner.space import knobs
from tuner.space.flags import parse_flags
from tuner.space.knobs import load_space
from tuner.study.cli import resolve_engines
from tuner.sweep.spec import load_spec

SPACE = """engine: fake
knobs:
  max_num_seqs: {type: int, low: 8, high: 512, default: 64, flag: --batch}
  turbo: {type: bool, default: false, flag: --turbo, flag_off: null}
"""


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    """Registered for this test only: the registry and the space table are restored afterwards."""
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    monkeypatch.setattr(knobs, "_SPACE_FILES", dict(knobs._SPACE_FILES))
    (tmp_path / "fake.yaml").write_text(SPACE)

    @registry.register_engine("fake")
    @dataclass
    class FakeEngine(Engine):
        image: ClassVar[str] = "example/fake-server"
        port: ClassVar[int] = 9911
        space_file: ClassVar[str] = str(tmp_path / "fake.yaml")
        name: str = "fake"

        def program(self, launch: Launch) -> list[str]:
            return [launch.python, "-m", "fake_server"]

        def display_program(self) -> list[str]:
            return ["fake-serve"]

        def model_args(self, launch: Launch) -> list[str]:
            return [launch.model]

        def container(self, model: str) -> tuple[list[str], list[str]]:
            return ["fake-serve"], [model, "--port", str(self.port)]

    return FakeEngine


def test_a_fake_engine_is_seen_by_the_cli_the_sweep_spec_and_the_exports(fake_engine, tmp_path, capsys):
    assert "fake" in engine_names() and resolve_engines("vllm,fake") == ["vllm", "fake"]
    assert load_space("fake").knobs["max_num_seqs"].flag == "--batch"

    spec = tmp_path / "sweep.yaml"
    (tmp_path / "w.jsonl").write_text("")
    spec.write_text(f"name: s\nmatrix:\n  models: [org/m]\n  engines: [fake]\n  workloads: [{tmp_path / 'w.jsonl'}]\n")
    assert [cell.engine for cell in load_spec(spec).cells] == ["fake"]

    config = {"max_num_seqs": 128, "turbo": True}
    command = get_engine("fake").serve_command(Launch(config=config, model="org/m"), load_space("fake"))
    assert command == ["fake-serve", "org/m", "--batch", "128", "--turbo"]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="fake-study", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["output_throughput", "ttft_p99"])
    study.set_user_attr("engine_versions", {"fake": "2.0"})
    study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], user_attrs={
        "engine": "fake", "config": config, "command": command,
        "summary": {"output_throughput": 1.0, "p99_ttft_ms": 1.0}, "constraints": []}))
    assert main(["export", "--study", "fake-study", "--storage", storage, "--format", "docker"]) == 0
    words = shlex.split(capsys.readouterr().out.splitlines()[-1])
    at = words.index("example/fake-server:v2.0")
    assert words[words.index("-p") + 1] == "127.0.0.1:9911:9911"
    assert words[at + 1:at + 5] == ["fake-serve", "org/m", "--port", "9911"]
    assert parse_flags(load_space("fake"), words[at + 5:]) == config


def test_an_unregistered_engine_is_refused_everywhere_with_the_known_names(tmp_path):
    with pytest.raises(InputError, match="unknown engine 'fake'.*sim, vllm, sglang, trtllm"):
        resolve_engines("fake")
    spec = tmp_path / "sweep.yaml"
    spec.write_text("name: s\nmatrix:\n  models: [org/m]\n  engines: [trtllm, fake]\n")
    with pytest.raises(InputError, match=r"unknown engine 'fake'") as err:
        load_spec(spec)
    assert "matrix.engines[1]" in str(err.value)  # trtllm, before it, is a known engine


def test_the_simulator_is_tuned_alone():
    simulators = [n for n in engine_names() if get_engine(n).simulated]
    assert simulators == ["sim"]
    with pytest.raises(InputError, match="on its own"):
        resolve_engines("vllm,sim")
