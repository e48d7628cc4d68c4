"""Write the bad-input tables of docs/reliability.md from the real messages.

Every row is a case of the test suite (tests/test_cli_input.py, tests/test_bad_files.py), run once more
here in a temporary folder; the tables are what a user gets today, not what someone remembered:

    python docs/make_reliability.py        # rewrites docs/reliability.md between its markers
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_bad_files  # noqa: E402
import test_cli_input  # noqa: E402

BEGIN, END = "<!-- begin reliability-tables -->", "<!-- end reliability-tables -->"


def main() -> None:
    body = (
        "**Command-line values, outputs and specs** (`tests/test_cli_input.py`):\n\n"
        + test_cli_input.reliability_table()
        + "\n\n**Files and images** (`tests/test_bad_files.py`; paths relative to the test's folder):\n\n"
        + test_bad_files.reliability_table()
    )
    page = ROOT / "docs" / "reliability.md"
    text = page.read_text()
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no {BEGIN} ... {END} block")
    page.write_text(pattern.sub(lambda _: block, text))
    print(f"{page.relative_to(ROOT)}: {body.count(chr(10) + '| ') - 2} rows written")


if __name__ == "__main__":
    main()
