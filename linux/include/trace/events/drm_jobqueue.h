/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Trace events of the Rust DRM job queue (rust/kernel/drm/jobqueue/).
 *
 * The fields follow the gpu_scheduler events where they mean the same thing
 * (name, fence_context, fence_seqno, job_count, hw_job_count, ctx, seqno), so
 * that tools reading drm_sched traces read these too.
 */

#undef TRACE_SYSTEM
#define TRACE_SYSTEM drm_jobqueue

#if !defined(_TRACE_DRM_JOBQUEUE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _TRACE_DRM_JOBQUEUE_H

#include <linux/dma-fence.h>
#include <linux/tracepoint.h>
#include <linux/types.h>

/* A job was submitted: its done fence, the credits it takes, its dependencies. */
TRACE_EVENT(drm_jobqueue_job_queue,
	    TP_PROTO(const char *name, u64 fence_context, u64 fence_seqno,
		     u32 credits, u32 deps, u32 job_count, u32 hw_job_count),
	    TP_ARGS(name, fence_context, fence_seqno, credits, deps, job_count,
		    hw_job_count),
	    TP_STRUCT__entry(__string(name, name)
			     __field(u64, fence_context)
			     __field(u64, fence_seqno)
			     __field(u32, credits)
			     __field(u32, deps)
			     __field(u32, job_count)
			     __field(u32, hw_job_count)),
	    TP_fast_assign(__assign_str(name);
			   __entry->fence_context = fence_context;
			   __entry->fence_seqno = fence_seqno;
			   __entry->credits = credits;
			   __entry->deps = deps;
			   __entry->job_count = job_count;
			   __entry->hw_job_count = hw_job_count;),
	    TP_printk("fence=%llu:%llu, ring=%s, credits=%u, deps=%u, job count:%u, hw job count:%u",
		      __entry->fence_context, __entry->fence_seqno, __get_str(name),
		      __entry->credits, __entry->deps, __entry->job_count,
		      __entry->hw_job_count)
);

/* The job of done fence @fence_context:@fence_seqno waits for fence @ctx:@seqno. */
TRACE_EVENT(drm_jobqueue_job_add_dep,
	    TP_PROTO(u64 fence_context, u64 fence_seqno, u64 ctx, u64 seqno),
	    TP_ARGS(fence_context, fence_seqno, ctx, seqno),
	    TP_STRUCT__entry(__field(u64, fence_context)
			     __field(u64, fence_seqno)
			     __field(u64, ctx)
			     __field(u64, seqno)),
	    TP_fast_assign(__entry->fence_context = fence_context;
			   __entry->fence_seqno = fence_seqno;
			   __entry->ctx = ctx;
			   __entry->seqno = seqno;),
	    TP_printk("fence=%llu:%llu depends on fence=%llu:%llu",
		      __entry->fence_context, __entry->fence_seqno,
		      __entry->ctx, __entry->seqno)
);

/* A job was handed to the hardware, which signals fence @hw_context:@hw_seqno. */
TRACE_EVENT(drm_jobqueue_job_run,
	    TP_PROTO(const char *name, u64 fence_context, u64 fence_seqno,
		     u64 hw_context, u64 hw_seqno, u32 job_count, u32 hw_job_count),
	    TP_ARGS(name, fence_context, fence_seqno, hw_context, hw_seqno, job_count,
		    hw_job_count),
	    TP_STRUCT__entry(__string(name, name)
			     __field(u64, fence_context)
			     __field(u64, fence_seqno)
			     __field(u64, hw_context)
			     __field(u64, hw_seqno)
			     __field(u32, job_count)
			     __field(u32, hw_job_count)),
	    TP_fast_assign(__assign_str(name);
			   __entry->fence_context = fence_context;
			   __entry->fence_seqno = fence_seqno;
			   __entry->hw_context = hw_context;
			   __entry->hw_seqno = hw_seqno;
			   __entry->job_count = job_count;
			   __entry->hw_job_count = hw_job_count;),
	    TP_printk("fence=%llu:%llu, ring=%s, hw fence=%llu:%llu, job count:%u, hw job count:%u",
		      __entry->fence_context, __entry->fence_seqno, __get_str(name),
		      __entry->hw_context, __entry->hw_seqno, __entry->job_count,
		      __entry->hw_job_count)
);

DECLARE_EVENT_CLASS(drm_jobqueue_job_end,
		    TP_PROTO(u64 fence_context, u64 fence_seqno, int error),
		    TP_ARGS(fence_context, fence_seqno, error),
		    TP_STRUCT__entry(__field(u64, fence_context)
				     __field(u64, fence_seqno)
				     __field(int, error)),
		    TP_fast_assign(__entry->fence_context = fence_context;
				   __entry->fence_seqno = fence_seqno;
				   __entry->error = error;),
		    TP_printk("fence=%llu:%llu error=%d",
			      __entry->fence_context, __entry->fence_seqno, __entry->error)
);

/*
 * A job retired: its done fence @fence has signalled, with its error (0 on
 * success). The fence, not its fields, is the argument, so that nothing is
 * read while the event is disabled. The error is read with
 * dma_fence_get_status(), under the fence lock: the fence may have been
 * signalled on another CPU, and only the lock orders the read after the
 * signaller's write.
 */
TRACE_EVENT(drm_jobqueue_job_done,
	    TP_PROTO(struct dma_fence *fence),
	    TP_ARGS(fence),
	    TP_STRUCT__entry(__field(u64, fence_context)
			     __field(u64, fence_seqno)
			     __field(int, error)),
	    TP_fast_assign(__entry->fence_context = fence->context;
			   __entry->fence_seqno = fence->seqno;
			   __entry->error = min(dma_fence_get_status(fence), 0);),
	    TP_printk("fence=%llu:%llu error=%d",
		      __entry->fence_context, __entry->fence_seqno, __entry->error)
);

/* A job ended without the hardware completing it; its done fence got @error. */
DEFINE_EVENT(drm_jobqueue_job_end, drm_jobqueue_job_cancel,
	     TP_PROTO(u64 fence_context, u64 fence_seqno, int error),
	     TP_ARGS(fence_context, fence_seqno, error)
);

/* A job ran longer than the timeout; the backend answered @action. */
TRACE_EVENT(drm_jobqueue_job_timeout,
	    TP_PROTO(const char *name, u64 fence_context, u64 fence_seqno,
		     const char *action),
	    TP_ARGS(name, fence_context, fence_seqno, action),
	    TP_STRUCT__entry(__string(name, name)
			     __field(u64, fence_context)
			     __field(u64, fence_seqno)
			     __string(action, action)),
	    TP_fast_assign(__assign_str(name);
			   __entry->fence_context = fence_context;
			   __entry->fence_seqno = fence_seqno;
			   __assign_str(action);),
	    TP_printk("fence=%llu:%llu, ring=%s timed out: %s",
		      __entry->fence_context, __entry->fence_seqno, __get_str(name),
		      __get_str(action))
);

DECLARE_EVENT_CLASS(drm_jobqueue_queue,
		    TP_PROTO(const char *name, u64 fence_context, const char *what),
		    TP_ARGS(name, fence_context, what),
		    TP_STRUCT__entry(__string(name, name)
				     __field(u64, fence_context)
				     __string(what, what)),
		    TP_fast_assign(__assign_str(name);
				   __entry->fence_context = fence_context;
				   __assign_str(what);),
		    TP_printk("ring=%s, context=%llu %s", __get_str(name),
			      __entry->fence_context, __get_str(what))
);

/* The queue was stopped, for example around a reset of its ring. */
DEFINE_EVENT(drm_jobqueue_queue, drm_jobqueue_queue_stop,
	     TP_PROTO(const char *name, u64 fence_context, const char *what),
	     TP_ARGS(name, fence_context, what)
);

/*
 * A stop of the queue ended; @what is the recovery it asked for. The jobs that were on the
 * ring are recovered when the last stop ends, with the most drastic recovery asked for (not at
 * all on a queue being dropped).
 */
DEFINE_EVENT(drm_jobqueue_queue, drm_jobqueue_queue_start,
	     TP_PROTO(const char *name, u64 fence_context, const char *what),
	     TP_ARGS(name, fence_context, what)
);

#endif /* _TRACE_DRM_JOBQUEUE_H */

/* This part must be outside protection */
#include <trace/define_trace.h>
