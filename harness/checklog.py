#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Judge a KUnit run by its whole kernel log, not only by KUnit's counts.

The cases and their results are those kunit.py parsed from the boot's KTAP
output (its --json file, --kunit-json). Prints every problem found and ends
with the line "N passed, N failed" (and ", N skipped" when cases were skipped). Exits non-zero when a case failed, the
kernel crashed or did not finish, or the log shows a lockdep report, BUG:,
WARNING:, a sleep in atomic context, a KASAN, KCSAN or kmemleak report or a Rust
panic. With --require-lockdep and --require-kmemleak it also requires proof,
from the post-test init of the x86_64 run, that lockdep stayed on and kmemleak
scanned, and with --require-trace that the drm_jobqueue and dma_fence trace
events are complete and consistent as trace-cmd read back the ring buffer of
the run and as perf script read perf's recording of the demo (tracecheck.py),
counted as two more cases. With --require-module-unload, the post-test init's
lines about the harness/modules are three more cases: fence_balanced unloaded,
fence_leak (unsignalled fences leaked) and callback_leak (an armed callback
leaked) were refused. With --require-fault-injection, each fault-injection
suite, which skips at boot, must have run again from the post-test init with
every allocation failure armed: one more case per suite, failed if its run is
missing, skipped, has no case or a failed one.
With --require-kcsan, the post-test init must have read KCSAN's counters, with
KCSAN enabled and watchpoints set up; they are printed (a report fails the run
whatever the counters say).
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tracecheck  # noqa: E402

# What must never appear in a clean log.
BAD = [
    # KCSAN (harness/run kcsan): "BUG: KCSAN: data-race in ...", also for a race
    # of unknown origin; named before the BUG it also is.
    (re.compile(r'BUG: KCSAN: '), 'KCSAN report'),
    (re.compile(r'BUG: '), 'BUG'),
    (re.compile(r'WARNING: '), 'WARNING'),
    (re.compile(r'sleeping function called from invalid context'), 'sleep in atomic context'),
    (re.compile(r'possible recursive locking detected|possible circular locking dependency'
                r'|inconsistent lock state|possible irq lock inversion|bad unlock balance'
                r'|suspicious RCU usage|lock held when returning to user space'
                r'|INFO: lockdep is turned off|turning off the locking correctness validator'),
     'lockdep report'),
    (re.compile(r'KASAN'), 'KASAN report'),
    (re.compile(r'suspected memory leaks?|unreferenced object 0x'), 'kmemleak report'),
    (re.compile(r'rust_begin_unwind|panicked at|Kernel panic'), 'panic'),
    (re.compile(r'Oops|general protection fault|kernel BUG at|Call Trace:'), 'oops or stack dump'),
    (re.compile(r'INFO: task .* blocked for more than'), 'hung task'),
    (re.compile(r'Fence .* released with pending signals'), 'unsignalled fence released'),
]

# --require-module-unload: the case, the module and what /init must have printed
# about unloading it.
MODULE_UNLOAD = [
    ('module_unload_balanced', 'fence_balanced', 'unload ok'),
    ('module_unload_barrier', 'fence_leak', 'unload refused'),
    ('module_unload_callback_barrier', 'callback_leak', 'unload refused'),
]

# --require-fault-injection: the suites /init runs again once GFP_KERNEL
# allocations can be made to fail (harness/initramfs-init).
FAULT_SUITES = ['drm_jobqueue_fault_injection', 'tyr_fault_injection']
# What each sweep of an operation printed.
SWEEP = re.compile(r'fault injection: (.+?): (\d+) failure points, (\d+) ENOMEM, (\d+) absorbed$')

# Lines that match BAD but are not reports.
BENIGN = [
    re.compile(r'KernelAddressSanitizer initialized'),
    re.compile(r'kasan: '),
    re.compile(r'jq-harness: kmemleak 0$'),
    re.compile(r'Lock dependency validator'),
    re.compile(r'^\s*#'),  # KTAP diagnostics of passing cases
    re.compile(r'jq-harness: (trace\.dat|perf\.data|profile): '),  # base64, checked apart
]

# KCSAN reports of races in the kernel itself, outside this project's code and
# known upstream as benign: (the report's title, a pattern every one of its
# lines up to the next '====' line must contain at least once, why). Only
# reports with all the patterns are let through, and each is printed.
KNOWN_UPSTREAM_KCSAN = [
    (re.compile(r'BUG: KCSAN: data-race in __rcu_read_lock / memcpy_and_pad'),
     [re.compile(r'by interrupt on cpu'), re.compile(r'arch_dup_task_struct'),
      re.compile(r'Comm: kthreadd')],
     'kthreadd copies its own task_struct for a new kernel thread while a timer interrupt on '
     'the same CPU updates its rcu_read_lock_nesting, which rcu_copy_process() then resets '
     'for the new task; upstream treats races in dup_task_struct()\'s copy as benign (syzbot\'s '
     '"data-race in copy_process / memcpy_and_pad"), and no code of this project takes part'),
    (re.compile(r'BUG: KCSAN: data-race in blake2s_update'),
     [re.compile(r'race at unknown origin'), re.compile(r'add_device_randomness'),
      re.compile(r'release_task')],
     'release_task() (kernel/exit.c) mixes the exiting thread\'s se.sum_exec_runtime into the '
     'entropy pool with add_device_randomness() while the scheduler, from the tick, still adds '
     'to it: a plain read of a counter used only as entropy, where a torn or changing value does '
     'not matter; seen once (2026-11-29) as a kunit_try_catch thread exited, no code of this '
     'project takes part'),
]


def known_upstream_kcsan(lines):
    """Returns {line index: why} for the titles of the known upstream KCSAN reports."""
    known = {}
    for i, line in enumerate(lines):
        for title, needs, why in KNOWN_UPSTREAM_KCSAN:
            if not title.search(line):
                continue
            block = []
            for later in lines[i + 1:]:
                if '=' * 20 in later:
                    break
                block.append(later)
            if all(any(n.search(b) for b in block) for n in needs):
                known[i] = why
    return known


RESULT = re.compile(r'^\s*(ok|not ok) \d+ (\S+)(.*)$')
TIMESTAMP = re.compile(r'^\[\s*\d+\.\d+\]\s*')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--post-checks', action='store_true',
                    help='the log must contain the initramfs post-test checks')
    ap.add_argument('--require-lockdep', action='store_true',
                    help='lockdep must have stayed on for the whole run')
    ap.add_argument('--require-kmemleak', action='store_true',
                    help='a kmemleak scan must have run and found nothing')
    ap.add_argument('--uml', action='store_true',
                    help='ignore the lockdep report 7.3.4 prints on UML at boot, before KUnit starts')
    ap.add_argument('--require-trace', action='store_true',
                    help='the trace events, as trace-cmd report (--trace-cmd, --trace-cmd-raw) '
                    'and perf script (--perf-script) read them, must pass harness/tracecheck.py')
    ap.add_argument('--trace-cmd', help='the output of trace-cmd report on the run\'s trace.dat')
    ap.add_argument('--trace-cmd-raw', help='the output of trace-cmd report -R on it')
    ap.add_argument('--perf-script', help='the output of perf script on the demo\'s perf.data')
    ap.add_argument('--require-module-unload', action='store_true',
                    help='fence_balanced must have unloaded, fence_leak and callback_leak must '
                    'have been refused')
    ap.add_argument('--require-fault-injection', action='store_true',
                    help='the fault-injection suites must have run again, armed, and passed')
    ap.add_argument('--require-kcsan', action='store_true',
                    help='KCSAN must have been enabled and set up watchpoints')
    ap.add_argument('--kunit-rc', type=int, default=0)
    ap.add_argument('--kunit-json', help="kunit.py's results of the run (its --json file)")
    ap.add_argument('--extra', help='a file of further "ok NAME"/"not ok NAME" results')
    ap.add_argument('log')
    args = ap.parse_args()

    try:
        with open(args.log, errors='replace') as f:
            lines = [l.rstrip('\n') for l in f]
    except OSError as e:
        print(f'checklog: cannot read the kernel log: {e}')
        print('0 passed, 1 failed')
        return 1

    problems = []
    ktap_seen = not args.uml
    known_kcsan = known_upstream_kcsan(lines)
    for i, line in enumerate(lines):
        text = TIMESTAMP.sub('', line)
        if 'KTAP version' in text:
            ktap_seen = True
        if not ktap_seen:
            if 'bad unlock balance detected' in text:
                print('checklog: ignored: the known UML boot-time lockdep report (lockdep is off for '
                      'the rest of the run: UML cannot prove locking)')
            continue
        # A case that failed in a run kunit.py did not parse (the suites run
        # again from the post-test init, for KCSAN or fault injection).
        m = RESULT.match(text)
        if m and m.group(1) == 'not ok' and '# SKIP' not in m.group(3):
            problems.append(f'failed case: line {i + 1}: {m.group(2)}')
        if any(b.search(text) for b in BENIGN):
            continue
        if i in known_kcsan:
            print(f'checklog: ignored: line {i + 1}: {text.strip()}: {known_kcsan[i]}')
            continue
        for pat, what in BAD:
            if pat.search(text):
                problems.append(f'{what}: line {i + 1}: {text.strip()}')
                break

    passed = failed = skipped = 0
    cases = kunit_cases(args.kunit_json) if args.kunit_json else []
    for name, status in cases:
        if status == 'PASS':
            passed += 1
        elif status == 'SKIP':
            skipped += 1
        else:
            failed += 1
            problems.append(f'failed case: {name} ({status})')

    if args.extra:
        with open(args.extra) as f:
            for line in f:
                m = re.match(r'(ok|not ok) (\S+)', line)
                if not m:
                    continue
                if m.group(1) == 'ok':
                    passed += 1
                else:
                    failed += 1
                    problems.append(f'failed check: {m.group(2)}')

    if args.require_module_unload:
        for case, module, want in MODULE_UNLOAD:
            m = re.search(rf'jq-harness: module {module} (.*)', '\n'.join(lines))
            if m and m.group(1).strip() == want:
                passed += 1
                print(f'checklog: ok {case}: module {module} {want}')
            else:
                failed += 1
                got = m.group(1).strip() if m else 'no line: not loaded'
                problems.append(f'failed check: {case}: module {module}: {got}, expected {want}')

    if args.require_fault_injection:
        for suite in FAULT_SUITES:
            problem, summary = fault_injection(lines, suite)
            if problem:
                failed += 1
                problems.append(f'failed check: fault_injection_{suite}: {problem}')
            else:
                passed += 1
                print(f'checklog: ok fault_injection_{suite}: {summary}')

    if args.require_trace:
        for tool, result in (
                ('trace-cmd', tracecheck.check_files('trace-cmd', args.trace_cmd or '',
                                                     args.log, args.trace_cmd_raw or '-')),
                # perf records the demo, whose reset stops and restarts a queue:
                # all eight events, as in the suites' recording.
                ('perf', tracecheck.check_files('perf', args.perf_script or ''))):
            trace_problems, trace_summary = result
            if trace_problems:
                failed += 1
                problems += [f'trace events ({tool}): {p}' for p in trace_problems]
            else:
                passed += 1
                print(f'checklog: trace events ({tool}): {trace_summary}')

    if not cases:
        problems.append('kunit.py parsed no case: the kernel did not run the suites')
    if args.kunit_rc != 0 and failed == 0:
        problems.append(f'kunit.py exited with status {args.kunit_rc}')

    joined = '\n'.join(lines)
    if args.post_checks and 'jq-harness: end' not in joined:
        problems.append('the post-test checks did not run to the end (crash or timeout?)')
    if args.require_lockdep:
        m = re.search(r'jq-harness: lockdep debug_locks:\s*(\d+)', joined)
        if not m:
            problems.append('no proof that lockdep was on: /proc/lockdep_stats was not read')
        elif m.group(1) != '1':
            problems.append('lockdep switched itself off during the run (debug_locks = 0)')
    if args.require_kmemleak:
        km = re.search(r'jq-harness: kmemleak (\d+|absent)', joined)
        if not km or km.group(1) == 'absent':
            problems.append('kmemleak did not scan')
        elif km.group(1) != '0':
            problems.append(f'kmemleak: {km.group(1)} unreferenced objects')
            # The records in full, with their allocation backtraces: a leak that
            # shows once in many runs is found from this output alone.
            problems += [f'kmemleak: {line.split("jq-harness: kmemleak: ", 1)[1]}'
                         for line in lines if 'jq-harness: kmemleak: ' in line][:80]

    if args.require_kcsan:
        counters = dict(re.findall(r'jq-harness: kcsan (\w+): (\d+)', joined))
        passes = re.search(r'jq-harness: kcsan passes (\d+)', joined)
        if counters.get('enabled') != '1' or int(counters.get('setup_watchpoints', 0)) == 0:
            problems.append(f'KCSAN was not enabled or set up no watchpoint: {counters}')
        else:
            print(f'checklog: kcsan: the suites ran {1 + int(passes.group(1) if passes else 0)} '
                  'times; ' + ', '.join(f'{k} {v}' for k, v in counters.items() if k != 'enabled'))

    for p in problems:
        print(f'checklog: {p}')
    summary = f'{passed} passed, {failed} failed'
    if skipped:
        summary += f', {skipped} skipped'
    print(summary)
    return 1 if problems or failed else 0


def kunit_cases(path):
    """Returns (name, status) of every case in kunit.py's JSON, in order: the
    leaves of its tree of suites (a parameterised case counts its parameters)."""
    try:
        with open(path) as f:
            root = json.load(f)
    except (OSError, ValueError):
        return []
    cases = []

    def walk(group):
        cases.extend((c['name'], c['status']) for c in group.get('test_cases', []))
        for sub in group.get('sub_groups', []):
            walk(sub)

    walk(root)
    return cases


def fault_injection(lines, suite):
    """Judges the run of SUITE between /init's begin and end lines: returns
    (problem or None, summary)."""
    begin = f'jq-harness: fault injection {suite} begin'
    end = f'jq-harness: fault injection {suite} end'
    texts = [TIMESTAMP.sub('', l) for l in lines]
    try:
        first = next(i for i, t in enumerate(texts) if t.strip() == begin)
        last = next(i for i in range(first, len(texts)) if texts[i].strip() == end)
    except StopIteration:
        return 'the suite did not run with allocation failures armed (no begin and end lines)', ''
    cases = skipped = bad = 0
    suite_ok = False
    sweeps = []
    for text in texts[first + 1:last]:
        m = RESULT.match(text)
        if m and m.group(2) == suite and text == text.lstrip():
            suite_ok = m.group(1) == 'ok'
        elif m:
            cases += 1
            if '# SKIP' in m.group(3):
                skipped += 1
            elif m.group(1) != 'ok':
                bad += 1
        s = SWEEP.search(text)
        if s:
            sweeps.append((s.group(1), int(s.group(2)), int(s.group(3))))
    if not cases:
        return 'no case ran', ''
    if skipped:
        return f'{skipped} of {cases} cases skipped: allocation failures were not armed', ''
    if bad or not suite_ok:
        return f'{bad} of {cases} cases failed', ''
    points = sum(p for _, p, _ in sweeps)
    enomem = sum(e for _, _, e in sweeps)
    return None, (f'{cases} cases, {len(sweeps)} operations, {points} allocation failures '
                  f'injected, {enomem} of them ENOMEM')


if __name__ == '__main__':
    sys.exit(main())
