// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * A benchmark of drm_sched, run at boot side by side with the Rust DRM job
 * queue (jobqueue_bench.rs), and of a floor: the bare cost of one dma_fence
 * with one callback per job.
 *
 * The workloads, the mock hardware and the output are those of
 * jobqueue_bench.rs, whose module documentation describes them; only the
 * queue differs. Each queue here is a drm_gpu_scheduler with one entity (the
 * 1:1 model of firmware-scheduled hardware), with its own mock ring. The mock
 * ring completes at once: run_job() puts the hardware fence in a FIFO and
 * starts an hrtimer without delay whose callback, in hardirq context as an
 * interrupt handler would, signals the FIFO's fences in order.
 *
 * It runs as a late initcall, after jobqueue_bench (a device initcall) and
 * after drm_sched's own initcall, which creates its fence slab.
 */

#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/device/faux.h>
#include <linux/dma-fence.h>
#include <linux/hrtimer.h>
#include <linux/jiffies.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/rcupdate.h>
#include <linux/seq_buf.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/workqueue.h>

#include <drm/gpu_scheduler.h>

static unsigned int workloads = ~0U;
module_param(workloads, uint, 0444);
MODULE_PARM_DESC(workloads, "Bit mask of the workloads to run (as jobqueue_bench's)");

static unsigned int reps = 5;
module_param(reps, uint, 0444);
MODULE_PARM_DESC(reps, "Repetitions of each workload");

static unsigned int ring_delay_ns;
module_param(ring_delay_ns, uint, 0444);
MODULE_PARM_DESC(ring_delay_ns, "Delay of the mock hardware's signals, in ns (default: none)");

static bool floors = true;
module_param(floors, bool, 0444);
MODULE_PARM_DESC(floors, "Measure the two floors after drm_sched (default: yes)");

/* The same constants and workloads as jobqueue_bench.rs. */
#define BENCH_CAPACITY		1024
#define BENCH_TIMEOUT_MS	10000
#define BENCH_MEMORY_FIRST	100000

enum bench_shape {
	SHAPE_INDEPENDENT,
	SHAPE_CHAIN,
	SHAPE_CHAIN2,
	SHAPE_FAN_IN,
	SHAPE_QUEUES64,
	SHAPE_CREDIT1,
	SHAPE_STOPPED,
	SHAPE_MEMORY,
	SHAPE_QUEUES64_SHARED,
	SHAPE_CHAIN_PIPELINED,
};

struct bench_workload {
	const char *name;
	enum bench_shape shape;
	unsigned int jobs;
};

static const struct bench_workload bench_workloads[] = {
	{ "independent", SHAPE_INDEPENDENT, 10000 },
	{ "chain", SHAPE_CHAIN, 10000 },
	{ "chain-2q", SHAPE_CHAIN2, 10000 },
	{ "fan-in-16", SHAPE_FAN_IN, 500 * 17 },
	{ "queues-64", SHAPE_QUEUES64, 64000 },
	{ "credit-1", SHAPE_CREDIT1, 5000 },
	{ "independent", SHAPE_INDEPENDENT, 1000 },
	{ "independent", SHAPE_INDEPENDENT, 100000 },
	{ "stopped", SHAPE_STOPPED, 10000 },
	{ "memory", SHAPE_MEMORY, 200000 },
	{ "queues-64-shared", SHAPE_QUEUES64_SHARED, 64000 },
	/* drm_sched pipelines a dependency on its own scheduler either way. */
	{ "chain-pipelined", SHAPE_CHAIN_PIPELINED, 10000 },
};

static unsigned int shape_queues(enum bench_shape shape)
{
	switch (shape) {
	case SHAPE_CHAIN2:
		return 2;
	case SHAPE_FAN_IN:
		return 17;
	case SHAPE_QUEUES64:
	case SHAPE_QUEUES64_SHARED:
		return 64;
	default:
		return 1;
	}
}

static u32 shape_capacity(enum bench_shape shape)
{
	return shape == SHAPE_CREDIT1 ? 1 : BENCH_CAPACITY;
}

/* The queue of job @i, and the number of jobs just before it that it depends on. */
static void shape_plan(enum bench_shape shape, unsigned int i,
		       unsigned int *queue, unsigned int *deps)
{
	*queue = 0;
	*deps = 0;
	switch (shape) {
	case SHAPE_CHAIN:
	case SHAPE_CHAIN_PIPELINED:
		*deps = min(i, 1U);
		break;
	case SHAPE_CHAIN2:
		*queue = i % 2;
		*deps = min(i, 1U);
		break;
	case SHAPE_FAN_IN:
		*queue = i % 17;
		if (*queue == 16)
			*deps = 16;
		break;
	case SHAPE_QUEUES64:
	case SHAPE_QUEUES64_SHARED:
		*queue = i % 64;
		break;
	default:
		break;
	}
}

/*
 * How many of the jobs just before job @i must finish before it can run: its
 * dependencies, or on a ring of one credit the job before it.
 */
static unsigned int shape_waits_for(enum bench_shape shape, unsigned int i)
{
	unsigned int queue, deps;

	if (shape == SHAPE_CREDIT1)
		return min(i, 1U);
	shape_plan(shape, i, &queue, &deps);
	return deps;
}

/* The times recorded for one job, in nanoseconds since bench_rep.base. */
struct bench_sample {
	s64 submit;
	s64 run;
	s64 hw;
};

/* One repetition of a workload. */
struct bench_rep {
	ktime_t base;
	unsigned int jobs;
	atomic_t freed;
	struct completion all_freed;
	struct bench_sample *samples;
	struct dma_fence **dones;
};

static s64 rep_since_base(struct bench_rep *rep, ktime_t t)
{
	return ktime_to_ns(ktime_sub(t, rep->base));
}

static struct bench_rep *rep_new(unsigned int jobs)
{
	struct bench_rep *rep = kzalloc_obj(*rep);

	if (!rep)
		return NULL;
	rep->samples = kvcalloc(jobs, sizeof(*rep->samples), GFP_KERNEL);
	rep->dones = kvcalloc(jobs, sizeof(*rep->dones), GFP_KERNEL);
	if (!rep->samples || !rep->dones) {
		kvfree(rep->samples);
		kvfree(rep->dones);
		kfree(rep);
		return NULL;
	}
	rep->jobs = jobs;
	atomic_set(&rep->freed, 0);
	init_completion(&rep->all_freed);
	rep->base = ktime_get();
	return rep;
}

static void rep_free(struct bench_rep *rep)
{
	unsigned int i;

	for (i = 0; i < rep->jobs; i++)
		dma_fence_put(rep->dones[i]);
	kvfree(rep->samples);
	kvfree(rep->dones);
	kfree(rep);
}

static void rep_job_freed(struct bench_rep *rep)
{
	/* Fully ordered: the samples this job wrote are visible to the waiter. */
	if (atomic_inc_return(&rep->freed) == rep->jobs)
		complete_all(&rep->all_freed);
}

/*
 * Mock hardware that completes every job at once, from hardirq context as an
 * interrupt would: an hrtimer without delay signals the FIFO's fences.
 */
struct bench_ring {
	/* Protects the FIFO: @slots, @head and @len. */
	spinlock_t lock;
	struct dma_fence **slots;
	unsigned int size;
	unsigned int head;
	unsigned int len;
	struct hrtimer timer;
	u64 context;
	atomic64_t seqno;
};

static struct dma_fence *ring_pop(struct bench_ring *ring)
{
	struct dma_fence *fence = NULL;
	unsigned long flags;

	spin_lock_irqsave(&ring->lock, flags);
	if (ring->len) {
		fence = ring->slots[ring->head];
		ring->head = ring->head + 1 == ring->size ? 0 : ring->head + 1;
		ring->len--;
	}
	spin_unlock_irqrestore(&ring->lock, flags);
	return fence;
}

static enum hrtimer_restart ring_timer(struct hrtimer *timer)
{
	struct bench_ring *ring = container_of(timer, struct bench_ring, timer);
	struct dma_fence *fence;

	while ((fence = ring_pop(ring))) {
		dma_fence_signal(fence);
		dma_fence_put(fence);
	}
	return HRTIMER_NORESTART;
}

/* Puts @fence, with the reference the caller hands over, at the end of the FIFO. */
static int ring_push(struct bench_ring *ring, struct dma_fence *fence)
{
	unsigned long flags;
	unsigned int tail;
	bool was_empty;

	spin_lock_irqsave(&ring->lock, flags);
	if (ring->len == ring->size) {
		spin_unlock_irqrestore(&ring->lock, flags);
		return -EBUSY;
	}
	tail = ring->head + ring->len;
	if (tail >= ring->size)
		tail -= ring->size;
	ring->slots[tail] = fence;
	was_empty = ++ring->len == 1;
	spin_unlock_irqrestore(&ring->lock, flags);

	/*
	 * The timer empties the FIFO before it returns, so it only needs
	 * starting when the FIFO was empty (again, if its callback is still
	 * returning).
	 */
	if (was_empty)
		hrtimer_start(&ring->timer, ring_delay_ns, HRTIMER_MODE_REL);
	return 0;
}

static int ring_init(struct bench_ring *ring, unsigned int size)
{
	ring->slots = kvcalloc(size, sizeof(*ring->slots), GFP_KERNEL);
	if (!ring->slots)
		return -ENOMEM;
	spin_lock_init(&ring->lock);
	ring->size = size;
	ring->head = 0;
	ring->len = 0;
	hrtimer_setup(&ring->timer, ring_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL);
	ring->context = dma_fence_context_alloc(1);
	atomic64_set(&ring->seqno, 0);
	return 0;
}

static void ring_fini(struct bench_ring *ring)
{
	hrtimer_cancel(&ring->timer);
	kvfree(ring->slots);
}

/* A queue: a scheduler with one entity, and its mock ring. */
struct bench_sched {
	struct drm_gpu_scheduler base;
	struct drm_sched_entity entity;
	struct bench_ring ring;
};

struct bench_job {
	struct drm_sched_job base;
	struct dma_fence hw_fence;
	struct bench_rep *rep;
	unsigned int index;
	bool hw_init;
};

static struct device *bench_dev;

static const char *bench_fence_driver_name(struct dma_fence *fence)
{
	return "drm_sched_bench";
}

static const char *bench_fence_timeline_name(struct dma_fence *fence)
{
	return "mock-ring";
}

static void bench_hw_fence_release(struct dma_fence *fence)
{
	struct bench_job *job = container_of(fence, struct bench_job, hw_fence);

	kfree_rcu(job, hw_fence.rcu);
}

static const struct dma_fence_ops bench_hw_fence_ops = {
	.get_driver_name = bench_fence_driver_name,
	.get_timeline_name = bench_fence_timeline_name,
	.release = bench_hw_fence_release,
};

static struct dma_fence *bench_run_job(struct drm_sched_job *sched_job)
{
	struct bench_job *job = container_of(sched_job, struct bench_job, base);
	struct bench_sched *sched = container_of(sched_job->sched, struct bench_sched, base);
	struct bench_ring *ring = &sched->ring;
	struct bench_rep *rep = job->rep;

	rep->samples[job->index].run = rep_since_base(rep, ktime_get());
	/* The job's reference, dropped by free_job(). */
	dma_fence_init64(&job->hw_fence, &bench_hw_fence_ops, NULL, ring->context,
			 atomic64_inc_return(&ring->seqno));
	job->hw_init = true;
	/* The FIFO's reference, then the scheduler's. */
	if (ring_push(ring, dma_fence_get(&job->hw_fence))) {
		/* Cannot happen: the FIFO holds as many fences as the ring has credits. */
		dma_fence_set_error(&job->hw_fence, -EBUSY);
		dma_fence_signal(&job->hw_fence);
		dma_fence_put(&job->hw_fence);
	}
	return dma_fence_get(&job->hw_fence);
}

static enum drm_gpu_sched_stat bench_timedout_job(struct drm_sched_job *sched_job)
{
	return DRM_GPU_SCHED_STAT_NO_HANG;
}

static void bench_free_job(struct drm_sched_job *sched_job)
{
	struct bench_job *job = container_of(sched_job, struct bench_job, base);
	struct bench_rep *rep = job->rep;

	if (job->hw_init && dma_fence_is_signaled(&job->hw_fence))
		rep->samples[job->index].hw =
			rep_since_base(rep, dma_fence_timestamp(&job->hw_fence));
	drm_sched_job_cleanup(sched_job);
	if (job->hw_init)
		dma_fence_put(&job->hw_fence);
	else
		kfree(job);
	rep_job_freed(rep);
}

static const struct drm_sched_backend_ops bench_sched_ops = {
	.run_job = bench_run_job,
	.timedout_job = bench_timedout_job,
	.free_job = bench_free_job,
};

static void bench_sched_destroy(struct bench_sched *sched)
{
	drm_sched_entity_destroy(&sched->entity);
	drm_sched_fini(&sched->base);
	ring_fini(&sched->ring);
	kfree(sched);
}

/* The submit_wq of every scheduler of the workload queues-64-shared. */
static struct workqueue_struct *bench_shared_wq;

static struct bench_sched *bench_sched_new(u32 capacity, struct workqueue_struct *submit_wq)
{
	struct drm_sched_init_args args = {
		.ops = &bench_sched_ops,
		.submit_wq = submit_wq,
		.num_rqs = DRM_SCHED_PRIORITY_COUNT,
		.credit_limit = capacity,
		.timeout = msecs_to_jiffies(BENCH_TIMEOUT_MS),
		.name = "drm-sched-bench",
		.dev = bench_dev,
	};
	struct drm_gpu_scheduler *list[1];
	struct bench_sched *sched;

	sched = kzalloc_obj(*sched);
	if (!sched)
		return NULL;
	if (ring_init(&sched->ring, capacity))
		goto err_free;
	if (drm_sched_init(&sched->base, &args))
		goto err_ring;
	list[0] = &sched->base;
	if (drm_sched_entity_init(&sched->entity, DRM_SCHED_PRIORITY_NORMAL, list, 1, NULL))
		goto err_sched;
	return sched;

err_sched:
	drm_sched_fini(&sched->base);
err_ring:
	ring_fini(&sched->ring);
err_free:
	kfree(sched);
	return NULL;
}

static void bench_scheds_destroy(struct bench_sched **scheds, unsigned int count)
{
	unsigned int i;

	for (i = 0; i < count; i++)
		if (scheds[i])
			bench_sched_destroy(scheds[i]);
	kfree(scheds);
	if (bench_shared_wq) {
		destroy_workqueue(bench_shared_wq);
		bench_shared_wq = NULL;
	}
}

static struct bench_sched **bench_scheds_new(enum bench_shape shape)
{
	unsigned int i, count = shape_queues(shape);
	struct bench_sched **scheds = kcalloc(count, sizeof(*scheds), GFP_KERNEL);

	if (!scheds)
		return NULL;
	if (shape == SHAPE_QUEUES64_SHARED) {
		bench_shared_wq = alloc_workqueue("drm-sched-bench-shared",
						  WQ_UNBOUND | WQ_MEM_RECLAIM, 0);
		if (!bench_shared_wq) {
			kfree(scheds);
			return NULL;
		}
	}
	for (i = 0; i < count; i++) {
		scheds[i] = bench_sched_new(shape_capacity(shape), bench_shared_wq);
		if (!scheds[i]) {
			bench_scheds_destroy(scheds, count);
			return NULL;
		}
	}
	return scheds;
}

/* Creates and submits jobs [@from, @to) of @rep; @gate is a dependency of the first one. */
static int submit_jobs(enum bench_shape shape, struct bench_sched **scheds,
		       struct bench_rep *rep, unsigned int from, unsigned int to,
		       struct dma_fence *gate)
{
	unsigned int i, d, q, deps;
	struct bench_job *job;
	int ret;

	for (i = from; i < to; i++) {
		shape_plan(shape, i, &q, &deps);
		job = kzalloc_obj(*job);
		if (!job)
			return -ENOMEM;
		ret = drm_sched_job_init(&job->base, &scheds[q]->entity, 1, NULL, 1);
		if (ret) {
			kfree(job);
			return ret;
		}
		job->rep = rep;
		job->index = i;
		for (d = i - deps; d < i && !ret; d++)
			ret = drm_sched_job_add_dependency(&job->base,
							   dma_fence_get(rep->dones[d]));
		if (!ret && i == 0 && gate)
			ret = drm_sched_job_add_dependency(&job->base, dma_fence_get(gate));
		if (ret) {
			drm_sched_job_cleanup(&job->base);
			kfree(job);
			return ret;
		}
		rep->samples[i].submit = rep_since_base(rep, ktime_get());
		drm_sched_job_arm(&job->base);
		rep->dones[i] = dma_fence_get(&job->base.s_fence->finished);
		drm_sched_entity_push_job(&job->base);
	}
	return 0;
}

struct rep_result {
	s64 ns_per_job;
	s64 submit_ns_per_job;
	s64 submit_to_run_p50;
	s64 submit_to_run_p99;
	s64 hw_to_done_p50;
	s64 hw_to_done_p99;
	s64 wake_p50;
	s64 wake_p99;
	s64 slab_bytes_per_job;
	s64 free_bytes_per_job;
	unsigned int errors;
};

static int cmp_s64(const void *a, const void *b)
{
	s64 x = *(const s64 *)a, y = *(const s64 *)b;

	return x < y ? -1 : x > y;
}

/* Sorts @values and returns their @p-th percentile. */
static s64 percentile(s64 *values, unsigned int n, unsigned int p)
{
	if (!n)
		return 0;
	sort(values, n, sizeof(*values), cmp_s64, NULL);
	return values[(u64)(n - 1) * p / 100];
}

static int sched_rep(const struct bench_workload *w, struct rep_result *res)
{
	s64 *done_at, *submit_to_run, *hw_to_done, *wake;
	unsigned int i, j, waits, n = 0, m = 0;
	struct bench_sched **scheds;
	struct bench_rep *rep;
	ktime_t start;
	int ret = -ENOMEM;

	scheds = bench_scheds_new(w->shape);
	rep = rep_new(w->jobs);
	done_at = kvcalloc(w->jobs, sizeof(s64), GFP_KERNEL);
	submit_to_run = kvcalloc(w->jobs, sizeof(s64), GFP_KERNEL);
	hw_to_done = kvcalloc(w->jobs, sizeof(s64), GFP_KERNEL);
	wake = kvcalloc(w->jobs, sizeof(s64), GFP_KERNEL);
	if (!scheds || !rep || !done_at || !submit_to_run || !hw_to_done || !wake)
		goto out;

	if (w->shape == SHAPE_STOPPED)
		drm_sched_wqueue_stop(&scheds[0]->base);
	start = ktime_get();
	ret = submit_jobs(w->shape, scheds, rep, 0, w->jobs, NULL);
	res->submit_ns_per_job = ktime_to_ns(ktime_sub(ktime_get(), start)) / w->jobs;
	if (w->shape == SHAPE_STOPPED)
		drm_sched_wqueue_start(&scheds[0]->base);
	if (ret)
		goto out;
	wait_for_completion(&rep->all_freed);
	res->ns_per_job = ktime_to_ns(ktime_sub(ktime_get(), start)) / w->jobs;

	res->errors = 0;
	for (i = 0; i < w->jobs; i++) {
		struct dma_fence *done = rep->dones[i];
		struct bench_sample *s = &rep->samples[i];
		s64 ready = S64_MIN;

		submit_to_run[i] = s->run - s->submit;
		if (dma_fence_get_status(done) == 1) {
			done_at[i] = rep_since_base(rep, dma_fence_timestamp(done));
			hw_to_done[n++] = done_at[i] - s->hw;
		} else {
			res->errors++;
		}
		waits = shape_waits_for(w->shape, i);
		for (j = i - waits; j < i; j++)
			ready = max(ready, done_at[j]);
		if (waits)
			wake[m++] = s->run - ready;
	}
	res->submit_to_run_p50 = percentile(submit_to_run, w->jobs, 50);
	res->submit_to_run_p99 = percentile(submit_to_run, w->jobs, 99);
	res->hw_to_done_p50 = percentile(hw_to_done, n, 50);
	res->hw_to_done_p99 = percentile(hw_to_done, n, 99);
	res->wake_p50 = percentile(wake, m, 50);
	res->wake_p99 = percentile(wake, m, 99);

out:
	kvfree(done_at);
	kvfree(submit_to_run);
	kvfree(hw_to_done);
	kvfree(wake);
	/* On an error, the jobs submitted so far finish when their schedulers go. */
	if (scheds)
		bench_scheds_destroy(scheds, shape_queues(w->shape));
	if (rep)
		rep_free(rep);
	return ret;
}

/* The memory the slab allocator holds, in bytes. */
static s64 slab_bytes(void)
{
	return (s64)(global_node_page_state_pages(NR_SLAB_RECLAIMABLE_B) +
		     global_node_page_state_pages(NR_SLAB_UNRECLAIMABLE_B)) * PAGE_SIZE;
}

static s64 si_free(void)
{
	struct sysinfo info;

	si_meminfo(&info);
	return (s64)info.freeram * info.mem_unit;
}

/*
 * Waits for the memory freed by earlier work to be back: kfree_rcu(), which
 * frees fences, batches objects for up to five seconds before it waits for a
 * grace period.
 */
static void settle(void)
{
	ssleep(6);
	rcu_barrier();
	msleep(100);
}

static const char *gate_driver_name(struct dma_fence *fence)
{
	return "drm_sched_bench";
}

static const char *gate_timeline_name(struct dma_fence *fence)
{
	return "gate";
}

static const struct dma_fence_ops gate_fence_ops = {
	.get_driver_name = gate_driver_name,
	.get_timeline_name = gate_timeline_name,
};

/* Records the memory of one job from readings before and after @jobs more jobs. */
static void memory_result(struct rep_result *res, s64 slab_before, s64 free_before,
			  unsigned int jobs)
{
	jobs = max(jobs, 1U);
	res->slab_bytes_per_job = (slab_bytes() - slab_before) / jobs;
	res->free_bytes_per_job = (free_before - si_free()) / jobs;
}

/* The memory of one job in flight. */
static int sched_memory_rep(const struct bench_workload *w, struct rep_result *res)
{
	unsigned int first = min(w->jobs, BENCH_MEMORY_FIRST);
	s64 slab_before, free_before;
	struct bench_sched **scheds;
	struct dma_fence *gate;
	struct bench_rep *rep;
	int ret = -ENOMEM;

	scheds = bench_scheds_new(w->shape);
	rep = rep_new(w->jobs);
	gate = kzalloc_obj(*gate);
	if (!scheds || !rep || !gate)
		goto out;
	dma_fence_init64(gate, &gate_fence_ops, NULL, dma_fence_context_alloc(1), 1);

	ret = submit_jobs(w->shape, scheds, rep, 0, first, gate);
	settle();
	slab_before = slab_bytes();
	free_before = si_free();
	if (!ret)
		ret = submit_jobs(w->shape, scheds, rep, first, w->jobs, NULL);
	msleep(100);
	memory_result(res, slab_before, free_before, w->jobs - first);
	dma_fence_signal(gate);
	dma_fence_put(gate);
	gate = NULL;
	if (!ret)
		wait_for_completion(&rep->all_freed);

out:
	kfree(gate);
	if (scheds)
		bench_scheds_destroy(scheds, shape_queues(w->shape));
	if (rep)
		rep_free(rep);
	return ret;
}

/* The floor: one fence with one callback per job. */
struct floor_fence {
	struct dma_fence base;
	struct dma_fence_cb cb;
};

static atomic_t floor_callbacks;

static void floor_callback(struct dma_fence *fence, struct dma_fence_cb *cb)
{
	atomic_inc(&floor_callbacks);
}

static const char *floor_timeline_name(struct dma_fence *fence)
{
	return "floor";
}

static const struct dma_fence_ops floor_fence_ops = {
	.get_driver_name = bench_fence_driver_name,
	.get_timeline_name = floor_timeline_name,
};

/* A new fence with @callback added, or called at once if it cannot be added. */
static struct floor_fence *floor_fence_new(u64 context, u64 seqno,
					   dma_fence_func_t callback)
{
	struct floor_fence *f = kmalloc_obj(*f);

	if (!f)
		return NULL;
	dma_fence_init64(&f->base, &floor_fence_ops, NULL, context, seqno);
	if (dma_fence_add_callback(&f->base, &f->cb, callback))
		callback(&f->base, &f->cb);
	return f;
}

static int floor_rep(const struct bench_workload *w, struct rep_result *res)
{
	u64 context = dma_fence_context_alloc(1);
	struct floor_fence *f;
	ktime_t start;
	unsigned int i;

	atomic_set(&floor_callbacks, 0);
	start = ktime_get();
	for (i = 0; i < w->jobs; i++) {
		f = floor_fence_new(context, i + 1, floor_callback);
		if (!f)
			return -ENOMEM;
		dma_fence_signal(&f->base);
		dma_fence_put(&f->base);
	}
	res->ns_per_job = ktime_to_ns(ktime_sub(ktime_get(), start)) / w->jobs;
	res->errors = w->jobs - atomic_read(&floor_callbacks);
	return 0;
}

/*
 * The floor with the mock hardware: each job's fence, with its callback, goes
 * straight onto a mock ring as large as the workload, whose hrtimer signals it
 * in hardirq context. What the queues add to this is their own cost.
 */
static atomic_t ring_floor_callbacks;
static unsigned int ring_floor_jobs;
static DECLARE_COMPLETION(ring_floor_done);

static void ring_floor_callback(struct dma_fence *fence, struct dma_fence_cb *cb)
{
	if (atomic_inc_return(&ring_floor_callbacks) == ring_floor_jobs)
		complete(&ring_floor_done);
}

static int ring_floor_rep(const struct bench_workload *w, struct rep_result *res)
{
	u64 context = dma_fence_context_alloc(1);
	struct bench_ring *ring;
	struct floor_fence *f;
	unsigned int i;
	ktime_t start;
	int ret;

	ring = kzalloc_obj(*ring);
	if (!ring)
		return -ENOMEM;
	ret = ring_init(ring, w->jobs);
	if (ret) {
		kfree(ring);
		return ret;
	}
	atomic_set(&ring_floor_callbacks, 0);
	ring_floor_jobs = w->jobs;
	reinit_completion(&ring_floor_done);
	start = ktime_get();
	for (i = 0; i < w->jobs; i++) {
		f = floor_fence_new(context, i + 1, ring_floor_callback);
		if (!f) {
			ret = -ENOMEM;
			break;
		}
		/* The FIFO takes the reference; the ring has room for every job. */
		ring_push(ring, &f->base);
	}
	if (!ret) {
		wait_for_completion(&ring_floor_done);
		res->ns_per_job = ktime_to_ns(ktime_sub(ktime_get(), start)) / w->jobs;
		res->errors = w->jobs - atomic_read(&ring_floor_callbacks);
	}
	/* On an error, the jobs pushed so far signal before the timer is cancelled. */
	while (ret && atomic_read(&ring_floor_callbacks) < i)
		msleep(20);
	ring_fini(ring);
	kfree(ring);
	return ret;
}

static int floor_memory_rep(const struct bench_workload *w, struct rep_result *res)
{
	unsigned int i, first = min(w->jobs, BENCH_MEMORY_FIRST);
	u64 context = dma_fence_context_alloc(1);
	s64 slab_before = 0, free_before = 0;
	struct floor_fence **fences;
	int ret = 0;

	fences = kvcalloc(w->jobs, sizeof(*fences), GFP_KERNEL);
	if (!fences)
		return -ENOMEM;
	for (i = 0; i < w->jobs && !ret; i++) {
		if (i == first) {
			settle();
			slab_before = slab_bytes();
			free_before = si_free();
		}
		fences[i] = floor_fence_new(context, i + 1, floor_callback);
		if (!fences[i])
			ret = -ENOMEM;
	}
	msleep(100);
	memory_result(res, slab_before, free_before, w->jobs - first);
	for (i = 0; i < w->jobs && fences[i]; i++) {
		dma_fence_signal(&fences[i]->base);
		dma_fence_put(&fences[i]->base);
	}
	kvfree(fences);
	return ret;
}

/* Sorts @values and returns their median. */
static s64 median(s64 *values, unsigned int n)
{
	sort(values, n, sizeof(*values), cmp_s64, NULL);
	return values[(n - 1) / 2];
}

/* The median over @n repetitions of the field at @offset of struct rep_result. */
static s64 median_of(const struct rep_result *res, unsigned int n, s64 *scratch,
		     size_t offset)
{
	unsigned int i;

	for (i = 0; i < n; i++)
		scratch[i] = *(const s64 *)((const char *)&res[i] + offset);
	return median(scratch, n);
}

#define MEDIAN_OF(res, n, scratch, field) \
	median_of(res, n, scratch, offsetof(struct rep_result, field))

/* Starts a result line with the description of workload @w. */
static void bench_line(struct seq_buf *line, const char *impl,
		       const struct bench_workload *w, unsigned int n)
{
	seq_buf_printf(line, "impl=%s workload=%s queues=%u capacity=%u jobs=%u reps=%u",
		       impl, w->name, shape_queues(w->shape), shape_capacity(w->shape),
		       w->jobs, n);
}

static void bench_print_memory(const char *impl, const struct bench_workload *w,
			       const struct rep_result *res, unsigned int n, s64 *scratch)
{
	struct seq_buf line;
	char buf[384];

	seq_buf_init(&line, buf, sizeof(buf));
	bench_line(&line, impl, w, n);
	seq_buf_printf(&line, " bytes_per_job=%lld",
		       MEDIAN_OF(res, n, scratch, slab_bytes_per_job));
	seq_buf_printf(&line, " bytes_per_job_min=%lld bytes_per_job_max=%lld",
		       scratch[0], scratch[n - 1]);
	seq_buf_printf(&line, " free_bytes_per_job=%lld",
		       MEDIAN_OF(res, n, scratch, free_bytes_per_job));
	seq_buf_printf(&line, " free_bytes_per_job_min=%lld free_bytes_per_job_max=%lld",
		       scratch[0], scratch[n - 1]);
	pr_info("jq-bench: %s\n", seq_buf_str(&line));
}

static void bench_print(const char *impl, const struct bench_workload *w,
			const struct rep_result *res, unsigned int n, s64 *scratch)
{
	unsigned int i, errors = 0;
	struct seq_buf line;
	char buf[512];

	for (i = 0; i < n; i++)
		errors += res[i].errors;
	seq_buf_init(&line, buf, sizeof(buf));
	bench_line(&line, impl, w, n);
	seq_buf_printf(&line, " ns_per_job=%lld", MEDIAN_OF(res, n, scratch, ns_per_job));
	seq_buf_printf(&line, " ns_per_job_min=%lld ns_per_job_max=%lld",
		       scratch[0], scratch[n - 1]);
	if (strcmp(impl, "floor") && strcmp(impl, "ring-floor")) {
		seq_buf_printf(&line, " submit_ns_per_job=%lld",
			       MEDIAN_OF(res, n, scratch, submit_ns_per_job));
		seq_buf_printf(&line, " submit_to_run_p50_ns=%lld",
			       MEDIAN_OF(res, n, scratch, submit_to_run_p50));
		seq_buf_printf(&line, " submit_to_run_p99_ns=%lld",
			       MEDIAN_OF(res, n, scratch, submit_to_run_p99));
		seq_buf_printf(&line, " hw_to_done_p50_ns=%lld",
			       MEDIAN_OF(res, n, scratch, hw_to_done_p50));
		seq_buf_printf(&line, " hw_to_done_p99_ns=%lld",
			       MEDIAN_OF(res, n, scratch, hw_to_done_p99));
		seq_buf_printf(&line, " wake_p50_ns=%lld",
			       MEDIAN_OF(res, n, scratch, wake_p50));
		seq_buf_printf(&line, " wake_p99_ns=%lld",
			       MEDIAN_OF(res, n, scratch, wake_p99));
	}
	seq_buf_printf(&line, " errors=%u", errors);
	pr_info("jq-bench: %s\n", seq_buf_str(&line));
}

static void bench_workload(const char *impl, const struct bench_workload *w,
			   unsigned int n)
{
	bool is_ring_floor = !strcmp(impl, "ring-floor");
	bool is_floor = !strcmp(impl, "floor");
	struct rep_result *res;
	unsigned int i;
	s64 *scratch;
	int ret = 0;

	res = kcalloc(n, sizeof(*res), GFP_KERNEL);
	scratch = kcalloc(n, sizeof(*scratch), GFP_KERNEL);
	if (!res || !scratch) {
		ret = -ENOMEM;
		goto out;
	}
	for (i = 0; i < n && !ret; i++) {
		if (w->shape == SHAPE_MEMORY)
			ret = is_floor ? floor_memory_rep(w, &res[i]) :
					 sched_memory_rep(w, &res[i]);
		else if (is_ring_floor)
			ret = ring_floor_rep(w, &res[i]);
		else
			ret = is_floor ? floor_rep(w, &res[i]) : sched_rep(w, &res[i]);
	}
	if (ret)
		goto out;
	if (w->shape == SHAPE_MEMORY)
		bench_print_memory(impl, w, res, n, scratch);
	else
		bench_print(impl, w, res, n, scratch);
out:
	if (ret)
		pr_err("jq-bench: impl=%s workload=%s jobs=%u failed: %d\n",
		       impl, w->name, w->jobs, ret);
	kfree(res);
	kfree(scratch);
}

/* Runs every workload of the mask on @impl; the ring floor has no memory workload. */
static void bench_impl(const char *impl, unsigned int n)
{
	bool ring_floor = !strcmp(impl, "ring-floor");
	unsigned int i;

	pr_info("jq-bench: impl=%s begin\n", impl);
	for (i = 0; i < ARRAY_SIZE(bench_workloads); i++)
		if (workloads & BIT(i) &&
		    !(ring_floor && bench_workloads[i].shape == SHAPE_MEMORY))
			bench_workload(impl, &bench_workloads[i], n);
	pr_info("jq-bench: impl=%s end\n", impl);
}

static int __init drm_sched_bench_init(void)
{
	struct faux_device *fdev;
	unsigned int n = max(reps, 1U);

	fdev = faux_device_create("drm_sched_bench", NULL, NULL);
	if (!fdev)
		return -ENODEV;
	bench_dev = &fdev->dev;

	bench_impl("drm_sched", n);
	if (floors) {
		bench_impl("floor", n);
		bench_impl("ring-floor", n);
	}
	bench_dev = NULL;
	faux_device_destroy(fdev);
	return 0;
}
late_initcall(drm_sched_bench_init);

MODULE_DESCRIPTION("Benchmark of drm_sched, side by side with the Rust DRM job queue");
MODULE_LICENSE("GPL");
