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
import sys
import zoneinfo
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
INFRA = REPO / "infra"
KUBERAY = CLUSTER / "kuberay"

JOB_MODULES = {f"unusual.ray_jobs.{job}": job for job in ("fit", "train", "score", "evaluate")}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# The Kubernetes resources a KubeRay file may hold besides Ray's: the scheduling around a RayJob
# (cronjob-score.yaml), with their apiVersions. Cluster-wide RBAC is not among them.
SCHEDULING_KINDS = {
    "CronJob": "batch/v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
SCHEDULED = KUBERAY / "cronjob-score.yaml"
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


def all_kuberay_docs() -> list[tuple[Path, dict]]:
    """Every document of every file under cluster/kuberay."""
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def embedded_ray_docs(doc: dict) -> list[dict]:
    """The Ray resources a ConfigMap holds as YAML files (the RayJob a CronJob's kubectl creates)."""
    if doc.get("kind") != "ConfigMap":
        return []
    out = []
    for key, text in (doc.get("data") or {}).items():
        if key.endswith((".yaml", ".yml")):
            out += [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind") in KUBERAY_KINDS]
    return out


def kuberay_docs() -> list[tuple[Path, dict]]:
    """The Ray resources under cluster/kuberay: the files' own documents, and the RayJobs that a CronJob
    creates from a ConfigMap (in the file of the CronJob), so that every RayJob gets the same checks."""
    out = []
    for path, doc in all_kuberay_docs():
        if doc.get("kind") in SCHEDULING_KINDS:
            out += [(path, d) for d in embedded_ray_docs(doc)]
        else:
            out.append((path, doc))
    return out


def doc_name(doc: dict) -> str:
    """metadata.name, or the generateName of a resource created anew on each run."""
    meta = doc.get("metadata") or {}
    return meta.get("name") or meta.get("generateName") or ""


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
        "cluster/kuberay/cronjob-score.yaml",
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
    assert {p.name for p, _ in jobs} >= {"rayjob-train.yaml", "rayjob-score.yaml", "cronjob-score.yaml"}
    seen = set()
    for path, doc in jobs:
        entrypoint = doc["spec"].get("entrypoint")
        assert entrypoint, f"{rel(path)}: RayJob {doc_name(doc)} has no spec.entrypoint"
        sub, _ = check_job_command(shlex.split(entrypoint), rel(path), entrypoint, allow_unusual=False)
        seen.add(sub)
    assert seen >= {"train", "score"}, f"RayJobs cover {sorted(seen)}; expected train and score"


def test_rayjob_train_and_score_use_the_documented_flags():
    """The entrypoints the README promises: train on GPUs into a bundle, score keeping id and label."""
    by_sub: dict[str, list] = {}
    for path, doc in docs_of_kind("RayJob"):
        entrypoint = doc["spec"]["entrypoint"]
        sub, args = check_job_command(shlex.split(entrypoint), rel(path), entrypoint)
        by_sub.setdefault(sub, []).append((path, args))
    [(path, train)] = by_sub["train"]
    assert train.data.startswith("s3://") and train.output.startswith("s3://"), rel(path)
    assert train.use_gpu and train.num_workers >= 1, f"{rel(path)}: the train RayJob is the GPU example"
    assert "label" in (train.exclude or []), f"{rel(path)}: the label column must be excluded from the features"
    assert len(by_sub["score"]) == 2, "a one-off score RayJob and the scheduled one"
    for path, score in by_sub["score"]:
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
            out.append((f"{rel(path)} ({kind} {doc_name(doc)})", cluster[kind]))
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
        assert doc_name(doc), f"{rel(path)}: metadata.name (or generateName, created by kubectl create) is required"
    for path, doc in all_kuberay_docs():  # kubectl apply refuses generateName: a file's own documents are named
        kind = doc.get("kind")
        assert kind in KUBERAY_KINDS or kind in SCHEDULING_KINDS, (
            f"{rel(path)}: {kind} is neither a Ray resource nor one of {sorted(SCHEDULING_KINDS)}"
        )
        assert doc.get("metadata", {}).get("name"), f"{rel(path)}: {kind}: metadata.name is required"


def test_kuberay_cluster_specs_are_well_formed():
    import ray

    specs = ray_cluster_specs()
    assert len(specs) == 5
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


# --------------------------------------------------------------------------- the scheduled scoring (cronjob-score.yaml)


def scheduled() -> dict[str, dict]:
    """kind -> the document of cronjob-score.yaml (one of each)."""
    docs = load_docs(SCHEDULED)
    kinds = [d.get("kind") for d in docs]
    assert len(kinds) == len(set(kinds)), f"{rel(SCHEDULED)}: one document of each kind: {kinds}"
    return {d["kind"]: d for d in docs}


def scheduled_pod(docs: dict) -> dict:
    return docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def config_mount(docs: dict) -> str:
    """Where the CronJob's container mounts the ConfigMap of the file."""
    pod = scheduled_pod(docs)
    [container] = pod["containers"]
    [volume] = [
        v for v in pod["volumes"] if v.get("configMap", {}).get("name") == docs["ConfigMap"]["metadata"]["name"]
    ]
    [mount] = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] == volume["name"]]
    return mount.rstrip("/")


def scheduled_script(docs: dict) -> tuple[str, str]:
    """(the ConfigMap key of the script the CronJob's container runs, its text)."""
    [container] = scheduled_pod(docs)["containers"]
    mount = config_mount(docs)
    scripts = [a for a in container["command"] + container.get("args", []) if a.startswith(f"{mount}/")]
    assert len(scripts) == 1, (
        f"{rel(SCHEDULED)}: the container runs one script from the ConfigMap: {container['command']}"
    )
    key = scripts[0].removeprefix(f"{mount}/")
    assert key in docs["ConfigMap"]["data"], (
        f"{rel(SCHEDULED)}: the container runs {scripts[0]}; the ConfigMap has no {key}"
    )
    return key, docs["ConfigMap"]["data"][key]


MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
WEEKDAYS = "sun mon tue wed thu fri sat".split()
# name, lowest, highest, names: the five fields as Kubernetes' CronJob controller reads them (robfig/cron's
# standard parser; it also takes @hourly and the like, which the manifests do not use).
CRON_FIELDS = (
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 6, WEEKDAYS),
)


def cron_value(v: str, what: str, names: list[str]) -> int | None:
    """A cron field's number, or the number of a month / weekday name (jan = 1, sun = 0); None if neither."""
    if v.isdigit():
        return int(v)
    return names.index(v.lower()) + (what == "month") if v.lower() in names else None


def cron_errors(expr: str) -> list[str]:
    """What is wrong with a five-field cron expression as a CronJob's schedule (empty: nothing)."""
    fields = expr.split()
    if len(fields) != 5:
        return [f"{expr!r} has {len(fields)} fields; a schedule has 5: minute hour day-of-month month day-of-week"]
    errors = []
    for text, (what, lo, hi, names) in zip(fields, CRON_FIELDS):
        for item in text.split(","):
            m = re.fullmatch(r"(?:(\*|\?)|(\w+)(?:-(\w+))?)(?:/(\d+))?", item)
            if not m:
                errors.append(f"{what}: {item!r} is not *, N, N-M or a list of them (with /step)")
                continue
            star, first, last, step = m.groups()
            if star == "?" and what not in ("day of month", "day of week"):
                errors.append(f"{what}: ? is only for the day fields")
            if step is not None and int(step) == 0:
                errors.append(f"{what}: step 0 in {item!r}")
            if star:
                continue
            a, b = cron_value(first, what, names), cron_value(last, what, names) if last else None
            if a is None or (last and b is None):
                errors.append(f"{what}: {item!r} is not a number{' or a name' if names else ''}")
                continue
            for v in (a, b) if b is not None else (a,):
                if not lo <= v <= hi:
                    errors.append(f"{what}: {v} is outside {lo}-{hi}")
            if b is not None and b < a:
                errors.append(f"{what}: the range {item!r} runs backwards")
    return errors


def test_cron_check_reports_bad_schedules():
    for good in ("10 * * * *", "*/15 0-6,22,23 * jan-mar mon-fri", "0 3 1 * ?", "0 0 * * sun"):
        assert cron_errors(good) == [], good
    for bad, message in [
        ("10 * * *", "4 fields"),
        ("@hourly", "1 fields"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("0 24 * * *", "hour: 24 is outside"),
        ("0 * 0 * *", "day of month: 0 is outside"),
        ("0 * * 13 *", "month: 13"),
        ("0 * * * 7", "day of week: 7"),
        ("*/0 * * * *", "step 0"),
        ("30-10 * * * *", "runs backwards"),
        ("? * * * *", "only for the day fields"),
        ("0 * * foo *", "not a number or a name"),
        ("0,, * * * *", "is not *"),
    ]:
        errors = cron_errors(bad)
        assert any(message in e for e in errors), (bad, errors)


def test_scheduled_file_holds_known_kinds_with_what_kubernetes_requires():
    docs = scheduled()
    assert set(docs) == set(SCHEDULING_KINDS), f"{rel(SCHEDULED)}: kinds {sorted(docs)}"
    for kind, doc in docs.items():
        where = f"{rel(SCHEDULED)}: {kind}"
        assert doc.get("apiVersion") == SCHEDULING_KINDS[kind], f"{where}: apiVersion {doc.get('apiVersion')}"
        name = doc.get("metadata", {}).get("name", "")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 52, (
            f"{where}: metadata.name {name!r} (a DNS label; a CronJob's at most 52 characters)"
        )
        assert "namespace" not in doc["metadata"], f"{where}: no namespace: the file is applied to the namespace chosen"
    cron = docs["CronJob"]["spec"]
    assert cron.get("schedule") and cron.get("jobTemplate"), f"{rel(SCHEDULED)}: CronJob needs schedule and jobTemplate"
    pod = scheduled_pod(docs)
    for c in pod["containers"]:
        assert c.get("name") and c.get("image"), f"{rel(SCHEDULED)}: every container needs a name and an image"
    for rule in docs["Role"]["rules"]:
        assert rule.get("verbs") and rule.get("resources") and "apiGroups" in rule, (
            f"{rel(SCHEDULED)}: Role rule {rule}"
        )
    binding = docs["RoleBinding"]
    assert {"apiGroup", "kind", "name"} <= set(binding["roleRef"]), f"{rel(SCHEDULED)}: RoleBinding roleRef"
    for s in binding["subjects"]:
        assert s.get("kind") and s.get("name"), f"{rel(SCHEDULED)}: RoleBinding subject {s}"
    assert all(isinstance(v, str) for v in docs["ConfigMap"]["data"].values()), (
        f"{rel(SCHEDULED)}: ConfigMap data values are strings"
    )


def test_cronjob_runs_hourly_one_run_at_a_time():
    cron = scheduled()["CronJob"]["spec"]
    schedule = cron["schedule"]
    errors = cron_errors(schedule)
    assert not errors, f"{rel(SCHEDULED)}: schedule {schedule!r}: {'; '.join(errors)}"
    minute, *rest = schedule.split()
    assert minute.isdigit() and rest == ["*"] * 4, f"{rel(SCHEDULED)}: the example runs once an hour: {schedule!r}"
    try:
        zoneinfo.ZoneInfo(cron["timeZone"])
    except (KeyError, zoneinfo.ZoneInfoNotFoundError):
        pytest.fail(f"{rel(SCHEDULED)}: timeZone {cron.get('timeZone')!r} is not an IANA time zone")
    assert cron.get("concurrencyPolicy") == "Forbid", f"{rel(SCHEDULED)}: concurrencyPolicy must be Forbid"
    assert 0 < cron.get("startingDeadlineSeconds", 0) < 3600, (
        f"{rel(SCHEDULED)}: startingDeadlineSeconds under the period (a missed hour is not run late, and the "
        "controller does not give up after 100 missed starts)"
    )
    for limit in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        assert isinstance(cron.get(limit), int) and cron[limit] >= 1, f"{rel(SCHEDULED)}: set {limit}"
    assert not cron.get("suspend"), f"{rel(SCHEDULED)}: the example is not suspended"


def test_cronjob_pod_waits_for_its_rayjob_and_is_not_retried():
    docs = scheduled()
    job = docs["CronJob"]["spec"]["jobTemplate"]["spec"]
    pod = scheduled_pod(docs)
    assert pod.get("restartPolicy") == "Never", f"{rel(SCHEDULED)}: the pod's restartPolicy must be Never"
    assert job.get("backoffLimit") == 0, f"{rel(SCHEDULED)}: backoffLimit 0: a retried pod would create a second RayJob"
    [(_, rayjob)] = [(p, d) for p, d in docs_of_kind("RayJob") if p == SCHEDULED]
    spec = rayjob["spec"]
    longest = (spec.get("backoffLimit", 0) + 1) * spec["activeDeadlineSeconds"]
    assert job.get("activeDeadlineSeconds", 0) > longest, (
        f"{rel(SCHEDULED)}: the Job's activeDeadlineSeconds must outlast the RayJob's attempts ({longest}s): Forbid "
        "only holds the next run while the pod waits"
    )
    [container] = pod["containers"]
    limits = container.get("resources", {}).get("limits", {})
    assert "cpu" in limits and "memory" in limits, (
        f"{rel(SCHEDULED)}: set the kubectl container's cpu and memory limits"
    )
    assert container["command"][0] in ("/bin/sh", "sh"), f"{rel(SCHEDULED)}: run.sh is a POSIX sh script"
    assert "registry.k8s.io/kubectl" not in container["image"], f"{rel(SCHEDULED)}: that image has no shell"
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", rel(SCHEDULED)
    assert int(env["KEEP_RAYJOBS"]["value"]) >= 1, rel(SCHEDULED)
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert pod.get("serviceAccountName") == account, f"{rel(SCHEDULED)}: the pod runs as {account}"


def test_scheduler_rbac_is_limited_to_rayjobs():
    docs = scheduled()
    [rule] = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"], (
        f"{rel(SCHEDULED)}: the Role is for rayjobs in ray.io only: {rule}"
    )
    assert sorted(rule["verbs"]) == ["create", "delete", "get", "list"], (
        f"{rel(SCHEDULED)}: the scheduler creates, reads, lists and deletes RayJobs, nothing else: {rule['verbs']}"
    )
    assert not {"nonResourceURLs", "resourceNames"} & set(rule), rel(SCHEDULED)
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }, f"{rel(SCHEDULED)}: the RoleBinding binds the Role (not a ClusterRole)"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": docs["ServiceAccount"]["metadata"]["name"]}], (
        f"{rel(SCHEDULED)}: the RoleBinding binds the scheduler's service account only (of this namespace)"
    )


def test_scheduled_rayjob_is_the_incremental_command():
    docs = scheduled()
    [(_, rayjob)] = [(p, d) for p, d in docs_of_kind("RayJob") if p == SCHEDULED]
    meta = rayjob["metadata"]
    assert meta.get("generateName") and "name" not in meta, (
        f"{rel(SCHEDULED)}: the RayJob in the ConfigMap needs generateName (a new RayJob each run), not a name"
    )
    spec = rayjob["spec"]
    sub, args = check_job_command(shlex.split(spec["entrypoint"]), rel(SCHEDULED), spec["entrypoint"])
    assert sub == "score" and args.incremental, f"{rel(SCHEDULED)}: the scheduled command is `score --incremental`"
    assert not args.overwrite and not args.rescore, (
        f"{rel(SCHEDULED)}: --overwrite / --rescore would score everything again every hour"
    )
    assert args.data.startswith("s3://") and args.output.startswith("s3://"), rel(SCHEDULED)
    assert not args.data.rstrip("/").startswith(args.output.rstrip("/")), f"{rel(SCHEDULED)}: --output inside --data"
    assert spec.get("shutdownAfterJobFinishes") is True and spec.get("ttlSecondsAfterFinished", -1) >= 0, (
        f"{rel(SCHEDULED)}: each run's cluster is deleted when it ends"
    )
    assert spec.get("activeDeadlineSeconds", 0) > 0, f"{rel(SCHEDULED)}: bound a run (a stuck one holds the schedule)"
    assert "clusterSelector" not in spec, f"{rel(SCHEDULED)}: the scheduled RayJob brings its own cluster"
    # The script finds the runs by the RayJob's labels and creates it from the file the ConfigMap mounts.
    _, script = scheduled_script(docs)
    labels = meta.get("labels", {})
    [selector] = re.findall(r"\bselector=(\S+)", script)
    key, value = selector.split("=", 1)
    assert labels.get(key) == value, f"{rel(SCHEDULED)}: run.sh selects {selector}; the RayJob's labels: {labels}"
    [key] = [
        k for k, v in docs["ConfigMap"]["data"].items() if embedded_ray_docs({"kind": "ConfigMap", "data": {k: v}})
    ]
    mount = config_mount(docs)
    assert re.search(rf"\bcreate -f {re.escape(mount)}/{re.escape(key)}\b", script), (
        f"{rel(SCHEDULED)}: run.sh must `kubectl create -f` the mounted {mount}/{key}"
    )


def test_scheduler_script_is_valid_sh():
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    _, script = scheduled_script(scheduled())
    run = subprocess.run([sh, "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, f"{rel(SCHEDULED)}: run.sh does not parse: {run.stderr}"


# A kubectl that serves rayjobs from a JSON file: enough of get (list with -l / --sort-by, one by name),
# create -f and delete for run.sh, with -o jsonpath (range, fields, quoted strings) and -o name. Each call is
# recorded (verb as RBAC sees it, resource, namespace). A created RayJob moves through the states of
# "progress", one per get of it ("gone" deletes it); a get after the last one fails.
FAKE_KUBECTL = r"""
import json, os, re, sys

STATE = os.environ["FAKE_KUBECTL_STATE"]
with open(STATE) as f:
    state = json.load(f)
RESOURCES = {"rayjobs.ray.io", "rayjob.ray.io", "rayjobs", "rayjob"}
SHORT = {"-l": "l", "--selector": "l", "-o": "o", "--output": "o", "-f": "f", "--filename": "f", "--sort-by": "sort-by"}


def save():
    with open(STATE, "w") as f:
        json.dump(state, f)


def fail(message):
    save()
    print(message, file=sys.stderr)
    sys.exit(1)


def lookup(obj, path):
    cur = obj
    for part in path.strip().lstrip(".").split("."):
        many = part.endswith("[*]")
        cur = cur.get(part.removesuffix("[*]")) if isinstance(cur, dict) else None
        if cur is None:
            return [] if many else None
    return cur


def render(tokens, obj):
    out, i = [], 0
    while i < len(tokens):
        expr, text = tokens[i]
        if not expr:
            out.append(text)
        elif expr.startswith("range "):
            depth, j = 1, i + 1
            while depth:
                depth += tokens[j][0].startswith("range ") - (tokens[j][0] == "end")
                j += 1
            for item in lookup(obj, expr[6:]):
                out.append(render(tokens[i + 1 : j - 1], item))
            i = j
            continue
        elif expr.startswith('"'):
            out.append(json.loads(expr))
        else:
            value = lookup(obj, expr)
            out.append("" if value is None else str(value))
        i += 1
    return "".join(out)


def as_object(job):
    status = {k: v for k, v in (("jobDeploymentStatus", job["status"]), ("jobStatus", job["jobStatus"])) if v}
    meta = {"name": job["name"], "creationTimestamp": "2026-12-07T%06d" % job["created"], "labels": job["labels"]}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, **({"status": status} if status else {})}


args = sys.argv[1:]
namespace = None
if args[:1] in (["-n"], ["--namespace"]):
    namespace, args = args[1], args[2:]
verb, rest = args[0], args[1:]
flags, positional = {}, []
while rest:
    a = rest.pop(0)
    if a in SHORT:
        flags[SHORT[a]] = rest.pop(0)
    elif a.startswith("--") and "=" in a:
        key, value = a[2:].split("=", 1)
        flags[key] = value
    elif a.startswith("-"):
        flags[a.lstrip("-")] = True
    else:
        positional.append(a)
target = positional[0] if positional else ""
resource, _, name = target.partition("/")
names = [name] if name else positional[1:]
rbac_verb = {"get": "list" if verb == "get" and not names else "get"}.get(verb, verb)
if verb == "create":
    resource = "rayjobs.ray.io"  # what -f holds: checked below
plural, _, group = resource.partition(".")
call = {"verb": rbac_verb, "group": group or "ray.io", "resource": plural.removesuffix("s") + "s"}
state["calls"].append({**call, "namespace": namespace, "argv": sys.argv[1:]})
if resource not in RESOURCES:
    fail(f"fake kubectl: {resource!r}: run.sh may only touch rayjobs")
jobs = state["rayjobs"]
output = flags.get("o", "")

if verb == "get" and not names:
    key, value = flags.get("l", "=").split("=", 1)
    items = [j for j in jobs if j["labels"].get(key) == value]
    if "sort-by" in flags:
        assert flags["sort-by"] == ".metadata.creationTimestamp", flags
        items.sort(key=lambda j: j["created"])
    assert output.startswith("jsonpath="), output
    tokens = re.findall(r"\{([^{}]*)\}|([^{}]+)", output[len("jsonpath="):])
    print(render(tokens, {"kind": "List", "items": [as_object(j) for j in items]}), end="")
elif verb == "get":
    [job] = [j for j in jobs if j["name"] == names[0]] or [None]
    if job is None:
        if names[0] == state.get("created") and state["progress"]:
            state["progress"].pop(0)
        fail(f'Error from server (NotFound): rayjobs.ray.io "{names[0]}" not found')
    if job["name"] == state.get("created"):
        if not state["progress"]:  # the scenario has no more states: fail, so a broken run.sh cannot hang
            fail(f"fake kubectl: {names[0]} was read more often than the scenario expects")
        step = state["progress"].pop(0)
        if step == "gone":
            jobs.remove(job)
            fail(f'Error from server (NotFound): rayjobs.ray.io "{names[0]}" not found')
        job["status"], job["jobStatus"] = step
    tokens = re.findall(r"\{([^{}]*)\}|([^{}]+)", output[len("jsonpath="):])
    print(render(tokens, as_object(job)), end="")
elif verb == "create":
    sys.path.insert(0, os.environ["FAKE_KUBECTL_YAML"])  # started with -S (fast): PyYAML's folder
    import yaml

    with open(flags["f"]) as f:
        [doc] = [d for d in yaml.safe_load_all(f) if d]
    assert doc["kind"] == "RayJob" and "name" not in doc["metadata"], doc["metadata"]
    new = doc["metadata"]["generateName"] + "run%02d" % len(jobs)
    jobs.append({"name": new, "created": max([j["created"] for j in jobs], default=0) + 1, "status": "",
                 "jobStatus": "", "labels": doc["metadata"].get("labels", {})})
    state["created"] = new
    print(f"rayjob.ray.io/{new}" if output == "name" else f"rayjob.ray.io/{new} created")
elif verb == "delete":
    missing = [n for n in names if n not in {j["name"] for j in jobs}]
    if missing:
        fail(f"not found: {missing}")
    state["rayjobs"] = [j for j in jobs if j["name"] not in names]
    for n in names:
        print(f'rayjob.ray.io "{n}" deleted')
else:
    fail(f"fake kubectl: no {verb}")
save()
"""


def run_scheduler(tmp_path: Path, rayjobs: list[dict], progress: list, namespace: str = "team"):
    """run.sh of cronjob-score.yaml against FAKE_KUBECTL, with the ConfigMap's files where the pod mounts
    them and the container's environment. Returns (exit status, stdout, stderr, final state)."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    docs = scheduled()
    [container] = scheduled_pod(docs)["containers"]
    mount = config_mount(docs)
    config = tmp_path / "config"
    config.mkdir(parents=True)
    for key, text in docs["ConfigMap"]["data"].items():
        (config / key).write_text(text)
    key, script = scheduled_script(docs)
    (config / key).write_text(script.replace(f"{mount}/", f"{config}/"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"#!{sys.executable} -S\n{FAKE_KUBECTL}")
    kubectl.chmod(0o755)
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps({"rayjobs": rayjobs, "progress": progress, "calls": []}))
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env |= {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "POD_NAMESPACE": namespace,
        "HOME": str(tmp_path),
        "POLL_SECONDS": "0",
        "FAKE_KUBECTL_STATE": str(state_file),
        "FAKE_KUBECTL_YAML": str(Path(yaml.__file__).parent.parent),
    }
    run = subprocess.run([sh, str(config / key)], capture_output=True, text=True, env=env, timeout=60)
    return run.returncode, run.stdout, run.stderr, json.loads(state_file.read_text())


def schedule_label() -> dict:
    [(_, rayjob)] = [(p, d) for p, d in docs_of_kind("RayJob") if p == SCHEDULED]
    return rayjob["metadata"]["labels"]


def finished_runs(n: int, start: int = 1) -> list[dict]:
    """n finished RayJobs of the schedule (every third one failed), the oldest first."""
    labels = schedule_label()
    return [
        {
            "name": f"unusual-score-hourly-old{i:02d}",
            "created": i,
            "status": "Complete" if i % 3 else "Failed",
            "jobStatus": "SUCCEEDED" if i % 3 else "FAILED",
            "labels": labels,
        }
        for i in range(start, start + n)
    ]


def scheduler_calls(state: dict, namespace: str = "team") -> list[dict]:
    for call in state["calls"]:
        assert call["namespace"] == namespace, f"run.sh must name the pod's namespace: {call['argv']}"
    return state["calls"]


@pytest.mark.parametrize(
    "progress, status",
    [
        ([("Initializing", ""), ("Running", "RUNNING"), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")], 0),
        ([("Running", "RUNNING"), ("Retrying", "FAILED"), ("Running", "RUNNING"), ("Failed", "FAILED")], 1),
        ([("Complete", "FAILED")], 1),  # the Ray job failed, the deployment completed
        ([("ValidationFailed", "")], 1),
        ([("Running", "RUNNING")] + ["gone"] * 10, 1),  # deleted under it: gives up
    ],
    ids=["succeeds", "fails-after-retry", "job-failed", "invalid", "rayjob-deleted"],
)
def test_scheduler_creates_a_rayjob_and_exits_with_its_outcome(tmp_path, progress, status):
    rc, out, err, state = run_scheduler(tmp_path, finished_runs(3), [list(p) if p != "gone" else p for p in progress])
    calls = scheduler_calls(state)
    assert rc == status, f"run.sh exited {rc}, expected {status}\n{out}\n{err}"
    assert [c["verb"] for c in calls][:2] == ["list", "create"], calls
    assert state["created"] and not state["progress"], "run.sh must wait until the RayJob ends"
    assert f"job/{state['created']}" in out, "run.sh names the RayJob whose log to read"
    if status:
        assert err.strip(), "a failed run says why on stderr"


@pytest.mark.parametrize("in_flight", ["Running", "Initializing", "", "Retrying", "Waiting"])
def test_scheduler_skips_while_a_run_is_in_flight(tmp_path, in_flight):
    jobs = finished_runs(2) + [
        {
            "name": "unusual-score-hourly-busy",
            "created": 9,
            "status": in_flight,
            "jobStatus": "",
            "labels": schedule_label(),
        }
    ]
    rc, out, err, state = run_scheduler(tmp_path, jobs, [])
    calls = scheduler_calls(state)
    assert rc == 0 and "skipped" in out and "unusual-score-hourly-busy" in out, (out, err)
    assert [c["verb"] for c in calls] == ["list"], f"nothing is created beside a run in flight: {calls}"


@pytest.mark.parametrize("ended", ["Complete", "Failed", "ValidationFailed"])
def test_scheduler_does_not_wait_on_a_run_that_ended(tmp_path, ended):
    jobs = [
        {
            "name": "unusual-score-hourly-last",
            "created": 1,
            "status": ended,
            "jobStatus": "",
            "labels": schedule_label(),
        }
    ]
    rc, out, err, state = run_scheduler(tmp_path, jobs, [("Complete", "SUCCEEDED")])
    assert rc == 0 and "skipped" not in out, (out, err)
    assert [c["verb"] for c in scheduler_calls(state)] == ["list", "create", "get"]


def test_scheduler_keeps_the_newest_finished_rayjobs(tmp_path):
    keep = int(
        next(e["value"] for e in scheduled_pod(scheduled())["containers"][0]["env"] if e["name"] == "KEEP_RAYJOBS")
    )
    other = {
        "name": "someone-elses",
        "created": 0,
        "status": "Complete",
        "jobStatus": "SUCCEEDED",
        "labels": {"x": "y"},
    }
    jobs = [other, *finished_runs(keep + 5)]
    rc, out, err, state = run_scheduler(tmp_path, jobs, [("Complete", "SUCCEEDED")])
    calls = scheduler_calls(state)
    assert rc == 0, (out, err)
    [delete] = [c for c in calls if c["verb"] == "delete"]
    deleted = [a for a in delete["argv"] if a.startswith("unusual-score-hourly-")]
    assert deleted == [j["name"] for j in finished_runs(5)], f"the 5 oldest go: {deleted}"
    names = {j["name"] for j in state["rayjobs"]}
    assert "someone-elses" in names, "only this schedule's RayJobs are touched"
    assert len(names) == 1 + keep + 1, "the newest finished ones stay, and this run's"
    # a history at the limit: nothing deleted
    rc, _, _, state = run_scheduler(tmp_path / "at-limit", finished_runs(keep), [("Complete", "SUCCEEDED")])
    assert rc == 0 and "delete" not in [c["verb"] for c in scheduler_calls(state)]
    # What a full run needs, the Role grants, and no more: a run that lists, deletes the oldest, creates and
    # reads its RayJob makes every kind of call run.sh has.
    [rule] = scheduled()["Role"]["rules"]
    granted = {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    used = {(c["group"], c["resource"], c["verb"]) for c in calls}
    assert used <= granted, f"{rel(SCHEDULED)}: run.sh calls {sorted(used - granted)}, which the Role does not grant"
    assert granted == used, f"{rel(SCHEDULED)}: the Role grants {sorted(granted - used)}, which run.sh never uses"


def test_readme_incremental_commands_carry_incremental():
    """--partition-filter and --rescore only mean something with --incremental."""
    seen = 0
    for line in markdown_commands(CLUSTER / "README.md"):
        argv = split_command(line)
        if "--partition-filter" in argv or "--rescore" in argv:
            seen += 1
            assert "--incremental" in argv, f"cluster/README.md: {line}"
    assert seen >= 2, "cluster/README.md: show a backfill (--partition-filter) and a rescore (--rescore)"


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
