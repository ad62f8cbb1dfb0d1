# SPDX-License-Identifier: GPL-2.0
#
# kunit.py QEMU configuration for the judged x86_64 run: like the kernel's own
# qemu_configs/x86_64.py, plus two vCPUs and room for KASAN. harness/run adds
# the initramfs (-initrd through --qemu_args) whose /init runs the post-test
# checks (the harness/modules unload checks, the demo recorded with perf,
# lockdep still on, a kmemleak scan, the drm_jobqueue and dma_fence trace events
# recorded in the ring buffer during the run, saved with trace-cmd: jq_trace)
# once KUnit is done: the judged run's has the modules built for its kernel.
# The Kconfig fragment lives in ../kunit/x86_64.config.
#
# trace_clock=mono (and perf record -k mono in the initramfs): when TCG runs
# slowly the kernel may mark the TSC unstable, and sched_clock, which the
# global clock and perf's default clock read, falls back to jiffies: thousands
# of events then share one 4 ms timestamp and the tools order those of
# different CPUs arbitrarily. CLOCK_MONOTONIC reads the clocksource (HPET
# then) and keeps the events of a job in order.
import os

from ..qemu_config import QemuArchParams

_HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(_HERE, '..', 'kunit', 'x86_64.config')) as f:
    _KCONFIG = ''.join(l for l in f if l.startswith('CONFIG_'))

QEMU_ARCH = QemuArchParams(linux_arch='x86_64',
                           kconfig=_KCONFIG,
                           qemu_arch='x86_64',
                           kernel_path='arch/x86/boot/bzImage',
                           kernel_command_line='console=ttyS0 kunit_shutdown=none rdinit=/init panic=-1 '
                                           'trace_event=drm_jobqueue:*,dma_fence:dma_fence_init,'
                                           'dma_fence:dma_fence_signaled trace_buf_size=32M '
                                           'trace_clock=mono jq_trace',
                           extra_qemu_params=['-bios', 'qboot.rom', '-smp', '2', '-m', '2048'])
