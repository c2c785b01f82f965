"""The deployment files under cluster/ and infra/ checked against the code they deploy.

Fast and offline: no Ray cluster, no network. Every job command found in a RayJob entrypoint, a
README code block or a YAML comment is parsed with the real ``unusual`` argument parser (and
``ray ...`` commands with Ray's own CLI), the RayService's Serve config is validated with Serve's
schema and the application is built from its arguments, the launcher config is validated with the
autoscaler's schema, and the dashboard may only query metrics that serving/ defines.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
INFRA = REPO / "infra"
KUBERAY = CLUSTER / "kuberay"

JOB_MODULES = {f"unusual.ray_jobs.{job}": job for job in ("fit", "train", "score", "evaluate")}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
GPU = "nvidia.com/gpu"
# A command example starts with one of these (after optional VAR=value assignments).
COMMAND_START = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"(?:python3? -m ray_jobs\.|unusual\s+(?:train|score|evaluate|fit|serve|info|demo)\b"
    r"|ray\s+(?:up|down|job|dashboard|exec|attach|start|stop|status|submit|get-auth-token|rsync-up|rsync-down)\b)"
)
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def cluster_yaml_files() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])


def load_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def docs_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in kuberay_docs() if d.get("kind") == kind]


# --------------------------------------------------------------------------- checking a command


def parse_cli(subcommand: str, flags: list[str], where: str, command: str):
    """``unusual.cli.build_parser().parse_args([subcommand, *flags])``; a failure names the file and flag."""
    import argparse
    import difflib

    from unusual.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if subcommand in subparsers.choices:
        # argparse accepts unambiguous prefixes (--keep for --keep-columns); a manifest must not rely on
        # them: the next flag sharing the prefix would break it.
        known = set(subparsers.choices[subcommand]._option_string_actions)
        for flag in (f.split("=", 1)[0] for f in flags if f.startswith("--")):
            if flag != "--" and flag not in known:
                near = difflib.get_close_matches(flag, sorted(known), n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                pytest.fail(
                    f"{where}: `unusual {subcommand}` has no flag {flag}{hint}; its flags: "
                    f"{', '.join(sorted(k for k in known if k.startswith('--')))}\n  command: {command}"
                )
    from unusual.cli import CONFIGS
    from unusual.config import ConfigError

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            ns = parser.parse_args([subcommand, *flags])
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            reason = lines[-1] if lines else "argparse exited"
            pytest.fail(f"{where}: `unusual {subcommand}` rejects its flags: {reason}\n  command: {command}")
    try:  # the job's typed config, as the command would build it
        return CONFIGS[subcommand].from_namespace(ns)
    except ConfigError as e:
        pytest.fail(f"{where}: `unusual {subcommand}` rejects its flags: {e}\n  command: {command}")


def check_job_command(argv: list[str], where: str, command: str, *, allow_unusual: bool = True):
    """``python -m ray_jobs.<train|score|evaluate> FLAGS`` (or ``unusual SUB FLAGS``) parsed by the real
    parser. Returns (subcommand, the job's validated config)."""
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        module = argv[2]
        if module not in JOB_MODULES:
            pytest.fail(
                f"{where}: `python -m {module}` is not a job module; expected one of {sorted(JOB_MODULES)}\n"
                f"  command: {command}"
            )
        sub = JOB_MODULES[module]
        return sub, parse_cli(sub, argv[3:], where, command)
    if allow_unusual and argv and argv[0] == "unusual" and len(argv) >= 2:
        return argv[1], parse_cli(argv[1], argv[2:], where, command)
    pytest.fail(f"{where}: expected `python -m ray_jobs.<train|score|evaluate> ...`; got: {command}")


def check_ray_command(argv: list[str], where: str, command: str) -> None:
    """``ray ...`` parsed by Ray's own click CLI (options, arguments); ``ray job submit``'s entrypoint must be
    ``python -m ray_jobs.*`` and parse with the unusual parser; files the command names must exist."""
    import click
    from ray.scripts.scripts import cli

    group, args = cli, argv[1:]
    path = ["ray"]
    while isinstance(group, click.Group):
        assert args and args[0] in group.commands, f"{where}: unknown command `{' '.join(path + args[:1])}`: {command}"
        path.append(args[0])
        group, args = group.commands[args[0]], args[1:]
    try:
        ctx = group.make_context(" ".join(path), list(args))
    except click.ClickException as e:
        pytest.fail(f"{where}: `{' '.join(path)}` rejects its arguments: {e.format_message()}\n  command: {command}")
    for key in ("runtime_env", "cluster_config_file"):
        value = ctx.params.get(key)
        if value:
            assert (REPO / value).is_file(), f"{where}: `{' '.join(path)}` names {value}, which does not exist"
    entrypoint = list(ctx.params.get("entrypoint") or ())
    if path[1:] == ["job", "submit"]:
        assert entrypoint, f"{where}: `ray job submit` without an entrypoint: {command}"
        check_job_command(entrypoint, where, command, allow_unusual=False)


def split_command(line: str) -> list[str]:
    """shlex tokens of the first simple command of a line (up to ``&&``, ``;``, ``|`` …), without
    leading VAR=value assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens: list[str] = []
    for tok in lexer:
        if tok in SHELL_SEPARATORS:
            break
        tokens.append(tok)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    return tokens


def logical_lines(lines: list[str]) -> list[str]:
    """Join backslash-continued lines."""
    out, buf = [], ""
    for line in lines:
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
        else:
            out.append((buf + stripped).strip())
            buf = ""
    if buf:
        out.append(buf.strip())
    return out


def markdown_commands(path: Path) -> list[str]:
    """Command lines of the fenced bash / sh / shell / unlabelled code blocks of a Markdown file."""
    commands, block, lang = [], None, ""
    for line in path.read_text().splitlines():
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            if block is None:
                block, lang = [], fence.group(1)
            else:
                if lang in ("", "bash", "sh", "shell", "console"):
                    commands += [c for c in logical_lines(block) if COMMAND_START.match(c)]
                block = None
            continue
        if block is not None:
            block.append(line)
    return commands


def yaml_comment_commands(path: Path) -> list[str]:
    """Command lines in the ``#`` comments of a YAML file (examples such as ``#   ray up ...``)."""
    comments = []
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*#\s?(.*)$", line)
        comments.append(m.group(1) if m else "")
    return [c for c in logical_lines(comments) if COMMAND_START.match(c)]


def check_command_line(line: str, where: str) -> None:
    argv = split_command(line)
    if not argv:
        return
    if argv[0] == "ray":
        check_ray_command(argv, where, line)
    else:
        check_job_command(argv, where, line)


def documented_files() -> list[Path]:
    return [
        *sorted(CLUSTER.rglob("*.md")),
        *sorted(INFRA.rglob("*.md")),
        *cluster_yaml_files(),
        *sorted(INFRA.glob("*.yml")),
        *sorted(INFRA.glob("*.yaml")),
    ]


# --------------------------------------------------------------------------- every file is there and parses


@pytest.mark.parametrize(
    "name",
    [
        "cluster/aws.yaml",
        "cluster/runtime_env.example.yaml",
        "cluster/README.md",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob-train.yaml",
        "cluster/kuberay/rayjob-score.yaml",
        "cluster/kuberay/rayservice.yaml",
        "infra/docker-compose.minio.yml",
        "infra/terraform/main.tf",
        "infra/terraform/variables.tf",
        "infra/terraform/outputs.tf",
        "infra/iam-policy.json",
        "infra/grafana-dashboard.json",
        "infra/README.md",
    ],
)
def test_deployment_file_exists(name):
    assert (REPO / name).is_file(), f"{name} is missing"


@pytest.mark.parametrize("path", cluster_yaml_files(), ids=rel)
def test_cluster_yaml_parses(path):
    try:
        docs = load_docs(path)
    except yaml.YAMLError as e:
        pytest.fail(f"{rel(path)}: not valid YAML: {e}")
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{rel(path)}: every document must be a mapping"


# --------------------------------------------------------------------------- job commands against the CLI


def test_every_rayjob_entrypoint_parses_with_the_real_cli():
    jobs = docs_of_kind("RayJob")
    assert {p.name for p, _ in jobs} >= {"rayjob-train.yaml", "rayjob-score.yaml"}
    seen = set()
    for path, doc in jobs:
        entrypoint = doc["spec"].get("entrypoint")
        assert entrypoint, f"{rel(path)}: RayJob {doc['metadata']['name']} has no spec.entrypoint"
        sub, _ = check_job_command(shlex.split(entrypoint), rel(path), entrypoint, allow_unusual=False)
        seen.add(sub)
    assert seen >= {"train", "score"}, f"RayJobs cover {sorted(seen)}; expected train and score"


def test_rayjob_train_and_score_use_the_documented_flags():
    """The entrypoints the README promises: train on GPUs into a bundle, score keeping id and label."""
    by_sub = {}
    for path, doc in docs_of_kind("RayJob"):
        entrypoint = doc["spec"]["entrypoint"]
        sub, args = check_job_command(shlex.split(entrypoint), rel(path), entrypoint)
        by_sub[sub] = (path, args)
    path, train = by_sub["train"]
    assert train.data.startswith("s3://") and train.output.startswith("s3://"), rel(path)
    assert train.use_gpu and train.num_workers >= 1, f"{rel(path)}: the train RayJob is the GPU example"
    assert "label" in (train.exclude or []), f"{rel(path)}: the label column must be excluded from the features"
    path, score = by_sub["score"]
    assert score.checkpoint.startswith("s3://") and score.output.startswith("s3://"), rel(path)
    assert "label" in score.keep_columns, f"{rel(path)}: keep the label so the scores can be evaluated"


@pytest.mark.parametrize("path", documented_files(), ids=rel)
def test_documented_commands_parse(path):
    """Commands in README code blocks and YAML comments: `python -m ray_jobs.*`, `unusual ...` and
    `ray ...` (Ray's CLI, with `ray job submit`'s entrypoint checked by the unusual parser)."""
    commands = markdown_commands(path) if path.suffix == ".md" else yaml_comment_commands(path)
    for line in commands:
        check_command_line(line, rel(path))


def test_the_readme_shows_job_submission_with_token_auth():
    text = (CLUSTER / "README.md").read_text()
    commands = markdown_commands(CLUSTER / "README.md")
    submits = [c for c in commands if split_command(c)[:3] == ["ray", "job", "submit"]]
    modules = {split_command(c)[split_command(c).index("--") + 3] for c in submits}
    assert modules >= {"unusual.ray_jobs.train", "unusual.ray_jobs.score", "unusual.ray_jobs.evaluate"}, modules
    assert "RAY_AUTH_MODE=token" in text
    assert re.search(r"kubectl apply -f cluster/kuberay/\S+\.yaml", text)


@pytest.mark.parametrize("path", [p for p in documented_files() if p.suffix == ".md"], ids=rel)
def test_paths_named_in_readmes_exist(path):
    for name in re.findall(r"\b((?:cluster|infra|serving|ray_jobs)/[\w./-]*\w)", path.read_text()):
        if "*" in name or name.endswith(("/_train", "/_evaluation")):
            continue
        assert (REPO / name).exists(), f"{rel(path)} names {name}, which does not exist"


def test_bad_flag_is_reported_with_file_and_flag():
    """The failure message names the file and the flag, so a drifted manifest is easy to fix."""
    score = "python -m unusual.ray_jobs.score --checkpoint s3://b/m --data s3://b/d --output s3://b/o"
    for extra, flag in [("--keep id", "--keep"), ("--keep-column id", "--keep-column"), ("--gpu", "--gpu")]:
        with pytest.raises(pytest.fail.Exception) as e:
            check_job_command(shlex.split(f"{score} {extra}"), "cluster/kuberay/example.yaml", "...")
        message = str(e.value)
        assert "cluster/kuberay/example.yaml" in message and f"no flag {flag} " in message, message
        assert "did you mean --" in message, message
    with pytest.raises(pytest.fail.Exception, match="example.yaml.*--top-k: Input should be a valid integer"):
        check_job_command(shlex.split(f"{score} --top-k three"), "cluster/kuberay/example.yaml", "...")
    with pytest.raises(pytest.fail.Exception, match="example.yaml.*required.*--output"):
        check_job_command(
            shlex.split("python -m unusual.ray_jobs.train --data s3://b/d"), "cluster/kuberay/example.yaml", ""
        )
    with pytest.raises(pytest.fail.Exception, match="rayjob.yaml.*unusual.ray_jobs.local_io"):
        check_job_command(
            ["python", "-m", "unusual.ray_jobs.local_io", "--data", "x"], "rayjob.yaml", "python -m ...local_io"
        )


# --------------------------------------------------------------------------- KubeRay manifests


FAST_PATH = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


def ray_cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for path, doc in kuberay_docs():
        spec = doc.get("spec") or {}
        kind = doc.get("kind")
        cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
        if cluster.get(kind) is not None:
            out.append((f"{rel(path)} ({kind} {doc['metadata']['name']})", cluster[kind]))
    return out


def pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def cpus_of(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_kuberay_documents_are_ray_resources():
    docs = kuberay_docs()
    assert {d.get("kind") for _, d in docs} == KUBERAY_KINDS
    for path, doc in docs:
        assert doc.get("apiVersion") == "ray.io/v1", f"{rel(path)}: apiVersion must be ray.io/v1"
        assert doc.get("metadata", {}).get("name"), f"{rel(path)}: metadata.name is required"


def test_kuberay_cluster_specs_are_well_formed():
    import ray

    specs = ray_cluster_specs()
    assert len(specs) == 4
    for where, spec in specs:
        assert spec.get("rayVersion") == ray.__version__, (
            f"{where}: rayVersion {spec.get('rayVersion')!r} differs from the project's Ray {ray.__version__}"
        )
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token authentication must be on"
        groups = [("head", spec["headGroupSpec"]), *[(g.get("groupName"), g) for g in spec["workerGroupSpecs"]]]
        images: set[str] = set()
        for name, group in groups:
            assert name, f"{where}: a worker group has no groupName"
            params = group.get("rayStartParams", {})
            bad = {k: v for k, v in params.items() if not isinstance(v, str)}
            assert not bad, f"{where}: group {name}: rayStartParams values must be strings (KubeRay): {bad}"
            for c in pod_containers(group):
                assert c.get("image"), f"{where}: group {name}: container without image"
                images.add(c["image"])
                limits = c.get("resources", {}).get("limits", {})
                assert "cpu" in limits and "memory" in limits, f"{where}: group {name}: set cpu and memory limits"
        assert len(images) == 1, f"{where}: every node must run the same image (same Ray, same code): {images}"
        for name, group in groups if "(RayJob " not in where else ():  # a RayJob's cluster serves nothing
            for c in pod_containers(group):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                for switch in FAST_PATH:
                    assert env.get(switch) == "1", (
                        f"{where}: group {name}: container {c.get('name')} must set {switch}=1 (Serve's fast path; "
                        "every Ray process reads it at its start)"
                    )
        for g in spec["workerGroupSpecs"]:
            lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 0)
            assert 0 <= lo <= n <= hi, f"{where}: group {g['groupName']}: need minReplicas <= replicas <= maxReplicas"


def test_raycluster_has_head_cpu_and_gpu_groups():
    [(path, doc)] = docs_of_kind("RayCluster")
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert set(groups) >= {"cpu", "gpu"}, f"{rel(path)}: worker groups {sorted(groups)}"
    gpu_limits = [c["resources"]["limits"].get(GPU) for c in pod_containers(groups["gpu"])]
    assert gpu_limits == ["1"], f"{rel(path)}: the gpu group gives each pod one GPU"
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] >= 1
    assert doc["spec"].get("enableInTreeAutoscaling") is True


def started_resources(spec: dict) -> tuple[float, float]:
    """CPUs and GPUs of a RayJob's cluster when KubeRay submits the entrypoint (every pod running)."""
    cpus = gpus = 0.0
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        cpus += sum(cpus_of(c["resources"]["limits"]["cpu"]) for c in pod_containers(head))
    for g in spec["workerGroupSpecs"]:
        n = g.get("replicas", g.get("minReplicas", 0))
        for c in pod_containers(g):
            limits = c["resources"]["limits"]
            cpus += n * cpus_of(limits["cpu"])
            gpus += n * float(limits.get(GPU, 0))
    return cpus, gpus


def test_rayjob_clusters_have_what_their_entrypoints_check_for_at_start():
    """The jobs size themselves from the resources up when they start and fail at once when these are
    too few (unusual.ray_jobs.train / unusual.ray_jobs.score); a RayJob's own cluster must provide them from the
    start."""
    for path, doc in docs_of_kind("RayJob"):
        spec = doc["spec"]
        if "rayClusterSpec" not in spec:
            continue
        sub, args = check_job_command(shlex.split(spec["entrypoint"]), rel(path), spec["entrypoint"])
        cpus, gpus = started_resources(spec["rayClusterSpec"])
        if sub == "train" and args.use_gpu:
            assert gpus >= args.num_workers, (
                f"{rel(path)}: --use-gpu --num-workers {args.num_workers} needs {args.num_workers} GPUs up at "
                f"start; the cluster starts with {gpus:g}"
            )
        if sub == "score" and args.use_gpu:
            assert gpus >= max(1, args.concurrency or 1), f"{rel(path)}: --use-gpu needs GPUs up at start"
        if sub == "train" and args.cpus_per_worker:
            assert args.cpus_per_worker * args.num_workers <= cpus, f"{rel(path)}: too few CPUs for the workers"
        assert cpus >= 1, f"{rel(path)}: the job's cluster starts without CPUs (head num-cpus 0, no CPU workers)"
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
            assert g.get("minReplicas", 0) == g.get("replicas", 0), (
                f"{rel(path)}: group {g['groupName']}: a job sized at start needs a fixed group "
                "(minReplicas = replicas)"
            )


# --------------------------------------------------------------------------- the RayService's Serve config


def serve_configs() -> list[tuple[Path, dict]]:
    out = []
    for path, doc in docs_of_kind("RayService"):
        raw = doc["spec"].get("serveConfigV2")
        assert isinstance(raw, str), f"{rel(path)}: serveConfigV2 must be a YAML string (a block scalar)"
        out.append((path, yaml.safe_load(raw)))
    assert out, "no RayService under cluster/kuberay"
    return out


def test_rayservice_serve_config_is_valid_for_serve():
    from ray.serve.schema import ServeDeploySchema

    for path, config in serve_configs():
        try:
            ServeDeploySchema.model_validate(config)
        except AttributeError:  # pydantic v1
            ServeDeploySchema.parse_obj(config)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, whichever version
            pytest.fail(f"{rel(path)}: serveConfigV2 is not a valid Serve config: {e}")


def test_serve_configs_deploy_the_topology_of_unusual_serve(monkeypatch):
    """The RayService's serveConfigV2 and serving/serve_config.yaml: an application per model (its
    ModelServer the ingress at /v1/models/NAME, the checkpoint an object-storage URI in its deployment's
    user_config) and the gateway at / naming each; every application builds from its args (only binds:
    nothing is loaded)."""
    from ray.serve.deployment import Application
    from unusual.serving import configfile

    from unusual.config import ServeConfig

    monkeypatch.delenv("UNUSUAL_SERVE_TOKEN", raising=False)
    shipped = REPO / "serving" / "serve_config.yaml"
    for path, config in [*serve_configs(), (shipped, load_docs(shipped)[0])]:
        apps = {a["name"]: a for a in config["applications"]}
        gateways = [a for a in apps.values() if a["import_path"] == "unusual.serving.configfile:gateway_app"]
        assert len(gateways) == 1 and gateways[0]["route_prefix"] == "/", f"{rel(path)}: one gateway application at /"
        served = ServeConfig.model_validate(gateways[0]["args"]).models
        checkpoints = configfile.checkpoints(config)
        assert set(checkpoints) == set(served), f"{rel(path)}: models {sorted(checkpoints)}, gateway {served}"
        for model, app_name in served.items():
            where = f"{rel(path)}: model {model}"
            app = apps.get(app_name)
            assert app, f"{where}: the gateway names application {app_name!r}, which is not there"
            assert app["import_path"] == "unusual.serving.configfile:model_app", f"{where}: {app['import_path']}"
            assert app["route_prefix"] == f"/v1/models/{model}" and app["args"]["model"] == model, where
            assert [d["name"] for d in app["deployments"]] == [f"model-{model}"], where
            assert checkpoints[model].startswith("s3://"), f"{where}: {checkpoints[model]} is not an object-storage URI"
        for app in apps.values():
            builder = getattr(configfile, app["import_path"].split(":")[1])
            try:
                built = builder(copy.deepcopy(app.get("args") or {}))
            except (ValueError, TypeError) as e:
                pytest.fail(f"{rel(path)}: application {app['name']}: {app['import_path']} rejects its args: {e}")
            assert isinstance(built, Application)


def test_the_shipped_serve_config_is_what_print_config_writes():
    """serving/serve_config.yaml is `unusual serve --print-config` of the command in its own header."""
    from unusual.cli import main

    shipped = REPO / "serving" / "serve_config.yaml"
    [command] = [c for c in yaml_comment_commands(shipped) if "--print-config" in c]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(split_command(command)[1:]) == 0
    assert yaml.safe_load(out.getvalue()) == load_docs(shipped)[0]


# --------------------------------------------------------------------------- the cluster launcher


def test_aws_launcher_config_is_valid_for_the_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_docs(CLUSTER / "aws.yaml")[0]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # noqa: BLE001 - jsonschema.ValidationError and the autoscaler's ValueErrors
        pytest.fail(f"cluster/aws.yaml: not a valid cluster launcher config: {e}")
    assert config["provider"]["type"] == "aws"


def test_aws_launcher_installs_the_project_and_enables_token_auth():
    import ray

    config = load_docs(CLUSTER / "aws.yaml")[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = [t for t in types.values() if str(t["node_config"].get("InstanceType", "")).startswith(("g", "p"))]
    cpu = [t for n, t in types.items() if t not in gpu and n != config["head_node_type"]]
    assert gpu and cpu, "cluster/aws.yaml: needs a GPU and a CPU worker group"
    for t in gpu:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, "cluster/aws.yaml: the GPU group autoscales from 0"
        cmds = " ".join(t["worker_setup_commands"])
        assert "download.pytorch.org/whl/cu" in cmds, "cluster/aws.yaml: GPU nodes install a CUDA build of PyTorch"
        assert "constraints.txt" not in cmds, "cluster/aws.yaml: constraints.txt pins the CPU PyTorch build"
        assert "-e ~/unusual" in cmds and "venv" in cmds
    assert "constraints.txt" in " ".join(config["worker_setup_commands"] + config["head_setup_commands"])
    for t in (head, *cpu, *gpu):
        assert "Arn" in t["node_config"].get("IamInstanceProfile", {}), "cluster/aws.yaml: IamInstanceProfile.Arn"
    setup = json.dumps(config)
    pins = set(re.findall(r"ray\[[\w,]+\]==([\w.]+)", setup))
    assert pins == {ray.__version__}, f"cluster/aws.yaml: pins Ray {pins}; the project uses {ray.__version__}"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[key]), f"cluster/aws.yaml: {key} must enable token auth"
        start = [c for c in config[key] if "ray start" in c]
        assert start, f"cluster/aws.yaml: {key} has no ray start"
        for switch in FAST_PATH:  # set before ray start, in the same shell
            assert all(re.search(rf"\b{switch}=1\b.*ray start", c, re.S) for c in start), (
                f"cluster/aws.yaml: {key} must set {switch}=1 before ray start (Serve's fast path)"
            )
    assert "~/.ray/auth_token" in config["file_mounts"], "cluster/aws.yaml: mount the cluster's token on every node"


def test_runtime_env_example_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = load_docs(CLUSTER / "runtime_env.example.yaml")[0]
    known = {"working_dir", "excludes", "pip", "uv", "conda", "env_vars", "py_modules", "config", "image_uri"}
    assert set(env) <= known, f"cluster/runtime_env.example.yaml: unknown runtime_env keys {set(env) - known}"
    assert env.get("working_dir") and env.get("pip"), "cluster/runtime_env.example.yaml: working_dir + pip example"
    assert ".venv/" in env.get("excludes", []), "cluster/runtime_env.example.yaml: exclude .venv from the upload"
    secrets = [k for k in env.get("env_vars", {}) if "SECRET" in k or k == "AWS_ACCESS_KEY_ID"]
    assert not secrets, f"cluster/runtime_env.example.yaml: credentials do not belong in a runtime_env: {secrets}"
    try:
        RuntimeEnv(**env)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"cluster/runtime_env.example.yaml: not a valid runtime_env: {e}")


# --------------------------------------------------------------------------- Grafana


def serving_metrics() -> dict[str, str]:
    """name -> Counter / Histogram / Gauge, as serving/*.py define them."""
    source = "\n".join(p.read_text() for p in sorted((REPO / "serving").glob("*.py")))
    found = dict(
        (name, kind) for kind, name in re.findall(r"metrics\.(Counter|Histogram|Gauge)\(\s*\"([A-Za-z0-9_]+)\"", source)
    )
    assert found, "serving/*.py define no metrics.Counter/Histogram/Gauge: has the code moved?"
    return found


def exported_names(name: str, kind: str) -> set[str]:
    """What Ray's Prometheus exporter calls an application metric: the ray_ prefix; counters _total,
    histograms _bucket / _sum / _count."""
    base = f"ray_{name}"
    return {"Counter": {f"{base}_total"}, "Histogram": {f"{base}_{s}" for s in ("bucket", "sum", "count")}}.get(
        kind, {base}
    )


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable query."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r}", t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            out.append((f"variable {v['name']!r}", q))
    return out


def load_dashboard() -> dict:
    try:
        return json.loads((INFRA / "grafana-dashboard.json").read_text())
    except json.JSONDecodeError as e:
        pytest.fail(f"infra/grafana-dashboard.json: not valid JSON: {e}")


def test_grafana_dashboard_queries_only_metrics_serving_defines():
    metrics = serving_metrics()
    allowed = {n: name for name, kind in metrics.items() for n in exported_names(name, kind)}
    queries = dashboard_queries(load_dashboard())
    assert queries, "infra/grafana-dashboard.json: no queries"
    used = set()
    for where, expr in queries:
        for token in re.findall(r"\b(?:ray_)?unusual_[A-Za-z0-9_]+", expr):
            assert token.startswith("ray_"), (
                f"infra/grafana-dashboard.json: {where} queries {token}; Ray exports it as ray_{token}"
            )
            assert token in allowed, (
                f"infra/grafana-dashboard.json: {where} queries {token}, which serving/ does not export; "
                f"known: {sorted(allowed)}"
            )
            used.add(allowed[token])
    missing = set(metrics) - used
    assert not missing, f"infra/grafana-dashboard.json: no panel for the serving metrics {sorted(missing)}"


def test_grafana_dashboard_serve_metrics_exist_in_ray():
    """Ray Serve's metric names as Ray's own bundled Serve dashboards query them (this Ray version)."""
    import ray.dashboard.modules.metrics.dashboards as bundled

    known = " ".join(p.read_text() for p in Path(bundled.__file__).parent.glob("serve*_panels.py"))
    names = {t for _, expr in dashboard_queries(load_dashboard()) for t in re.findall(r"\bray_serve_[a-z0-9_]+", expr)}
    assert {"ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket"} <= names
    assert any("error" in n for n in names), "infra/grafana-dashboard.json: chart Serve's error requests"
    for name in sorted(names):
        assert re.search(rf"\b{name}\b", known), (
            f"infra/grafana-dashboard.json queries {name}, which Ray's own Serve dashboards do not know"
        )


def test_grafana_dashboard_has_the_model_variable():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "model" in variables, "infra/grafana-dashboard.json: a `model` template variable"
    for where, expr in dashboard_queries(dashboard):
        if "unusual_" in expr and where.startswith("panel"):
            assert "$model" in expr, f"infra/grafana-dashboard.json: {where} ignores the model variable"
    exprs = " ".join(e for _, e in dashboard_queries(dashboard))
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    assert "model_version" in exprs, "infra/grafana-dashboard.json: break the score panels down by model_version"


# --------------------------------------------------------------------------- IAM


def policy_actions(statement: dict) -> list[str]:
    actions = statement.get("Action", [])
    return [actions] if isinstance(actions, str) else list(actions)


def policy_resources(statement: dict) -> list[str]:
    resources = statement.get("Resource", [])
    return [resources] if isinstance(resources, str) else list(resources)


def test_iam_policy_is_least_privilege():
    path = INFRA / "iam-policy.json"
    try:
        policy = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        pytest.fail(f"infra/iam-policy.json: not valid JSON: {e}")
    assert policy.get("Version") == "2012-10-17", "infra/iam-policy.json: Version must be 2012-10-17"
    statements = policy["Statement"]
    assert isinstance(statements, list) and statements
    writes = set()
    for s in statements:
        sid = s.get("Sid", "?")
        assert s.get("Effect") == "Allow", f"infra/iam-policy.json: statement {sid}: Effect"
        assert "NotAction" not in s and "NotResource" not in s, f"infra/iam-policy.json: statement {sid}: Not*"
        for a in policy_actions(s):
            assert a != "*" and not a.endswith(":*"), f"infra/iam-policy.json: statement {sid} grants {a!r}"
        resources = policy_resources(s)
        assert "*" not in resources, f"infra/iam-policy.json: statement {sid}: Resource '*'"
        if "s3:ListBucket" in policy_actions(s):
            assert "s3:prefix" in s.get("Condition", {}).get("StringLike", {}), (
                f"infra/iam-policy.json: statement {sid}: ListBucket must be limited by s3:prefix"
            )
        if {"s3:PutObject", "s3:DeleteObject"} & set(policy_actions(s)):
            writes.update(resources)
    assert writes and all(r.endswith(("/models/*", "/scores/*")) for r in writes), (
        f"infra/iam-policy.json: the jobs may write models/ and scores/ only; writes {sorted(writes)}"
    )
    reads = {r for s in statements if "s3:GetObject" in policy_actions(s) for r in policy_resources(s)}
    assert any(r.endswith("/data/*") for r in reads), "infra/iam-policy.json: the jobs read data/"


def test_iam_policy_json_matches_terraform_job_policy():
    main = (INFRA / "terraform" / "main.tf").read_text()
    policy = json.loads((INFRA / "iam-policy.json").read_text())
    json_actions = {a for s in policy["Statement"] for a in policy_actions(s)}
    tf_actions = set(re.findall(r"\"(s3:[A-Z][A-Za-z]+)\"", main))
    assert json_actions == tf_actions, (
        f"infra/iam-policy.json and infra/terraform/main.tf grant different S3 actions: "
        f"only in the JSON {sorted(json_actions - tf_actions)}, only in Terraform {sorted(tf_actions - json_actions)}"
    )


def test_terraform_declares_what_it_uses():
    tf = INFRA / "terraform"
    text = "\n".join(p.read_text() for p in sorted(tf.glob("*.tf")))
    declared = set(re.findall(r"^variable \"(\w+)\"", text, re.M))
    used = set(re.findall(r"\bvar\.(\w+)", text))
    assert used <= declared, f"infra/terraform: undeclared variables {sorted(used - declared)}"
    for needed in (
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_public_access_block",
    ):
        assert f'resource "{needed}"' in text, f"infra/terraform/main.tf: no {needed}"
    resources = set(re.findall(r"^(?:resource|data) \"(\w+)\" \"(\w+)\"", text, re.M))
    for kind, name in set(re.findall(r"\b((?:aws|data\.aws)_\w+)\.(\w+)\b", text)):
        kind = kind.removeprefix("data.")
        assert (kind, name) in resources, f"infra/terraform: {kind}.{name} is referenced but not defined"
    deny_all = re.findall(r'effect\s*=\s*"Deny"\s*\n\s*actions\s*=\s*\["s3:\*"\]', text)
    assert text.count('"s3:*"') == len(deny_all) <= 1, (
        "infra/terraform/main.tf: s3:* only in the bucket policy's Deny statement (insecure transport)"
    )


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_is_formatted():
    """`terraform fmt -check` parses the files (offline; `validate` would need the provider)."""
    run = subprocess.run(
        ["terraform", "fmt", "-check", "-diff", "-recursive", str(INFRA / "terraform")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"infra/terraform: terraform fmt -check failed:\n{run.stdout}{run.stderr}"


# --------------------------------------------------------------------------- MinIO


def test_minio_compose_runs_minio_and_creates_the_bucket():
    path = INFRA / "docker-compose.minio.yml"
    compose = load_docs(path)[0]
    services = compose.get("services", {})
    minio = next((s for s in services.values() if "minio/minio" in s.get("image", "")), None)
    assert minio, f"{rel(path)}: no MinIO service"
    ports = " ".join(map(str, minio.get("ports", [])))
    assert ":9000" in ports and ":9001" in ports, f"{rel(path)}: MinIO must publish 9000 (S3) and 9001 (console)"
    init = next((s for s in services.values() if "minio/mc" in s.get("image", "")), None)
    assert init, f"{rel(path)}: no mc init container"
    script = json.dumps([init.get("entrypoint"), init.get("command"), init.get("environment")])
    assert "mc mb" in script and "unusual" in script, f"{rel(path)}: the init container must create the bucket unusual"
    assert "depends_on" in init, f"{rel(path)}: the init container must wait for MinIO"
    text = path.read_text()
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert var in text, f"{rel(path)}: say which {var} to export"
