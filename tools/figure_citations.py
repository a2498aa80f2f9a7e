"""The convention for measured numbers in README.md and docs/ (docs/figures/README.md), checked
by tests/test_figures.py: `NUMBER [fig:NAME.KEY]` cites a value of a figures file written by
`tools.figures` (the number must be that value to its printed rounding), `[hand: WHERE,
YYYY-MM-DD]` marks a number measured by hand (on a line of its own right under a heading: the
whole section), and a measured-looking number needs one or the other.

`python3 -m tools.figure_citations --check` lists the breaches; `--update-docs CPU_KIND` rewrites
the cited numbers from that CPU kind's file (`update_docs`).
"""
import argparse
import decimal
import json
from pathlib import Path
import re
import sys
import typing as tp

from tools.figures import (ROOT, TABLE_BEGIN, TABLE_END, TABLE_FILE, figures_path, load_all,
                           value_info)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), TABLE_FILE]
FIG_MARK = re.compile(r"\[fig:([\w.]+)\]")
HAND_MARK = re.compile(r"\[hand:([^\]]*)\]")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
MEASURED = re.compile(
    r"(?<![\w.])(?:\d+(?:\.\d+)?-)?\d+(?:\.\d+)? ?(?:dB|MB|MiB|GB|GiB)\b"  # scores, memory
    r"|(?<![\w.])\d+\.\d+ ?(?:s|ms)\b"  # times with decimals
    r"|(?<![\w.])\d+(?:\.\d+)?-\d+(?:\.\d+)? ?(?:s|ms|minutes)\b"  # ranges of times
    r"|(?<![\w.])\d+(?:\.\d+)? ?%"  # percentages
    r"|(?<![\w.])\d+(?:\.\d+)?x\b"  # speed-ups
    r"|(?<![\w.])0\.\d{3}\b")  # ratios
# Sizes of inputs, not results: a length or size followed by what it measures.
INPUT_SIZE = re.compile(r" ?(?:segments?|stereo|tracks?|excerpts?|songs?|examples?|of audio|"
                        r"long|noise|windows?|chunks?|blocks?|jobs?)\b")


def is_input_size(line: str, found: tp.Match) -> bool:
    """Whether the number `found` in `line` is the size of an input: followed by what it
    measures (`30 s stereo`) or closely after the word segment (`its segment (7.8 s`)."""
    return bool(INPUT_SIZE.match(line, found.end())
                or "segment" in line[max(0, found.start() - 25):found.start()])


INLINE_CODE = re.compile(r"`([^`]*)`")
BLOCK_START = re.compile(r"#+ |[-*] |\d+\. |\|")
COMMENT = re.compile(r"<!--.*?-->")


def code_word(match: tp.Match) -> str:
    """An inline code span as prose reads it: a bare word stays (`segment`), anything else,
    commands and their numbers, goes."""
    return match.group(1) if re.fullmatch(r"[A-Za-z_]+", match.group(1)) else ""


def prose_blocks(text: str) -> tp.Iterator[tp.Tuple[int, str]]:
    """(first line number, text joined on one line) of each paragraph, list item, table and
    heading of `text` outside fenced code blocks, with inline code and HTML comments removed
    (commands and their arguments are not figures)."""
    fenced = False
    start, lines = 0, []  # type: tp.Tuple[int, tp.List[str]]
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            line = ""
        stripped = "" if fenced else COMMENT.sub("", INLINE_CODE.sub(code_word, line)).strip()
        table_row = lines and lines[-1].startswith("|") and stripped.startswith("|")
        if lines and (not stripped or BLOCK_START.match(stripped)) and not table_row:
            yield start, " ".join(lines)
            lines = []
        if stripped:
            start = start if lines else number
            lines.append(stripped)
    if lines:
        yield start, " ".join(lines)


def hand_covered_lines(text: str) -> tp.Set[int]:
    """Line numbers of the sections whose first line under the heading is a `[hand: ...]`
    marker (up to the next heading of the same or a higher level)."""
    lines = text.splitlines()
    covered: tp.Set[int] = set()
    level_open: tp.Optional[int] = None
    for index, line in enumerate(lines):
        heading = re.match(r"(#+) ", line)
        if heading:
            level = len(heading.group(1))
            if level_open is not None and level <= level_open:
                level_open = None
            following = next((other for other in lines[index + 1:] if other.strip()), "")
            if level_open is None and HAND_MARK.match(following.strip()):
                level_open = level
        if level_open is not None:
            covered.add(index + 1)
    return covered


def cited_value_problem(line: str, match: tp.Match, figures: tp.Sequence[dict]) -> str:
    """Why the number before the `[fig:KEY]` marker `match` is not KEY's value in any of
    `figures` to its printed rounding ('' when it is)."""
    key = match.group(1)
    try:
        value_info(key)
    except KeyError as error:
        return str(error.args[0])
    before = FIG_MARK.split(HAND_MARK.sub("", line[:match.start()]))[-1]
    numbers = NUMBER.findall(before)
    if not numbers:
        return f"no number before [fig:{key}]"
    printed = numbers[-1]
    quantum = 10.0 ** decimal.Decimal(printed).as_tuple().exponent
    name, _, field = key.partition(".")
    values = [record["figures"][name]["values"][field] for record in figures
              if field in record["figures"].get(name, {}).get("values", {})]
    if any(abs(float(printed) - value) <= quantum / 2 + 1e-12 for value in values):
        return ""
    return (f"{printed} [fig:{key}] is in no figures file (values there: "
            f"{', '.join(f'{value:.6g}' for value in values) or 'none'})")


def without_generated_table(text: str) -> str:
    """`text` with the lines of the table `tools.figures` writes (between its markers) blanked:
    it is the figures files printed, checked against them by its own test."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        return text
    head, rest = text.split(TABLE_BEGIN, 1)
    table, tail = rest.split(TABLE_END, 1)
    return head + "\n" * table.count("\n") + tail


def uncited_claims(block: str) -> tp.List[str]:
    """The measured-looking numbers of `block` that no `[fig:KEY]` follows before the next one."""
    claims = [found for found in MEASURED.finditer(block) if not is_input_size(block, found)]
    ends = [claim.start() for claim in claims[1:]] + [len(block)]
    return [claim.group(0) for claim, end in zip(claims, ends)
            if not FIG_MARK.search(block, claim.end(), end)]


def doc_problems(text: str, figures: tp.Sequence[dict]) -> tp.List[str]:
    """Every breach of the convention in the markdown `text`, checked against the figures files
    `figures`, as `line N: what` (N: the first line of the paragraph, list item or table). A
    `[hand: ...]` marker covers its paragraph, list item or table, and the table right after its
    paragraph; a `[fig:KEY]` marker covers the one number before it."""
    problems = []
    text = without_generated_table(text)
    covered = hand_covered_lines(text)
    previous_by_hand = False
    for number, block in prose_blocks(text):
        for mark in HAND_MARK.finditer(block):
            where = DATE.sub("", mark.group(1)).strip(" ,;")
            if not DATE.search(mark.group(1)) or not where:
                problems.append(f"line {number}: {mark.group(0)} must say where and when "
                                "([hand: WHERE, YYYY-MM-DD])")
        for mark in FIG_MARK.finditer(block):
            problem = cited_value_problem(block, mark, figures)
            if problem:
                problems.append(f"line {number}: {problem}")
        by_hand = bool(HAND_MARK.search(block))
        table_under_hand = block.startswith("|") and previous_by_hand
        previous_by_hand = by_hand
        if number in covered or by_hand or table_under_hand:
            continue
        claims = uncited_claims(block)
        if claims:
            problems.append(f"line {number}: {', '.join(claims)} look measured but cite no "
                            "figure: add [fig:NAME.KEY] or [hand: WHERE, YYYY-MM-DD]")
    return problems


def docs_problems(paths: tp.Sequence[Path] = DOCS) -> tp.List[str]:
    """`doc_problems` of every doc in `paths` against every figures file, as `PATH: line N:`."""
    figures = list(load_all().values())
    return [f"{path.relative_to(ROOT)}: {problem}" for path in paths
            for problem in doc_problems(path.read_text(), figures)]


INLINE_CODE_SPAN = re.compile(r"(`[^`]*`)")
CITED = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?=[^\d\[\]]{0,12}\[fig:([\w.]+)\])")


def cite_values(text: str, figures: tp.Dict[str, tp.Any]) -> str:
    """`text` with each number cited as `NUMBER ... [fig:KEY]` replaced by KEY's value in the
    figures file `figures`, printed with as many decimals as the number had (a key the file
    lacks leaves its number as it is, and so does code between backticks)."""
    def replace(match: tp.Match) -> str:
        name, _, field = match.group(2).partition(".")
        values = figures["figures"].get(name, {}).get("values", {})
        if field not in values:
            return match.group(1)
        decimals = max(0, -decimal.Decimal(match.group(1)).as_tuple().exponent)
        return f"{values[field]:.{decimals}f}"
    pieces = INLINE_CODE_SPAN.split(text)  # odd pieces are code: examples, not citations
    return "".join(piece if index % 2 else CITED.sub(replace, piece)
                   for index, piece in enumerate(pieces))


def update_docs(kind: str, paths: tp.Sequence[Path] = DOCS) -> tp.List[Path]:
    """Rewrite the cited numbers of `paths` from the figures file of CPU kind `kind` (the docs
    that name that CPU beside them); returns the files changed."""
    figures = json.loads(figures_path(kind).read_text())
    changed = []
    for path in paths:
        text = path.read_text()
        cited = cite_values(text, figures)
        if cited != text:
            path.write_text(cited)
            changed.append(path)
    return changed


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools.figure_citations",
                                     description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true",
                        help="list the docs' figures that break the convention")
    action.add_argument("--update-docs", metavar="CPU_KIND",
                        help="rewrite the numbers the docs cite as [fig:KEY] from "
                             "docs/figures/CPU_KIND.json (the CPU the docs name)")
    args = parser.parse_args(argv)
    if args.update_docs:
        for path in update_docs(args.update_docs):
            print(f"Updated the cited figures of {path.relative_to(ROOT)}")
        return 0
    problems = docs_problems()
    print("\n".join(problems) or "Every measured figure of the docs is cited.")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
