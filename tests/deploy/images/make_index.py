"""Write a PEP 503 "simple" index over the wheels in INDEX/files: INDEX/simple/<project>/index.html.

pip reads such a folder as an index through a file:// URL; prepare.sh serves the CPU torch wheel this way
to the worker image build (TORCH_CPU_INDEX), since download.pytorch.org is not reachable here.
Usage: python make_index.py INDEX
"""

import html
import re
import sys
from collections import defaultdict
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1])
    projects: dict[str, list[str]] = defaultdict(list)
    for wheel in sorted((root / "files").iterdir()):
        name = wheel.name.split("-")[0]
        projects[re.sub(r"[-_.]+", "-", name).lower()].append(wheel.name)
    for project, files in projects.items():
        folder = root / "simple" / project
        folder.mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="../../files/{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
        (folder / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")


if __name__ == "__main__":
    main()
