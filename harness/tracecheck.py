# SPDX-License-Identifier: GPL-2.0
"""Checks the drm_jobqueue trace events as the tracing tools read them back.

The test kernel boots with trace_event=drm_jobqueue:* and the dma_fence events
(harness/qemu/x86_64.py), which fill the ring buffer during the suites; after
them the initramfs saves the buffer with `trace-cmd extract` and records the
job-queue demo (loaded as a module) with `perf record -e 'drm_jobqueue:*'`
(harness/initramfs-init). harness/run reads both back on the host with
`trace-cmd report` and `perf script`, whose libtraceevent parses each field by
the event's format file. Every job of a recording must have left a consistent
record, field by field:

- no field failed to parse (libtraceevent's "[FAILED TO PARSE]"), every
  drm_jobqueue and dma_fence line parses with the fields of
  include/trace/events/drm_jobqueue.h, and in trace-cmd's raw output (-R) every
  event carries exactly the fields of its format, named as in gpu_scheduler;
- job_add_dep events precede their job's job_queue, which counts them in deps,
  and never name the job's own fence;
- job_run, job_cancel and job_timeout follow their job's job_queue, the
  hardware fence of job_run is of another context, and a queue runs its jobs
  in order unless a reset resubmitted them;
- every submitted job has exactly one job_done, after a job_run or job_cancel,
  with the error of its job_cancel if it has one;
- every queue_start ends a queue_stop of its queue (stops nest), and no job
  of a queue runs while a stop of it is in force;
- the events the recording must show all fired, and nothing was lost;
- every dma_fence created during the recording (dma_fence_init) signalled
  exactly once (dma_fence_signaled), whatever its driver, Rust or C.

check(report, ...) returns (problems, summary); the command line checks the
files harness/run wrote.
"""

import re

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
# An event line of `trace-cmd report` ("comm-pid [cpu] flags ts: name: fields")
# or of `perf script` ("comm pid [cpu] ts: system:name: fields").
LINE = re.compile(r'\s(\d+\.\d+):\s+(?:drm_jobqueue:)?drm_jobqueue_(\w+):\s+(.*)$')
# The dma_fence events the run also records: every fence created while the
# kernel ran (Rust or C) must signal exactly once.
FENCE_EVENT = re.compile(r'\s\d+\.\d+:\s+(?:dma_fence:)?dma_fence_(init|signaled):\s+'
                         r'driver=(.*?) timeline=(.*?) context=(\d+) seqno=(\d+)$')
# Any line naming one of the events, parsed or not.
ANY_EVENT = re.compile(r'(?:drm_jobqueue_\w+|dma_fence_(?:init|signaled)):')
# What libtraceevent prints for an event or field it cannot parse, and what
# trace-cmd and perf print where events were lost.
UNPARSED = re.compile(r'FAILED TO PARSE|EVENTS DROPPED|LOST EVENTS|PERF_RECORD_LOST')
# The fields of each event's format file (trace-cmd report -R), in order.
FIELDS = {
    'job_queue': ['name', 'fence_context', 'fence_seqno', 'credits', 'deps', 'job_count',
                  'hw_job_count'],
    'job_add_dep': ['fence_context', 'fence_seqno', 'ctx', 'seqno'],
    'job_run': ['name', 'fence_context', 'fence_seqno', 'hw_context', 'hw_seqno', 'job_count',
                'hw_job_count'],
    'job_done': ['fence_context', 'fence_seqno', 'error'],
    'job_cancel': ['fence_context', 'fence_seqno', 'error'],
    'job_timeout': ['name', 'fence_context', 'fence_seqno', 'action'],
    'queue_stop': ['name', 'fence_context', 'what'],
    'queue_start': ['name', 'fence_context', 'what'],
}
RAW_LINE = re.compile(r'\s\d+\.\d+:\s+drm_jobqueue_(\w+):\s+(.*)$')
RAW_FIELD = re.compile(r'(\w+)=(\S+)')
# Drivers of fences that a check leaks on purpose (harness/modules).
LEAKED_ON_PURPOSE = {'fence_leak', 'callback_leak'}


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


def check_raw(raw, bad):
    """Every drm_jobqueue event of `trace-cmd report -R` has exactly its fields."""
    n = 0
    for line in raw:
        m = RAW_LINE.search(line)
        if not m:
            continue
        n += 1
        kind, rest = m.group(1), m.group(2)
        names = [f.group(1) for f in RAW_FIELD.finditer(rest)]
        if names != FIELDS.get(kind):
            bad(f'raw {kind}: fields {names}, expected {FIELDS.get(kind)}: {rest}')
    if n == 0:
        bad('no drm_jobqueue event in the raw report')


def check(trace, tool, stats=None, raw=None, require=tuple(EVENTS)):
    """Checks the lines of TOOL's report (trace-cmd report or perf script).

    STATS is the ring buffer's (entries kept, entries written), RAW the lines
    of `trace-cmd report -R`, REQUIRE the events that must have fired."""
    problems = []

    def bad(msg):
        if len(problems) < 20:
            problems.append(msg)

    if not trace:
        return [f'{tool}: no output'], ''
    if stats is not None and stats[0] != stats[1]:
        bad(f'the ring buffer lost events: {stats[0]} of {stats[1]} kept')
    for line in trace + (raw or []):
        if UNPARSED.search(line):
            bad(f'{tool} could not parse or lost events: {line.strip()}')
        elif ANY_EVENT.search(line) and not (LINE.search(line) or FENCE_EVENT.search(line)
                                             or RAW_LINE.search(line)):
            bad(f'{tool}: an event line that does not parse: {line.strip()}')
    if raw is not None:
        check_raw(raw, bad)

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
            # Stops nest (`JobQueue::stop`): each start ends one stop in force.
            depth = stopped.get(ctx, 0)
            if kind == 'queue_start' and depth == 0:
                bad(f'queue_start without a stop in force on context {ctx}')
            stopped[ctx] = depth + 1 if kind == 'queue_stop' else max(depth - 1, 0)
            if g[2:] == ('resubmit',):
                resubmitted.add(ctx)
        elif fence not in queued:
            bad(f'{kind} for {fence} without job_queue before it')
        elif kind == 'job_run':
            if g[3] == g[0]:
                bad(f'{fence}: the hardware fence is of the queue\'s own context')
            if stopped.get(g[0], 0) > 0:
                bad(f'{fence} ran while its queue was stopped')
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
        if n == 0 and kind in require:
            bad(f'drm_jobqueue_{kind} never fired')
    summary = (f'{len(queued)} jobs traced, {sum(counts.values())} events '
               f'(' + ', '.join(f'{k} {n}' for k, n in counts.items()) + '); ' + fences)
    return problems, summary


def main():
    """tracecheck.py [--stats LOG] [--raw FILE] [--require EVENTS] TOOL REPORT"""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument('--stats', help='the boot log with the ring buffer statistics')
    ap.add_argument('--raw', help='the output of trace-cmd report -R')
    ap.add_argument('--require', help='comma-separated events that must fire (default: all)')
    ap.add_argument('tool')
    ap.add_argument('report')
    args = ap.parse_args()
    problems, summary = check_files(args.tool, args.report, args.stats, args.raw, args.require)
    for p in problems:
        print(f'tracecheck: {args.tool}: {p}')
    if not problems:
        print(f'tracecheck: {args.tool}: {summary}')
    return 1 if problems else 0


def read_lines(path):
    try:
        with open(path, errors='replace') as f:
            return f.read().splitlines()
    except OSError:
        return None


def check_files(tool, report, stats_log=None, raw=None, require=None):
    """check() on the files harness/run wrote; a missing report is a problem."""
    trace = read_lines(report)
    if trace is None:
        return [f'{tool}: no report ({report})'], ''
    stats = None
    if stats_log:
        for line in read_lines(stats_log) or []:
            m = re.search(r'jq-harness: trace entries-in-buffer/entries-written: (\d+)/(\d+)', line)
            if m:
                stats = (int(m.group(1)), int(m.group(2)))
        if stats is None:
            return [f'{tool}: the ring buffer statistics are missing'], ''
    raw_lines = None
    if raw:
        raw_lines = read_lines(raw)
        if raw_lines is None:
            return [f'{tool}: no raw report ({raw})'], ''
    if isinstance(require, str):
        require = require.split(',')
    want = tuple(require or EVENTS)
    return check(trace, tool, stats, raw_lines, want)


if __name__ == '__main__':
    raise SystemExit(main())
