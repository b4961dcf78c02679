"""The container image recipe (`Dockerfile`, `.dockerignore`), checked without a Docker daemon."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMAND = ["mfa-gateway", "run", "--config", "/etc/mfa-gateway/gateway.toml"]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped; ARGs substituted."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    args: dict[str, str] = {}
    out: list[Instruction] = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        out.append(Instruction(keyword, rest.strip()))
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage (what the image runs)."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1] :]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile((REPO / "Dockerfile").read_text("utf-8"))


@pytest.fixture(scope="module")
def image(instructions: list[Instruction]) -> list[Instruction]:
    return final_stage(instructions)


def test_slim_python_base(instructions: list[Instruction]) -> None:
    """Every stage starts from the official slim Python 3.11 image."""
    bases = [ins.args.split()[0] for ins in instructions if ins.keyword == "FROM"]
    assert bases
    for base in bases:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base


def test_runs_as_non_root(image: list[Instruction]) -> None:
    """The final image switches to a numeric non-root user before it runs anything."""
    users = [ins.args for ins in image if ins.keyword == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit()
    last_user = max(i for i, ins in enumerate(image) if ins.keyword == "USER")
    assert all(ins.keyword != "RUN" for ins in image[last_user:]), "RUN after USER runs as user"


def test_installs_the_package(instructions: list[Instruction], image: list[Instruction]) -> None:
    """The package is built from the sources and pip-installed into the final image."""
    assert any(
        ins.keyword == "RUN" and re.search(r"pip wheel .*\.$", ins.args) for ins in instructions
    )
    runs = [ins.args for ins in image if ins.keyword == "RUN"]
    assert any(re.search(r"\bpip install\b.*mfa_gateway-.*\.whl", run) for run in runs)
    assert any(ins.keyword == "COPY" and ins.args.startswith("--from=build") for ins in image)


def test_healthcheck_probes_healthz(image: list[Instruction]) -> None:
    """A HEALTHCHECK probes /healthz with a time-out."""
    (check,) = [ins.args for ins in image if ins.keyword == "HEALTHCHECK"]
    assert "--timeout=" in check
    command = exec_form(check[check.index("CMD") + 3 :].strip())
    assert "/healthz" in " ".join(command)


def test_runs_the_gateway(image: list[Instruction]) -> None:
    """ENTRYPOINT + CMD run `mfa-gateway run --config /etc/mfa-gateway/gateway.toml`."""
    entry = [exec_form(ins.args) for ins in image if ins.keyword == "ENTRYPOINT"]
    cmd = [exec_form(ins.args) for ins in image if ins.keyword == "CMD"]
    assert (entry[-1] if entry else []) + (cmd[-1] if cmd else []) == COMMAND


def test_no_secrets_baked_in(instructions: list[Instruction]) -> None:
    """No secret is set in the image; keys and config come from a mount at run time."""
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            assert not re.search(r"(?i)(secret|password|token|encryption_key)\s*=", ins.args)
        if ins.keyword == "COPY":
            assert not re.search(r"\.pem|keys/|secrets|gateway\.toml", ins.args)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `**` any number of directories, `*`/`?` within one."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches the path or a parent folder; the last match wins and
    `!` re-includes."""
    candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex((pattern[1:] if negate else pattern).strip("/"))
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("gateway/cli.py", False),
        ("gateway/web/templates/base.html", False),
        ("keys/es256-1.pem", True),
        ("secrets/upstream-client-secret", True),
        ("gateway.toml", True),
        (".env", True),
        (".git/config", True),
        ("tests/unit/test_cli.py", True),
        ("node_modules/x/index.js", True),
        ("gateway/__pycache__/cli.cpython-311.pyc", True),
        ("gateway/dev-key.pem", True),
    ],
)
def test_dockerignore(path: str, ignored: bool) -> None:
    """The build context is an allow-list: sources in, keys/secrets/config never."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored(path, patterns) is ignored


def test_copied_sources_exist(instructions: list[Instruction]) -> None:
    """Every file the build stage copies from the context exists in the repository."""
    for ins in instructions:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            *sources, _dest = ins.args.split()
            for src in sources:
                assert (REPO / src).exists(), src
