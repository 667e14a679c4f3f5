"""Run several ``potstill`` commands one after another in each process of one launch
(``accelerate launch ... tests/_launched.py JOBS.json``): one start-up of the process group for a
whole table of runs. JOBS.json is a list of argument lists; the first failure ends the launch with
its exit code."""

import json
import sys
from pathlib import Path

from potstill.cli import main

for argv in json.loads(Path(sys.argv[1]).read_text()):
    code = main(argv)
    if code:
        sys.exit(code)
