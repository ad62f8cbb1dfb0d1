#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Print the compiler, clippy and rustdoc diagnostics of a build log that
point into the project's own files; exit 1 if there are any.

usage: filter-warnings.py LOG PATH...
"""

import re
import sys

text = open(sys.argv[1], errors='replace').read()
paths = sys.argv[2:]

# rustc-style diagnostics start with "warning" or "error" at the beginning of
# a line; C compiler diagnostics are single lines "path:line:col: warning: ...".
blocks = re.split(r'\n(?=(?:warning|error)(?:\[\S+\])?: )', text)
bad = []
for b in blocks:
    if not re.match(r'(warning|error)', b) or re.match(r'warning: \d+ warnings? emitted', b):
        continue
    if any(p in b for p in paths):
        bad.append(b.strip())
for line in text.splitlines():
    if re.search(r': (warning|error): ', line) and any(p in line for p in paths):
        bad.append(line)
for b in bad:
    print(b)
    print()
sys.exit(1 if bad else 0)
