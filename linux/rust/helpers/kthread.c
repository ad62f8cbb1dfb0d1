// SPDX-License-Identifier: GPL-2.0

#include <linux/kthread.h>

__rust_helper void rust_helper_kthread_init_work(struct kthread_work *work,
						 kthread_work_func_t fn)
{
	kthread_init_work(work, fn);
}

__rust_helper struct kthread_worker *
rust_helper_kthread_run_worker(unsigned int flags, const char *name)
{
	return kthread_run_worker(flags, "%s", name);
}
