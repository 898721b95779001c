"""Lint rules for tilefeat's Nextflow code, run with reftrace (PyPI `reftrace`):

    .venv/bin/reftrace lint --rules nextflow/lint/rules.py --directory nextflow

`reftrace lint` parses every .nf and .config file under the directory (a file that does not
parse fails the run) and applies the @rule (scripts) and @configrule (configs) functions
below; any LintError makes it exit 1. tests/python/test_nextflow.py runs it.

reftrace exposes process directives (tag, label, container, ...) and config process scopes;
the process sections it does not expose (input, output, when, script, stub) are read from
the source text by the small Groovy-aware splitter at the bottom of this file.
"""

import re
from pathlib import Path

from reftrace import ConfigFile, Module
from reftrace.directives import ContainerFormat
from reftrace.linting import LintError, LintResults, configrule, rule

REPO = Path(__file__).resolve().parents[2]
NEXTFLOW = REPO / "nextflow"

# Labels conf/base.config defines; a process must use one of them.
KNOWN_LABELS = {"process_single", "process_low", "process_medium", "process_high", "process_gpu"}


def _versions_env():
    values = {}
    for line in (REPO / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def _expected_images():
    env = _versions_env()
    version, cuda = env["TILEFEAT_VERSION"], env["CUDA_VERSION"]
    return {
        "sif": f"oras://ghcr.io/tilefeat/tilefeat:{version}-cuda{cuda}-sif",
        "cuda": f"ghcr.io/tilefeat/tilefeat:{version}-cuda{cuda}",
        "cpu": f"ghcr.io/tilefeat/tilefeat:{version}-cpu",
    }


# ---------------------------------------------------------------------------------------
# Script (.nf) rules
# ---------------------------------------------------------------------------------------


@rule
def process_directives(module: Module, results: LintResults):
    """Every process has one tag (the sample/cohort ID), a known label and one container."""
    for process in module.processes:
        where = f"process '{process.name}'"
        if len(process.tags) != 1:
            results.errors.append(LintError(process.line, f"{where} needs exactly one tag, has {len(process.tags)}"))
        elif "meta.id" not in process.tags[0].tag:
            results.errors.append(LintError(process.line, f"{where}: tag must show meta.id, is {process.tags[0].tag!r}"))
        labels = [label.label for label in process.labels]
        if not labels:
            results.errors.append(LintError(process.line, f"{where} has no label"))
        for label in labels:
            if label not in KNOWN_LABELS:
                results.errors.append(LintError(process.line, f"{where}: label {label!r} is not one of {sorted(KNOWN_LABELS)}"))
        if len(process.containers) != 1:
            results.errors.append(LintError(process.line, f"{where} needs exactly one container directive"))
        if process.accelerators:
            results.errors.append(
                LintError(process.line, f"{where}: request GPUs in config (profile gpu), not with an accelerator directive")
            )


@rule
def container_images(module: Module, results: LintResults):
    """Container: Apptainer/Singularity get the SIF, Docker the image; versions from versions.env."""
    images = _expected_images()
    docker_ref = re.compile(r"ghcr\.io/tilefeat/tilefeat:[^\s'\"]+")
    for process in module.processes:
        for container in process.containers:
            where = f"process '{process.name}' container"
            if container.format != ContainerFormat.TERNARY:
                results.errors.append(LintError(container.line, f"{where}: use the nf-core `engine ? sif : docker` form"))
                continue
            condition = container.condition
            if "workflow.containerEngine" not in condition or "singularity" not in condition or "apptainer" not in condition:
                results.errors.append(
                    LintError(container.line, f"{where}: condition must select singularity and apptainer, is {condition!r}")
                )
            if container.true_name != images["sif"]:
                results.errors.append(
                    LintError(container.line, f"{where}: Apptainer/Singularity image must be {images['sif']}, is {container.true_name!r}")
                )
            docker = docker_ref.findall(container.false_name)
            if not docker:
                results.errors.append(LintError(container.line, f"{where}: no Docker image in {container.false_name!r}"))
            for image in docker:
                if image not in (images["cuda"], images["cpu"]):
                    results.errors.append(
                        LintError(container.line, f"{where}: Docker image {image} is neither {images['cuda']} nor {images['cpu']}")
                    )
            if "oras://" in container.false_name:
                results.errors.append(LintError(container.line, f"{where}: SIF image on the Docker side"))


@rule
def process_sections(module: Module, results: LintResults):
    """nf-core module shape: meta input, named emits, versions topic, when, ext.args/prefix, stub."""
    for name, line, sections in _processes_in_source(Path(module.path)):
        where = f"process '{name}'"

        def error(message, line=line):
            results.errors.append(LintError(line, f"{where}: {message}"))

        for section in ("input", "output", "when", "script", "stub"):
            if section not in sections:
                error(f"has no `{section}:` section")
        if "shell" in sections or "exec" in sections:
            error("use `script:`, not `shell:`/`exec:`")

        inputs = _statements(sections.get("input", ""))
        if inputs and not re.match(r"tuple\s+val\(\s*meta\s*\)\s*,\s*path\(", inputs[0]):
            error(f"first input must be `tuple val(meta), path(...)`, is {inputs[0]!r}")
        for statement in inputs:
            for kind, variable in re.findall(r"\b(path|file)\s*\(?\s*([A-Za-z_]\w*)", statement):
                if "cache" in variable.lower():
                    error(f"`{kind} {variable}`: a cache folder is shared, mutable state; pass it as a val, never stage it")

        outputs = _statements(sections.get("output", ""))
        for statement in outputs:
            if not re.search(r"\bemit:\s*\w+", statement):
                error(f"output without `emit:` name: {statement!r}")
        versions = [s for s in outputs if re.search(r"\btopic:\s*versions\b", s)]
        if len(versions) != 1:
            error("needs exactly one output with `topic: versions`")
        else:
            pattern = (
                r"^tuple\s+val\(\s*\"\$\{task\.process\}\"\s*\)\s*,\s*val\(\s*'(\w+)'\s*\)\s*,\s*eval\((.+)\)\s*,"
                r"\s*topic:\s*versions\s*,\s*emit:\s*versions_(\w+)$"
            )
            match = re.match(pattern, versions[0])
            if not match:
                error(f"versions output must be `tuple val(\"${{task.process}}\"), val('tool'), eval(...), topic: versions, emit: versions_tool`, is {versions[0]!r}")
            elif match.group(1) != match.group(3):
                error(f"versions output: emit name versions_{match.group(3)} does not match tool {match.group(1)!r}")

        when = " ".join(sections.get("when", "").split())
        if when != "task.ext.when == null || task.ext.when":
            error(f"`when:` must be `task.ext.when == null || task.ext.when`, is {when!r}")

        script = sections.get("script", "")
        for needed in ("task.ext.args", "task.ext.prefix"):
            if needed not in script:
                error(f"script does not use {needed}")
        if "params." in script or "params." in sections.get("stub", ""):
            error("modules must not read params: pass values as inputs or task.ext.args")
        if "task.ext.prefix" not in sections.get("stub", ""):
            error("stub must name its outputs with task.ext.prefix, as the script does")


@rule
def batched_tiles_staged_apart(module: Module, results: LintResults):
    """A process that takes several samples' tiles in one task (its meta lists them in
    meta.samples) stages each in a folder of its own (`stageAs: 'tiles??/*'`): two samples'
    folders may have the same name, and Nextflow refuses colliding input names."""
    for name, line, sections in _processes_in_source(Path(module.path)):
        if "meta.samples" not in sections.get("script", ""):
            continue
        inputs = _statements(sections.get("input", ""))
        first = inputs[0] if inputs else ""
        if not re.search(r"path\(\s*\w+\s*,\s*stageAs:\s*'\w+(\?+|\*)/\*'\s*\)", first):
            results.errors.append(
                LintError(
                    line,
                    f"process '{name}': several samples per task: stage their tiles apart, "
                    f"e.g. `path(tiles, stageAs: 'tiles??/*')`, is {first!r}",
                )
            )


@rule
def device_follows_accelerator(module: Module, results: LintResults):
    """A process_gpu process asks for CUDA only when the task was given a GPU (task.accelerator)."""
    gpu_processes = {p.name for p in module.processes if any(label.label == "process_gpu" for label in p.labels)}
    for name, line, sections in _processes_in_source(Path(module.path)):
        if name not in gpu_processes:
            continue
        where = f"process '{name}'"
        script = sections.get("script", "")
        # The device must come from one variable defined as `task.accelerator ? 'cuda…' : 'cpu'`.
        uses = re.findall(r"--device[ =](\S+)", script)
        if len(uses) != 1:
            results.errors.append(LintError(line, f"{where}: script must pass --device exactly once, found {uses}"))
            continue
        value = uses[0]
        inline = re.fullmatch(r"\$\{\s*task\.accelerator\s*\?\s*'cuda(:\d+)?'\s*:\s*'cpu'\s*\}", value)
        variable = re.fullmatch(r"\$\{?(\w+)\}?", value)
        ok = bool(inline)
        if variable and not inline:
            definition = re.search(rf"\bdef\s+{variable.group(1)}\s*=\s*(.+)", script)
            ok = bool(
                definition
                and re.fullmatch(r"task\.accelerator\s*\?\s*'cuda(:\d+)?'\s*:\s*'cpu'", definition.group(1).strip())
            )
        if not ok:
            results.errors.append(
                LintError(line, f"{where}: --device {value} must be `task.accelerator ? 'cuda' : 'cpu'` (no auto, no fixed cuda)")
            )


@rule
def includes_resolve(module: Module, results: LintResults):
    """Every local include points at an existing file that defines what is included."""
    here = Path(module.path).resolve().parent
    for include in module.includes:
        source = include.from_module
        if source.startswith("plugin/"):
            continue
        target = (here / source).resolve()
        if target.suffix != ".nf":
            target = target.with_suffix(".nf")
        if not target.is_file():
            results.errors.append(LintError(include.line, f"include from {source!r}: {target} does not exist"))
            continue
        defined = {name for name, _, _ in _processes_in_source(target)}
        defined |= set(re.findall(r"^\s*(?:workflow|def)\s+(\w+)", target.read_text(), re.MULTILINE))
        for item in include.items:
            if item.name not in defined:
                results.errors.append(LintError(include.line, f"{item.name} is not defined in {source}"))


@rule
def params_are_declared(module: Module, results: LintResults):
    """Pipeline scripts only read params that nextflow.config and nextflow_schema.json declare;
    modules read none."""
    path = Path(module.path).resolve()
    if "modules" in path.relative_to(NEXTFLOW).parts:
        for param in module.params:
            results.errors.append(LintError(param.line, f"module reads params.{param.name}: use an input or task.ext.args"))
        return
    declared_schema = _schema_params()
    declared_config = _config_params()
    for param in module.params:
        if param.name not in declared_schema:
            results.errors.append(LintError(param.line, f"params.{param.name} is not in nextflow_schema.json"))
        if param.name not in declared_config:
            results.errors.append(LintError(param.line, f"params.{param.name} has no default in nextflow.config"))


# ---------------------------------------------------------------------------------------
# Config (.config) rules
# ---------------------------------------------------------------------------------------


@configrule
def params_in_closures(config: ConfigFile, results: LintResults):
    """A process setting that reads params must be a closure (evaluated per task, after the
    command line is applied); publishDir's mode takes no closure."""

    def check(directive):
        if directive.options:
            for option in directive.options:
                if option.name == "mode" and directive.name == "publishDir":
                    continue
                if option.value.params and not option.value.in_closure:
                    results.errors.append(
                        LintError(option.line_number, f"{directive.name}.{option.name} reads params outside a closure")
                    )
        elif directive.value.params and not directive.value.in_closure:
            results.errors.append(LintError(directive.line_number, f"{directive.name} reads params outside a closure"))

    for scope in config.process_scopes:
        for directive in scope.directives:
            check(directive)
        for named in scope.named_scopes:
            for directive in named.directives:
                check(directive)


@configrule
def pipeline_profiles(config: ConfigFile, results: LintResults):
    """nextflow.config: the profiles the README documents, and GPUs wired the way they must be."""
    path = Path(config.path).resolve()
    if path != NEXTFLOW / "nextflow.config":
        return
    text = _strip_comments(path.read_text())
    profiles = _block(text, "profiles")
    if profiles is None:
        results.errors.append(LintError(1, "no profiles block"))
        return
    for name in ("docker", "apptainer", "singularity", "gpu", "slurm", "test"):
        if _block(profiles, name) is None:
            results.errors.append(LintError(1, f"no `{name}` profile"))
    gpu = _block(profiles, "gpu") or ""
    gpu_label = _block(gpu, r"withLabel:\s*'process_gpu'") or ""
    if not re.search(r"^\s*accelerator\s*=\s*1\s*$", gpu_label, re.MULTILINE):
        results.errors.append(LintError(1, "profile gpu: withLabel 'process_gpu' must set accelerator = 1"))
    # The image runs as a non-root user: Docker tasks need `-u $(id -u):$(id -g)` in both the
    # docker profile and the gpu profile (whose runOptions replaces the docker profile's).
    docker = _block(profiles, "docker") or ""
    if not re.search(r"^\s*docker\.runOptions\s*=\s*'-u \$\(id -u\):\$\(id -g\)'", docker, re.MULTILINE):
        results.errors.append(LintError(1, "profile docker: docker.runOptions must be '-u $(id -u):$(id -g)'"))
    for setting, value in (("docker.runOptions", "-u $(id -u):$(id -g) --gpus all"), ("apptainer.runOptions", "--nv"), ("singularity.runOptions", "--nv")):
        if not re.search(rf"^\s*{re.escape(setting)}\s*=\s*'{re.escape(value)}'", gpu, re.MULTILINE):
            results.errors.append(LintError(1, f"profile gpu: {setting} must be '{value}'"))
    slurm = _block(profiles, "slurm") or ""
    if not re.search(r"executor\s*=\s*'slurm'", slurm):
        results.errors.append(LintError(1, "profile slurm: executor = 'slurm' missing"))
    slurm_gpu = _block(slurm, r"withLabel:\s*'process_gpu'") or ""
    if not re.search(r"clusterOptions\s*=\s*\{[^}]*task\.accelerator[^}]*--gres=gpu:", slurm_gpu):
        results.errors.append(
            LintError(1, "profile slurm: process_gpu needs clusterOptions turning task.accelerator into --gres=gpu:N")
        )
    if not re.search(r"id\s+'nf-schema@2\.\d+\.\d+'", text):
        results.errors.append(LintError(1, "plugins: pin nf-schema 2.x (id 'nf-schema@2.x.y')"))
    declared = _config_params()
    schema = _schema_params()
    for name in sorted(declared ^ schema):
        where = "nextflow.config" if name in declared else "nextflow_schema.json"
        results.errors.append(LintError(1, f"param {name!r} is only in {where}; keep config and schema in step"))


@configrule
def base_labels(config: ConfigFile, results: LintResults):
    """conf/base.config defines every known label; GPUs are requested only by the gpu profile."""
    path = Path(config.path).resolve()
    if path != NEXTFLOW / "conf" / "base.config":
        return
    text = _strip_comments(path.read_text())
    for label in sorted(KNOWN_LABELS):
        if _block(text, rf"withLabel:\s*'{label}'") is None:
            results.errors.append(LintError(1, f"label {label!r} is not defined"))
    if re.search(r"\baccelerator\b", text):
        results.errors.append(LintError(1, "base.config must not request GPUs (profile gpu does)"))


# ---------------------------------------------------------------------------------------
# Source helpers
# ---------------------------------------------------------------------------------------

SECTION = re.compile(r"^\s*(input|output|when|script|stub|shell|exec)\s*:\s*(?://.*)?$")


def _skip_code(text, i, stop):
    """Index just past the `stop` character that closes code starting at i, skipping
    nested braces, strings and comments (used for `${...}` inside a GString)."""
    depth, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            i = text.find("\n", i) if text.find("\n", i) >= 0 else n
        elif text.startswith("/*", i):
            i = text.find("*/", i + 2) + 2 if text.find("*/", i + 2) >= 0 else n
        elif text[i] in "'\"":
            i = _skip_string(text, i)
        elif text[i] == "{":
            depth += 1
            i += 1
        elif text[i] == stop and depth == 0:
            return i + 1
        elif text[i] == "}":
            depth -= 1
            i += 1
        else:
            i += 1
    return n


def _skip_string(text, i):
    """Index just past the string literal starting at i ('...', "...", '''...''', \"\"\"...\"\"\")."""
    n = len(text)
    triple = text[i : i + 3] in ('"""', "'''")
    quote = text[i : i + 3] if triple else text[i]
    interpolate = quote[0] == '"'
    j = i + len(quote)
    while j < n:
        if text[j] == "\\":
            j += 2
        elif text.startswith(quote, j):
            return j + len(quote)
        elif interpolate and text.startswith("${", j):
            j = _skip_code(text, j + 2, "}")
        elif text[j] == "\n" and not triple:
            return j  # unterminated: stop at the end of the line
        else:
            j += 1
    return n


def _mask(text, strings=True):
    """Same length as text, comments (and, with strings=True, string literals, quotes
    included) replaced by spaces, newlines kept: braces can then be matched on code alone."""
    out = list(text)
    i, n = 0, len(text)

    def blank(start, end):
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            blank(i, end)
            i = end
        elif text[i] in "'\"":
            end = _skip_string(text, i)
            if strings:
                blank(i, end)
            i = max(end, i + 1)
        else:
            i += 1
    return "".join(out)


def _mask_strings_and_comments(text):
    return _mask(text, strings=True)


def _strip_comments(text):
    return _mask(text, strings=False)


def _matching_brace(masked, open_index):
    depth = 0
    for k in range(open_index, len(masked)):
        if masked[k] == "{":
            depth += 1
        elif masked[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return -1


def _block(text, head):
    """Body of the first `head {...}` block in text (head is a regex), or None."""
    masked = _mask_strings_and_comments(text)
    # find the head in the comment-free text (its strings intact), match braces on code only
    for match in re.finditer(rf"(?<![\w.]){head}\s*\{{", _strip_comments(text)):
        start = match.end() - 1
        end = _matching_brace(masked, start)
        if end > 0:
            return text[start + 1 : end]
    return None


def _processes_in_source(path):
    """(name, line, {section: text}) for every `process NAME { ... }` in a script."""
    text = path.read_text()
    masked = _mask_strings_and_comments(text)
    found = []
    for match in re.finditer(r"^[ \t]*process\s+(\w+)\s*\{", masked, re.MULTILINE):
        start = match.end() - 1
        end = _matching_brace(masked, start)
        if end < 0:
            continue
        body = text[start + 1 : end]
        body_masked = masked[start + 1 : end]
        sections = {}
        current = None
        for raw, code in zip(body.splitlines(), body_masked.splitlines()):
            head = SECTION.match(code)
            if head:
                current = head.group(1)
                sections[current] = ""
            elif current:
                sections[current] += raw + "\n"
        line = text.count("\n", 0, match.start()) + 1
        found.append((match.group(1), line, sections))
    return found


def _statements(section):
    """Non-empty, comment-free lines of an input/output section."""
    lines = []
    for raw in _strip_comments(section).splitlines():
        raw = raw.strip()
        if raw:
            lines.append(raw)
    return lines


def _schema_params():
    import json

    schema = json.loads((NEXTFLOW / "nextflow_schema.json").read_text())
    names = set()
    for group in schema.get("$defs", {}).values():
        names |= set(group.get("properties", {}))
    names |= set(schema.get("properties", {}))
    return names


def _config_params():
    text = _strip_comments((NEXTFLOW / "nextflow.config").read_text())
    block = _block(text, "params") or ""
    return set(re.findall(r"^\s*(\w+)\s*=", block, re.MULTILINE))
