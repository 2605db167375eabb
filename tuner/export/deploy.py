"""The chosen trial in a container: a Kubernetes Deployment + Service, or a `docker run` line.

Each engine adapter names its official image, port and in-container command (`Engine.image`, `port`,
`container`). The container listens on all its interfaces (a pod must be reachable); `docker run`
publishes the port on the host's 127.0.0.1 only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from tuner.engines import engine_names, get_engine
from tuner.errors import InputError
from tuner.records.pareto import Point
from tuner.space.constraints import gpus_needed

# study-wide --engine-arg flags that suit the tuning machine (a CPU, a small test GPU), not a GPU deployment:
# flag -> the value that marks it so (None: any value, or none)
MACHINE_SPECIFIC = {"--enforce-eager": None, "--kv-cache-memory-bytes": None, "--distributed-executor-backend": "uni"}
HF_CACHE_VOLUME = '-v "$HOME/.cache/huggingface:/root/.cache/huggingface"'  # $HOME expands in the user's shell


@dataclass(frozen=True)
class Container:
    engine: str
    name: str  # Kubernetes object and docker container name
    image: str
    command: list[str]  # empty: the image's own entrypoint
    args: list[str]
    port: int
    gpus: int
    model: str
    study: str
    trial: int
    dropped: tuple[str, ...] = ()  # machine-specific engine args left out (warn about them)


def split_serve_command(point: Point) -> tuple[str, list[str]]:
    """(model, every flag after it) of a trial's recorded serve command."""
    adapter = get_engine(point.engine)
    program = adapter.display_program()
    argv = list(point.command)
    if argv[:len(program)] != program or len(argv) <= len(program):
        raise InputError(f"trial {point.number} recorded no {point.engine} serve command", field="study")
    rest = argv[len(program):]
    if adapter.model_flag:
        at = rest.index(adapter.model_flag) if adapter.model_flag in rest else -1
        if at < 0 or at + 1 >= len(rest):
            raise InputError(f"trial {point.number}: no {adapter.model_flag} in its command", field="study")
        return rest[at + 1], rest[:at] + rest[at + 2:]
    return rest[0], rest[1:]


def _without_dummy_weights(flags: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(flags):
        if flags[i:i + 2] == ["--load-format", "dummy"]:
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return out


def _machine_specific(words: list[str], keep: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(kept, dropped) of a list of engine args; flags in `keep` stay."""
    kept, dropped, i = [], [], 0
    while i < len(words):
        flag, _, inline = words[i].partition("=")
        takes_value = (not inline and flag != "--enforce-eager" and i + 1 < len(words)
                       and not words[i + 1].startswith("-"))
        size = 2 if takes_value else 1
        value = inline or (words[i + 1] if takes_value else None)
        if flag in MACHINE_SPECIFIC and flag not in keep and MACHINE_SPECIFIC[flag] in (None, value):
            dropped.append(shlex.join(words[i:i + size]))
        else:
            kept += words[i:i + size]
        i += size
    return kept, dropped


def without_machine_args(flags: list[str], study_args: list[str] | None) -> tuple[list[str], list[str]]:
    """Every trial's command ends with the study's --engine-arg words (`study_args`): the machine-specific
    ones among them are dropped. A study that did not store them: only flags that are never knobs
    (--enforce-eager may be the cuda_graphs knob's)."""
    if study_args and flags[-len(study_args):] == study_args:
        kept, dropped = _machine_specific(study_args)
        return flags[:-len(study_args)] + kept, dropped
    return _machine_specific(flags, keep=("--enforce-eager",))


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    return name or "llm-server"


def container_for(point: Point, study: optuna.Study, model: str | None = None, image: str | None = None,
                  name: str | None = None) -> Container:
    adapter = get_engine(point.engine) if point.engine in engine_names() else None
    if adapter is None or not adapter.image:
        with_images = [n for n in engine_names() if get_engine(n).image]
        raise InputError(f"trial {point.number} ran on '{point.engine}', which has no container image; "
                         f"the k8s and docker formats are for {', '.join(with_images)} trials", field="format")
    recorded_model, flags = split_serve_command(point)
    if model and model != recorded_model:
        flags = _without_dummy_weights(flags)  # a model shape was tuned; the real model has real weights
    model = model or recorded_model
    study_args = (study.user_attrs.get("engine_args_by_engine") or {}).get(point.engine)
    flags, dropped = without_machine_args(flags, study_args if study_args is not None
                                          else study.user_attrs.get("engine_args"))
    version = (study.user_attrs.get("engine_versions") or {}).get(point.engine)
    tag = f"v{version}" if version and version[:1].isdigit() else "latest"
    command, args = adapter.container(model)
    args = [*args, *flags]
    return Container(engine=point.engine, name=_dns_name(name or f"{point.engine}-{Path(model).name}"),
                     image=image or f"{adapter.image}:{tag}", command=command, args=args, port=adapter.port,
                     gpus=gpus_needed(point.config), model=model, study=study.study_name, trial=point.number,
                     dropped=tuple(dropped))


def local_model_note(container: Container) -> str | None:
    if container.model.startswith(("/", "./", "~")):
        return (f"note: the model is a local path ({container.model}); pass --model HUB_ID, "
                "or mount that folder into the container")
    return None


def dropped_note(container: Container) -> str | None:
    if not container.dropped:
        return None
    return (f"note: left out engine args that suit the tuning machine, not a GPU deployment: "
            f"{' '.join(container.dropped)} (add them to the args by hand if you mean them)")


class _NoAliases(yaml.SafeDumper):
    """Plain YAML for kubectl and reviewers: a mapping used twice is written twice, not as &id001 / *id001."""

    def ignore_aliases(self, data) -> bool:
        return True


def k8s_manifest(c: Container) -> str:
    labels = {"app": c.name}
    container = {
        "name": "server",
        "image": c.image,
        **({"command": c.command} if c.command else {}),
        "args": c.args,
        "ports": [{"name": "http", "containerPort": c.port}],
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token",
                                                                     "optional": True}}}],
        "resources": {"limits": {"nvidia.com/gpu": c.gpus}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                           "failureThreshold": 3},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": c.name, "labels": {**labels, "servetune/study": _dns_name(c.study),
                                                "servetune/trial": str(c.trial)}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [container],
                         "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": c.name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": c.port, "targetPort": "http"}]},
    }
    header = (f"# servetune: study {c.study}, trial {c.trial} ({c.engine}); {c.gpus} GPU(s)\n"
              "# optional: kubectl create secret generic hf-token --from-literal=token=$HF_TOKEN\n")
    return header + yaml.dump_all([deployment, service], Dumper=_NoAliases, sort_keys=False)


def docker_line(c: Container) -> str:
    head = ["docker", "run", "--rm", "--name", c.name, "--gpus", str(c.gpus), "--ipc=host",
            "-p", f"127.0.0.1:{c.port}:{c.port}", "-e", "HF_TOKEN"]
    return f"{shlex.join(head)} {HF_CACHE_VOLUME} {shlex.join([c.image, *c.command, *c.args])}"
