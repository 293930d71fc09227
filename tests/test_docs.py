"""The README and the docs/ pages against the repository: commands, flags, make targets, paths, links.

What a page shows must run: every `klotski <subcommand>` in code (fenced blocks and inline code)
exists, every flag on a `klotski <sub> ...` command line is accepted by that subcommand (the truth
is `klotski <sub> --help`, run in a subprocess, so the check does not depend on how the CLI is laid
out in the package), and so is every flag in a table under a heading that names one subcommand
(docs/cli.md); every flag of the CLI is documented in docs/cli.md; every `make <target>` is a
Makefile target; every `scripts/<name>` and every repository path in inline code exists, and the
flags of a `scripts/<name>.py` command appear in its `--help`; every relative Markdown link points
to a file (and a heading, for `#anchor`s into Markdown pages).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Inline code that starts like a command but names a row of `klotski bench --ablation`
# ("klotski simple", the first rung of the ablation ladder), not a subcommand.
NOT_SUBCOMMANDS = {"simple"}

# Repository folders whose paths, written in inline code, must exist (globs must match).
CHECKED_DIRS = ("tests/", "benchmarks/", "examples/", "docs/")  # scripts/: checked apart

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
# Where a shell command starts: the start of a line or inline code, after `$ `, a separator, a
# backtick (inline code inside a code comment), `do` / `then`, environment assignments, and a
# path such as `.venv/bin/`.
_CMD_PREFIX = (r"(?:^|(?<=[;&|`(])|(?<=\bdo\b)|(?<=\bthen\b))[ \t]*(?:\$[ \t]+)?"
               r"(?:[A-Z_][A-Z0-9_]*=(?:'[^']*'|\"[^\"]*\"|\S*)[ \t]+)*")
KLOTSKI_CMD = re.compile(_CMD_PREFIX + r"(?:\S*/)?klotski[ \t]+([a-z][\w-]*)", re.M)
MAKE_CMD = re.compile(_CMD_PREFIX + r"make[ \t]+([a-z][\w-]*)", re.M)
SCRIPT = re.compile(r"(?<![\w/.-])scripts/([\w.-]*[\w])")
SCRIPT_CMD = re.compile(r"(?<![\w/.-])scripts/([\w-]+\.py)\b")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
HELP_OPTION_LINE = re.compile(r"^ {2}(-\S.*?)(?: {2,}|$)")


# ---- what the repository offers ---------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, COLUMNS="1000", PYTHONPATH=str(ROOT))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def options_of(help_text: str) -> set[str]:
    """The option strings an argparse --help lists under its options (not those its texts name)."""
    opts: set[str] = set()
    for line in help_text.splitlines():
        m = HELP_OPTION_LINE.match(line)
        if m:
            for part in m.group(1).split(", "):
                if part.startswith("-"):
                    opts.add(part.split()[0].split("=")[0])
    return opts


@functools.cache
def cli_options(sub: str) -> frozenset[str] | None:
    """The options `klotski <sub>` accepts, or None when there is no such subcommand."""
    r = subprocess.run([sys.executable, "-c", "from klotski_jax.cli import main; main()", sub,
                        "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        return None
    return frozenset(options_of(r.stdout))


@functools.cache
def script_options(name: str) -> frozenset[str]:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--help"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"scripts/{name} --help failed:\n{r.stderr[-2000:]}"
    return frozenset(options_of(r.stdout))


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)[ \t]*:(?!=)", text, re.M))


# ---- reading a page ---------------------------------------------------------------------------
def code_texts(md: str) -> tuple[list[str], list[str]]:
    """(fenced code blocks, inline code spans) of a Markdown text."""
    blocks = [m.group(2) for m in FENCE.finditer(md)]
    prose = FENCE.sub("\n", md)
    spans = [m.group(1) for m in INLINE.finditer(prose)]
    return blocks, spans


def command_tail(code: str, start: int) -> str:
    """The rest of the shell command that starts at `start`: continued over lines ending in a
    backslash and over lines indented deeper than the command's (a synopsis), up to a comment,
    or a `|`, `;`, `&&`, `>` or backtick outside brackets."""
    line_start = code.rfind("\n", 0, start) + 1
    indent = len(code[line_start:start]) - len(code[line_start:start].lstrip(" \t"))
    out, depth, i, n = [], 0, start, len(code)
    while i < n:
        c = code[i]
        if c == "\n":
            rest = code[i + 1:]
            nxt = rest.split("\n", 1)[0]
            prev = "".join(out).rstrip(" \t")
            continued = prev.endswith("\\") or (
                nxt.strip() and len(nxt) - len(nxt.lstrip(" \t")) > indent)
            if not continued:
                break
            out.append(" ")
            i += 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and (c in "|;>`" or code.startswith("&&", i)):
            break
        elif c == "#" and (i == 0 or code[i - 1] in " \t"):
            j = code.find("\n", i)  # a comment: skip to the end of the line
            i = n if j < 0 else j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _anchors(md: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("\n", md)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def _exists(rel: str) -> bool:
    if any(ch in rel for ch in "*?["):
        return bool(glob.glob(str(ROOT / rel)))
    return (ROOT / rel).exists()


def check_markdown(md: str, page: Path) -> list[str]:
    """Every problem of one Markdown text (as if it were the file `page`): [] when it is sound."""
    problems: list[str] = []
    blocks, spans = code_texts(md)

    def check_cli(code: str, where: str) -> None:
        for m in KLOTSKI_CMD.finditer(code):
            sub = m.group(1)
            if sub in NOT_SUBCOMMANDS:
                continue
            opts = cli_options(sub)
            if opts is None:
                problems.append(f"{where}: `klotski {sub}` is not a subcommand")
                continue
            for flag in FLAG.findall(command_tail(code, m.end())):
                if flag not in opts:
                    problems.append(f"{where}: `klotski {sub}` has no option {flag}")

    def check_scripts(code: str, where: str) -> None:
        for m in SCRIPT_CMD.finditer(code):
            name = m.group(1)
            if not (ROOT / "scripts" / name).is_file():
                continue  # reported by the path check
            for flag in FLAG.findall(command_tail(code, m.end())):
                if flag not in script_options(name):
                    problems.append(f"{where}: scripts/{name} has no option {flag}")

    for code in blocks:
        check_cli(code, "code block")
        check_scripts(code, "code block")
    for code in spans:
        check_cli(code, f"`{code}`")
        check_scripts(code, f"`{code}`")
        if code.startswith(CHECKED_DIRS) and " " not in code and not _exists(code.rstrip("/")):
            problems.append(f"`{code}`: no such path in the repository")

    for code in blocks + spans:
        for target in MAKE_CMD.findall(code):
            if target not in make_targets():
                problems.append(f"`make {target}`: no such Makefile target")

    for name in sorted(set(SCRIPT.findall(md))):
        if not (ROOT / "scripts" / name).exists():
            problems.append(f"scripts/{name}: no such file")

    # Flags in the tables under a heading that names exactly one subcommand (docs/cli.md).
    sub = None
    for line in FENCE.sub("\n", md).splitlines():
        h = HEADING.match(line)
        if h:
            subs = set(re.findall(r"`klotski ([a-z][\w-]*)`", h.group(2)))
            sub = subs.pop() if len(subs) == 1 else None
        elif sub and line.lstrip().startswith("|"):
            first = re.split(r"(?<!\\)\|", line.strip().strip("|"))[0]
            opts = cli_options(sub)
            if opts is None:
                problems.append(f"heading names `klotski {sub}`, not a subcommand")
                sub = None
                continue
            for flag in FLAG.findall(first):
                if flag not in opts:
                    problems.append(f"table under `klotski {sub}`: no option {flag}")

    prose = FENCE.sub("\n", md)
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        if not path:
            if anchor and anchor not in _anchors(md):
                problems.append(f"link #{anchor}: no such heading on this page")
            continue
        dest = (page.parent / path).resolve()
        try:
            rel = dest.relative_to(ROOT).as_posix()
        except ValueError:
            problems.append(f"link {target}: outside the repository")
            continue
        if not dest.exists():
            problems.append(f"link {target}: no such file {rel}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            problems.append(f"link {target}: no heading #{anchor} in {rel}")
    return problems


# ---- the tests --------------------------------------------------------------------------------
PAGES = ["README.md", "ARCHITECTURE.md",
         *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_page(page: str) -> None:
    path = ROOT / page
    problems = check_markdown(path.read_text(), path)
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


def test_docs_pages_exist() -> None:
    for page in ("cli", "budgets", "benchmarks", "exactness"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


def test_cli_reference_is_complete() -> None:
    """Every subcommand, and every option of each, has its place in docs/cli.md."""
    r = subprocess.run([sys.executable, "-c", "from klotski_jax.cli import main; main()",
                        "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    subs = re.search(r"\{([\w,-]+)\}", r.stdout).group(1).split(",")
    md = (ROOT / "docs" / "cli.md").read_text()
    sections = {}
    for h in HEADING.finditer(md):
        found = re.findall(r"`klotski ([a-z][\w-]*)`", h.group(2))
        if len(found) == 1:
            end = HEADING.search(md, h.end())
            while end and len(end.group(1)) > len(h.group(1)):
                end = HEADING.search(md, end.end())
            sections[found[0]] = md[h.end(): end.start() if end else len(md)]
    missing = []
    for sub in subs:
        if sub not in sections:
            missing.append(f"no `klotski {sub}` heading")
            continue
        documented = set(FLAG.findall(sections[sub]))
        missing += [f"klotski {sub} {o}" for o in sorted(cli_options(sub) - {"-h", "--help"})
                    if o not in documented]
    assert not missing, "docs/cli.md lacks:\n  " + "\n  ".join(missing)


def test_checker_catches_mistakes() -> None:
    """The checker on a small page with one mistake of each kind (and the same page fixed)."""
    page = ROOT / "docs" / "example.md"
    good = """# Example

```sh
klotski generate CKPT --prompt "hi" --max-new-tokens 8 \\
    --device-budget 25%
.venv/bin/python scripts/make_bench_model.py tiny /tmp/t --convert /tmp/c
make demo
```

Run `klotski plan CKPT --device-budget 25% --json`; see [the CLI](cli.md) and
[budgets](budgets.md) and [the top](#example).

## `klotski bench`

| flag | meaning |
|---|---|
| `--cold-disk` | evict |
"""
    assert check_markdown(good, page) == []
    bad = (good.replace("--max-new-tokens", "--max-new-tokenz")
               .replace("klotski plan", "klotski plna")
               .replace("make demo", "make demoo")
               .replace("--convert", "--convertt")
               .replace("(cli.md)", "(cli-reference.md)")
               .replace("(#example)", "(#nowhere)")
               .replace("`--cold-disk`", "`--cold-disks`")
               + "\nSee `scripts/no_such_script.py`.\n")
    problems = check_markdown(bad, page)
    expected = ["no option --max-new-tokenz", "`klotski plna` is not a subcommand",
                "`make demoo`", "scripts/make_bench_model.py has no option --convertt",
                "no such file docs/cli-reference.md", "#nowhere",
                "table under `klotski bench`: no option --cold-disks",
                "scripts/no_such_script.py: no such file"]
    for e in expected:
        assert any(e in p for p in problems), (e, problems)
    assert len(problems) == len(expected), problems
