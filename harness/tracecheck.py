# SPDX-License-Identifier: GPL-2.0
"""Checks the drm_jobqueue trace events recorded during the x86_64 test run.

The test kernel boots with trace_event=drm_jobqueue:* (harness/qemu/x86_64.py);
the initramfs prints the ring buffer after the suites, gzipped and in base64
(harness/initramfs-init). Every job the suites submit must have left a
consistent record, field by field:

- each event parses with the fields of include/trace/events/drm_jobqueue.h;
- job_add_dep events precede their job's job_queue, which counts them in deps,
  and never name the job's own fence;
- job_run, job_cancel and job_timeout follow their job's job_queue, the
  hardware fence of job_run is of another context, and a queue runs its jobs
  in order unless a reset resubmitted them;
- every submitted job has exactly one job_done, after a job_run or job_cancel,
  with the error of its job_cancel if it has one;
- queue_stop and queue_start alternate per queue;
- all eight events fired, and the ring buffer lost nothing;
- every dma_fence created during the run (dma_fence_init) signalled exactly
  once (dma_fence_signaled), whatever its driver, Rust or C.

check(lines) returns (problems, summary).
"""

import re

import dump

FENCE = r'(\d+):(\d+)'
EVENTS = {
    'job_queue': re.compile(rf'^fence={FENCE}, ring=(\S+), credits=(\d+), deps=(\d+), '
                            r'job count:(\d+), hw job count:(\d+)$'),
    'job_add_dep': re.compile(rf'^fence={FENCE} depends on fence={FENCE}$'),
    'job_run': re.compile(rf'^fence={FENCE}, ring=(\S+), hw fence={FENCE}, '
                          r'job count:(\d+), hw job count:(\d+)$'),
    'job_done': re.compile(rf'^fence={FENCE} error=(-?\d+)$'),
    'job_cancel': re.compile(rf'^fence={FENCE} error=(-\d+)$'),
    'job_timeout': re.compile(rf'^fence={FENCE}, ring=(\S+) timed out: '
                              r'(no hang|reset, continue|reset, resubmit|reset, cancel|reset later|device gone)$'),
    'queue_stop': re.compile(r'^ring=(\S+), context=(\d+) stopped$'),
    'queue_start': re.compile(r'^ring=(\S+), context=(\d+) '
                              r'resumed: (continue|resubmit|cancel)$'),
}
LINE = re.compile(r'\s(\d+\.\d+): drm_jobqueue_(\w+): (.*)$')
# The dma_fence events the run also records: every fence created while the
# kernel ran (Rust or C) must signal exactly once.
FENCE_EVENT = re.compile(r'\s\d+\.\d+: dma_fence_(init|signaled): driver=(.*?) timeline=(.*?) '
                         r'context=(\d+) seqno=(\d+)$')
# Drivers of fences that a check leaks on purpose (harness/modules).
LEAKED_ON_PURPOSE = {'fence_leak', 'callback_leak'}


def decode(lines):
    """Returns the trace lines and the buffer statistics printed by the initramfs."""
    stats = None
    for line in lines:
        m = re.search(r'jq-harness: trace entries-in-buffer/entries-written: (\d+)/(\d+)', line)
        if m:
            stats = (int(m.group(1)), int(m.group(2)))
    data = dump.read(lines, 'trace')
    if data is None:
        return None, stats
    return data.decode(errors='replace').splitlines(), stats


def check_fences(trace, bad):
    """Every fence created must signal exactly once. Returns the summary."""
    created, signalled, untracked = {}, {}, 0
    for line in trace:
        m = FENCE_EVENT.search(line)
        if not m:
            continue
        kind, driver, fence = m.group(1), m.group(2), (m.group(4), m.group(5))
        if kind == 'init':
            if fence in created and fence not in signalled:
                bad(f'dma_fence {fence[0]}:{fence[1]} ({driver}) created twice')
            created[fence] = driver
            signalled.pop(fence, None)
        elif fence not in created:
            untracked += 1
        elif fence in signalled:
            bad(f'dma_fence {fence[0]}:{fence[1]} ({driver}) signalled twice')
        else:
            signalled[fence] = driver
    drivers = {}
    for fence, driver in created.items():
        made, done = drivers.get(driver, (0, 0))
        drivers[driver] = (made + 1, done + (fence in signalled))
        if fence not in signalled and driver not in LEAKED_ON_PURPOSE:
            bad(f'dma_fence {fence[0]}:{fence[1]} ({driver}) never signalled')
    if not created:
        bad('no dma_fence_init events (trace_event=dma_fence:...)')
    return (f'{len(created)} fences created, {len(signalled)} signalled once, in '
            f'{len({f[0] for f in created})} contexts of {len(drivers)} drivers')


def check(log_lines):
    trace, stats = decode(log_lines)
    if trace is None:
        return ['no drm_jobqueue trace in the log (trace_event= and the initramfs)'], ''
    problems = []

    def bad(msg):
        if len(problems) < 20:
            problems.append(msg)

    if stats is None:
        bad('the ring buffer statistics are missing')
    elif stats[0] != stats[1]:
        bad(f'the ring buffer lost events: {stats[0]} of {stats[1]} kept')

    counts = {k: 0 for k in EVENTS}
    queued = {}       # fence -> deps announced by job_queue
    deps_seen = {}    # fence -> job_add_dep events before its job_queue
    ran, cancel, done = set(), {}, {}
    stopped = {}
    last_run, resubmitted = {}, set()  # per queue: the last job run, a resubmit since
    last_t = 0.0
    for line in trace:
        m = LINE.search(line)
        if not m:
            continue
        t, kind, rest = float(m.group(1)), m.group(2), m.group(3)
        if t < last_t:
            bad(f'timestamps go backwards: {line.strip()}')
        last_t = t
        pat = EVENTS.get(kind)
        if pat is None:
            bad(f'unknown event {kind}')
            continue
        f = pat.match(rest)
        if not f:
            bad(f'{kind}: fields do not parse: {rest}')
            continue
        counts[kind] += 1
        g = f.groups()
        fence = (g[0], g[1]) if kind.startswith('job_') else None
        if kind == 'job_add_dep':
            if fence in queued:
                bad(f'job_add_dep after job_queue for {fence}')
            if (g[2], g[3]) == fence or g[2] == g[0] and int(g[3]) > int(g[1]):
                bad(f'{fence} depends on itself or a later job of its queue: {rest}')
            deps_seen[fence] = deps_seen.get(fence, 0) + 1
        elif kind == 'job_queue':
            if fence in queued:
                bad(f'job_queue twice for {fence}')
            queued[fence] = int(g[4])
            if int(g[4]) != deps_seen.get(fence, 0):
                bad(f'{fence}: deps={g[4]} but {deps_seen.get(fence, 0)} job_add_dep events')
        elif kind in ('queue_stop', 'queue_start'):
            ctx = g[1]
            if stopped.get(ctx, False) == (kind == 'queue_stop'):
                bad(f'{kind} twice in a row on context {ctx}')
            stopped[ctx] = kind == 'queue_stop'
            if g[2:] == ('resubmit',):
                resubmitted.add(ctx)
        elif fence not in queued:
            bad(f'{kind} for {fence} without job_queue before it')
        elif kind == 'job_run':
            if g[3] == g[0]:
                bad(f'{fence}: the hardware fence is of the queue\'s own context')
            if int(g[1]) <= last_run.get(g[0], 0) and g[0] not in resubmitted:
                bad(f'{fence} ran after job {last_run[g[0]]} of its queue, without a resubmit')
            resubmitted.discard(g[0])
            last_run[g[0]] = int(g[1])
            ran.add(fence)
        elif kind == 'job_timeout':
            if g[3] == 'reset, resubmit':
                resubmitted.add(g[0])
        elif kind == 'job_cancel':
            cancel[fence] = int(g[2])
        elif kind == 'job_done':
            if fence in done:
                bad(f'job_done twice for {fence}')
            done[fence] = int(g[2])
            if fence not in ran and fence not in cancel:
                bad(f'job_done for {fence} that neither ran nor was cancelled')
            if fence in cancel and cancel[fence] != int(g[2]):
                bad(f'{fence}: cancelled with {cancel[fence]}, done with {g[2]}')

    for fence in queued:
        if fence not in done:
            bad(f'{fence} was submitted but has no job_done')
    fences = check_fences(trace, bad)
    for kind, n in counts.items():
        if n == 0:
            bad(f'drm_jobqueue_{kind} never fired')
    summary = (f'{len(queued)} jobs traced, {sum(counts.values())} events '
               f'(' + ', '.join(f'{k} {n}' for k, n in counts.items()) + '); ' + fences)
    return problems, summary
