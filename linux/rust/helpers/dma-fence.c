// SPDX-License-Identifier: GPL-2.0

#include <linux/dma-fence.h>
#include <linux/lockdep.h>
#include <linux/module.h>
#include <linux/rcupdate.h>

__rust_helper struct dma_fence *rust_helper_dma_fence_get(struct dma_fence *fence)
{
	return dma_fence_get(fence);
}

__rust_helper void rust_helper_dma_fence_put(struct dma_fence *fence)
{
	dma_fence_put(fence);
}

__rust_helper bool rust_helper_dma_fence_is_signaled(struct dma_fence *fence)
{
	return dma_fence_is_signaled(fence);
}

__rust_helper bool rust_helper_dma_fence_test_signaled_flag(struct dma_fence *fence)
{
	return dma_fence_test_signaled_flag(fence);
}

__rust_helper bool rust_helper_dma_fence_is_later(struct dma_fence *f1,
						  struct dma_fence *f2)
{
	return dma_fence_is_later(f1, f2);
}

__rust_helper ktime_t rust_helper_dma_fence_timestamp(struct dma_fence *fence)
{
	return dma_fence_timestamp(fence);
}

__rust_helper void rust_helper_dma_fence_set_error(struct dma_fence *fence, int error)
{
	dma_fence_set_error(fence, error);
}

__rust_helper unsigned long rust_helper_dma_fence_lock_irqsave(struct dma_fence *fence)
{
	unsigned long flags;

	dma_fence_lock_irqsave(fence, flags);
	return flags;
}

__rust_helper void rust_helper_dma_fence_unlock_irqrestore(struct dma_fence *fence,
							   unsigned long flags)
{
	dma_fence_unlock_irqrestore(fence, flags);
}

/*
 * Fences created by Rust use the inline lock; give it the lockdep class of its
 * nesting level, as dma_fence_array and dma_fence_chain do for theirs.
 */
__rust_helper void rust_helper_dma_fence_set_lock_class(struct dma_fence *fence,
							struct lock_class_key *key,
							const char *name)
{
	lockdep_set_class_and_name(&fence->inline_lock, key, name);
}

/* With CONFIG_LOCKDEP these are real functions, otherwise inline stubs. */
#ifndef CONFIG_LOCKDEP
__rust_helper bool rust_helper_dma_fence_begin_signalling(void)
{
	return dma_fence_begin_signalling();
}

__rust_helper void rust_helper_dma_fence_end_signalling(bool cookie)
{
	dma_fence_end_signalling(cookie);
}
#endif

/*
 * Fences and fence callbacks made in Rust keep the module that holds their
 * names or their callback's code loaded while they are pending: the module
 * whose memory holds @addr, NULL for vmlinux. No reference is taken.
 */
__rust_helper struct module *rust_helper_dma_fence_module_of(const void *addr)
{
	struct module *mod;

	rcu_read_lock();
	mod = __module_address((unsigned long)addr);
	rcu_read_unlock();
	return mod;
}

__rust_helper void rust_helper_dma_fence_module_get(struct module *mod)
{
	if (mod)
		__module_get(mod);
}

__rust_helper void rust_helper_dma_fence_module_put(struct module *mod)
{
	module_put(mod);
}
