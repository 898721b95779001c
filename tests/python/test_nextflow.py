"""Checks of the Nextflow pipeline and modules under nextflow/ that need no Nextflow runtime.

* reftrace lint with the repository's rules (nextflow/lint/rules.py): every .nf and .config
  file parses and follows them; mutated copies show that the rules do fire.
* check-jsonschema: nextflow_schema.json and assets/schema_input.json are valid draft 2020-12
  schemas; the test samplesheet passes the input schema and bad samplesheets do not.
* The modules' `script:` and `stub:` blocks are rendered the way Nextflow would (a small
  evaluator for the Groovy expressions they use) and run with bash against the real tilefeat
  binary (TILEFEAT_BIN, default target/release/tilefeat): `extract --dry-run` for each way the
  module can be called, a real extract of two tiny samples and a real join of their outputs
  (and the test profile's demo samples), each compared value for value with plain
  `tilefeat extract` / `tilefeat join` runs of the same samples. The module and the CLI
  therefore cannot drift apart. A missing binary or demo/tiles/ fails these tests (no skip).
* --model: a tiny TorchScript encoder made in the test (torch, no download) and its sidecar,
  staged as main.nf stages them, through both extract modules: byte for byte plain
  `tilefeat extract --model`, the model in the provenance; --model with --weights (or a
  non-default --layer) refused at start-up; the commands without --model unchanged.

nf-test (nextflow/**/tests/*.nf.test) and real Nextflow runs need the Nextflow runtime and are
not run here.
"""

import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zlib
from pathlib import Path

import pytest
import yaml

from conftest import make_archive

REPO = Path(__file__).resolve().parents[2]
NF = REPO / "nextflow"
EXTRACT_NF = NF / "modules" / "local" / "tilefeat" / "extract" / "main.nf"
JOIN_NF = NF / "modules" / "local" / "tilefeat" / "join" / "main.nf"
BATCH_NF = NF / "modules" / "local" / "tilefeat" / "extract_batch" / "main.nf"
TILEFEAT_BIN = Path(os.environ.get("TILEFEAT_BIN", REPO / "target" / "release" / "tilefeat"))


@pytest.fixture(scope="session")
def built_binary():
    """The binary must be there (CI builds it first): missing, the tests fail, never skip."""
    if not TILEFEAT_BIN.is_file():
        pytest.fail(
            f"tilefeat binary not built: {TILEFEAT_BIN} does not exist "
            "(scripts/setup.sh --no-demo, or set TILEFEAT_BIN)",
            pytrace=False,
        )
    return TILEFEAT_BIN


needs_binary = pytest.mark.usefixtures("built_binary")


def _load_rules():
    spec = importlib.util.spec_from_file_location("tilefeat_nextflow_rules", NF / "lint" / "rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RULES = _load_rules()


def _versions_env():
    return RULES._versions_env()


# ---------------------------------------------------------------------------------------
# reftrace lint
# ---------------------------------------------------------------------------------------


def _reftrace_lint(directory, rules):
    """`reftrace lint --rules RULES --directory DIR`, in-process (reftrace's own CLI)."""
    from click.testing import CliRunner
    from reftrace.cli.main import cli

    result = CliRunner().invoke(cli, ["lint", "--rules", str(rules), "--directory", str(directory)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["reftrace", "lint"], result.exit_code, result.output, "")


def test_reftrace_lint_passes():
    result = _reftrace_lint(NF, NF / "lint" / "rules.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "No issues found!" in output, output
    # every script and config was actually looked at
    assert "Linting Nextflow files" in output and "Linting config files" in output


def _copy_pipeline(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(NF, repo / "nextflow", ignore=shutil.ignore_patterns("work", ".nextflow*", ".nf-test*", "results", "__pycache__"))
    shutil.copy(REPO / "versions.env", repo / "versions.env")
    return repo


MUTATIONS = [
    # (file under nextflow/, text, replacement, message the lint must print)
    ("modules/local/tilefeat/extract/main.nf", "def device = task.accelerator ? 'cuda' : 'cpu'", "def device = 'cuda'", "--device"),
    ("modules/local/tilefeat/extract/main.nf", "def device = task.accelerator ? 'cuda' : 'cpu'", "def device = 'auto'", "--device"),
    ("modules/local/tilefeat/extract/main.nf", "--device ${device}", "--device cuda", "--device"),
    ("modules/local/tilefeat/extract/main.nf", "    val cache_dir\n", "    path cache_dir\n", "cache folder is shared"),
    ("modules/local/tilefeat/extract/main.nf", "    stub:\n", "    // no stub\n", "no `stub:` section"),
    ("modules/local/tilefeat/extract/main.nf", "    tag \"$meta.id\"\n", "", "exactly one tag"),
    ("modules/local/tilefeat/extract/main.nf", "label 'process_gpu'", "label 'gpu_please'", "is not one of"),
    ("modules/local/tilefeat/extract/main.nf", "tilefeat:0.1.0-cuda13.0-sif", "tilefeat:0.0.9-cuda13.0-sif", "Apptainer/Singularity image must be"),
    ("modules/local/tilefeat/extract/main.nf", "tilefeat:0.1.0-cpu", "tilefeat:latest", "neither"),
    ("modules/local/tilefeat/extract/main.nf", ", topic: versions, emit: versions_tilefeat", ", emit: versions_tilefeat", "topic: versions"),
    ("modules/local/tilefeat/extract/main.nf", "emit: rejected", "optional: true", "without `emit:`"),
    ("modules/local/tilefeat/extract/main.nf", "task.ext.when == null || task.ext.when", "true", "`when:` must be"),
    ("modules/local/tilefeat/extract/main.nf", "def args = task.ext.args ?: ''", "def args = params.extra ?: ''", "task.ext.args"),
    ("modules/local/tilefeat/extract/main.nf", "tuple val(meta), path(tiles)\n", "path tiles\n", "first input must be"),
    ("modules/local/tilefeat/join/main.nf", "    when:\n", "", "no `when:` section"),
    ("modules/local/tilefeat/join/main.nf", "workflow.containerEngine in ['singularity', 'apptainer']", "workflow.containerEngine == 'docker'", "condition must select"),
    ("main.nf", "include { TILEFEAT_JOIN          } from './modules/local/tilefeat/join/main'", "include { TILEFEAT_JOIN          } from './modules/local/tilefeat/joins/main'", "does not exist"),
    ("main.nf", "include { TILEFEAT_EXTRACT_BATCH } from './modules/local/tilefeat/extract_batch/main'", "include { TILEFEAT_EXTRACT_BATCHES } from './modules/local/tilefeat/extract_batch/main'", "is not defined in"),
    ("main.nf", "params.samples_per_task == 1", "params.tasks_per_sample == 1", "not in nextflow_schema.json"),
    ("modules/local/tilefeat/extract_batch/main.nf", "path(tiles, stageAs: 'tiles??/*')", "path(tiles)", "stage their tiles apart"),
    ("modules/local/tilefeat/extract_batch/main.nf", "def device = task.accelerator ? 'cuda' : 'cpu'", "def device = 'auto'", "--device"),
    ("modules/local/tilefeat/extract_batch/main.nf", ", topic: versions, emit: versions_tilefeat", ", emit: versions_tilefeat", "topic: versions"),
    ("modules/local/tilefeat/extract_batch/main.nf", "    stub:\n", "    // no stub\n", "no `stub:` section"),
    ("main.nf", "params.cohort_id", "params.cohort_name", "not in nextflow_schema.json"),
    ("main.nf", "TILEFEAT_JOIN( ch_join_input )", "TILEFEAT_JOIN( ch_join_input ", "Failed to parse"),
    ("nextflow.config", "                accelerator = 1\n", "", "accelerator = 1"),
    ("nextflow.config", "docker.runOptions      = '-u $(id -u):$(id -g) --gpus all'", "docker.runOptions      = '--gpus all'", "docker.runOptions"),
    ("nextflow.config", "docker.runOptions   = '-u $(id -u):$(id -g)'", "docker.fixOwnership = true", "profile docker: docker.runOptions"),
    ("nextflow.config", "--gres=gpu:", "--gpus=", "--gres=gpu:N"),
    ("nextflow.config", "    aggregate    = 'none'\n", "", "only in nextflow_schema.json"),
    ("nextflow.config", "    samples_per_task = 1", "    samples_per_tasks = 1", "only in nextflow.config"),
    ("conf/modules.config", "ext.format = { params.cohort_format }", "ext.format = params.cohort_format", "outside a closure"),
    ("conf/modules.config", "ext.args   = { \"--aggregate ${params.aggregate}\" }", "ext.args   = \"--aggregate ${params.aggregate}\"", "outside a closure"),
    ("conf/base.config", "withLabel: 'process_gpu'", "withLabel: 'process_gpus'", "'process_gpu' is not defined"),
]


@pytest.mark.parametrize("relative, old, new, message", MUTATIONS, ids=[f"{m[0]}:{m[3]}" for m in MUTATIONS])
def test_reftrace_lint_catches(tmp_path, relative, old, new, message):
    repo = _copy_pipeline(tmp_path)
    target = repo / "nextflow" / relative
    text = target.read_text()
    assert old in text, f"mutation no longer applies: {old!r} not in {relative} (update MUTATIONS)"
    target.write_text(text.replace(old, new, 1))
    result = _reftrace_lint(repo / "nextflow", repo / "nextflow" / "lint" / "rules.py")
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"lint passed a broken {relative}:\n{output}"
    assert message in output, output


# ---------------------------------------------------------------------------------------
# JSON schemas
# ---------------------------------------------------------------------------------------


def _check_jsonschema(*args):
    return subprocess.run([sys.executable, "-m", "check_jsonschema", *args], capture_output=True, text=True, timeout=120)


def test_schemas_are_valid_draft_2020_12():
    for schema in (NF / "nextflow_schema.json", NF / "assets" / "schema_input.json"):
        assert json.loads(schema.read_text())["$schema"] == "https://json-schema.org/draft/2020-12/schema", schema
    result = _check_jsonschema("--check-metaschema", str(NF / "nextflow_schema.json"), str(NF / "assets" / "schema_input.json"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_metaschema_rejects_a_broken_schema(tmp_path):
    schema = json.loads((NF / "nextflow_schema.json").read_text())
    schema["$defs"]["extraction_options"]["properties"]["batch_size"]["type"] = "int"  # not a JSON Schema type
    broken = tmp_path / "nextflow_schema.json"
    broken.write_text(json.dumps(schema))
    result = _check_jsonschema("--check-metaschema", str(broken))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Schema validation errors were encountered." in output, output
    assert "extraction_options.properties.batch_size.type: 'int' is not" in output, output


def _samplesheet_as_json(csv_path, out):
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    out.write_text(json.dumps(rows))
    return rows


def _validate_samplesheet(csv_path, tmp_path):
    data = tmp_path / (Path(csv_path).stem + ".json")
    rows = _samplesheet_as_json(csv_path, data)
    result = _check_jsonschema("--schemafile", str(NF / "assets" / "schema_input.json"), str(data))
    return rows, result


def test_test_samplesheet_validates(tmp_path):
    rows, result = _validate_samplesheet(NF / "assets" / "test_samplesheet.csv", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = [row["sample"] for row in rows]
    assert samples == ["sampleA", "sampleB"]
    # nf-schema's uniqueEntries is not a JSON Schema keyword: check it here
    assert len(set(samples)) == len(samples)
    # relative tile paths are resolved against the samplesheet's folder (main.nf)
    for row in rows:
        resolved = ((NF / "assets") / row["tiles"]).resolve()
        assert resolved == REPO / "demo" / "tiles" / row["sample"], resolved


def _require_demo_tiles():
    if not (REPO / "demo" / "tiles").is_dir():
        pytest.fail("demo/tiles/ is missing: it is tracked in git (git checkout -- demo/tiles)", pytrace=False)


def test_test_samplesheet_tiles_exist():
    _require_demo_tiles()
    with open(NF / "assets" / "test_samplesheet.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            folder = ((NF / "assets") / row["tiles"]).resolve()
            assert folder.is_dir(), f"{row['sample']}: {folder} is not a folder"
            assert any(p.is_file() for p in folder.rglob("*")), f"{row['sample']}: {folder} holds no files"


@pytest.mark.parametrize(
    "content, message",
    [
        ("sample,tiles\nsample A,demo/tiles/a\n", "$[0].sample: 'sample A' does not match"),  # space in the ID
        ("sample,tiles\n-a,demo/tiles/a\n", "$[0].sample: '-a' does not match"),  # ID starting with '-'
        ("sample,tiles\nsampleA,\n", "$[0].tiles: '' does not match"),  # no tile folder
        ("sample,tiles,extra\nsampleA,demo/tiles/a,x\n", "('extra' was unexpected)"),  # unknown column
        ("sample,tiles\n", "$: [] should be non-empty"),  # no sample at all
        ("id,tiles\nsampleA,demo/tiles/a\n", "$[0]: 'sample' is a required property"),  # wrong header
    ],
    ids=["space-in-id", "leading-dash", "no-tiles", "unknown-column", "no-sample", "wrong-header"],
)
def test_bad_samplesheets_are_rejected(tmp_path, content, message):
    sheet = tmp_path / "bad.csv"
    sheet.write_text(content)
    _, result = _validate_samplesheet(sheet, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"exit {result.returncode} for:\n{content}\n{output}"
    assert "Schema validation errors were encountered." in output, output
    assert message in output, output


def _config_param_defaults():
    text = RULES._strip_comments((NF / "nextflow.config").read_text())
    block = RULES._block(text, "params")
    defaults = {}
    for name, value in re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", block, re.MULTILINE):
        if value == "null":
            defaults[name] = None
        elif re.fullmatch(r"-?\d+", value):
            defaults[name] = int(value)
        elif value in ("true", "false"):
            defaults[name] = value == "true"
        else:
            match = re.fullmatch(r"'([^']*)'", value)
            assert match, f"nextflow.config: params.{name} = {value}: not a simple literal"
            defaults[name] = match.group(1)
    return defaults


def _schema_properties():
    schema = json.loads((NF / "nextflow_schema.json").read_text())
    properties = {}
    for group in schema["$defs"].values():
        properties.update(group["properties"])
    refs = {item["$ref"] for item in schema["allOf"]}
    assert refs == {f"#/$defs/{name}" for name in schema["$defs"]}, "every $defs group must be in allOf"
    return properties


def test_schema_and_config_agree():
    defaults = _config_param_defaults()
    properties = _schema_properties()
    assert set(defaults) == set(properties)
    for name, value in defaults.items():
        assert properties[name].get("default") == value, f"{name}: config default {value!r}, schema {properties[name].get('default')!r}"
    # the test profile's values are valid too
    test_config = (NF / "conf" / "test.config").read_text()
    assert re.search(r"weights\s*=\s*'random:0'", test_config)
    assert re.search(r"input\s*=\s*\"\$\{projectDir\}/assets/test_samplesheet.csv\"", test_config)


@pytest.mark.parametrize(
    "overrides, error",
    [
        # error: None when the values are valid, else what check-jsonschema must say
        ({}, None),
        ({"weights": "random:0", "cache_dir": "/shared/cache", "precision": "bf16", "aggregate": "mean"}, None),
        ({"weights": "/data/resnet50-0676ba61.pth"}, None),
        ({"weights": "random:x"}, "$.weights: 'random:x' does not match"),
        ({"precision": "fp8"}, "$.precision: 'fp8' is not one of"),
        ({"layer": "layer2"}, "$.layer: 'layer2' is not one of"),
        ({"aggregate": "median"}, "$.aggregate: 'median' is not one of"),
        ({"batch_size": 0}, "$.batch_size: 0 is less than the minimum of 1"),
        ({"cache_dir": "relative/cache"}, "$.cache_dir: 'relative/cache' does not match '^/'"),
        ({"cohort_id": "my cohort"}, "$.cohort_id: 'my cohort' does not match"),
        ({"samples_per_task": 8, "format": "h5", "cohort_format": "parquet"}, None),
        ({"format": "parquet"}, None),
        ({"model": "/data/encoders/uni.pt"}, None),
        ({"model": ""}, "$.model: '' does not match"),
        ({"samples_per_task": 0}, "$.samples_per_task: 0 is less than the minimum of 1"),
        ({"samples_per_task": 1.5}, "$.samples_per_task: 1.5 is not of type 'integer'"),
        ({"format": "tsv"}, "$.format: 'tsv' is not one of"),
        ({"cohort_format": "h5"}, "$.cohort_format: 'h5' is not one of"),
    ],
)
def test_parameter_schema_checks_values(tmp_path, overrides, error):
    params = {name: value for name, value in _config_param_defaults().items() if value is not None}
    params.update(overrides)
    document = tmp_path / "params.json"
    document.write_text(json.dumps(params))
    result = _check_jsonschema("--schemafile", str(NF / "nextflow_schema.json"), str(document))
    output = result.stdout + result.stderr
    if error is None:
        assert result.returncode == 0, output
    else:
        assert result.returncode == 1, output
        assert "Schema validation errors were encountered." in output, output
        assert error in output, output


def test_container_and_manifest_versions_match_versions_env():
    env = _versions_env()
    version, cuda = env["TILEFEAT_VERSION"], env["CUDA_VERSION"]
    for module in (EXTRACT_NF, BATCH_NF, JOIN_NF):
        images = re.findall(r"(?:oras://)?ghcr\.io/tilefeat/tilefeat:[\w.-]+", module.read_text())
        assert images, module
        for image in images:
            assert image in (
                f"oras://ghcr.io/tilefeat/tilefeat:{version}-cuda{cuda}-sif",
                f"ghcr.io/tilefeat/tilefeat:{version}-cuda{cuda}",
                f"ghcr.io/tilefeat/tilefeat:{version}-cpu",
            ), image
    manifest = RULES._block(RULES._strip_comments((NF / "nextflow.config").read_text()), "manifest")
    assert re.search(rf"version\s*=\s*'{re.escape(version)}'", manifest)


# ---------------------------------------------------------------------------------------
# Rendering module scripts as Nextflow would
# ---------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")
      | (?P<op>\?:|==|!=|\|\||&&|->|[?:()\[\],!{}.])
      | (?P<num>\d+)
      | (?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)
    )""",
    re.VERBOSE,
)

# Methods the evaluator knows: list.join(sep), list.collect { x -> expression },
# list.findAll { x -> expression }, value.toString(), value.startsWith(prefix).
_METHODS = ("join", "collect", "findAll", "toString", "startsWith", "endsWith")
# Types `instanceof` knows.
_TYPES = {"List": list, "Map": dict, "String": str}


class GroovyError(Exception):
    pass


class StagedPath(str):
    """A staged input as a module's script sees it (Nextflow's TaskPath): its text is the
    name it was staged as, a `stageAs` folder included (`inputs/a.csv`); so is `.name`
    (TaskPath.getName() returns that alias); `.fileName.name` is its last part."""

    @property
    def name(self):
        return str(self)

    @property
    def fileName(self):  # noqa: N802 (Groovy's name)
        return type("FileName", (), {"name": Path(str(self)).name})()


def _truthy(value):
    return value not in (None, "", [], {}, 0, False)


def _lookup(dotted, ctx):
    head, *rest = dotted.split(".")
    if head not in ctx:
        raise GroovyError(f"unknown name {head!r} (add it to the test context)")
    value = ctx[head]
    for part in rest:
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _groovy_str(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_groovy_str(v) for v in value) + "]"
    return str(value)


def _interpolate(body, ctx, triple=False):
    """A GString's text: escapes and ${...} / $name interpolation, as Groovy does it."""
    out, i, n = [], 0, len(body)
    escapes = {"n": "\n", "t": "\t", "\\": "\\", "$": "$", "'": "'", '"': '"'}
    while i < n:
        c = body[i]
        if c == "\\" and i + 1 < n:
            if body[i + 1] == "\n" and triple:  # line continuation
                i += 2
                continue
            if body[i + 1] not in escapes:
                raise GroovyError(f"unsupported escape \\{body[i + 1]}")
            out.append(escapes[body[i + 1]])
            i += 2
        elif body.startswith("${", i):
            end = RULES._skip_code(body, i + 2, "}")
            out.append(_groovy_str(evaluate(body[i + 2 : end - 1], ctx)))
            i = end
        elif c == "$":
            match = re.match(r"\$([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", body[i:])
            if not match:
                raise GroovyError(f"stray $ in {body[i:i + 20]!r}")
            out.append(_groovy_str(_lookup(match.group(1), ctx)))
            i += match.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _tokenize(expression):
    tokens, pos = [], 0
    expression = expression.strip()
    while pos < len(expression):
        match = _TOKEN.match(expression, pos)
        if not match or match.end() == pos:
            raise GroovyError(f"cannot parse {expression[pos:]!r} in {expression!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(expression) and expression[pos].isspace():
            pos += 1
    return tokens


class _Parser:
    """Recursive descent over the tokens of one expression (or of a closure's body)."""

    def __init__(self, tokens, ctx, source):
        self.tokens, self.ctx, self.source, self.index = tokens, ctx, source, 0

    def peek(self):
        return self.tokens[self.index] if self.index < len(self.tokens) else (None, None)

    def take(self, value=None):
        token = self.peek()
        if value is not None and token[1] != value:
            raise GroovyError(f"expected {value!r}, got {token[1]!r} in {self.source!r}")
        self.index += 1
        return token

    def parse(self):
        result = self.expr()
        if self.index != len(self.tokens):
            raise GroovyError(f"trailing {self.tokens[self.index:]} in {self.source!r}")
        return result

    def expr(self):
        left = self.or_expr()
        if self.peek() == ("op", "?:"):
            self.take()
            right = self.expr()
            return left if _truthy(left) else right
        if self.peek() == ("op", "?"):
            self.take()
            yes = self.expr()
            self.take(":")
            no = self.expr()
            return yes if _truthy(left) else no
        return left

    def or_expr(self):
        value = self.and_expr()
        while self.peek() == ("op", "||"):
            self.take()
            other = self.and_expr()
            value = _truthy(value) or _truthy(other)
        return value

    def and_expr(self):
        value = self.eq_expr()
        while self.peek() == ("op", "&&"):
            self.take()
            other = self.eq_expr()
            value = _truthy(value) and _truthy(other)
        return value

    def eq_expr(self):
        value = self.unary()
        if self.peek() in (("op", "=="), ("op", "!=")):
            op = self.take()[1]
            other = self.unary()
            return (value == other) if op == "==" else (value != other)
        if self.peek() == ("name", "instanceof"):
            self.take()
            kind = self.take()[1]
            if kind not in _TYPES:
                raise GroovyError(f"instanceof {kind}: unknown type in {self.source!r}")
            return isinstance(value, _TYPES[kind])
        return value

    def unary(self):
        if self.peek() == ("op", "!"):
            self.take()
            return not _truthy(self.unary())
        return self.postfix(self.primary())

    def postfix(self, value):
        """`.method(...)` / `.method { ... }` after a value."""
        while self.peek() == ("op", "."):
            self.take()
            kind, method = self.take()
            if kind != "name" or method not in _METHODS:
                raise GroovyError(f"method .{method} not supported in {self.source!r}")
            value = self.call(value, method)
        return value

    def call(self, target, method):
        if method == "join" and self.peek() == ("op", "("):
            self.take("(")
            separator = self.expr()
            self.take(")")
            return separator.join(_groovy_str(v) for v in target)
        if method == "toString" and self.peek() == ("op", "("):
            self.take("(")
            self.take(")")
            return _groovy_str(target)  # null.toString() is 'null' in Groovy too
        if method in ("startsWith", "endsWith") and self.peek() == ("op", "("):
            self.take("(")
            affix = self.expr()
            self.take(")")
            return str(target).startswith(affix) if method == "startsWith" else str(target).endswith(affix)
        if method in ("collect", "findAll") and self.peek() == ("op", "{"):
            self.take("{")
            kind, parameter = self.take()
            if kind != "name" or "." in parameter:
                raise GroovyError(f"closure parameter expected, got {parameter!r} in {self.source!r}")
            self.take("->")
            start, depth = self.index, 0
            while not (self.peek() == ("op", "}") and depth == 0):
                if self.peek() == (None, None):
                    raise GroovyError(f"unclosed closure in {self.source!r}")
                depth += {"{": 1, "}": -1}.get(self.peek()[1], 0) if self.peek()[0] == "op" else 0
                self.index += 1
            body = self.tokens[start : self.index]
            self.take("}")
            results = [_Parser(body, {**self.ctx, parameter: item}, self.source).parse() for item in target]
            if method == "findAll":
                return [item for item, keep in zip(target, results) if _truthy(keep)]
            return results
        raise GroovyError(f"method call .{method}{self.peek()[1]}...: not supported in {self.source!r}")

    def primary(self):
        kind, value = self.take()
        if kind == "str":
            body = value[1:-1]
            return _interpolate(body, self.ctx) if value[0] == '"' else re.sub(r"\\(.)", r"\1", body)
        if kind == "num":
            return int(value)
        if kind == "name":
            if value in ("null", "true", "false"):
                return {"null": None, "true": True, "false": False}[value]
            head, _, method = value.rpartition(".")
            if head and method in _METHODS and self.peek() in (("op", "("), ("op", "{")):
                return self.call(_lookup(head, self.ctx), method)
            if self.peek() == ("op", "("):
                raise GroovyError(f"method call {value}(...) not supported")
            return _lookup(value, self.ctx)
        if value == "(":
            inner = self.expr()
            self.take(")")
            return inner
        if value == "[":
            items = []
            while self.peek() != ("op", "]"):
                items.append(self.expr())
                if self.peek() == ("op", ","):
                    self.take()
            self.take("]")
            return items
        raise GroovyError(f"unexpected {value!r} in {self.source!r}")


def evaluate(expression, ctx):
    """Evaluate the small Groovy subset the modules and conf/modules.config's ext.args use:
    literals, GStrings, names, ?: (elvis), ? : (ternary), ||, &&, ==, !=, !,
    instanceof List|Map|String, (...), [...], list.join(sep), list.collect { x -> expression },
    list.findAll { x -> expression }, value.toString() and value.startsWith(prefix)."""
    return _Parser(_tokenize(expression), ctx, expression.strip()).parse()


def _section(module_path, section):
    processes = RULES._processes_in_source(module_path)
    assert len(processes) == 1, module_path
    return processes[0][2][section]


def render(module_path, section, ctx, overrides=None):
    """The bash script Nextflow would run for `section` (script or stub) of the module."""
    text = _section(module_path, section)
    start = text.index('"""')
    end = text.rindex('"""')
    assert end > start, f"{module_path} {section}: no triple-quoted script"
    ctx = dict(ctx)
    overrides = overrides or {}
    for raw in text[:start].splitlines():
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        match = re.fullmatch(r"def\s+(\w+)\s*=\s*(.+)", line)
        if not match:
            raise GroovyError(f"{module_path} {section}: unsupported statement {line!r} (teach the test about it)")
        name, expression = match.groups()
        ctx[name] = overrides[name] if name in overrides else evaluate(expression, ctx)
    unused = set(overrides) - set(ctx)
    assert not unused, f"overrides for variables the module no longer defines: {unused}"
    return textwrap.dedent(_interpolate(text[start + 3 : end], ctx, triple=True)).strip() + "\n"


def _output_globs(module_path):
    """{emit name: glob} of the module's path outputs, in their order."""
    outputs = _section(module_path, "output")
    found = re.findall(r'path\("([^"]+)"\)[^\n]*?\bemit:\s*(\w+)', outputs)
    assert found, module_path
    return {emit: pattern for pattern, emit in found}


def _glob(folder, pattern):
    """The files of a task folder an output glob matches, as Nextflow matches them (Java
    glob: `{a,b}` alternatives; `*` does not cross `/`; hidden files left out)."""
    match = re.fullmatch(r"(.*)\{([^{}]*)\}(.*)", pattern)
    patterns = [match.group(1) + alt + match.group(3) for alt in match.group(2).split(",")] if match else [pattern]
    # staged inputs (symlinks here) are left out, as Nextflow leaves them out (includeInputs: false)
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if not p.name.startswith(".") and not p.is_symlink()})


def _task(meta_id, process, args="", accelerator=None, cpus=2, prefix=None, format=None):
    return {
        "meta": {"id": meta_id},
        "task": {
            "ext": {"args": args, "prefix": prefix, "when": None, "format": format},
            "cpus": cpus,
            "accelerator": accelerator,
            "process": process,
        },
    }


def test_renderer_evaluates_groovy():
    ctx = {"a": "", "b": "x", "task": {"accelerator": None, "ext": {}}, "xs": ["p", "q"]}
    assert evaluate("a ?: 'd'", ctx) == "d"
    assert evaluate("b ?: 'd'", ctx) == "x"
    assert evaluate("task.accelerator ? 'cuda' : 'cpu'", ctx) == "cpu"
    assert evaluate("task.ext.prefix ?: \"${b}-y\"", ctx) == "x-y"
    assert evaluate("task.ext.when == null || task.ext.when", ctx) is True
    assert evaluate("xs.join(' ')", ctx) == "p q"
    # closures, postfix calls and instanceof, as TILEFEAT_EXTRACT_BATCH and TILEFEAT_JOIN use them
    ctx.update({"meta": {"samples": [{"id": "s1"}, {"id": "s2"}]}, "one": StagedPath("inputs/a.csv")})
    assert evaluate("meta.samples.collect { s -> \"--sample '${s.id}'\" }.join(' ')", ctx) == "--sample 's1' --sample 's2'"
    assert evaluate("xs instanceof List ? xs : [xs]", ctx) == ["p", "q"]
    assert evaluate("(one instanceof List ? one : [one]).collect { f -> \"${f}\" }", ctx) == ["inputs/a.csv"]
    assert evaluate("[one].collect { f -> f.name }", ctx) == ["inputs/a.csv"]  # TaskPath.name: the staged name
    assert evaluate("[one].collect { f -> f.fileName.name }", ctx) == ["a.csv"]
    assert evaluate("xs.collect { x -> [x, xs.collect { y -> y }] }", ctx) == [["p", ["p", "q"]], ["q", ["p", "q"]]]
    # findAll, toString and startsWith, as conf/modules.config's ext.args and the extract modules use them
    assert evaluate("[ a, b, 'c' ].findAll { x -> x }.join(' ')", ctx) == "x c"
    ctx.update({"params": {"weights": "random:3", "model": None, "size": 224}})
    assert evaluate("(params.weights && params.weights.toString().startsWith('random:')) ? 'r' : ''", ctx) == "r"
    assert evaluate("params.model.toString().startsWith('random:')", ctx) is False  # null.toString() is 'null'
    assert evaluate("(params.model && params.size == 224) ? '' : 'sized'", ctx) == "sized"
    assert _interpolate("a \\\\\n \\$HOME ${b} $b\\tz", ctx, triple=True) == "a \\\n $HOME x x\tz"
    with pytest.raises(GroovyError):
        evaluate("b.toUpperCase()", ctx)
    with pytest.raises(GroovyError):
        evaluate("xs.collect { x -> x }.unique()", ctx)


# ---------------------------------------------------------------------------------------
# Extract and join scripts against the real binary
# ---------------------------------------------------------------------------------------


def _png(path, width=48, height=40, seed=0):
    """A small RGB PNG, written without any imaging library."""
    rows = b"".join(
        b"\x00" + bytes(((x * 7 + y * 3 + seed * 50) % 256, (x * y + seed) % 256, (x + 2 * y) % 256)[c] for x in range(width) for c in range(3))
        for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Two samples of tiny tiles (one in a sub-folder: tile folders are searched recursively)."""
    root = tmp_path_factory.mktemp("tiles")
    for s, sample in enumerate(("sampleA", "sampleB")):
        folder = root / sample
        (folder / "sub").mkdir(parents=True)
        _png(folder / "t0.png", seed=s)
        _png(folder / "sub" / "t1.png", seed=s + 2)
    return root


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
    """A PATH folder holding `tilefeat` (the modules call it by that name)."""
    folder = tmp_path_factory.mktemp("bin")
    (folder / "tilefeat").symlink_to(TILEFEAT_BIN.resolve())
    return folder


def _run_task(script, workdir, bin_dir, timeout=300):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".command.sh").write_text("#!/bin/bash -ue\n" + script)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("TILEFEAT_CACHE_DIR", None)
    env.pop("TILEFEAT_WEIGHTS", None)
    return subprocess.run(
        ["bash", "-ue", "-o", "pipefail", ".command.sh"], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


def _stage(workdir, name, target):
    """Nextflow stages path inputs as symlinks in the task folder."""
    link = workdir / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _modules_config_args(process, params, meta=None):
    """The task.ext.args conf/modules.config gives `process`, for these params and the task's
    meta (default: a tile folder, meta.slide false): its ext.args closure evaluated as Groovy
    would (--weights only for random:SEED; with a --model, the ResNet50's defaults left out;
    the slide flags for slides only), and every flag it can pass (each `"--flag ${params.x}"`)."""
    text = RULES._strip_comments((NF / "conf" / "modules.config").read_text())
    block = RULES._block(text, rf"withName:\s*'{process}'")
    assert block is not None, f"conf/modules.config has no withName: '{process}'"
    ext_args = re.search(r"ext\.args\s*=\s*\{(.*?)\}\s*\n\s*(?:ext\.|containerOptions|publishDir)", block, re.DOTALL)
    assert ext_args, f"{process}: ext.args closure not found"
    pairs = re.findall(r'"(--[a-z][\w-]*) \$\{params\.(\w+)\}"', ext_args.group(1))
    assert pairs, f"{process}: no flags in ext.args"
    for flag, param in pairs:
        # a param without a default is passed only when set (`params.X ? "--flag ${params.X}" : ''`)
        optional = f'params.{param} ? "{flag} ${{params.{param}}}" : \'\'' in ext_args.group(1)
        # a slide flag: passed to slides only, and only when set
        slide_only = f'(meta.slide && params.{param} != null) ? "{flag} ${{params.{param}}}" : \'\'' in ext_args.group(1)
        assert param == "weights" or optional or slide_only or params[param] is not None, f"{process}: {flag} reads params.{param}, which has no default"
    args = evaluate(ext_args.group(1), {"params": params, "meta": meta or {"slide": False}})
    assert isinstance(args, str), f"{process}: ext.args gives {args!r}, not a string"
    return args, [flag for flag, _ in pairs]


def _extract_ctx(tiles_name, args, accelerator=None, weights=None, cache_dir="", staged=None, model=None, model_sidecar=None):
    """Context of TILEFEAT_EXTRACT for sample `tiles_name`, its tiles staged as `staged`
    (default: a folder named like the sample); weights, model and model_sidecar are the staged
    files' names ([] when not given, as main.nf passes them)."""
    ctx = _task(tiles_name, "TILEFEAT:TILEFEAT_EXTRACT", args=args, accelerator=accelerator)
    ctx.update({
        "tiles": staged or tiles_name, "weights": weights if weights is not None else [],
        "model": model or [], "model_sidecar": model_sidecar or [], "cache_dir": cache_dir,
    })  # fmt: skip
    return ctx


def _default_params(**overrides):
    params = _config_param_defaults()
    params.update(overrides)
    return params


EXTRACT_SCENARIOS = {
    # name: (params overrides, accelerator, staged weights, use cache)
    "defaults-random-weights": ({"weights": "random:0"}, None, None, False),
    "non-default-options": (
        {"weights": "random:1", "precision": "bf16", "layer": "layer3", "pool": "avg", "normalize": "imagenet", "size": 64, "batch_size": 3, "on_error": "skip"},
        None,
        None,
        False,
    ),
    "shared-cache-dir": ({"weights": "random:0"}, None, None, True),
    "weights-input-branch": ({"weights": None}, None, "random:7", False),
}


@needs_binary
@pytest.mark.parametrize("scenario", list(EXTRACT_SCENARIOS))
def test_extract_script_dry_run(tmp_path, tiles, bin_dir, scenario):
    overrides, accelerator, weights, use_cache = EXTRACT_SCENARIOS[scenario]
    args, _ = _modules_config_args("TILEFEAT_EXTRACT", _default_params(**overrides))
    cache_dir = str(tmp_path / "feature cache") if use_cache else ""
    if use_cache:
        Path(cache_dir).mkdir()
    ctx = _extract_ctx("sampleA", args + " --dry-run", accelerator=accelerator, weights=weights, cache_dir=cache_dir)
    script = render(EXTRACT_NF, "script", ctx)
    assert "--device cpu" in script and "--device cuda" not in script
    assert "--threads 2" in script and "--sample 'sampleA'" in script
    assert ("--cache-dir" in script) == use_cache and ("--no-cache" in script) != use_cache
    work = tmp_path / "work"
    work.mkdir()
    _stage(work, "sampleA", tiles / "sampleA")
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"


@needs_binary
def test_extract_script_asks_cuda_only_with_accelerator(tmp_path, tiles, bin_dir):
    args, _ = _modules_config_args("TILEFEAT_EXTRACT", _default_params(weights="random:0"))
    script = render(EXTRACT_NF, "script", _extract_ctx("sampleA", args + " --dry-run", accelerator={"request": 1}))
    assert "--device cuda" in script and "--device cpu" not in script
    work = tmp_path / "work"
    work.mkdir()
    _stage(work, "sampleA", tiles / "sampleA")
    result = _run_task(script, work, bin_dir)
    # clap must accept the command line; on a machine without a GPU the answer is exit 5
    # (device unavailable, saying so), never 2 (usage error) or a crash
    if result.returncode == 5:
        assert "tilefeat: error: --device cuda: CUDA is not available" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        assert "dry run: sample sampleA" in result.stdout and "; device cuda:" in result.stdout, result.stdout


@needs_binary
def test_cli_accepts_every_flag_and_value_the_pipeline_uses(bin_dir):
    extract_help = subprocess.run([str(TILEFEAT_BIN), "extract", "--help"], capture_output=True, text=True, timeout=60)
    join_help = subprocess.run([str(TILEFEAT_BIN), "join", "--help"], capture_output=True, text=True, timeout=60)
    assert extract_help.returncode == 0 and join_help.returncode == 0
    _, extract_flags = _modules_config_args("TILEFEAT_EXTRACT", _default_params())
    _, join_flags = _modules_config_args("TILEFEAT_JOIN", _default_params())
    module_extract = set(re.findall(r"--[a-z][\w-]*", _section(EXTRACT_NF, "script")))
    module_extract |= set(re.findall(r"--[a-z][\w-]*", _section(BATCH_NF, "script")))
    # --format (the batch module, for h5 and parquet) comes with the output formats:
    # test_cli_accepts_the_output_formats checks it
    module_extract -= {"--format"}
    module_join = set(re.findall(r"--[a-z][\w-]*", _section(JOIN_NF, "script")))
    for flag in set(extract_flags) | module_extract:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", extract_help.stdout), f"tilefeat extract has no {flag}"
    for flag in set(join_flags) | module_join:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", join_help.stdout), f"tilefeat join has no {flag}"
    # the schema's choices are exactly the CLI's
    properties = _schema_properties()
    for param, flag, help_text in (
        ("precision", "--precision", extract_help.stdout),
        ("layer", "--layer", extract_help.stdout),
        ("pool", "--pool", extract_help.stdout),
        ("normalize", "--normalize", extract_help.stdout),
        ("on_error", "--on-error", extract_help.stdout),
        ("aggregate", "--aggregate", join_help.stdout),
    ):
        assert set(properties[param]["enum"]) == _possible_values(help_text, flag), param


def _possible_values(help_text, flag):
    """Values clap lists for a flag: `[possible values: a, b]` or a `Possible values:` list."""
    # a flag's line is indented by 2 to 6 spaces; its description (which may wrap onto a line
    # starting with another flag's name) by more
    match = re.search(
        rf"^ {{2,6}}(?:-\w, )?{re.escape(flag)}\b.*?(?=^ {{2,6}}(?:-\w, )?--[a-z]|\Z)", help_text, re.MULTILINE | re.DOTALL
    )
    assert match, f"{flag} not in help"
    block = match.group(0)
    inline = re.search(r"\[possible values: ([^\]]+)\]", block)
    if inline:
        return {value.strip() for value in inline.group(1).split(",")}
    listed = re.findall(r"^\s*- (\w[\w-]*)", block, re.MULTILINE)
    assert listed, f"no possible values for {flag}:\n{block}"
    return set(listed)


@needs_binary
def test_versions_eval_prints_the_version(tmp_path, bin_dir):
    env = _versions_env()
    for module in (EXTRACT_NF, BATCH_NF, JOIN_NF):
        command = re.search(r"eval\(\"(.+?)\"\)", _section(module, "output")).group(1)
        result = _run_task(command + "\n", tmp_path / module.parent.name, bin_dir)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == env["TILEFEAT_VERSION"], result.stdout


def _collect_outputs(work, module_path, what):
    """{emit name: file} of a finished task: each path output must match exactly one file."""
    found = {}
    outputs = _section(module_path, "output")
    for emit, pattern in _output_globs(module_path).items():
        matches = _glob(work, pattern)
        optional = re.search(rf'path\("{re.escape(pattern)}"\), optional: true, emit: {emit}\b', outputs)
        if optional and not matches:
            continue
        assert len(matches) == 1, f"{what}: output path({pattern!r}) ({emit}) matched {matches}"
        found[emit] = matches[0]
    return found


def _ext_format_param(process):
    """The param conf/modules.config gives `process` as ext.format (`ext.format = { params.X }`)."""
    text = RULES._strip_comments((NF / "conf" / "modules.config").read_text())
    block = RULES._block(text, rf"withName:\s*'{process}'")
    assert block is not None, f"conf/modules.config has no withName: '{process}'"
    match = re.search(r"^\s*ext\.format\s*=\s*\{\s*params\.(\w+)\s*\}\s*$", block, re.MULTILINE)
    assert match, f"{process}: no `ext.format = {{ params.X }}` in conf/modules.config"
    return match.group(1)


def _extract_one(tmp_path, bin_dir, sample, folder, params):
    """TILEFEAT_EXTRACT's script for one sample, for real, in a Nextflow-like task folder (its
    tile folder or archive staged as a symlink of the same name, as Nextflow stages a path
    input), with conf/modules.config's ext.args and ext.format for `params`.
    Returns {emit name: file}."""
    args, _ = _modules_config_args("TILEFEAT_EXTRACT", params)
    format = params[_ext_format_param("TILEFEAT_EXTRACT")]
    work = tmp_path / f"extract-{sample}"
    work.mkdir()
    _stage(work, folder.name, folder)
    ctx = _extract_ctx(sample, args, staged=folder.name)
    ctx["task"]["ext"]["format"] = format
    script = render(EXTRACT_NF, "script", ctx)
    assert f"tilefeat extract \\\n    {folder.name} \\\n" in script, script
    assert f"--output {sample}.{format} " in script, script
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    found = _collect_outputs(work, EXTRACT_NF, sample)
    assert found["features"].name == f"{sample}.{format}"
    assert found["provenance"].name == f"{sample}.provenance.yaml"
    assert found["rejected"].read_text().splitlines()[0] == "tile\treason"
    return found


def _join(work, bin_dir, outputs, params):
    """TILEFEAT_JOIN's script for real on per-sample outputs ({sample: {emit: file}}), staged
    under inputs/ in sample-ID order (as main.nf sorts them), with conf/modules.config's
    ext.args, ext.prefix (cohort_id) and ext.format for `params`. Returns the cohort file."""
    work.mkdir()
    names = []
    for sample in sorted(outputs):
        found = outputs[sample]
        _stage(work, f"inputs/{found['features'].name}", found["features"])
        _stage(work, f"inputs/{found['provenance'].name}", found["provenance"])
        names.append(f"inputs/{found['features'].name}")
    join_args, _ = _modules_config_args("TILEFEAT_JOIN", params)
    format = params[_ext_format_param("TILEFEAT_JOIN")]
    ctx = _task(params.get("cohort_id", "cohort"), "TILEFEAT:TILEFEAT_JOIN", args=join_args, format=format)
    # the staged files as the script sees them: named with their stageAs folder (TaskPath)
    staged = [StagedPath(name) for name in names]
    ctx.update({"features": staged if len(staged) > 1 else staged[0], "provenance": []})
    script = render(JOIN_NF, "script", ctx)
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert (work / f"{ctx['meta']['id']}.inputs.txt").read_text().split() == names
    found = _collect_outputs(work, JOIN_NF, "join")
    assert found["cohort"].name == f"{ctx['meta']['id']}.{format}"
    return found["cohort"]


def _extract_and_join(tmp_path, bin_dir, samples, params, aggregates):
    """The module scripts for real, in Nextflow-like task folders: extract every sample on CPU
    (_extract_one), then join their outputs (_join) with each aggregate.
    Returns ({sample: {emit name: file}}, {aggregate: rows of the cohort CSV})."""
    outputs = {sample: _extract_one(tmp_path, bin_dir, sample, folder, params) for sample, folder in samples.items()}
    cohorts = {}
    for aggregate in aggregates:
        cohort = _join(tmp_path / f"join-{aggregate}", bin_dir, outputs, dict(params, aggregate=aggregate))
        cohorts[aggregate] = _read_rows(cohort)
    return outputs, cohorts


def _read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _plain_runs(tmp_path, samples, flags, aggregates):
    """What the README's plain commands give for the same samples: `tilefeat extract DIR
    --output S.csv --sample S FLAGS` per sample, then `tilefeat join S.csv... --aggregate A`
    (samples in sorted order, as main.nf joins them). Returns ({sample: rows of its CSV},
    {aggregate: rows of the cohort CSV})."""
    out = tmp_path / "plain"
    out.mkdir()
    per_sample = {}
    for sample in sorted(samples):
        csv_path = out / f"{sample}.csv"
        result = subprocess.run(
            [str(TILEFEAT_BIN), "extract", str(samples[sample]), "--output", str(csv_path), "--sample", sample,
             "--device", "cpu", "--no-cache", "--quiet", *flags],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        per_sample[sample] = _read_rows(csv_path)
    cohorts = {}
    for aggregate in aggregates:
        cohort = out / f"cohort-{aggregate}.csv"
        result = subprocess.run(
            [str(TILEFEAT_BIN), "join", *(str(out / f"{s}.csv") for s in sorted(samples)),
             "--output", str(cohort), "--aggregate", aggregate, "--quiet"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        cohorts[aggregate] = _read_rows(cohort)
    return per_sample, cohorts


def _check_against_plain_runs(outputs, cohorts, plain_samples, plain_cohorts):
    """The module scripts must give what the plain commands give, value for value: each
    sample's CSV, and each cohort CSV (with aggregate none, exactly the samples' rows behind a
    sample column; with mean, the mean of those rows)."""
    assert sorted(outputs) == sorted(plain_samples)
    for sample, found in outputs.items():
        rows = _read_rows(found["features"])
        assert rows[0] == plain_samples[sample][0], (sample, rows[0][:4], plain_samples[sample][0][:4])
        assert rows == plain_samples[sample], f"{sample}: the module's CSV differs from plain `tilefeat extract`"
    for aggregate, rows in cohorts.items():
        assert rows == plain_cohorts[aggregate], f"aggregate {aggregate}: the module's cohort differs from plain `tilefeat join`"
        if aggregate == "none":
            expected = [["sample", *plain_samples[min(plain_samples)][0]]]
            for sample in sorted(plain_samples):
                expected += [[sample, *row] for row in plain_samples[sample][1:]]
            assert rows == expected, "aggregate none: cohort rows are not the samples' rows"
        elif aggregate == "mean":
            import numpy as np

            assert rows[0][:2] == ["sample", "n_tiles"], rows[0][:4]
            assert rows[0][2:] == plain_samples[min(plain_samples)][0][1:], "feature columns differ"
            assert [row[0] for row in rows[1:]] == sorted(plain_samples)
            for row in rows[1:]:
                tiles = np.array([r[1:] for r in plain_samples[row[0]][1:]], dtype=np.float64)
                assert int(row[1]) == len(tiles), (row[0], row[1], len(tiles))
                mean = np.array(row[2:], dtype=np.float64)
                assert np.allclose(mean, tiles.mean(axis=0), rtol=1e-5, atol=1e-6), f"{row[0]}: not the mean of its tiles"


@needs_binary
def test_extract_then_join_end_to_end(tmp_path, tiles, bin_dir):
    params = _default_params(weights="random:0", batch_size=2)
    samples = {name: tiles / name for name in ("sampleA", "sampleB")}
    outputs, cohorts = _extract_and_join(tmp_path, bin_dir, samples, params, ("mean", "none"))
    for aggregate, expected_rows in (("mean", 2), ("none", 4)):  # 2 samples of 2 tiles
        rows = cohorts[aggregate]
        assert rows[0][0] == "sample"
        assert len(rows) == 1 + expected_rows, rows[:3]
        assert [row[0] for row in rows[1:]] == sorted(row[0] for row in rows[1:])
        assert {row[0] for row in rows[1:]} == {"sampleA", "sampleB"}
        assert len({len(row) for row in rows}) == 1
    # The same values as the plain CLI with the same options, written out here by hand (the
    # pipeline's other defaults must be the CLI's), the same threads as the task (cpus = 2).
    plain = _plain_runs(tmp_path, samples, ["--weights", "random:0", "--batch-size", "2", "--threads", "2"], ("mean", "none"))
    _check_against_plain_runs(outputs, cohorts, *plain)


@needs_binary
def test_archives_end_to_end(tmp_path, tiles, bin_dir):
    """A samplesheet's `tiles` may be an archive, staged as a file: the module script runs a
    .zip and a .TAR.GZ (named unlike their samples, members in a sub-folder too) and joins
    the results, and each sample's CSV is byte for byte plain `tilefeat extract` of the
    unpacked folder, with the samplesheet's sample ID."""
    archives = tmp_path / "archives"
    archives.mkdir()
    folders = {name: tiles / name for name in ("sampleA", "sampleB")}
    samples = {
        "sampleA": make_archive(folders["sampleA"], archives / "slide-A.zip"),
        "sampleB": make_archive(folders["sampleB"], archives / "slide-B.TAR.GZ"),
    }
    params = _default_params(weights="random:0", batch_size=2)
    outputs, cohorts = _extract_and_join(tmp_path, bin_dir, samples, params, ("mean", "none"))
    plain_samples, plain_cohorts = _plain_runs(
        tmp_path, folders, ["--weights", "random:0", "--batch-size", "2", "--threads", "2"], ("mean", "none")
    )
    _check_against_plain_runs(outputs, cohorts, plain_samples, plain_cohorts)
    for sample, archive in samples.items():
        assert outputs[sample]["features"].read_bytes() == (tmp_path / "plain" / f"{sample}.csv").read_bytes(), (
            f"{sample}: the module's CSV of {archive.name} is not the bytes of `tilefeat extract` of the folder"
        )
        provenance = outputs[sample]["provenance"].read_text()
        assert f"\nsample: {sample}\n" in provenance, provenance
        assert re.search(rf"^tile_dir: \S*/{re.escape(archive.name)}$", provenance, re.MULTILINE), provenance
    assert len(cohorts["none"]) == 1 + 4  # 2 samples of 2 tiles


def _main_nf_tiles_check():
    """How main.nf checks a samplesheet's `tiles` (it resolves the path, then refuses what is
    neither a folder, an archive nor a slide, and the slides Nextflow cannot stage), read from
    its source: the suffix lists and the refusals as (condition, message GString), in order.
    There is no Nextflow runtime here: the conditions are pinned and mirrored by
    _tiles_refusal; the suffixes and the messages are main.nf's own."""
    text = (NF / "main.nf").read_text()
    lists = {}
    for name in ("TILE_ARCHIVE_SUFFIXES", "SLIDE_SUFFIXES", "UNSTAGEABLE_SLIDE_SUFFIXES"):
        match = re.search(rf"^\s*def {name} = \[([^\]]*)\]", text, re.MULTILINE)
        assert match, f"main.nf: `def {name} = [...]` not found"
        lists[name] = re.findall(r"'([^']*)'", match.group(1))
    start = text.index("def archive = TILE_ARCHIVE_SUFFIXES.any { suffix -> name.endsWith(suffix) }")
    assert "def name = location.name.toLowerCase()" in text[start - 200 : start]
    assert "def slide = SLIDE_SUFFIXES.any { suffix -> name.endsWith(suffix) }" in text[start:]
    refusals = re.findall(r'^\s*if \( (.+?) \) \{\n\s*error "((?:\\.|[^"\\])*)"\n\s*\}', text[start:], re.MULTILINE)
    assert [condition for condition, _ in refusals[:3]] == [
        "!location.exists()",
        "!location.isDirectory() && !archive && !slide",
        "!location.isDirectory() && UNSTAGEABLE_SLIDE_SUFFIXES.any { suffix -> name.endsWith(suffix) }",
    ], refusals
    assert "slide = slide && !location.isDirectory()" in text[start:]
    assert "[ meta + [ slide_mpp: meta.slide_mpp ?: params.slide_mpp, slide: slide ], location ]" in text[start:], (
        "main.nf no longer passes the checked path on"
    )
    return lists, [message for _, message in refusals[:3]]


def _tiles_refusal(samplesheet, sample, tiles):
    """main.nf's answer for one samplesheet row: None (accepted), or its error message."""
    lists, (missing, neither, unstageable) = _main_nf_tiles_check()
    location = Path(tiles) if tiles.startswith("/") else samplesheet.parent / tiles
    name = location.name.lower()
    archive = any(name.endswith(suffix) for suffix in lists["TILE_ARCHIVE_SUFFIXES"])
    slide = any(name.endswith(suffix) for suffix in lists["SLIDE_SUFFIXES"])
    ctx = {"meta": {"id": sample}, "tiles": tiles, "location": str(location), **lists}
    if not location.exists():
        return _interpolate(missing, ctx)
    if not location.is_dir() and not archive and not slide:
        return _interpolate(neither, ctx)
    if not location.is_dir() and any(name.endswith(s) for s in lists["UNSTAGEABLE_SLIDE_SUFFIXES"]):
        return _interpolate(unstageable, ctx)
    return None


SNAKEMAKE_COMMON = NF.parent / "snakemake" / "workflow" / "rules" / "common.smk"


@needs_binary
def test_samplesheet_tiles_folder_or_archive(tmp_path, tiles):
    """`tiles` is a folder, an archive with one of tilefeat's suffixes or a slide file (any
    case); a plain file that is neither, a missing path, or a slide whose data lie beside it
    (.mrxs, .vms, .vmu, .dcm: not staged) is refused with its own message."""
    lists, _ = _main_nf_tiles_check()
    suffixes = lists["TILE_ARCHIVE_SUFFIXES"]
    assert suffixes == [".zip", ".tar", ".tar.gz", ".tgz"]
    assert lists["SLIDE_SUFFIXES"] == [".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"]
    assert lists["UNSTAGEABLE_SLIDE_SUFFIXES"] == [".mrxs", ".vms", ".vmu", ".dcm"]
    # the Snakemake workflow takes the same archives and slides
    common = SNAKEMAKE_COMMON.read_text()
    for name in ("TILE_ARCHIVE_SUFFIXES", "SLIDE_SUFFIXES"):
        body = re.search(rf"^{name} = \((.*?)\)", common, re.MULTILINE | re.DOTALL)
        assert body and re.findall(r'"([^"]*)"', body.group(1)) == lists[name], name
    # main.nf's suffixes are exactly the archives tilefeat reads, in any case ...
    for n, suffix in enumerate(suffixes):
        archive = make_archive(tiles / "sampleA", tmp_path / f"kind{n}{suffix.upper()}")
        result = subprocess.run(
            [str(TILEFEAT_BIN), "extract", str(archive), "--output", str(tmp_path / f"kind{n}.csv"),
             "--weights", "random:0", "--device", "cpu", "--no-cache", "--dry-run"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"dry run: sample kind{n} " in result.stdout and " 2 tiles in " in result.stdout, result.stdout
    # ... and tilefeat opens any other file as a slide: a plain file that is none fails (exit 3)
    (tmp_path / "notes.txt").write_text("not tiles\n")
    result = subprocess.run(
        [str(TILEFEAT_BIN), "extract", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "n.csv"),
         "--weights", "random:0", "--device", "cpu", "--no-cache", "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "is neither a tile folder, an archive (.zip, .tar, .tar.gz) nor a slide OpenSlide can open" in result.stderr, result.stderr

    sheet = tmp_path / "sheet" / "samples.csv"
    (tmp_path / "sheet" / "archives").mkdir(parents=True)
    shutil.copytree(tiles / "sampleA", tmp_path / "sheet" / "folder.zip")  # a folder, whatever its name
    shutil.copytree(tiles / "sampleA", tmp_path / "sheet" / "folder.mrxs")  # a folder, whatever its name
    make_archive(tiles / "sampleA", tmp_path / "sheet" / "archives" / "a.Zip")
    make_archive(tiles / "sampleA", tmp_path / "sheet" / "archives" / "b.TAR")
    make_archive(tiles / "sampleA", tmp_path / "sheet" / "archives" / "c.tar.gz")
    make_archive(tiles / "sampleA", tmp_path / "sheet" / "archives" / "d.TGZ")
    (tmp_path / "sheet" / "notes.txt").write_text("not tiles\n")
    (tmp_path / "sheet" / "e.tar.bz2").write_bytes((tmp_path / "sheet" / "archives" / "b.TAR").read_bytes())
    for name in ("s.SVS", "s.ome.tiff", "s.ndpi", "s.mrxs", "s.DCM", "s.vms"):
        (tmp_path / "sheet" / name).write_bytes(b"slide")  # main.nf goes by the suffix
    accepted = {
        "folder": str(tiles / "sampleA"),
        "folderzip": "folder.zip",
        "foldermrxs": "folder.mrxs",
        "zip": "archives/a.Zip",
        "tar": "archives/b.TAR",
        "targz": str(tmp_path / "sheet" / "archives" / "c.tar.gz"),
        "tgz": "archives/d.TGZ",
        "svs": "s.SVS",
        "ometiff": "s.ome.tiff",
        "ndpi": "s.ndpi",
    }
    neither = (
        "is a file but neither a tile archive (.zip, .tar, .tar.gz, .tgz) nor a slide (.svs, .tif, .tiff, .ndpi, "
        ".vms, .vmu, .scn, .mrxs, .svslide, .bif, .dcm); give the sample's tile folder, an archive of its tiles "
        "or its slide file (suffixes in any case)"
    )
    unstaged = "slide, whose data lie in files beside it that Nextflow does not stage: run it with the Snakemake workflow"
    refused = {
        "notes": ("notes.txt", f"Sample 'notes': tiles 'notes.txt' (resolved to {tmp_path / 'sheet' / 'notes.txt'}) {neither}"),
        "bz2": ("e.tar.bz2", neither),
        "missing": ("archives/gone.zip", f"Sample 'missing': tiles 'archives/gone.zip' (resolved to {tmp_path / 'sheet' / 'archives' / 'gone.zip'}) does not exist"),
        "mrxs": ("s.mrxs", f"Sample 'mrxs': tiles 's.mrxs' (resolved to {tmp_path / 'sheet' / 's.mrxs'}) is a .mrxs/.vms/.vmu/.dcm {unstaged}"),
        "dcm": ("s.DCM", unstaged),
        "vms": ("s.vms", unstaged),
    }
    rows = {**accepted, **{sample: tiles_path for sample, (tiles_path, _) in refused.items()}}
    sheet.write_text("sample,tiles\n" + "".join(f"{sample},{path}\n" for sample, path in rows.items()))
    _, result = _validate_samplesheet(sheet, tmp_path)  # the schema lets every row through ...
    assert result.returncode == 0, result.stdout + result.stderr
    for sample, tiles_path in accepted.items():  # ... main.nf takes the folders, archives and slides ...
        assert _tiles_refusal(sheet, sample, tiles_path) is None, sample
    for sample, (tiles_path, message) in refused.items():  # ... and refuses the rest
        refusal = _tiles_refusal(sheet, sample, tiles_path)
        assert refusal is not None and message in refusal, (sample, refusal)


def _test_profile_params():
    """Params under -profile test: nextflow.config defaults, then conf/test.config literals."""
    params = _default_params()
    block = RULES._block(RULES._strip_comments((NF / "conf" / "test.config").read_text()), "params")
    for name, value in re.findall(r"^\s*(\w+)\s*=\s*(.+?)\s*$", block, re.MULTILINE):
        literal = re.fullmatch(r"'([^']*)'|(\d+)", value)
        if literal:
            params[name] = literal.group(1) if literal.group(1) is not None else int(literal.group(2))
    return params


@needs_binary
def test_test_profile_end_to_end(tmp_path, bin_dir):
    """What `nextflow run nextflow/ -profile test` runs, minus Nextflow: the test samplesheet's
    demo tiles through the module scripts with the test profile's parameters."""
    _require_demo_tiles()
    params = _test_profile_params()
    assert params["weights"] == "random:0"
    with open(NF / "assets" / "test_samplesheet.csv", newline="") as handle:
        samples = {row["sample"]: ((NF / "assets") / row["tiles"]).resolve() for row in csv.DictReader(handle)}
    outputs, cohorts = _extract_and_join(tmp_path, bin_dir, samples, params, (params["aggregate"],))
    rows = cohorts[params["aggregate"]]
    if params["aggregate"] == "none":
        tiles = sum(1 for folder in samples.values() for p in folder.rglob("*") if p.is_file())
        assert len(rows) == 1 + tiles
    else:
        assert [row[0] for row in rows[1:]] == sorted(samples)
    flags = ["--weights", params["weights"], "--batch-size", str(params["batch_size"]), "--threads", "2"]
    _check_against_plain_runs(outputs, cohorts, *_plain_runs(tmp_path, samples, flags, (params["aggregate"],)))


# ---------------------------------------------------------------------------------------
# Several samples per task (--samples_per_task > 1): TILEFEAT_EXTRACT_BATCH
# ---------------------------------------------------------------------------------------


def _batch_stage_pattern():
    """The `stageAs` of TILEFEAT_EXTRACT_BATCH's tiles input."""
    match = re.search(r"tuple val\(meta\), path\(tiles, stageAs: '([^']+)'\)", _section(BATCH_NF, "input"))
    assert match, "TILEFEAT_EXTRACT_BATCH: `tuple val(meta), path(tiles, stageAs: '...')` not found"
    return match.group(1)


def _staged_names(pattern, names):
    """The names Nextflow stages a list of inputs under for `stageAs: pattern`
    (TaskProcessor.expandWildcards): a `*` last part keeps each file's name; in the folder
    part, `?`s become the 1-based index zero-padded to their count and `*` the index; a
    pattern without wildcards gets a `*` appended when there are several files."""

    def index(text, i, strip_star=False):
        text = text.replace("*", "" if strip_star else str(i))
        return re.sub(r"\?+", lambda m: str(i).zfill(len(m.group())), text)

    if not pattern or pattern == "*":
        return list(names)
    if "*" not in pattern and "?" not in pattern and len(names) > 1:
        pattern += "*"
    staged = []
    for i, name in enumerate(names, 1):
        parent, _, last = pattern.rpartition("/")
        last = name if last in ("*", "") else index(last, i, strip_star=len(names) <= 1)
        staged.append(f"{index(parent, i)}/{last}" if parent else last)
    return staged


def test_staged_names_follow_nextflow():
    assert _staged_names("tiles??/*", ["a", "tiles"]) == ["tiles01/a", "tiles02/tiles"]
    assert _staged_names("tiles??/*", ["a"]) == ["tiles01/a"]
    assert _staged_names("dir*/*", ["a", "b"]) == ["dir1/a", "dir2/b"]
    assert _staged_names("inputs/*", ["a", "b"]) == ["inputs/a", "inputs/b"]
    assert _staged_names("*", ["a", "a"]) == ["a", "a"]  # a collision: Nextflow refuses the task
    assert _staged_names("seq", ["a", "b"]) == ["seq1", "seq2"]


def _main_nf_batches(ids, size, mpps=None, slides=(), split_slides=False):
    """main.nf's batches for --samples_per_task `size`: sample IDs in order, grouped by slide
    mpp (`mpps`: {id: mpp}; one --slide-mpp per process) and, when slide flags are given
    (`split_slides`), by being a slide (`slides`: their IDs), `size` at a time (the last one
    of a group may be smaller), each named FIRST..LAST (or its one sample's ID). Mirrors
    main.nf, whose code is pinned by test_main_nf_batches_and_rekeys_per_sample."""
    by_mpp = {}
    for sample in sorted(ids):
        key = ((mpps or {}).get(sample), split_slides and sample in slides)
        by_mpp.setdefault(key, []).append(sample)
    groups = [g[i : i + size] for g in by_mpp.values() for i in range(0, len(g), size)]
    return [(group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}", group) for group in groups]


def test_main_nf_batches_and_rekeys_per_sample():
    """main.nf (no Nextflow runtime here, so its code is pinned): one sample per task through
    TILEFEAT_EXTRACT when samples_per_task is 1; else batches in sample-ID order through
    TILEFEAT_EXTRACT_BATCH, whose outputs are re-keyed to each sample's meta by file name
    (<id>.<format>, <id>.provenance.yaml), the failed samples reported, and the join fed the
    same way in both cases."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    for needed in (
        "if ( params.samples_per_task == 1 ) {\n        TILEFEAT_EXTRACT( channel.fromList(samples), weights, model, model_sidecar, cache_dir )",
        "def split_slides = [ params.magnification, params.mpp, params.patch_size, params.stride, params.tissue ].any { v -> v != null }",
        ".toSorted { a, b -> a[0].id <=> b[0].id }\n            .groupBy { row -> [ row[0].slide_mpp, split_slides && row[0].slide ] }\n            .values()\n"
        "            .collectMany { group -> group.collate( params.samples_per_task as int ) }",
        "[ [ id: id, samples: rows.collect { row -> row[0] }, slide_mpp: rows[0][0].slide_mpp, slide: rows.every { row -> row[0].slide } ], rows.collect { row -> row[1] } ]",
        'def id = ids.size() == 1 ? ids[0] : "${ids.first()}..${ids.last()}".toString()',
        "TILEFEAT_EXTRACT_BATCH( channel.fromList(batches), weights, model, model_sidecar, cache_dir )",
        "ch_features = perSample( TILEFEAT_EXTRACT_BATCH.out.features, [ '.csv', '.h5', '.parquet', '.pt' ] )",
        "ch_provenance = perSample( TILEFEAT_EXTRACT_BATCH.out.provenance, [ '.provenance.yaml' ] )",
        "reportFailedSamples( TILEFEAT_EXTRACT_BATCH.out.failed )",
        'found.findAll { f -> suffixes.any { suffix -> f.name == "${sample.id}${suffix}".toString() } }',
        ".collect { row -> [ row[0], row[1].size() == 1 ? row[1][0] : row[1] ] }",
        "def ch_join_input = ch_features\n            .map { meta, files -> [ meta, [ files ].flatten().find { f -> !f.name.endsWith('.pt') } ] }\n"
        "            .join( ch_provenance )",
        "tsv.readLines().drop(1).findAll { line -> line }.collect { line -> line.split('\\t', 3) as List }",
        "storeDir: \"${params.outdir}/pipeline_info\"",
    ):
        assert needed in text, f"main.nf no longer has: {needed}"
    assert _main_nf_batches(["c", "a", "b"], 2) == [("a..b", ["a", "b"]), ("c", ["c"])]
    assert _main_nf_batches(["c", "a", "b"], 2, {"a": 0.25, "b": None, "c": 0.25}) == [("a..c", ["a", "c"]), ("b", ["b"])]
    # slides apart from tile folders only when slide flags are given
    assert _main_nf_batches(["c", "a", "b"], 2, slides={"b"}) == [("a..b", ["a", "b"]), ("c", ["c"])]
    assert _main_nf_batches(["c", "a", "b"], 2, slides={"b"}, split_slides=True) == [("a..c", ["a", "c"]), ("b", ["b"])]
    # the file names the re-keying looks for are the ones the module's outputs match, for
    # every format the schema offers
    globs = _output_globs(BATCH_NF)
    assert globs["features"] == "*.{csv,h5,parquet,pt}" and globs["provenance"] == "*.provenance.yaml"
    assert globs["index"] == "*.index.npz"
    assert set(_schema_properties()["format"]["enum"]) == {"csv", "h5", "parquet", "pt", "stamp", "clam"}


def test_batch_module_config_matches_extract():
    """conf/modules.config gives TILEFEAT_EXTRACT_BATCH the same ext.args, ext.format and
    containerOptions as TILEFEAT_EXTRACT, and publishes its outputs to the same samples/
    folder, but not the batch's own failed list (main.nf gathers those)."""
    text = RULES._strip_comments((NF / "conf" / "modules.config").read_text())
    blocks = {name: RULES._block(text, rf"withName:\s*'{name}'") for name in ("TILEFEAT_EXTRACT", "TILEFEAT_EXTRACT_BATCH")}

    def setting(block, name):
        match = re.search(rf"^\s*{re.escape(name)}\s*=\s*(.+?)(?=^\s*[\w.]+\s*=|\Z)", block, re.MULTILINE | re.DOTALL)
        assert match, name
        return " ".join(match.group(1).split())

    for name in ("ext.args", "ext.format", "containerOptions"):
        assert setting(blocks["TILEFEAT_EXTRACT"], name) == setting(blocks["TILEFEAT_EXTRACT_BATCH"], name), name
    publish = setting(blocks["TILEFEAT_EXTRACT_BATCH"], "publishDir")
    assert 'path: { "${params.outdir}/samples" }' in publish, publish
    # (clam's h5_files/ and pt_files/ after that: test_clam_is_published_in_clam_s_folders)
    assert "saveAs: { filename -> filename.endsWith('.failed.tsv') ? null : (params.format != 'clam' ? filename : " in publish, publish
    params = _default_params(weights="random:3", precision="bf16")
    assert _modules_config_args("TILEFEAT_EXTRACT_BATCH", params) == _modules_config_args("TILEFEAT_EXTRACT", params)


def _batch_ctx(samples, staged, args, accelerator=None, weights=None, cache_dir="", format=None, model=None, model_sidecar=None):
    """Context of TILEFEAT_EXTRACT_BATCH: the batch meta as main.nf builds it, and its tiles
    as the script sees them (`staged`, one per sample: a list, or the one path of a
    single-sample batch, as Nextflow passes them)."""
    (batch_id, _), *_ = _main_nf_batches(samples, len(samples))
    ctx = _task(batch_id, "TILEFEAT:TILEFEAT_EXTRACT_BATCH", args=args, accelerator=accelerator, format=format)
    ctx["meta"] = {"id": batch_id, "samples": [{"id": sample} for sample in samples]}
    paths = [StagedPath(name) for name in staged]
    ctx.update({
        "tiles": paths if len(paths) > 1 else paths[0], "weights": weights or [],
        "model": model or [], "model_sidecar": model_sidecar or [], "cache_dir": cache_dir,
    })  # fmt: skip
    return ctx


def _run_batch(work, bin_dir, samples, params, weights=None, extra_args="", model=None, model_sidecar=None):
    """TILEFEAT_EXTRACT_BATCH's script for real on `samples` ({sample ID: tile folder or
    archive}, in the order main.nf gives them: sorted), each staged under the name Nextflow
    gives it, and so are the weights, model and model_sidecar files when given.
    Returns (script, completed process)."""
    args, _ = _modules_config_args("TILEFEAT_EXTRACT_BATCH", params)
    format = params[_ext_format_param("TILEFEAT_EXTRACT_BATCH")]
    ids = sorted(samples)
    staged = _staged_names(_batch_stage_pattern(), [samples[s].name for s in ids])
    assert len(set(staged)) == len(staged), f"Nextflow would refuse colliding input names: {staged}"
    work.mkdir(parents=True)
    for sample, name in zip(ids, staged):
        _stage(work, name, samples[sample])
    for staged_file in (weights, model, model_sidecar):
        if staged_file:
            _stage(work, Path(staged_file).name, staged_file)
    ctx = _batch_ctx(
        ids, staged, (args + " " + extra_args).strip(), weights=Path(weights).name if weights else None, format=format,
        model=Path(model).name if model else None, model_sidecar=Path(model_sidecar).name if model_sidecar else None,
    )  # fmt: skip
    script = render(BATCH_NF, "script", ctx)
    assert " ".join(f"--sample '{s}'" for s in ids) in script, script
    assert "--device cpu" in script and "--threads 2" in script and "--no-cache" in script, script
    assert ("--format" in script) == (format != "csv"), script
    return script, _run_task(script, work, bin_dir)


def _batch_outputs(work, meta_samples, format):
    """What the task emits, re-keyed per sample as main.nf's perSample does it: for each of
    the batch's samples, its file `<id><suffix>` among those an output glob matched.
    Returns {sample: {emit: file}} for the samples that have all three."""
    globs = _output_globs(BATCH_NF)
    suffixes = {"features": f".{format}", "provenance": ".provenance.yaml", "rejected": ".rejected.tsv"}
    emitted = {emit: _glob(work, globs[emit]) for emit in suffixes}
    per_sample = {}
    for sample in meta_samples:
        found = {emit: next((f for f in emitted[emit] if f.name == f"{sample}{suffix}"), None) for emit, suffix in suffixes.items()}
        if any(found.values()):
            assert all(found.values()), f"{sample}: some of its files only: {found}"
            per_sample[sample] = found
    # nothing else was emitted (e.g. a file of no sample of the batch)
    assert sorted(f for files in emitted.values() for f in files) == sorted(f for found in per_sample.values() for f in found.values())
    return per_sample


def _failed_rows(work, batch_id):
    lines = (work / f"{batch_id}.failed.tsv").read_text().splitlines()
    assert lines[0] == "sample\texit_status\terror", lines
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 3 for row in rows), rows
    return rows


@pytest.fixture(scope="module")
def demo_samples():
    _require_demo_tiles()
    return {name: REPO / "demo" / "tiles" / name for name in ("sampleA", "sampleB", "sampleC")}


@pytest.fixture(scope="module")
def demo_singles(tmp_path_factory, bin_dir, demo_samples):
    """The demo samples through TILEFEAT_EXTRACT, one task each (random:0 weights)."""
    tmp = tmp_path_factory.mktemp("singles")
    params = _default_params(weights="random:0")
    return {sample: _extract_one(tmp, bin_dir, sample, folder, params) for sample, folder in demo_samples.items()}


@needs_binary
@pytest.mark.parametrize("samples_per_task", [2, 3])
def test_batch_script_matches_one_sample_per_task(tmp_path, bin_dir, demo_samples, demo_singles, samples_per_task):
    """--samples_per_task 2 and 3 on the demo samples: the batch tasks' per-sample CSVs and
    rejected lists are byte for byte those of one task per sample, each provenance names its
    sample and tile folder, no sample is listed as failed, and the cohort joined from the
    re-keyed outputs is the one-task-per-sample cohort."""
    params = _default_params(weights="random:0")
    outputs = {}
    batches = _main_nf_batches(list(demo_samples), samples_per_task)
    assert len(batches) == -(-3 // samples_per_task)
    for batch_id, ids in batches:
        work = tmp_path / batch_id
        script, result = _run_batch(work, bin_dir, {s: demo_samples[s] for s in ids}, params)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        assert _failed_rows(work, batch_id) == []
        found = _batch_outputs(work, ids, "csv")
        assert sorted(found) == ids
        for sample in ids:
            assert found[sample]["features"].read_bytes() == demo_singles[sample]["features"].read_bytes(), (
                f"{sample}: the batch task's CSV differs from its one-sample task's"
            )
            assert found[sample]["rejected"].read_bytes() == demo_singles[sample]["rejected"].read_bytes()
            provenance = found[sample]["provenance"].read_text()
            # (a staged folder is a symlink: tilefeat records where it leads)
            assert f"\nsample: {sample}\n" in provenance, provenance
            assert f"\ntile_dir: {demo_samples[sample]}\n" in provenance, provenance
        outputs.update(found)
    assert sorted(outputs) == sorted(demo_samples)
    join_params = dict(params, aggregate="mean")
    batched = _read_rows(_join(tmp_path / "join-batched", bin_dir, outputs, join_params))
    single = _read_rows(_join(tmp_path / "join-single", bin_dir, demo_singles, join_params))
    assert batched == single and [row[0] for row in batched[1:]] == sorted(demo_samples)


@needs_binary
def test_batch_stages_same_named_folders_apart(tmp_path, bin_dir, demo_samples, demo_singles):
    """Two samples whose folders are both called `tiles`, and an archive, in one task: each is
    staged in its own folder, and each sample's CSV is its own (the samplesheet's IDs name
    them)."""
    sources = tmp_path / "sources"
    shutil.copytree(demo_samples["sampleA"], sources / "slide1" / "tiles")
    shutil.copytree(demo_samples["sampleB"], sources / "slide2" / "tiles")
    archive = make_archive(demo_samples["sampleC"], sources / "tiles.zip")
    samples = {"p1": sources / "slide1" / "tiles", "p2": sources / "slide2" / "tiles", "p3": archive}
    assert len(set(_staged_names("*", [p.name for p in samples.values()]))) < 3  # they would collide unstaged
    script, result = _run_batch(tmp_path / "batch", bin_dir, samples, _default_params(weights="random:0"))
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert "'tiles01/tiles' 'tiles02/tiles' 'tiles03/tiles.zip'" in script, script
    found = _batch_outputs(tmp_path / "batch", ["p1", "p2", "p3"], "csv")
    for sample, demo in (("p1", "sampleA"), ("p2", "sampleB"), ("p3", "sampleC")):
        assert found[sample]["features"].read_bytes() == demo_singles[demo]["features"].read_bytes(), sample


@needs_binary
def test_batch_reports_failed_samples_and_keeps_the_others(tmp_path, bin_dir, demo_samples, demo_singles):
    """A sample without tiles and one with a corrupt tile (--on_error fail) among good ones:
    the task succeeds, the good samples' files are there (byte for byte their one-sample
    tasks'), the broken ones have none and are listed in <batch>.failed.tsv with tilefeat's
    exit status and message; their re-keyed outputs hold the good samples only."""
    broken = tmp_path / "broken"
    (broken / "bare").mkdir(parents=True)
    shutil.copytree(demo_samples["sampleB"], broken / "corrupt")
    (broken / "corrupt" / "zz_bad.png").write_bytes(b"not a png at all\n")
    samples = {"sampleA": demo_samples["sampleA"], "bare": broken / "bare", "corrupt": broken / "corrupt", "sampleC": demo_samples["sampleC"]}
    ((batch_id, ids),) = _main_nf_batches(list(samples), 4)
    assert batch_id == "bare..sampleC"
    work = tmp_path / "batch"
    script, result = _run_batch(work, bin_dir, samples, _default_params(weights="random:0"))
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert "2 of 4 samples failed (bare, corrupt); the others were written" in result.stderr, result.stderr
    found = _batch_outputs(work, ids, "csv")
    assert sorted(found) == ["sampleA", "sampleC"]
    for sample in found:
        assert found[sample]["features"].read_bytes() == demo_singles[sample]["features"].read_bytes(), sample
    for sample in ("bare", "corrupt"):
        left = [work / f"{sample}.{suffix}" for suffix in ("csv", "provenance.yaml", "rejected.tsv")]
        assert not [f for f in left if f.exists()], f"{sample} left files behind"
    rows = {row[0]: row for row in _failed_rows(work, batch_id)}
    assert sorted(rows) == ["bare", "corrupt"]
    assert rows["bare"][1] == "3" and "holds no tiles" in rows["bare"][2], rows["bare"]
    assert rows["corrupt"][1] == "3" and "zz_bad.png" in rows["corrupt"][2] and "not a PNG" in rows["corrupt"][2], rows["corrupt"]

    # A batch of one failing sample (the last, smaller batch): tilefeat's message does not
    # name the sample then; it is still listed, and nothing is emitted.
    work = tmp_path / "alone"
    script, result = _run_batch(work, bin_dir, {"bare": broken / "bare"}, _default_params(weights="random:0"))
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert _batch_outputs(work, ["bare"], "csv") == {}
    ((sample, status, error),) = _failed_rows(work, "bare")
    assert (sample, status) == ("bare", "3") and "holds no tiles" in error, error


@needs_binary
def test_batch_fails_on_errors_that_are_not_a_sample_s(tmp_path, bin_dir, demo_samples):
    """Only a sample's own input or output failure (exit 3 or 6) is tolerated: bad weights
    (exit 4) or a usage error (exit 2) fail the task with tilefeat's exit status."""
    weights = tmp_path / "bad.pth"
    weights.write_bytes(b"not weights\n")
    samples = {s: demo_samples[s] for s in ("sampleA", "sampleB")}
    script, result = _run_batch(tmp_path / "weights", bin_dir, samples, _default_params(weights=None), weights=weights)
    assert "--weights bad.pth" in script, script
    assert result.returncode == 4, f"{script}\n{result.stdout}\n{result.stderr}"
    script, result = _run_batch(tmp_path / "usage", bin_dir, samples, _default_params(weights="random:0"), extra_args="--no-such-flag")
    assert result.returncode == 2, f"{script}\n{result.stdout}\n{result.stderr}"


# ---------------------------------------------------------------------------------------
# Output formats (--format csv|h5|parquet, --cohort_format csv|parquet)
# ---------------------------------------------------------------------------------------


@needs_binary
def test_cli_accepts_the_output_formats():
    """The batch module's --format and the formats the schema offers are the CLI's; join
    writes Parquet as well as CSV. (Needs a tilefeat with output formats.)"""
    extract_help = subprocess.run([str(TILEFEAT_BIN), "extract", "--help"], capture_output=True, text=True, timeout=60)
    join_help = subprocess.run([str(TILEFEAT_BIN), "join", "--help"], capture_output=True, text=True, timeout=60)
    assert extract_help.returncode == 0 and join_help.returncode == 0
    assert "--format ${format}" in _section(BATCH_NF, "script")
    assert re.search(r"(?<![\w-])--format(?![\w-])", extract_help.stdout), "tilefeat extract has no --format"
    properties = _schema_properties()
    assert set(properties["format"]["enum"]) <= _possible_values(extract_help.stdout, "--format")
    assert "parquet" in join_help.stdout.lower(), join_help.stdout
    assert set(properties["cohort_format"]["enum"]) == {"csv", "parquet"}


def _as_rows(features, tmp_path):
    """A per-sample feature file of any format as rows, through `tilefeat join FILE --output
    X.csv` (join reads all three formats): `sample,tile,0..D-1` rows."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix="rows-"))
    out = folder / "rows.csv"
    result = subprocess.run(
        [str(TILEFEAT_BIN), "join", str(features), "--output", str(out), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return _read_rows(out)


FORMAT_CASES = [
    # (per-sample format, cohort format, samples per task)
    ("h5", "csv", 1),
    ("parquet", "parquet", 1),
    ("h5", "parquet", 2),
    ("parquet", "csv", 3),
]


@needs_binary
@pytest.mark.parametrize(
    "format, cohort_format, samples_per_task", FORMAT_CASES, ids=[f"{f}-{c}-per{n}" for f, c, n in FORMAT_CASES]
)
def test_output_formats_end_to_end(tmp_path, bin_dir, demo_samples, format, cohort_format, samples_per_task):
    """--format h5|parquet and --cohort_format csv|parquet through the module scripts (one
    sample per task, and batched): each sample's <id>.<format> with its provenance and
    rejected list beside it, holding what plain `tilefeat extract --output S.<format>` holds,
    and the cohort file the plain `tilefeat join ... --output cohort.<cohort_format>` of
    those. (Needs a tilefeat with output formats.)"""
    params = _default_params(weights="random:0", format=format, cohort_format=cohort_format, samples_per_task=samples_per_task)
    if samples_per_task == 1:
        outputs = {s: _extract_one(tmp_path, bin_dir, s, folder, params) for s, folder in demo_samples.items()}
    else:
        outputs = {}
        for batch_id, ids in _main_nf_batches(list(demo_samples), samples_per_task):
            work = tmp_path / batch_id
            script, result = _run_batch(work, bin_dir, {s: demo_samples[s] for s in ids}, params)
            assert f"--format {format} " in script, script
            assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
            assert _failed_rows(work, batch_id) == []
            outputs.update(_batch_outputs(work, ids, format))
    assert sorted(outputs) == sorted(demo_samples)
    cohort = _join(tmp_path / "join", bin_dir, outputs, params)

    plain = tmp_path / "plain"
    plain.mkdir()
    for sample, folder in sorted(demo_samples.items()):
        result = subprocess.run(
            [str(TILEFEAT_BIN), "extract", str(folder), "--output", str(plain / f"{sample}.{format}"), "--sample", sample,
             "--weights", "random:0", "--device", "cpu", "--threads", "2", "--no-cache", "--quiet"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (plain / f"{sample}.provenance.yaml").is_file() and (plain / f"{sample}.rejected.tsv").is_file()
        found = outputs[sample]
        assert found["features"].name == f"{sample}.{format}"
        assert found["provenance"].name == f"{sample}.provenance.yaml"
        assert found["rejected"].read_bytes() == (plain / f"{sample}.rejected.tsv").read_bytes()
        assert f"\nsample: {sample}\n" in found["provenance"].read_text()
        rows = _as_rows(found["features"], tmp_path)
        assert rows == _as_rows(plain / f"{sample}.{format}", tmp_path), f"{sample}: the module's {format} differs"
        assert [row[0] for row in rows[1:]] == [sample] * (len(rows) - 1) and len(rows) > 1
    plain_cohort = plain / f"cohort.{cohort_format}"
    result = subprocess.run(
        [str(TILEFEAT_BIN), "join", *(str(plain / f"{s}.{format}") for s in sorted(demo_samples)),
         "--output", str(plain_cohort), "--aggregate", params["aggregate"], "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert cohort.name == f"cohort.{cohort_format}"
    tiles = sum(1 for folder in demo_samples.values() for f in folder.iterdir() if f.is_file())
    if cohort_format == "csv":
        rows = _read_rows(cohort)
        assert rows == _read_rows(plain_cohort)
        assert len(rows) == 1 + tiles and [row[0] for row in rows[1:]] == sorted(row[0] for row in rows[1:])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(cohort)
        assert table.equals(pq.read_table(plain_cohort)), "the module's Parquet cohort differs from plain `tilefeat join`"
        assert table.num_rows == tiles


STUB_CASES = [
    # (module, ext.format: None = the module's default)
    (EXTRACT_NF, None), (EXTRACT_NF, "h5"), (EXTRACT_NF, "parquet"),
    (EXTRACT_NF, "pt"), (EXTRACT_NF, "stamp"), (EXTRACT_NF, "clam"),
    (JOIN_NF, None), (JOIN_NF, "parquet"),
    (BATCH_NF, None), (BATCH_NF, "h5"), (BATCH_NF, "pt"), (BATCH_NF, "stamp"), (BATCH_NF, "clam"),
]  # fmt: skip


@pytest.mark.parametrize(
    "module_path, format", STUB_CASES, ids=[f"{m.parent.name}-{f or 'default'}" for m, f in STUB_CASES]
)
def test_stub_writes_every_declared_output(tmp_path, module_path, format):
    """`-stub` runs need no binary: the stub must create exactly what the outputs declare
    (one file per sample for the batch module's per-sample outputs)."""
    per_sample = 1
    if module_path == EXTRACT_NF:
        ctx = _extract_ctx("sampleA", "")
    elif module_path == JOIN_NF:
        ctx = _task("cohort", "TILEFEAT:TILEFEAT_JOIN")
        ctx.update({"features": [StagedPath("inputs/a.csv")], "provenance": [StagedPath("inputs/a.provenance.yaml")]})
    else:
        samples = ["sampleA", "sampleB", "sampleC"]
        ctx = _batch_ctx(samples, [f"tiles0{i + 1}/{s}" for i, s in enumerate(samples)], "")
        per_sample = len(samples)
    ctx["task"]["ext"]["format"] = format
    script = render(module_path, "stub", ctx)
    work = tmp_path / "stub"
    result = _run_task(script, work, tmp_path)
    assert result.returncode == 0, f"{script}\n{result.stderr}"
    for emit, pattern in _output_globs(module_path).items():
        matches = _glob(work, pattern)
        expected = 1 if emit in ("failed", "cohort") else per_sample
        if emit == "features" and format == "clam":
            expected = 2 * per_sample  # each sample's .h5 and .pt
        if emit == "index":  # optional: only when the tiles have coordinates (none in a stub)
            expected = 0
        if emit == "tissue":  # optional: only for slides (a stub's samples are tile folders)
            expected = 0
        assert len(matches) == expected, f"stub output path({pattern!r}) ({emit}) matched {matches}"
    if "features" in _output_globs(module_path):
        suffixes = {"stamp": {".h5"}, "clam": {".h5", ".pt"}}.get(format, {f".{format or 'csv'}"})
        assert {p.suffix for p in _glob(work, _output_globs(module_path)["features"])} == suffixes
    if module_path == JOIN_NF:
        assert (work / f"cohort.{format or 'csv'}").is_file()
    if module_path == EXTRACT_NF:
        assert (work / "sampleA.rejected.tsv").read_text() == "tile\treason\n"
    if module_path == BATCH_NF:
        assert (work / "sampleA.rejected.tsv").read_text() == "tile\treason\n"
        assert (work / "sampleA..sampleC.failed.tsv").read_text() == "sample\texit_status\terror\n"


# ---------------------------------------------------------------------------------------
# A TorchScript encoder instead of the ResNet50 (--model FILE.pt, its sidecar FILE.json)
# ---------------------------------------------------------------------------------------

TINY_SIDECAR = {
    "tilefeat_encoder": 1, "name": "tiny", "source": "test", "size": 64, "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25], "output": "embedding", "output_dim": 8, "weights_sha256": None,
}  # fmt: skip
# What the pipeline's ext.args always passed (without --model it must stay so, byte for byte).
DEFAULT_EXTRACT_ARGS = "--precision fp32 --layer layer4 --pool max --normalize tutorial --size 224 --batch-size 32 --on-error fail"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny TorchScript encoder made here, no download (8 features; seeded random init) and
    its sidecar (64 x 64 tiles, mean 0.5, std 0.25): (model, sidecar), in a folder of their
    own, as a user keeps them."""
    import torch

    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    model = folder / "tiny.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace/save: still what tilefeat reads
        torch.jit.save(torch.jit.trace(net, torch.rand(2, 3, 64, 64)), str(model))
    sidecar = folder / "tiny.json"
    sidecar.write_text(json.dumps(TINY_SIDECAR))
    return model, sidecar


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory, tiny_model, demo_samples):
    """Plain `tilefeat extract demo/tiles/S -o S.csv --model tiny.pt` (on CPU, as the module's
    task without a GPU) for sampleA and sampleB: {sample: CSV}."""
    model, _ = tiny_model
    out = tmp_path_factory.mktemp("plain-model")
    env = {k: v for k, v in os.environ.items() if k not in ("TILEFEAT_CACHE_DIR", "TILEFEAT_WEIGHTS")}
    found = {}
    for sample in ("sampleA", "sampleB"):
        result = subprocess.run(
            [str(TILEFEAT_BIN), "extract", str(demo_samples[sample]), "-o", str(out / f"{sample}.csv"), "--model", str(model),
             "--device", "cpu"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        found[sample] = out / f"{sample}.csv"
    return found


def _main_nf_model_files(model_param):
    """main.nf's model inputs for --model `model_param`: (model, sidecar or None), the sidecar
    being the model's sibling named after its base name (the name without its last
    extension, as Nextflow's baseName) with .json, when it exists. Mirrors main.nf, whose code
    is pinned here."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    for needed in (
        "def model = params.model ? file(params.model, checkIfExists: true) : []",
        "if ( model && model.resolveSibling(model.baseName + '.json').exists() ) {\n"
        "        model_sidecar = model.resolveSibling(model.baseName + '.json')",
    ):
        assert needed in text, f"main.nf no longer has: {needed}"
    if not model_param:
        return None, None
    model = Path(model_param)
    assert model.is_file(), model  # checkIfExists
    base = model.name.rpartition(".")[0] or model.name
    sidecar = model.with_name(base + ".json")
    return model, (sidecar if sidecar.exists() else None)


def _main_nf_model_refusals(params):
    """main.nf's start-up refusals that concern --model, evaluated for `params`: the messages
    of the `if ( CONDITION ) { error "..." }` blocks whose condition reads params.model and
    holds for these params (no Nextflow runtime here: the conditions are main.nf's own,
    evaluated as Groovy would)."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    blocks = re.findall(r'^\s*if \( (.+?) \) \{\n\s*error "((?:\\.|[^"\\])*)"\n\s*\}', text, re.MULTILINE)
    model_blocks = [(condition, message) for condition, message in blocks
                    if "params.model" in condition and "params.preset" not in condition]
    assert len(model_blocks) == 2, model_blocks
    ctx = {"params": params}
    return [_interpolate(message, ctx) for condition, message in model_blocks if _truthy(evaluate(condition, ctx))]


def test_model_args_leave_the_resnet50_defaults_out():
    """conf/modules.config: without --model, ext.args is what it always was (and so is each
    module's command, pinned here); with --model, --layer and the ResNet50's default
    --normalize and --size are left out (the sidecar sets those), a non-default one is passed."""
    for process in ("TILEFEAT_EXTRACT", "TILEFEAT_EXTRACT_BATCH"):
        assert _modules_config_args(process, _default_params())[0] == DEFAULT_EXTRACT_ARGS
        assert _modules_config_args(process, _default_params(weights="random:2"))[0] == DEFAULT_EXTRACT_ARGS + " --weights random:2"
        assert _modules_config_args(process, _default_params(weights="/w/resnet50.pth"))[0] == DEFAULT_EXTRACT_ARGS
        model = _default_params(model="/m/tiny.pt")
        assert _modules_config_args(process, model)[0] == "--precision fp32 --pool max --batch-size 32 --on-error fail"
        custom = dict(model, normalize="imagenet", size=96, pool="avg", precision="bf16")
        assert _modules_config_args(process, custom)[0] == (
            "--precision bf16 --pool avg --normalize imagenet --size 96 --batch-size 32 --on-error fail"
        )
    # the modules' commands without a model: byte for byte what they were before --model
    script = render(EXTRACT_NF, "script", _extract_ctx("sampleA", DEFAULT_EXTRACT_ARGS, weights="resnet50.pth"))
    assert script == (
        "tilefeat extract \\\n    sampleA \\\n    --output sampleA.csv \\\n    --sample 'sampleA' \\\n"
        "    --device cpu \\\n    --threads 2 \\\n    --weights resnet50.pth \\\n    --no-cache \\\n    --quiet \\\n"
        f"    {DEFAULT_EXTRACT_ARGS}\n"
    ), script
    script = render(EXTRACT_NF, "script", _extract_ctx("sampleA", DEFAULT_EXTRACT_ARGS))
    assert "    --threads 2 \\\n     \\\n    --no-cache \\\n" in script, script
    script = render(BATCH_NF, "script", _batch_ctx(["a", "b"], ["tiles01/a", "tiles02/b"], DEFAULT_EXTRACT_ARGS))
    assert (
        "tilefeat extract \\\n    'tiles01/a' 'tiles02/b' \\\n    --outdir . \\\n    --sample 'a' --sample 'b' \\\n     \\\n"
        "    --device cpu \\\n    --threads 2 \\\n     \\\n    --no-cache \\\n    --quiet \\\n"
        f"    {DEFAULT_EXTRACT_ARGS} \\\n    2> a..b.extract.err || status=$?\n"
    ) in script, script
    # with a model: --model FILE, and nothing of the ResNet50's
    for module_path, ctx in (
        (EXTRACT_NF, _extract_ctx("sampleA", _modules_config_args("TILEFEAT_EXTRACT", model)[0], model="tiny.pt", model_sidecar="tiny.json")),
        (BATCH_NF, _batch_ctx(["a"], ["tiles01/a"], _modules_config_args("TILEFEAT_EXTRACT_BATCH", model)[0], model="tiny.pt", model_sidecar="tiny.json")),
    ):
        script = render(module_path, "script", ctx)
        assert "    --model tiny.pt \\\n" in script, script
        assert not re.search(r"--(weights|layer|normalize|size)\b", script), script


def test_model_params_refused_at_start_up(tiny_model):
    """main.nf refuses --model with --weights (a file or random:SEED), and with a --layer
    other than the default, before any task runs, saying why; --model alone, or --weights
    alone, passes. Its sidecar is found as the model's sibling under the same stem."""
    model, sidecar = tiny_model
    for params in (_default_params(), _default_params(model=str(model)), _default_params(weights="random:0")):
        assert _main_nf_model_refusals(params) == [], params
    for weights in ("/shared/weights/resnet50-0676ba61.pth", "random:0"):
        (refusal,) = _main_nf_model_refusals(_default_params(model=str(model), weights=weights))
        assert refusal == (
            f"Give --model or --weights, not both: --model '{model}' replaces the ResNet50, so --weights "
            f"'{weights}' (the ResNet50's weights) does not apply to it"
        ), refusal
    (refusal,) = _main_nf_model_refusals(_default_params(model=str(model), layer="layer3"))
    assert refusal.startswith(f"--layer layer3 picks a ResNet50 stage: it does not apply to --model '{model}'"), refusal
    assert _main_nf_model_files(str(model)) == (model, sidecar)
    assert _main_nf_model_files(None) == (None, None)


@needs_binary
def test_model_end_to_end(tmp_path, bin_dir, demo_samples, tiny_model, tiny_plain):
    """--model through the module scripts, the model and its sidecar staged into the task as
    main.nf passes them: one sample per task and two per task, each sample's CSV byte for
    byte plain `tilefeat extract demo/tiles/S -o S.csv --model tiny.pt` (8 feature columns),
    its provenance recording the model (file, sha256, sidecar) and the sidecar's 64 x 64
    tiles; the join of them works. Without the sidecar staged, tilefeat would not see it."""
    model, sidecar = tiny_model
    params = _default_params(model=str(model))
    staged_model, staged_sidecar = _main_nf_model_files(params["model"])
    assert (staged_model, staged_sidecar) == (model, sidecar)
    sha256 = hashlib.sha256(model.read_bytes()).hexdigest()

    def check(sample, found):
        assert found["features"].read_bytes() == tiny_plain[sample].read_bytes(), f"{sample}: the module's CSV differs from plain --model"
        assert _read_rows(found["features"])[0] == ["tile", *map(str, range(8))]
        provenance = yaml.safe_load(found["provenance"].read_text())
        assert provenance["sample"] == sample
        assert provenance["model"]["sha256"] == sha256, provenance["model"]
        assert provenance["model"]["file"] == "tiny.pt" and provenance["model"]["sidecar"] == "tiny.json", provenance["model"]
        assert provenance["model"]["name"] == "tiny" and provenance["settings"]["size"] == 64, provenance["settings"]
        assert provenance["model"]["mean"] == [0.5] * 3 and provenance["model"]["std"] == [0.25] * 3

    # one sample per task (TILEFEAT_EXTRACT)
    args, _ = _modules_config_args("TILEFEAT_EXTRACT", params)
    work = tmp_path / "extract-sampleA"
    work.mkdir()
    for target in (demo_samples["sampleA"], staged_model, staged_sidecar):
        _stage(work, target.name, target)
    script = render(EXTRACT_NF, "script", _extract_ctx("sampleA", args, model=staged_model.name, model_sidecar=staged_sidecar.name))
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    single = _collect_outputs(work, EXTRACT_NF, "sampleA")
    check("sampleA", single)

    # two samples per task (TILEFEAT_EXTRACT_BATCH)
    samples = {s: demo_samples[s] for s in ("sampleA", "sampleB")}
    ((batch_id, ids),) = _main_nf_batches(list(samples), 2)
    work = tmp_path / batch_id
    script, result = _run_batch(work, bin_dir, samples, params, model=staged_model, model_sidecar=staged_sidecar)
    assert "--model tiny.pt" in script, script
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert _failed_rows(work, batch_id) == []
    batched = _batch_outputs(work, ids, "csv")
    for sample in ids:
        check(sample, batched[sample])
    cohort = _read_rows(_join(tmp_path / "join", bin_dir, batched, params))
    assert cohort[0] == ["sample", "tile", *map(str, range(8))] and len(cohort) > 2

    # the sidecar matters: a model staged without it is run at the defaults (224, tutorial)
    work = tmp_path / "no-sidecar"
    work.mkdir()
    for target in (demo_samples["sampleA"], staged_model):
        _stage(work, target.name, target)
    script = render(EXTRACT_NF, "script", _extract_ctx("sampleA", args, model=staged_model.name))
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    provenance = yaml.safe_load((work / "sampleA.provenance.yaml").read_text())
    assert "sidecar" not in provenance["model"] and provenance["settings"]["size"] == 224, provenance["model"]


@needs_binary
def test_model_with_weights_or_layer_fails_the_module(tmp_path, bin_dir, demo_samples, tiny_model):
    """A pipeline that reuses the modules and gives them a model and weights (or --layer in
    ext.args) gets tilefeat's usage error (exit 2), never one silently left out."""
    model, sidecar = tiny_model
    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(b"not read\n")
    for name, staged, args in (
        ("weights", (weights, model, sidecar), DEFAULT_EXTRACT_ARGS.replace(" --layer layer4", "")),
        ("layer", (model, sidecar), "--layer layer4"),
    ):
        work = tmp_path / name
        work.mkdir()
        for target in (demo_samples["sampleA"], *staged):
            _stage(work, target.name, target)
        ctx = _extract_ctx("sampleA", args, weights=weights.name if weights in staged else None, model=model.name, model_sidecar=sidecar.name)
        script = render(EXTRACT_NF, "script", ctx)
        result = _run_task(script, work, bin_dir)
        assert result.returncode == 2, f"{script}\n{result.stdout}\n{result.stderr}"
        assert ("--weights does not apply" if name == "weights" else "cannot be used with '--layer") in result.stderr, result.stderr
        assert not (work / "sampleA.csv").exists()


# ---------------------------------------------------------------------------------------
# Formats for the MIL tools (--format pt|stamp|clam), slide mpp, join only where it reads
# ---------------------------------------------------------------------------------------


def _publish_save_as(process):
    """conf/modules.config's publishDir saveAs closure of `process`: (parameter, body)."""
    text = RULES._strip_comments((NF / "conf" / "modules.config").read_text())
    block = RULES._block(text, rf"withName:\s*'{process}'")
    match = re.search(r"saveAs:\s*\{\s*(\w+)\s*->\s*(.+?)\s*\},\s*\n", block)
    assert match, f"{process}: no publishDir saveAs closure"
    return match.groups()


def test_clam_is_published_in_clam_s_folders():
    """--format clam: each sample's .h5, provenance and rejected list are published under
    samples/h5_files/, its .pt (and index.npz) under samples/pt_files/, as CLAM reads them
    (--data_root_dir <outdir>, sub-folder samples); every other format keeps the names; the
    batch's failed list is still not published."""
    for process in ("TILEFEAT_EXTRACT", "TILEFEAT_EXTRACT_BATCH"):
        name, body = _publish_save_as(process)

        def save_as(filename, format):
            return evaluate(body, {name: filename, "params": _default_params(format=format)})

        expected = {
            "S1.h5": "h5_files/S1.h5", "S1.pt": "pt_files/S1.pt", "S1.index.npz": "pt_files/S1.index.npz",
            "S1.provenance.yaml": "h5_files/S1.provenance.yaml", "S1.rejected.tsv": "h5_files/S1.rejected.tsv",
        }  # fmt: skip
        for filename, published in expected.items():
            assert save_as(filename, "clam") == published, (process, filename)
            for other in ("csv", "h5", "pt", "stamp"):
                assert save_as(filename, other) == filename, (process, filename, other)
        if process == "TILEFEAT_EXTRACT_BATCH":
            assert save_as("a..b.failed.tsv", "clam") is None and save_as("a..b.failed.tsv", "csv") is None


def _main_nf_stamp_refusal(params, samples):
    """main.nf's start-up refusal of --format stamp without a slide mpp, for `samples`
    ({id: slide_mpp or None}, as main.nf builds meta.slide_mpp): its message, or None. The
    condition and message are main.nf's own; `without_mpp` mirrors its pinned code."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    needed = "def without_mpp = samples.findAll { row -> !row[0].slide_mpp }.collect { row -> row[0].id }"
    assert needed in text, f"main.nf no longer has: {needed}"
    blocks = re.findall(r'^\s*if \( (.+?) \) \{\n\s*error "((?:\\.|[^"\\])*)"\n\s*\}', text, re.MULTILINE)
    ((condition, message),) = [(c, m) for c, m in blocks if "without_mpp" in c]
    ctx = {"params": params, "without_mpp": [s for s, mpp in samples.items() if not mpp]}
    return _interpolate(message, ctx) if _truthy(evaluate(condition, ctx)) else None


def test_stamp_without_slide_mpp_refused_at_start_up():
    """--format stamp needs every sample's slide mpp (--slide_mpp, or the samplesheet's
    slide_mpp column, which main.nf puts in meta.slide_mpp): refused before any task runs,
    naming the samples without; other formats, or every mpp known, pass."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    for needed in (
        "[ meta + [ slide_mpp: meta.slide_mpp ?: params.slide_mpp, slide: slide ], location ]",
        "[ [ id: dir.name, slide_mpp: params.slide_mpp, slide: false ], dir ]",
    ):
        assert needed in text, f"main.nf no longer has: {needed}"
    refusal = _main_nf_stamp_refusal(_default_params(format="stamp"), {"a": 0.25, "b": None, "c": None})
    assert refusal == (
        "--format stamp writes STAMP's coordinates in micrometres, which needs each slide's micrometres per pixel "
        "at level 0: give --slide_mpp F, or a slide_mpp column in the samplesheet; none for b, c"
    ), refusal
    assert _main_nf_stamp_refusal(_default_params(format="stamp"), {"a": 0.25, "b": 0.5}) is None
    assert _main_nf_stamp_refusal(_default_params(format="h5"), {"a": None}) is None


def test_samplesheet_slide_mpp_column(tmp_path):
    """The samplesheet's optional slide_mpp column: a number from 0.01 to 100 (nf-schema
    types it; an empty cell is left out), into meta.slide_mpp."""
    schema = json.loads((NF / "assets" / "schema_input.json").read_text())
    assert schema["items"]["properties"]["slide_mpp"]["meta"] == ["slide_mpp"]
    assert "slide_mpp" not in schema["items"]["required"]
    for value, error in ((0.25, None), (100, None), (352.78, "352.78 is greater than the maximum of 100"), ("x40", "'x40' is not of type 'number'")):
        data = tmp_path / "sheet.json"
        data.write_text(json.dumps([{"sample": "a", "tiles": "t/a"}, {"sample": "b", "tiles": "t/b", "slide_mpp": value}]))
        result = _check_jsonschema("--schemafile", str(NF / "assets" / "schema_input.json"), str(data))
        output = result.stdout + result.stderr
        assert (result.returncode == 0) == (error is None), output
        if error:
            assert error in output, output


def test_join_only_for_formats_join_reads():
    """main.nf joins csv, h5, parquet and clam (its .h5 files), and for pt and stamp makes no
    cohort (it says so) while still gathering the versions."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    match = re.search(r"def joinable\(format\) \{\n\s*return format in \[([^\]]*)\]", text)
    assert match, "main.nf: def joinable(format) not found"
    assert re.findall(r"'(\w+)'", match.group(1)) == ["csv", "h5", "parquet", "clam"]
    join_at = text.index("if ( joinable(params.format) ) {")
    assert join_at < text.index("TILEFEAT_JOIN( ch_join_input )") < text.index("} else {", join_at)
    assert text.index("channel.topic('versions')") > text.index("} else {", join_at)  # outside the if


def _histolab_tiles(root, demo_samples):
    """The demo samples' tiles renamed as histolab names them (coordinates and a 256 px
    extent at level 0): index.npz and STAMP's layout need them."""
    samples = {}
    for sample in ("sampleA", "sampleB"):
        folder = root / sample
        folder.mkdir(parents=True)
        for n, tile in enumerate(sorted(demo_samples[sample].iterdir())):
            shutil.copy(tile, folder / f"tile_{n}_level0_{256 * n}-512-{256 * n + 256}-768{tile.suffix}")
        samples[sample] = folder
    return samples


def _plain_mil(tmp_path, folder, sample, fmt, mpp):
    """Plain `tilefeat extract` of one sample in format `fmt`: its folder of files."""
    out = tmp_path / "plain" / fmt
    out.mkdir(parents=True, exist_ok=True)
    target = ["--outdir", str(out), "--format", fmt] if fmt in ("clam", "stamp", "pt") else []
    result = subprocess.run(
        [str(TILEFEAT_BIN), "extract", str(folder), *target, "--sample", sample, "--slide-mpp", str(mpp),
         "--weights", "random:0", "--device", "cpu", "--threads", "2", "--no-cache", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out / "h5_files" if fmt == "clam" else out, out / "pt_files" if fmt == "clam" else out


def _same_mil_files(found, plain_h5_dir, plain_pt_dir, sample, fmt):
    """The module's files of `sample` hold what plain extract's hold (bags tensor for tensor,
    index.npz the same centres, HDF5 datasets and attributes)."""
    import h5py
    import numpy as np
    import torch

    names = {f.name: f for f in found}
    if fmt in ("pt", "clam"):
        bag = torch.load(names[f"{sample}.pt"], weights_only=True)
        assert bag.dtype == torch.float32 and bool((bag == torch.load(plain_pt_dir / f"{sample}.pt", weights_only=True)).all())
        assert np.array_equal(np.load(names[f"{sample}.index.npz"])["arr_0"], np.load(plain_pt_dir / f"{sample}.index.npz")["arr_0"])
    if fmt in ("stamp", "clam"):
        with h5py.File(names[f"{sample}.h5"]) as a, h5py.File(plain_h5_dir / f"{sample}.h5") as b:
            assert sorted(a) == sorted(b) and dict(a.attrs).keys() == dict(b.attrs).keys()
            for key in a:
                assert np.array_equal(a[key][:], b[key][:]), key
            if fmt == "stamp":
                assert a.attrs["unit"] == "um" and "feats" in a, dict(a.attrs)
    assert names[f"{sample}.rejected.tsv"].read_bytes() == (plain_h5_dir / f"{sample}.rejected.tsv").read_bytes()


@needs_binary
@pytest.mark.parametrize("fmt", ["pt", "stamp", "clam"])
def test_mil_formats_end_to_end(tmp_path, bin_dir, demo_samples, fmt):
    """--format pt|stamp|clam with meta.slide_mpp through both module scripts for real: each
    sample's files (clam's moved up from h5_files/ and pt_files/; index.npz in the optional
    `index` emit) hold what plain `tilefeat extract --format F --slide-mpp F` writes, re-keyed
    per sample as main.nf does; clam's .h5 files join, as main.nf joins them."""
    samples = _histolab_tiles(tmp_path / "tiles", demo_samples)
    params = _default_params(weights="random:0", format=fmt)
    mpp = 0.5
    globs = _output_globs(EXTRACT_NF)
    # one sample per task
    single = {}
    for sample, folder in samples.items():
        args, _ = _modules_config_args("TILEFEAT_EXTRACT", params)
        work = tmp_path / f"extract-{sample}"
        work.mkdir()
        _stage(work, folder.name, folder)
        ctx = _extract_ctx(sample, args, staged=folder.name)
        ctx["meta"]["slide_mpp"] = mpp
        ctx["task"]["ext"]["format"] = params[_ext_format_param("TILEFEAT_EXTRACT")]
        script = render(EXTRACT_NF, "script", ctx)
        assert f"--sample '{sample}' --slide-mpp 0.5 \\\n" in script, script
        result = _run_task(script, work, bin_dir)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        features = _glob(work, globs["features"])
        index = _glob(work, globs["index"])
        assert [f.name for f in features] == ({"pt": [f"{sample}.pt"], "stamp": [f"{sample}.h5"]}.get(fmt) or [f"{sample}.h5", f"{sample}.pt"])
        assert [f.name for f in index] == ([f"{sample}.index.npz"] if fmt in ("pt", "clam") else [])
        assert [f.name for f in _glob(work, globs["provenance"])] == [f"{sample}.provenance.yaml"]
        assert not (work / "h5_files").exists() and not (work / "pt_files").exists()
        found = [*features, *index, *_glob(work, globs["rejected"])]
        _same_mil_files(found, *_plain_mil(tmp_path, folder, sample, fmt, mpp), sample, fmt)
        single[sample] = {"features": features, "provenance": _glob(work, globs["provenance"])[0]}

    # two samples per task, meta.slide_mpp on the batch
    ((batch_id, ids),) = _main_nf_batches(list(samples), 2, {s: mpp for s in samples})
    work = tmp_path / batch_id
    args, _ = _modules_config_args("TILEFEAT_EXTRACT_BATCH", params)
    staged = _staged_names(_batch_stage_pattern(), [samples[s].name for s in ids])
    work.mkdir()
    for sample, name in zip(ids, staged):
        _stage(work, name, samples[sample])
    ctx = _batch_ctx(ids, staged, args, format=fmt)
    ctx["meta"]["slide_mpp"] = mpp
    script = render(BATCH_NF, "script", ctx)
    assert "--sample 'sampleA' --sample 'sampleB' --slide-mpp 0.5 \\\n" in script, script
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert _failed_rows(work, batch_id) == []
    batch_globs = _output_globs(BATCH_NF)
    emitted = [f for emit in ("features", "index", "rejected") for f in _glob(work, batch_globs[emit])]
    for sample in ids:
        _same_mil_files(emitted, tmp_path / "plain" / fmt / ("h5_files" if fmt == "clam" else ""),
                        tmp_path / "plain" / fmt / ("pt_files" if fmt == "clam" else ""), sample, fmt)  # fmt: skip

    if fmt == "clam":  # main.nf joins each sample's .h5 (not its .pt) with its provenance
        outputs = {
            s: {"features": next(f for f in found["features"] if f.suffix == ".h5"), "provenance": found["provenance"]}
            for s, found in single.items()
        }
        rows = _read_rows(_join(tmp_path / "join", bin_dir, outputs, params))
        assert rows[0][:2] == ["sample", "tile"] and len(rows) == 1 + sum(len(list(f.iterdir())) for f in samples.values())
    else:  # which is why main.nf makes no cohort of these: tilefeat join refuses them (exit 3)
        only = next(f for f in single["sampleA"]["features"])
        result = subprocess.run([str(TILEFEAT_BIN), "join", str(only), "--output", str(tmp_path / "c.csv")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 3, result.stderr


@needs_binary
def test_clam_batch_leaves_no_files_of_a_failed_sample(tmp_path, bin_dir, demo_samples):
    """--format clam batched with a sample that has no tiles: the task succeeds, the good
    sample's .h5, .pt, provenance and rejected list are there, the bare one is listed in the
    failed list with none of its files."""
    samples = {"sampleA": demo_samples["sampleA"], "bare": tmp_path / "bare"}
    samples["bare"].mkdir()
    script, result = _run_batch(tmp_path / "batch", bin_dir, samples, _default_params(weights="random:0", format="clam"))
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    work = tmp_path / "batch"
    names = sorted(f.name for emit in ("features", "provenance", "rejected", "index") for f in _glob(work, _output_globs(BATCH_NF)[emit]))
    assert names == ["sampleA.h5", "sampleA.provenance.yaml", "sampleA.pt", "sampleA.rejected.tsv"], names
    ((sample, status, error),) = _failed_rows(work, "bare..sampleA")
    assert (sample, status) == ("bare", "3") and "holds no tiles" in error, error


# ---------------------------------------------------------------------------------------
# Whole-slide images
# ---------------------------------------------------------------------------------------

SLIDE_PARAMS = {"weights": "random:0", "magnification": 5, "patch_size": 512, "tissue": "clam"}
SLIDE_CLI = ["--magnification", "5", "--patch-size", "512", "--tissue", "clam"]


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory):
    """tests/python/make_slides.py's Aperio SVS with tissue (CLAM finds it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import make_slides

    path = tmp_path_factory.mktemp("slides") / "tissue.svs"
    make_slides.write_tissue_svs(path)
    return path


def test_slide_flags_for_slides_only():
    """conf/modules.config passes the slide flags to slides (meta.slide) only, and only those
    that are set; without slide params the command is what it was."""
    params = _default_params(**SLIDE_PARAMS)
    for process in ("TILEFEAT_EXTRACT", "TILEFEAT_EXTRACT_BATCH"):
        slide_args, flags = _modules_config_args(process, params, meta={"slide": True})
        assert {"--magnification", "--mpp", "--patch-size", "--stride", "--tissue"} <= set(flags)
        assert slide_args.endswith(" " + " ".join(SLIDE_CLI)), slide_args
        tile_args, _ = _modules_config_args(process, params, meta={"slide": False})
        assert not any(flag in tile_args for flag in SLIDE_CLI[::2]), tile_args
        assert _modules_config_args(process, _default_params(), meta={"slide": True})[0] == _modules_config_args(process, _default_params())[0]
    # every slide param is in nextflow.config (null) and in the schema
    properties = _schema_properties()
    for name in ("magnification", "mpp", "patch_size", "stride", "tissue"):
        assert name in properties and _default_params()[name] is None, name
    assert properties["tissue"]["enum"] == ["clam", "tcga", "bwh_biopsy", "none"]
    text = (NF / "main.nf").read_text()
    assert 'error "Give --magnification or --mpp, not both' in text
    for module in (EXTRACT_NF, BATCH_NF):
        assert _output_globs(module)["tissue"] == "*.tissue.png"
        assert 'path("*.tissue.png"), optional: true, emit: tissue' in _section(module, "output")


@needs_binary
def test_slide_end_to_end(tmp_path, bin_dir, tiles, tissue_slide):
    """A slide sample through both module scripts for real (staged as a symlink, as Nextflow
    stages it): its CSV is byte for byte a plain `tilefeat extract` of the slide with the same
    flags, and its tissue picture is emitted (`tissue`); batched with slide flags, the slide
    gets a task of its own, apart from the tile folders."""
    reference = tmp_path / "plain" / "slideA.csv"
    result = subprocess.run(
        [str(TILEFEAT_BIN), "extract", str(tissue_slide), "--output", str(reference), "--sample", "slideA",
         "--weights", "random:0", "--device", "cpu", "--threads", "2", "--no-cache", "--quiet", *SLIDE_CLI],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    params = _default_params(**SLIDE_PARAMS)

    # one sample per task
    args, _ = _modules_config_args("TILEFEAT_EXTRACT", params, meta={"slide": True})
    work = tmp_path / "extract-slideA"
    work.mkdir()
    _stage(work, tissue_slide.name, tissue_slide)
    ctx = _extract_ctx("slideA", args, staged=tissue_slide.name)
    ctx["meta"]["slide"] = True
    ctx["task"]["ext"]["format"] = "csv"
    script = render(EXTRACT_NF, "script", ctx)
    assert " ".join(SLIDE_CLI) in script, script
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    found = _collect_outputs(work, EXTRACT_NF, "slideA")
    assert found["features"].read_bytes() == reference.read_bytes()
    assert found["tissue"].name == "slideA.tissue.png"
    # a tile folder gets no slide flag (tilefeat would refuse it, exit 2)
    tile_args, _ = _modules_config_args("TILEFEAT_EXTRACT", params, meta={"slide": False})
    assert "--patch-size" not in tile_args

    # batched: the slide apart from the tile folders, its batch meta.slide true
    batches = _main_nf_batches(["slideA", "sampleA", "sampleB"], 3, slides={"slideA"}, split_slides=True)
    assert batches == [("sampleA..sampleB", ["sampleA", "sampleB"]), ("slideA", ["slideA"])]
    args, _ = _modules_config_args("TILEFEAT_EXTRACT_BATCH", params, meta={"slide": True})
    work = tmp_path / "batch-slideA"
    work.mkdir()
    _stage(work, tissue_slide.name, tissue_slide)
    ctx = _batch_ctx(["slideA"], [tissue_slide.name], args, format="csv")
    ctx["meta"]["slide"] = True
    script = render(BATCH_NF, "script", ctx)
    result = _run_task(script, work, bin_dir)
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    assert _failed_rows(work, "slideA") == []
    assert (work / "slideA.csv").read_bytes() == reference.read_bytes()
    assert [f.name for f in _glob(work, _output_globs(BATCH_NF)["tissue"])] == ["slideA.tissue.png"]


def _main_nf_preset_refusals(params):
    """main.nf's start-up refusals that concern --preset, evaluated for `params` as Groovy
    would (as _main_nf_model_refusals does for --model)."""
    text = RULES._strip_comments((NF / "main.nf").read_text())
    blocks = re.findall(r'^\s*if \( (.+?) \) \{\n\s*error "((?:\\.|[^"\\])*)"\n\s*\}', text, re.MULTILINE)
    preset_blocks = [(c, m) for c, m in blocks if "params.preset" in c]
    assert len(preset_blocks) == 5, preset_blocks
    ctx = {"params": params}
    return [_interpolate(m, ctx) for c, m in preset_blocks if _truthy(evaluate(c, ctx))]


def test_preset_is_passed_alone_and_matches_plain_extract(tmp_path, bin_dir, tiles):
    """--preset (issue 28: the pipeline passed --layer, --pool, --normalize and --size at their
    defaults, so a preset given any other way was refused by tilefeat, exit 2): ext.args
    passes the preset alone; main.nf refuses a setting at neither its default nor the
    preset's value, and a --model; the module's script, run for real, gives a plain
    `extract --preset`'s numbers."""
    trunc = _default_params(preset="resnet50-trunc", weights="random:0")
    for process in ("TILEFEAT_EXTRACT", "TILEFEAT_EXTRACT_BATCH"):
        for agreeing in ({}, {"layer": "layer3", "pool": "avg", "normalize": "imagenet"}):
            args, _ = _modules_config_args(process, {**trunc, **agreeing})
            assert args == "--precision fp32 --preset resnet50-trunc --batch-size 32 --on-error fail --weights random:0", args
    assert _main_nf_preset_refusals(_default_params()) == []
    assert _main_nf_preset_refusals(dict(trunc, layer="layer3", pool="avg", normalize="imagenet")) == []
    assert _main_nf_preset_refusals(_default_params(preset="tutorial", layer="layer3")) == [
        "--layer layer3 disagrees with --preset tutorial: leave --layer at its default"]
    assert _main_nf_preset_refusals(dict(trunc, pool="max", size=448)) == [
        "--size 448 disagrees with --preset resnet50-trunc (224 px): leave --size at its default"]
    assert _main_nf_preset_refusals(_default_params(preset="tutorial", model="/m/tiny.pt")) == [
        "--preset tutorial sets the ResNet50's settings: it does not apply to --model '/m/tiny.pt'"]
    found = _extract_one(tmp_path, bin_dir, "sampleA", tiles / "sampleA", trunc)
    plain, _ = _plain_runs(tmp_path, {"sampleA": tiles / "sampleA"},
                           ["--weights", "random:0", "--preset", "resnet50-trunc"], [])  # fmt: skip
    assert _read_rows(found["features"]) == plain["sampleA"]
    assert len(plain["sampleA"][0]) == 1 + 1024
