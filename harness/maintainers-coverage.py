#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""checkpatch warns FILE_PATH_CHANGES ("does MAINTAINERS need updating?")
for every patch that adds a file. Answer the question instead of silencing it:
every file a patch of the series adds must be covered by an F: pattern of a
MAINTAINERS section other than THE REST, in the MAINTAINERS of the final tree.

usage: maintainers-coverage.py MAINTAINERS PATCH...
"""

import fnmatch
import re
import sys


def sections(path):
    name, pats = None, []
    for line in open(path, errors='replace'):
        line = line.rstrip('\n')
        if line and not re.match(r'^[A-Z]:\t', line) and not line.startswith('\t'):
            if name and pats:
                yield name, pats
            name, pats = line, []
        m = re.match(r'^F:\t(\S+)', line)
        if m:
            pats.append(m.group(1))
    if name and pats:
        yield name, pats


def covered(f, pats):
    for p in pats:
        if p.endswith('/') and f.startswith(p):
            return True
        if fnmatch.fnmatchcase(f, p) or fnmatch.fnmatchcase(f, p.rstrip('/') + '/*'):
            return True
    return False


def main():
    secs = [(n, p) for n, p in sections(sys.argv[1]) if n != 'THE REST']
    bad = 0
    for patch in sys.argv[2:]:
        text = open(patch, errors='replace').read()
        for f in re.findall(r'^diff --git a/\S+ b/(\S+)\nnew file mode', text, re.M):
            owners = [n for n, p in secs if covered(f, p)]
            if not owners:
                print(f'{patch}: {f} is not covered by any MAINTAINERS section')
                bad = 1
    return bad


if __name__ == '__main__':
    sys.exit(main())
