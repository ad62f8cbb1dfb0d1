#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Judge the log of `harness/run stress`.

Prints the figures the stress module (harness/stress/jq_stress.rs) printed,
then every problem found, and ends with "stress: clean" or "stress: FAILED".
The run is clean when the module ran to its end and found no invariant
violated ("jq-stress: result: clean"), unloaded afterwards (no fence of it
left pending), lockdep stayed on, kmemleak found nothing, the post-test init
ran to its end, and the whole log has none of the reports checklog.py fails a
test run on (lockdep, BUG, WARNING, KASAN, kmemleak, panic, ...).
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checklog import BAD, BENIGN, TIMESTAMP  # noqa: E402

# Reports of the stress run itself, and a Rust fence dropped unsignalled.
STRESS_BAD = [
    (re.compile(r'jq-stress: VIOLATION'), 'invariant violated'),
    (re.compile(r'jq-stress: ERROR'), 'stress run error'),
    (re.compile(r'dropped unsignalled'), 'fence dropped unsignalled'),
]


def main():
    if len(sys.argv) != 2:
        print('usage: stresscheck.py LOG')
        return 2
    try:
        with open(sys.argv[1], errors='replace') as f:
            lines = [TIMESTAMP.sub('', l.rstrip('\n')) for l in f]
    except OSError as e:
        print(f'stresscheck: cannot read the log: {e}')
        print('stress: FAILED')
        return 1

    problems = []
    for i, text in enumerate(lines):
        at = text.find('jq-stress: ')
        if at >= 0:
            print(text[at:])
        if any(b.search(text) for b in BENIGN):
            continue
        for pat, what in BAD + STRESS_BAD:
            if pat.search(text):
                problems.append(f'{what}: line {i + 1}: {text.strip()}')
                break

    joined = '\n'.join(lines)
    if 'jq-stress: result: clean' not in joined:
        m = re.search(r'jq-stress: result: (.*)', joined)
        problems.append(f'the stress run: {m.group(1) if m else "no result: it did not finish"}')
    m = re.search(r'allocation failures armed (\d+) fired (\d+) \(ENOMEM (\d+)', joined)
    if not m or int(m.group(2)) == 0:
        problems.append('no allocation failure was injected (is failslab in the kernel, and '
                        'ignore-gfp-wait off?)')
    m = re.search(r'jq-harness: module jq_stress (.*)', joined)
    if not m or m.group(1).strip() != 'unload ok':
        problems.append(f'module jq_stress: {m.group(1).strip() if m else "not loaded"}, '
                        'expected unload ok')
    m = re.search(r'jq-harness: lockdep debug_locks:\s*(\d+)', joined)
    if not m:
        problems.append('no proof that lockdep was on: /proc/lockdep_stats was not read')
    elif m.group(1) != '1':
        problems.append('lockdep switched itself off during the run (debug_locks = 0)')
    km = re.search(r'jq-harness: kmemleak (\d+|absent)', joined)
    if not km or km.group(1) == 'absent':
        problems.append('kmemleak did not scan')
    elif km.group(1) != '0':
        problems.append(f'kmemleak: {km.group(1)} unreferenced objects')
    if 'jq-harness: end' not in joined:
        problems.append('the post-test checks did not run to the end (crash or timeout?)')

    for p in problems:
        print(f'stresscheck: {p}')
    print('stress: clean' if not problems else 'stress: FAILED')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
