"""The README as a newcomer reads it: every ```python block runs as written, a ```text block
right after one is exactly what it prints, and the times the README states for the quick
commands are those their --help states (issue 11)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def fenced_blocks(text):
    """[(language, code, line number)] of every fenced block, in order."""
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```\s*$", text, re.M | re.S):
        blocks.append((match.group(1), match.group(2), text[:match.start()].count("\n") + 1))
    return blocks


def python_blocks():
    """[(code, the text it must print or None, line)]: a ```text block that is the next
    block after a ```python one is that block's output."""
    blocks = fenced_blocks(README.read_text())
    out = []
    for i, (lang, code, line) in enumerate(blocks):
        if lang == "python":
            after = blocks[i + 1] if i + 1 < len(blocks) else None
            out.append((code, after[1] if after and after[0] == "text" else None, line))
    return out


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2
    assert any(expected for _, expected, _ in BLOCKS), "no block with its printed output"


@pytest.mark.quick
@pytest.mark.parametrize("code, expected, line", BLOCKS,
                         ids=[f"README.md:{line}" for _, _, line in BLOCKS])
def test_readme_python_block_runs_as_written(code, expected, line):
    """Each block alone, in a fresh namespace (the kernels through Triton's interpreter on
    CPU, as conftest sets it up)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    if expected is not None:
        assert printed.getvalue().rstrip("\n") == expected.rstrip("\n")


def test_extraction_finds_blocks_and_their_output():
    text = "x\n```python\nprint(1)\n```\nprose\n```text\n1\n```\n```python\npass\n```\n"
    blocks = fenced_blocks(text)
    assert [(lang, code) for lang, code, _ in blocks] == [("python", "print(1)\n"),
                                                          ("text", "1\n"),
                                                          ("python", "pass\n")]


@pytest.mark.quick
def test_stated_times_are_the_same_in_readme_and_help():
    """One measured number per command, the same in the README and in --help."""
    from bnbench import run, train_args

    text = " ".join(README.read_text().split())
    for command, stated in (("bnbench run --quick", run.QUICK_TIME),
                            ("bnbench train --quick", train_args.QUICK_TIME)):
        lines = [line for line in README.read_text().splitlines()
                 if line.startswith(command + " ") or line.startswith(command + "\t")]
        assert lines, command
        for line in lines:
            assert stated in line, (command, line, stated)
        assert stated in text
    # the test suite's length and its fast subset are stated
    assert "pytest -m quick" in text


@pytest.mark.parametrize("table", ["operator variants", "compiled code"])
def test_readme_tables_are_generated(table):
    """The README's op table is the registry's (bnbench.registry.variants_markdown), its
    compiled-code table the committed results/inspect.csv's (bnbench.inspect.markdown):
    regenerate and paste rather than edit by hand."""
    import pandas as pd

    from bnbench import inspect, registry

    if table == "operator variants":
        expected = registry.variants_markdown()
    else:
        expected = inspect.markdown(pd.read_csv(ROOT / "results" / "inspect.csv",
                                                keep_default_na=False))
    assert expected in README.read_text(), f"README's {table} table is not:\n{expected}"


@pytest.mark.parametrize("table", ["traffic", "parallelism"])
def test_readme_proxy_tables_are_the_committed_results(table):
    """The README's traffic and parallelism tables are bnbench.traffic's markdown of the
    committed results/traffic.csv and results/parallelism.csv."""
    import pandas as pd

    from bnbench import traffic

    df = pd.read_csv(ROOT / "results" / f"{table}.csv")
    expected = traffic.markdown(df) if table == "traffic" else traffic.parallelism_markdown(df)
    assert expected in README.read_text(), f"README's {table} table is not:\n{expected}"


def test_readme_overhead_table_is_the_committed_results():
    """The README's host-cost table is bnbench.overhead's markdown of results/overhead.csv."""
    import pandas as pd

    from bnbench import overhead

    expected = overhead.markdown(pd.read_csv(ROOT / "results" / overhead.CSV_NAME))
    assert expected in README.read_text(), f"README's overhead table is not:\n{expected}"


def test_readme_overhead_claim_holds_in_the_committed_results():
    """The README says every path is within 1.5x of torch's call: the committed measurement
    (not a timing made by the test) must say so, path by path, with the launches counted."""
    import pandas as pd

    from bnbench import overhead

    df = pd.read_csv(ROOT / "results" / overhead.CSV_NAME)
    assert set(df["path"]) == {p.name for p in overhead.PATHS}
    assert "every path is within 1.5x of torch's call" in " ".join(README.read_text().split())
    over = df[df["kernels_us"] > 1.5 * df["torch_us"]]
    assert over.empty, over[["path", "torch_us", "kernels_us"]]
    assert (df["launches"] >= 1).all()
