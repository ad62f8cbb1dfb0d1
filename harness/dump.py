# SPDX-License-Identifier: GPL-2.0
"""Reads back what the initramfs printed with its dump function
(harness/initramfs-init): standard input, gzipped and in base64, between the
lines "jq-harness: NAME begin" and "jq-harness: NAME end"."""

import base64
import gzip
import re


def read(lines, name):
    """Returns the bytes dumped as NAME in the last dump of the log, or None."""
    data, inside = None, False
    prefix = re.compile(rf'jq-harness: {re.escape(name)}: (\S+)')
    for line in lines:
        if f'jq-harness: {name} begin' in line:
            inside, data = True, []
        elif f'jq-harness: {name} end' in line:
            inside = False
        elif inside:
            m = prefix.search(line)
            if m:
                data.append(m.group(1))
    if not data:
        return None
    return gzip.decompress(base64.b64decode(''.join(data)))


def main():
    """dump.py LOG NAME OUT: writes what LOG holds as NAME to OUT; exits 1 if nothing."""
    import sys
    with open(sys.argv[1], errors='replace') as f:
        data = read(f, sys.argv[2])
    if data is None:
        return 1
    with open(sys.argv[3], 'wb') as out:
        out.write(data)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
