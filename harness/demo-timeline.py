#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Turn the kernel log of the demo boot into a readable account of what the
job queue did: the demo's own narration, a timeline built from the
drm_jobqueue trace events (tp_printk), the summary, and the checks (lockdep
still on, nothing bad in the log). Exits non-zero if the demo did not finish
or the log is not clean."""

import re
import sys

STAMP = re.compile(r'^\[\s*(\d+\.\d+)\]\s*(.*)$')
EVENT = re.compile(r'drm_jobqueue_(\w+): (.*)$')
SUBMIT = re.compile(r'demo: submitted (\S+) to the (\S+) ring: done fence (\d+:\d+)')
BAD = re.compile(r'BUG: |WARNING: |sleeping function called from invalid context|'
                 r'possible recursive locking|possible circular locking|inconsistent lock state|'
                 r'KASAN|Kernel panic|Call Trace:|turning off the locking correctness validator')


def main():
    lines = open(sys.argv[1], errors='replace').read().splitlines()
    names = {}
    rings = {}
    narration, events, summary, problems = [], [], [], []
    t0 = None
    for line in lines:
        m = STAMP.match(line)
        t, text = (float(m.group(1)), m.group(2)) if m else (None, line)
        if BAD.search(text):
            problems.append(text)
        s = SUBMIT.search(text)
        if s:
            names[s.group(3)] = s.group(1)
            rings[s.group(3)] = s.group(2)
        e = EVENT.search(text)
        if e and t is not None:
            if t0 is None:
                t0 = t
            events.append((t, e.group(1), e.group(2)))
            continue
        d = re.search(r'rust_jobqueue_demo: demo: (.*)$', text)
        if d:
            msg = d.group(1)
            (summary if summary or msg.startswith('summary') else narration).append(msg)

    print('== Rust DRM job queue demo: three mock hardware rings, four frames ==')
    for msg in narration:
        print('  ' + msg)
    print()
    print('== Timeline, from the drm_jobqueue trace events ==')
    print('   time     ring     event    job          details')
    for t, kind, rest in events:
        fence = re.search(r'fence=(\d+:\d+)', rest)
        key = fence.group(1) if fence else ''
        job = names.get(key, key)
        ring = rings.get(key, '')
        detail = rest
        if kind == 'job_queue':
            d = re.search(r'credits=(\d+), deps=(\d+)', rest)
            detail = f'queued, {d.group(2)} dependenc{"y" if d.group(2) == "1" else "ies"}' if d else rest
        elif kind == 'job_add_dep':
            dep = re.search(r'depends on fence=(\d+:\d+)', rest)
            detail = f'waits for {names.get(dep.group(1), dep.group(1))}' if dep else rest
        elif kind == 'job_run':
            hw = re.search(r'hw fence=(\d+:\d+)', rest)
            detail = f'handed to the hardware (hw fence {hw.group(1)})' if hw else rest
        elif kind in ('job_done', 'job_cancel'):
            err = re.search(r'error=(-?\d+)', rest)
            code = int(err.group(1)) if err else 0
            what = {0: 'ok', -5: '-EIO', -110: '-ETIMEDOUT', -125: '-ECANCELED'}.get(code, str(code))
            detail = ('retired: ' if kind == 'job_done' else 'did not complete: ') + what
        elif kind == 'job_timeout':
            detail = 'timed out: ' + rest.split('timed out: ')[-1]
        elif kind in ('queue_stop', 'queue_start'):
            ring = re.search(r'ring=(\w+)', rest).group(1) if 'ring=' in rest else ''
            job = ''
            detail = rest.split(' ', 2)[-1]
        print(f'  {1000 * (t - t0):7.1f} ms  {ring:<7}  {kind[4:] if kind.startswith("job_") else kind:<8} '
              f'{job:<12} {detail}')
    print()
    print('== Summary ==')
    for msg in summary[1:]:
        print('  ' + msg)
    print()
    lockdep = [l for l in lines if 'jq-harness: lockdep debug_locks:' in l]
    ok = bool(summary) and any(m.startswith('done') for m in summary)
    print('== Checks ==')
    print(f'  demo finished: {"yes" if ok else "NO"}')
    print(f'  trace events seen: {len(events)}')
    print(f'  lockdep still validating at the end: '
          f'{"yes" if lockdep and lockdep[0].strip().endswith("1") else "NO"}')
    print(f'  kernel log problems: {len(problems)}')
    for p in problems[:10]:
        print('    ' + p)
    return 0 if ok and events and not problems and lockdep and lockdep[0].strip().endswith('1') else 1


if __name__ == '__main__':
    sys.exit(main())
