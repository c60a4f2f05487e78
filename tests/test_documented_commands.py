"""Every command shown in README.md and docs/*.md runs as written on tiny data, or is marked as
needing what CI does not have.

Commands are collected from the Markdown: the lines of ```bash / ```sh code blocks; the lines of
plain ``` and 4-space indented blocks that start with a launcher (after an optional `$ ` prompt);
inline code spans that start with a launcher and name a program. Launchers: `python`, `python3`,
`torchrun`, `accelerate launch`, `bash`, `pip`, `hf`, optionally after `VAR=value` assignments.
A span of only a launcher (`torchrun`, `accelerate launch --cpu --num_processes 2`) names the
launcher, and `python -m MODULE` / `python SCRIPT.py` with no argument names the tool in prose:
neither is a command (a tool named so must be shown as a command somewhere in the docs).

A command that cannot run in CI is marked in the Markdown with what it needs (categories: NEEDS):
- `<!-- needs: gpu -->` alone on a line: every command of the block (code block or paragraph) that
  starts on the next non-blank line;
- `<!-- needs: data -->` right before an inline code span: that span;
- `# needs: network` as (the start of) a trailing comment of a line in a code block: that command.

The unmarked commands run as written, in the order of the pages (README.md, then docs/*.md), in
one temporary folder that holds links to the repository's entry points and experiments/ (so the
documented relative paths work and nothing is written into the repository), offline, with the
sizes shrunk by SHRINK; each must exit with status 0.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))

NEEDS = {
    "gpu": "one or several GPUs (torchrun / accelerate launch over GPUs, CUDA)",
    "data": "ImageNet or the user's own data, checkpoints or values (the command shows placeholders)",
    "network": "a download (PyPI, the Hugging Face hub)",
    "time": "more time, memory or scratch disk than CI has: the study's runs, benchmarks, the test suite itself",
}

HOW_TO_MARK = ("`<!-- needs: CATEGORY -->` on the line before its block or right before its inline span, or "
               "`# needs: CATEGORY` after it in a code block; categories: " + ", ".join(NEEDS))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LAUNCHER = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"  # VAR=value ...
                      r"(python3?|torchrun|accelerate launch|bash|pip|hf)(?=\s|$)(.*)$", re.S)
MARKER = r"<!--\s*needs:\s*([\w-]+(?:\s*,\s*[\w-]+)*)\s*-->"
MARKER_LINE = re.compile(r"^\s*" + MARKER + r"\s*$")
INLINE_MARKER = re.compile(MARKER + r"\s*$")
COMMENT_MARKER = re.compile(r"#\s*needs:\s*([\w-]+(?:\s*,\s*[\w-]+)*)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


@dataclass
class Command:
    file: str
    line: int
    text: str                      # one logical line: continuations joined, comments dropped
    needs: Tuple[str, ...] = ()    # categories of the markers that apply to it

    def __str__(self):
        return f"{self.file}:{self.line}: {self.text}"


@dataclass
class Marker:
    line: int
    names: Tuple[str, ...]
    used: bool = False


@dataclass
class Parsed:
    commands: List[Command] = field(default_factory=list)
    tool_names: List[Command] = field(default_factory=list)   # `python -m X` spans without arguments
    markers: List[Marker] = field(default_factory=list)


def _names(text: str) -> Tuple[str, ...]:
    return tuple(n.strip() for n in text.split(","))


def _strip_comment(line: str) -> str:
    """The line without its shell comment (a `#` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _logical_lines(body: List[Tuple[int, str]]):
    """[(first line number, text without comments, markers of its trailing comments)], backslash
    continuations joined."""
    out, parts, first, names = [], [], None, ()
    for number, raw in body:
        m = COMMENT_MARKER.search(raw[len(_strip_comment(raw)):])
        names += _names(m.group(1)) if m else ()
        code = _strip_comment(raw)
        if first is None:
            if not code.strip():
                names = ()
                continue
            first = number
        if code.endswith("\\"):
            parts.append(code[:-1].strip())
            continue
        parts.append(code.strip())
        out.append((first, " ".join(p for p in parts if p), names))
        parts, first, names = [], None, ()
    if parts:
        out.append((first, " ".join(p for p in parts if p), names))
    return out


def classify(text: str) -> Optional[str]:
    """'command', 'tool' (a program named without arguments) or None (not a command) for text
    that follows no shell syntax of its own: an inline span or a line of a plain block."""
    m = LAUNCHER.match(text.strip())
    if not m:
        return None
    if not text.strip().startswith(m.group(1)):
        return "command"  # VAR=value before the launcher: a command line, not a name in prose
    launcher, rest = m.group(1), m.group(2).split()
    if launcher in ("pip", "hf"):
        return "command" if rest else None
    if launcher == "bash":
        return "command" if any(w.endswith(".sh") for w in rest) else None
    for i, word in enumerate(rest):
        if word in ("-m", "-c") or word.endswith(".py"):
            args = rest[i + (2 if word in ("-m", "-c") else 1):]
            return "command" if args or word == "-c" else "tool"
    return None


def program(text: str) -> Optional[str]:
    """The script or module a python command runs ('train.py', '-m evaluation.evaluate'), else None."""
    words = text.split()
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return f"-m {words[i + 1]}"
        if word.endswith(".py"):
            return word
    return None


def parse(path: str, root: str = REPO) -> Parsed:
    """The commands, tool names and markers of the Markdown file `path` (relative to `root`)."""
    with open(os.path.join(root, path)) as f:
        lines = f.read().split("\n")
    result, pending = Parsed(), None

    def add(number, text, names):
        if pending:
            pending.used = True
        result.commands.append(Command(path, number, text, (pending.names if pending else ()) + names))

    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER_LINE.match(line)
        if m:
            pending = Marker(i + 1, _names(m.group(1)))
            result.markers.append(pending)
            i += 1
            continue
        if not line.strip():
            i += 1
            continue
        fence = FENCE.match(line)
        indented = line.startswith("    ") and (i == 0 or not lines[i - 1].strip())
        if fence:
            j, body = i + 1, []
            while j < len(lines) and not lines[j].strip().startswith(fence.group(1)):
                body.append((j + 1, lines[j]))
                j += 1
            lang = fence.group(2).lower()
            if lang in SHELL_LANGS or lang == "":
                for number, text, names in _logical_lines(body):
                    if lang == "" and text.startswith("$ "):
                        text = text[2:]
                    if lang in SHELL_LANGS or classify(text) == "command":
                        add(number, text, names)
            i = j + 1
        elif indented:
            j, body = i, []
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                body.append((j + 1, lines[j][4:]))
                j += 1
            for number, text, names in _logical_lines(body):
                if text.startswith("$ "):
                    text = text[2:]
                if classify(text) == "command":
                    add(number, text, names)
            i = j
        else:  # a paragraph (or a table, a list item): its inline code spans
            j = i
            while j < len(lines) and lines[j].strip() and not FENCE.match(lines[j]) and not MARKER_LINE.match(lines[j]):
                j += 1
            text = "\n".join(lines[i:j])
            for span in SPAN.finditer(text):
                content = " ".join(span.group(2).split())
                kind = classify(content)
                number = i + 1 + text.count("\n", 0, span.start())
                before = INLINE_MARKER.search(text[:span.start()])
                names = _names(before.group(1)) if before else ()
                if before:
                    result.markers.append(Marker(number, names, used=kind == "command"))
                if kind == "command":
                    add(number, content, names)
                elif kind == "tool":
                    result.tool_names.append(Command(path, number, content))
            i = j
        pending = None  # a block marker applies to the block right after it only
    return result


# --- what an unmarked command must not show --------------------------------------------------------

SIGNS = {  # category -> what in a command says it needs it
    "data": re.compile(
        r"\.\.\."                                             # 'and so on'
        r"|(?:^|\s)\[[^\]]*\]"                                # [--optional args] of a synopsis
        r"|(?<![A-Za-z0-9$%{])[A-Z](?:[A-Z0-9_]*[A-Z0-9])?(?![\w=(])"  # CKPT, REF.npz, DATA_DIR, ref_N
        r"|(?:^|[\s=])/[\w.-]+/"                              # an absolute path (/data/..., /tmp/...)
        r"|(?<![\w/])(?:data|exps|pretrained|weights)/"       # ImageNet folders, checkpoints of runs
        r"|\bimagenet|\bILSVRC"),
    "gpu": re.compile(r"--multi_gpu|--nproc_per_node[= ](?!1\b)\d+|--num_processes[= ](?!1\b)\d+|\bcuda\b"),
    "network": re.compile(r"\bpip3? install\b|\bhf download\b|https?://"),
    "time": re.compile(r"experiments/study/\w+\.sh|\bpytest\b"),
}


def unmarked_signs(command: Command) -> List[str]:
    """'category (what)' for every sign of a need in an unmarked command."""
    found = []
    for name, sign in SIGNS.items():
        m = sign.search(command.text)
        if m:
            found.append(f"{name} ({m.group(0).strip()})")
    return found


# --- running ---------------------------------------------------------------------------------------

# Appended to a runnable command before it runs, to shrink the work: each entry changes sizes only
# (the last value of a key wins in every tool), never which code runs or the names of the files a
# later command of the same page reads.
SHRINK = [
    # The CPU demos (DFM and ELIT, with or without post-hoc EMA): a 3-block, width-32 model, batch
    # 4 and 4 images per class, 8 preview samples. max_train_steps, the checkpoint and snapshot
    # steps and exp_name stay, so demo_runs/<exp>/checkpoints/<step>.pt and the post-hoc EMA
    # snapshots (and so the reachable stds) are the ones the docs name. Depth 3 is the smallest the
    # ELIT demo allows (head 1, core >= 1, tail 1).
    (re.compile(r"^python3? train\.py --config experiments/train/demo_cpu(_elit)?\.yaml"),
     "model_overrides.depth=3 model_overrides.hidden_size=32 model_overrides.num_heads=2 batch_size=4 "
     "demo_images_per_class=4 preview.num_samples=8"),
    # The data tools' benchmark: fewer (synthetic) images; the same code paths and settings.
    (re.compile(r"^python3? -m data\.benchmark convert"), "--images 16"),
    (re.compile(r"^python3? -m data\.benchmark paired-loader"), "--images 32 --batch-size 8"),
    (re.compile(r"^python3? -m data\.benchmark encode"), "--images 1 --batch-size 1"),
]


def shrunk(text: str) -> str:
    extra = [words for pattern, words in SHRINK if pattern.search(text)]
    return " ".join([text] + extra)


def runnable(path: str) -> List[Command]:
    return [c for c in parse(path).commands if not c.needs]


def _sandbox(root) -> dict:
    """A working folder that looks like the repository root to the commands (links to the entry
    points and experiments/), with `python` on PATH running this interpreter; returns the
    environment to run in."""
    for name in sorted(os.listdir(REPO)):
        if name.endswith(".py") or name == "experiments":
            os.symlink(os.path.join(REPO, name), os.path.join(root, name))
    bin_dir, tmp = os.path.join(root, ".bin"), os.path.join(root, ".tmp")
    os.makedirs(bin_dir)
    os.makedirs(tmp)
    for name in ("python", "python3"):
        with open(os.path.join(bin_dir, name), "w") as f:
            f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        os.chmod(os.path.join(bin_dir, name), 0o755)
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", TMPDIR=tmp, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONSTARTUP", None)
    return env


# --- the tests -------------------------------------------------------------------------------------

def test_the_collector_reads_every_kind_of_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python train.py --config a.yaml` or name `python -m evaluation.evaluate`; `torchrun` and\n"
        "`accelerate launch --cpu --num_processes 2` are launchers, `git status` is not ours.\n"
        "A span over two lines: `python -m generation.budget_sweep --ckpt x.pt\n--class-label 3`.\n"
        "\n"
        "```bash\n"
        "# a comment\n"
        "python generate.py --ckpt x.pt \\\n"
        "    num_samples=8   # eight\n"
        "OMP_NUM_THREADS=1 python -m bench.finite_check\n"
        "```\n"
        "\n"
        "<!-- needs: gpu, data -->\n"
        "```\n"
        "$ torchrun --nproc_per_node 8 generate.py --ckpt CKPT\n"
        "| a table | of output |\n"
        "```\n"
        "\n"
        "    python train.py --help\n"
        "    pip install tensorboard   # needs: network (not in requirements.txt)\n"
        "\n"
        "<!-- needs: time -->\n"
        "A paragraph: `bash experiments/study/dfm_vs_fm.sh` and <!-- needs: data --> `python x.py RUN`.\n"
        "\n"
        "```python\n"
        "python_code = 1\n"
        "```\n")
    parsed = parse("page.md", root=str(tmp_path))
    got = [(c.line, c.text, c.needs) for c in parsed.commands]
    assert got == [
        (1, "python train.py --config a.yaml", ()),
        (3, "python -m generation.budget_sweep --ckpt x.pt --class-label 3", ()),
        (8, "python generate.py --ckpt x.pt num_samples=8", ()),
        (10, "OMP_NUM_THREADS=1 python -m bench.finite_check", ()),
        (15, "torchrun --nproc_per_node 8 generate.py --ckpt CKPT", ("gpu", "data")),
        (19, "python train.py --help", ()),
        (20, "pip install tensorboard", ("network",)),
        (23, "bash experiments/study/dfm_vs_fm.sh", ("time",)),
        (23, "python x.py RUN", ("time", "data")),
    ]
    assert [t.text for t in parsed.tool_names] == ["python -m evaluation.evaluate"]
    assert [(m.line, m.names, m.used) for m in parsed.markers] == [
        (13, ("gpu", "data"), True), (22, ("time",), True), (23, ("data",), True)]


def marking_problems(paths: List[str], root: str = REPO) -> List[str]:
    """One line per unknown or misplaced marker, unmarked command that shows a need, tool named in
    prose that no command runs, and SHRINK entry that shrinks nothing."""
    problems, programs, tools, unmarked = [], set(), [], []
    for path in paths:
        parsed = parse(path, root)
        for marker in parsed.markers:
            unknown = [n for n in marker.names if n not in NEEDS]
            if unknown:
                problems.append(f"{path}:{marker.line}: marker names {', '.join(unknown)}; known: {', '.join(NEEDS)}")
            if not marker.used:
                problems.append(f"{path}:{marker.line}: marker applies to no command (it goes on the line before a "
                                f"code block or paragraph, or right before an inline command)")
        for command in parsed.commands:
            signs = [] if command.needs else unmarked_signs(command)
            if signs:
                problems.append(f"{command.file}:{command.line}: `{command.text}` shows {'; '.join(signs)}: make "
                                f"it run on tiny data, or mark what it needs ({HOW_TO_MARK})")
        tools += parsed.tool_names
        programs.update(program(c.text) for c in parsed.commands)
        unmarked += [c.text for c in parsed.commands if not c.needs]
    problems += [f"{tool.file}:{tool.line}: `{tool.text}` names a tool that no command of the docs runs"
                 for tool in tools if program(tool.text) not in programs]
    problems += [f"SHRINK entry {pattern.pattern!r} applies to no runnable command"
                 for pattern, _ in SHRINK if not any(pattern.search(t) for t in unmarked)]
    return problems


def test_a_command_with_placeholders_or_a_bad_marker_is_one_line_naming_it(tmp_path):
    (tmp_path / "page.md").write_text(
        "Sample with `python generate.py --ckpt CKPT num_samples=8`, train on\n"
        "<!-- needs: gpus -->`torchrun --nproc_per_node 8 train.py --config x.yaml`.\n"
        "\n"
        "<!-- needs: data -->\n"
        "Nothing to mark here.\n"
        "\n"
        "```bash\n"
        "python train.py --config experiments/train/demo_cpu.yaml\n"
        "pip install tensorboard\n"
        "python train.py --data-dir /data/in256 ...   # needs: data\n"
        "```\n"
        "`python -m bench.nothing` names a tool.\n")
    problems = [p.split(": make it run")[0] for p in marking_problems(["page.md"], root=str(tmp_path))]
    assert problems == [
        "page.md:2: marker names gpus; known: gpu, data, network, time",
        "page.md:4: marker applies to no command (it goes on the line before a code block or paragraph, or right "
        "before an inline command)",
        "page.md:1: `python generate.py --ckpt CKPT num_samples=8` shows data (CKPT)",
        "page.md:9: `pip install tensorboard` shows network (pip install)",
        "page.md:12: `python -m bench.nothing` names a tool that no command of the docs runs",
    ] + [f"SHRINK entry {p.pattern!r} applies to no runnable command" for p, _ in SHRINK[1:]]


def test_every_command_runs_here_or_is_marked_with_what_it_needs():
    assert not marking_problems(DOCS), "\n".join(marking_problems(DOCS))
    assert sum(len(runnable(path)) for path in DOCS) >= 20  # the collector still finds the runnable commands


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """One working folder for all pages, as the checkout of a user who reads README.md and then
    docs/ in order; returns (folder, environment, commands already run there). A command that an
    earlier page already ran there (the demos, `--help`) is not run again: its text is proven, and
    its outputs are there for the page's later commands. Run alone, a page's test runs them all."""
    root = str(tmp_path_factory.mktemp("docs"))
    return root, _sandbox(root), set()


@pytest.mark.slow  # about 2 minutes on 2 cores, most of it the three CPU demos of README.md (CI runs it)
@pytest.mark.parametrize("path", [p for p in DOCS if runnable(p)])
def test_documented_commands_run_as_written(path, sandbox):
    root, env, done = sandbox
    for command in runnable(path):
        text = shrunk(command.text)
        if text in done:
            continue
        started = time.monotonic()
        try:
            proc = subprocess.run(["bash", "-c", text], cwd=root, env=env, capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command.file}:{command.line}: `{text}` still ran after 300 s")
        took = time.monotonic() - started
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().split("\n")[-15:])
            pytest.fail(f"{command.file}:{command.line}: `{text}` exited {proc.returncode} after {took:.1f} s:\n{tail}")
        done.add(text)
        print(f"{took:6.1f} s  {command.file}:{command.line}: {text}")
