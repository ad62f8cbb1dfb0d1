#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
#
# Turns the "jq-bench:" lines of the benchmark boots (drivers/gpu/drm/tests/
# jobqueue_bench.rs and drm_sched_bench.c) into a Markdown table, with the
# issue's targets checked. Exits 1 if a line reports errors or a workload is
# missing.

import argparse
import re
import sys

LINE = re.compile(r'jq-bench: (impl=\S+ workload=.*)$')
IMPLS = ('jobqueue', 'drm_sched', 'floor', 'ring-floor')


def parse(path):
    """Returns {(impl, workload, jobs): {key: value}} and the failure lines."""
    rows, failures = {}, []
    with open(path, errors='replace') as f:
        for line in f:
            m = LINE.search(line.rstrip())
            if not m:
                continue
            if ' failed: ' in m.group(1):
                failures.append(m.group(1))
                continue
            fields = dict(kv.split('=', 1) for kv in m.group(1).split() if '=' in kv)
            for k, v in fields.items():
                if re.fullmatch(r'-?\d+', v):
                    fields[k] = int(v)
            rows[(fields['impl'], fields['workload'], fields['jobs'])] = fields
    return rows, failures


def us(ns):
    return f'{ns / 1000:.1f}' if ns is not None else '-'


def ns(row, spread=True):
    if not row:
        return '-'
    if not spread:
        return str(row['ns_per_job'])
    return f"{row['ns_per_job']} ({row['ns_per_job_min']}–{row['ns_per_job_max']})"


def sub(row):
    return str(row['submit_ns_per_job']) if row and 'submit_ns_per_job' in row else '-'


def pair(row, key):
    if not row or f'{key}_p50_ns' not in row:
        return '-'
    if key == 'wake' and not row[f'{key}_p99_ns']:
        return '-'
    return f"{us(row[f'{key}_p50_ns'])} / {us(row[f'{key}_p99_ns'])}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('log', help='the log of the boot that ran every workload')
    ap.add_argument('--trace-log', help='the boot with trace_event=drm_jobqueue:*')
    ap.add_argument('--notrace-log', help='the boot of the build without tracepoints')
    ap.add_argument('--sched-trace-log',
                    help='the boot with trace_event=gpu_scheduler:* (drm_sched)')
    args = ap.parse_args()

    rows, failures = parse(args.log)
    ok = not failures
    for f in failures:
        print(f'FAILED: {f}')

    workloads = []
    for (impl, name, jobs) in rows:
        if name != 'memory' and (name, jobs) not in workloads:
            workloads.append((name, jobs))

    print('| workload | jobs | JobQueue ns/job (min–max) | drm_sched ns/job (min–max) '
          '| floor ns/job | floor with the mock ring ns/job | throughput JobQueue/drm_sched '
          '| cost JobQueue/floor | over the ring floor, JobQueue | drm_sched | ratio '
          '| submitting ns/job, JobQueue | drm_sched '
          '| submit→run p50/p99 µs, JobQueue | drm_sched '
          '| hw→done p50/p99 µs, JobQueue | drm_sched '
          '| wake p50/p99 µs, JobQueue | drm_sched |')
    print('|---|' + '---:|' * 18)
    misses = []
    for name, jobs in workloads:
        jq, sd, fl, rf = (rows.get((i, name, jobs)) for i in IMPLS)
        for i, r in zip(IMPLS, (jq, sd, fl, rf)):
            if r is None:
                ok = False
                print(f'MISSING: impl={i} workload={name} jobs={jobs}')
            elif r.get('errors', 0):
                ok = False
                print(f"ERRORS: impl={i} workload={name} jobs={jobs} errors={r['errors']}")
        thr = cost = '-'
        if jq and sd:
            v = sd['ns_per_job'] / jq['ns_per_job']
            thr = f'{v:.2f}x'
            if v < 1.5:
                misses.append(f'{name} ({jobs}): throughput {v:.2f}x drm_sched < 1.5x')
        if jq and fl:
            v = jq['ns_per_job'] / fl['ns_per_job']
            cost = f'{v:.1f}x'
            if v > 3:
                misses.append(f'{name} ({jobs}): {v:.1f}x the floor > 3x')
        # What each queue adds to the mock hardware's own cost, and the ratio of the two.
        over = ['-', '-', '-']
        if jq and sd and rf:
            a, b = (r['ns_per_job'] - rf['ns_per_job'] for r in (jq, sd))
            over = [str(a), str(b), f'{b / a:.2f}x' if a > 0 else '-']
        print(f'| {name} | {jobs} | {ns(jq)} | {ns(sd)} | {ns(fl, False)} | {ns(rf, False)} '
              f"| {thr} | {cost} | {' | '.join(over)} "
              f'| {sub(jq)} | {sub(sd)} '
              f"| {pair(jq, 'submit_to_run')} | {pair(sd, 'submit_to_run')} "
              f"| {pair(jq, 'hw_to_done')} | {pair(sd, 'hw_to_done')} "
              f"| {pair(jq, 'wake')} | {pair(sd, 'wake')} |")

    print()
    mem = [rows.get((i, 'memory', 200000)) for i in IMPLS[:3]]
    if all(mem):
        b = [m['bytes_per_job'] for m in mem]
        print('| memory per job in flight (median; min–max) | JobQueue | drm_sched | floor |')
        print('|---|---:|---:|---:|')
        for key, label in (('bytes_per_job', 'bytes/job, slab pages'),
                           ('free_bytes_per_job', 'bytes/job, free memory')):
            print(f'| {label} | ' + ' | '.join(
                f"{m[key]} ({m[key + '_min']}–{m[key + '_max']})" for m in mem) + ' |')
        if b[0] > b[1]:
            misses.append(f'memory: {b[0]} bytes/job > drm_sched {b[1]}')
        print()
    else:
        ok = False
        print('MISSING: memory')

    scale = [rows.get(('jobqueue', 'independent', n)) for n in (1000, 10000, 100000)]
    if all(scale):
        v = [r['ns_per_job'] for r in scale]
        flat = max(v) / min(v)
        print(f'Scaling (JobQueue, independent): 1,000 jobs {v[0]} ns/job, 10,000 {v[1]}, '
              f'100,000 {v[2]}: max/min {flat:.2f}')
        if flat > 1.10:
            misses.append(f'scaling: ns/job varies {flat:.2f}x from 1k to 100k jobs (> 1.10)')
        print()

    if args.trace_log or args.notrace_log:
        # One row per build or boot: (label, JobQueue's log, drm_sched's log); None is the
        # first boot's row of the same workload, '' a log that was not made.
        trows = [('trace events compiled in, disabled', None, None)]
        if args.trace_log:
            trows.append(('trace events enabled (`drm_jobqueue:*`; `gpu_scheduler:*`)',
                          args.trace_log, args.sched_trace_log or ''))
        if args.notrace_log:
            trows.append(('tracepoints compiled out (no CONFIG_TRACEPOINTS)',
                          args.notrace_log, ''))
        print('| independent, 10,000 jobs | JobQueue ns/job (median; min–max) | vs. disabled '
              '| drm_sched ns/job (median; min–max) | vs. disabled |')
        print('|---|---:|---:|---:|---:|')
        cost = None
        for label, jq_path, sched_path in trows:
            cells = []
            for impl, path in (('jobqueue', jq_path), ('drm_sched', sched_path)):
                if path == '':
                    cells += ['-', '']
                    continue
                base = rows.get((impl, 'independent', 10000))
                r = base if path is None else parse(path)[0].get((impl, 'independent', 10000))
                if not r:
                    ok = False
                    print(f'MISSING: {label}, {impl}')
                    cells += ['-', '']
                    continue
                rel = ''
                if path is not None and base:
                    change = r['ns_per_job'] / base['ns_per_job'] - 1
                    rel = f'{change * 100:+.1f}%'
                    if impl == 'jobqueue' and path == args.trace_log:
                        cost = change
                cells += [f"{r['ns_per_job']} ({r['ns_per_job_min']}–{r['ns_per_job_max']})", rel]
            print(f"| {label} | {' | '.join(cells)} |")
        if cost is not None and cost > 0.15:
            misses.append(f'trace events enabled cost {cost * 100:.1f}% > 15%')
        print()

    print('Targets: ' + ('all met' if not misses else 'missed: ' + '; '.join(misses)))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
