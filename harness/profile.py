#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Turns the tick profile of a `harness/run bench profile` boot into a table.

The kernel samples the interrupted kernel address at every timer tick when it
boots with `profile=SHIFT` (kernel/profile.c): /proc/profile holds the sampling
step, then one counter per 2^SHIFT bytes of kernel text from _stext. The
initramfs prints it gzipped and in base64 between "jq-harness: profile begin"
and "... end". Under `-icount` the ticks come every so many instructions, so
the counts are shares of the instructions executed.

usage: profile.py LOG SYSTEM.MAP [TOP]
"""

import bisect
import os
import re
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dump  # noqa: E402

# Where the CPUs wait for work: counted apart, not in the shares.
IDLE = re.compile(r'^(default_idle|arch_cpu_idle|cpu_idle_poll|pv_native_safe_halt|'
                  r'native_safe_halt|do_idle|cpuidle_.*|acpi_idle_.*|mwait_idle.*|'
                  r'__cpuidle_text_start|poll_idle)$')


def read_profile(log):
    with open(log, errors='replace') as f:
        data = dump.read(f, 'profile')
    if data is None:
        sys.exit(f'profile.py: no profile in {log} (profile= on the command line, CONFIG_PROFILING)')
    step = struct.unpack_from('<I', data)[0]
    counts = struct.unpack_from(f'<{(len(data) - 4) // 4}I', data, 4)
    return step, counts


def read_symbols(path):
    syms = []
    with open(path) as f:
        for line in f:
            addr, kind, name = line.split()[:3]
            if kind in 'tTwW':
                syms.append((int(addr, 16), name))
    syms.sort()
    return syms


def main():
    log, smap = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    step, counts = read_profile(log)
    syms = read_symbols(smap)
    stext = next(a for a, n in syms if n == '_stext')
    addrs = [a for a, _ in syms]
    by_fn = {}
    for i, c in enumerate(counts):
        if not c:
            continue
        k = bisect.bisect_right(addrs, stext + i * step) - 1
        name = syms[k][1] if k >= 0 else '?'
        by_fn[name] = by_fn.get(name, 0) + c
    idle = sum(c for n, c in by_fn.items() if IDLE.match(n))
    busy = sum(by_fn.values()) - idle
    if not busy:
        sys.exit('profile.py: no samples outside the idle loop')
    print(f'{busy} samples outside the idle loop ({idle} idle), by function:\n')
    print('| share | samples | function |')
    print('|---:|---:|---|')
    for name, c in sorted(by_fn.items(), key=lambda x: -x[1]):
        if IDLE.match(name):
            continue
        if top == 0:
            break
        top -= 1
        print(f'| {100 * c / busy:.1f}% | {c} | `{name}` |')


if __name__ == '__main__':
    main()
