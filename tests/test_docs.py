"""The docs a user reads: every link resolves inside the repository, and every command in a fenced block names
files that exist and flags its command line accepts (checked against the command's own --help)."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tnf_scale.config import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "slurm" / "README.md",
    REPO / "data" / "README.md",
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
ANY_FENCE = re.compile(r"```.*?```", re.S)
# a command quoted in the text, also one that wraps onto the next line (not across a paragraph)
INLINE = re.compile(r"`((?:python|deepspeed|tnf-|mpirun)(?:[^`\n]|\n(?!\n))*)`")


OUTSIDE = ("TNF_" + "SPEC", "../" + "shared")  # the design notes users do not have, spelled apart not to match here


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(doc):
    text = doc.read_text()
    assert not any(word in text for word in OUTSIDE), "users have the repository only: say it in the docs"
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists() and REPO in path.parents or path == REPO, f"{doc.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{doc.name}: {target}: no heading with that anchor in {path.name}"


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def help_text(module_main: str) -> str:
    """The --help of a `module:function` command line, run in this process."""
    module, function = module_main.split(":")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        getattr(importlib.import_module(module), function)(["--help"])
    return out.getvalue()


def passes_training_flags(target: str) -> bool:
    """Whether a command line hands the flags it does not know to the training runs it launches."""
    module = importlib.import_module(target.split(":")[0])
    return "parse_known_args" in Path(module.__file__).read_text()


def entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """(the command line's `module:function`, its arguments) for a command of this project, or None."""
    scripts = console_scripts()
    for i, word in enumerate(words):
        if word in ("tnf_scale/train.py", "tnf_scale.train"):
            return "tnf_scale.train:main", words[i + 1 :]
        if word in scripts:
            return scripts[word], words[i + 1 :]
        if match := re.fullmatch(r"tools/([a-z0-9_]+)\.py", word):
            return f"tnf_scale.cli.{match.group(1)}:main", words[i + 1 :]
        if match := re.fullmatch(r"tnf_scale\.(cli\.[a-z0-9_]+|preflight)", word):
            return f"tnf_scale.{match.group(1)}:main", words[i + 1 :]
    return None


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for every command line in a fenced shell block of the docs (continuation lines joined) and every
    command quoted in their text."""
    commands = []
    for doc in DOCS:
        text = doc.read_text()
        for block in FENCE.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if line and not line.startswith("#"):
                    commands.append((doc.name, line))
        commands += [(doc.name, command) for command in INLINE.findall(ANY_FENCE.sub("", text))]
    return commands


def test_every_documented_command_names_existing_files_and_accepted_flags():
    helps: dict[str, str] = {"tnf_scale.train:main": build_parser().format_help()}
    checked = wrapped = 0
    for doc, command in documented_commands():
        wrapped += "\n" in command
        words = shlex.split(
            re.sub(r"\.\.\.|[\[\]]", "", command)
        )  # a wrapped line's break is a space  # placeholders and optional parts as plain words
        for word in words:  # the repository's own files a command names must be there
            if re.fullmatch(
                r"(ds_configs|slurm|tools|tnf_scale)/[a-z0-9_./-]+\.(json|sh|py)", word
            ):  # not a PLACEHOLDER
                assert (REPO / word).is_file(), f"{doc}: `{command}` names {word}, which does not exist"
        found = entry_point(words)
        if found is None:
            continue
        target, args = found
        if target not in helps:
            helps[target] = help_text(target)
        accepted = set(re.findall(r"--\w+", helps[target]))
        if passes_training_flags(target):
            accepted |= set(re.findall(r"--\w+", helps["tnf_scale.train:main"]))
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert flag in accepted, f"{doc}: `{command}`: {target} has no flag {flag}"
        checked += 1
    # the docs' commands were found (a changed fence syntax would silently check nothing), wrapped ones too
    assert checked >= 20 and wrapped >= 5


@pytest.mark.parametrize("script", ["slurm/pretrain_large.sh", "tools/gpu_check.sh"])
def test_the_shell_scripts_parse(script):
    """Scripts that only run on a cluster or a GPU node (their dry runs are in docs/benchmarks.md) parse here."""
    import subprocess

    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_no_code_comment_or_message_points_outside_the_repository():
    """Users have the repository only: the code cites docs/ (planted: a module citing the design notes' spec file)."""
    sources = [p for folder in ("tnf_scale", "tests", "tools", "slurm") for p in (REPO / folder).rglob("*.*")]
    hits = [
        f"{p.relative_to(REPO)}: {word}"
        for p in sources
        if p.suffix in (".py", ".sh", ".json", ".toml")
        for word in OUTSIDE
        if word in p.read_text()
    ]
    assert not hits, hits


@pytest.mark.parametrize("has_gpu", ["", "1"])
def test_make_install_takes_the_torch_the_suite_runs_on_every_node(has_gpu, tmp_path):
    """A GPU node gets the same torch version as the suite's, not whatever PyPI has newest (planted: the unpinned
    `torch` of GPU nodes fails the GPU case)."""
    import subprocess

    import torch

    proc = subprocess.run(
        ["make", "-n", "-B", "install", f"HAS_GPU={has_gpu}", f"VENV={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f'pip install -q "torch=={torch.__version__.split("+")[0]}"' in proc.stdout


FIGURES_FROM = re.compile(r"<!-- figures: ([^>]*?) -->")
# a figure: a signed number, a decimal, a percentage or a table cell's number (ranges like 10..50 are settings)
FIGURE = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*(?:\.\d+)?%?(?!\w|\.\d)")


def figures_in(text: str) -> list[str]:
    """The figures of a block of prose or a table: numbers with a sign, a decimal point or a percent sign, and the
    numbers of table cells but a row's first; not the words of commands, links or headings."""
    text = re.sub(r"`[^`]*`|\]\([^)]*\)|^#.*$", " ", text, flags=re.M)
    found = []
    for line in text.splitlines():
        cells = line.startswith("|")
        if cells:  # a row's first cell names the row (a setting, a yardstick), the others hold its figures
            line = "|".join(line.split("|")[2:])
        found += [f for f in FIGURE.findall(line) if cells or re.search(r"[-+−.%]", f)]
    return found


def value(figure: str) -> tuple[float, int]:
    """A figure's value and its decimals (a percentage in percent)."""
    number = figure.replace("−", "-").replace(",", "").rstrip("%")
    return float(number), len(number.split(".")[1]) if "." in number else 0


def stated_by(figure: str, artefacts: str) -> bool:
    """Whether an artefact holds the figure: a number that rounds to it at the figure's decimals."""
    wanted, decimals = value(figure)
    return any(
        round(value(found)[0], decimals) == round(wanted, decimals)
        for found in FIGURE.findall(artefacts.replace("−", "-"))
    )


def figure_blocks(doc: Path) -> list[tuple[list[str], str]]:
    """(artefact paths, the text up to the next marker, heading or `<!-- end figures -->`) for every
    `<!-- figures: PATH ... -->`."""
    text = doc.read_text()
    blocks = []
    for match in FIGURES_FROM.finditer(text):
        rest = text[match.end() :]
        ends = (FIGURES_FROM.search(rest), re.search(r"^#", rest, re.M), re.search("<!-- end figures -->", rest))
        end = min([m.start() for m in ends if m] or [len(rest)])
        blocks.append((match.group(1).split(), rest[:end]))
    return blocks


def covered(doc: Path) -> str:
    """The part of a page every figure of which must stand in a results block: the README's results section and
    the whole results page; the benchmarks log is history and only its marked blocks are checked."""
    text = doc.read_text()
    if doc.name == "README.md":
        return text.split("## Results", 1)[1].split("\n## ", 1)[0]
    return text if doc.name == "results.md" else ""


@pytest.mark.parametrize(
    ("doc", "least"),
    [(REPO / "README.md", 4), (REPO / "docs" / "results.md", 10), (REPO / "docs" / "benchmarks.md", 2)],
    ids=["README", "results", "benchmarks"],
)
def test_every_figure_of_the_results_is_in_the_artefact_named_beside_it(doc, least):
    """Each results block names the artefacts in tools/results/ its figures come from; a figure none of them holds
    fails (a re-run that changes a number fails until the page is updated; planted: 241 tokens/s changed to 242),
    and so does a figure of the README's results or the results page outside every block (planted: a figure
    before the first block)."""
    blocks = figure_blocks(doc)
    assert len(blocks) >= least
    outside = covered(doc)
    for _, block in blocks:
        outside = outside.replace(block.strip(), "\n")
    assert not figures_in(outside), f"{doc.name}: {figures_in(outside)} stand in no figures block"
    for paths, block in blocks:
        assert all(p.startswith("tools/results/") and (REPO / p).is_file() for p in paths), paths
        artefacts = "\n".join((REPO / p).read_text() for p in paths)
        missing = [f for f in figures_in(block) if not stated_by(f, artefacts)]
        assert not missing, f"{doc.name}: {missing} are in none of {paths}"
