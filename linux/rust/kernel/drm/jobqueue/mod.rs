// SPDX-License-Identifier: GPL-2.0 OR MIT

//! A job queue for GPU drivers whose firmware schedules the hardware.
//!
//! A [`JobQueue`] serves one firmware ring (a Tyr/Panthor CSF queue, a Nova channel): jobs run in
//! submission order, each once its dependencies have signalled and the ring has room for it. The
//! driver says how to run a job and gets back, at submission, the job's *done fence*: a
//! [`DmaFence`] that signals when the job has finished, with its error, and that it can share with
//! userspace (syncobjs, sync files) and other drivers.
//!
//! The queue is built on [`dma_fence`](crate::dma_fence) alone: a
//! [`ProxyFence`](crate::dma_fence::ProxyFence) makes each done fence follow the hardware fence
//! that [`Backend::run`] returns and gives the job's credits back when it signals
//! ([`ReturnCredits`](crate::dma_fence::ReturnCredits)), and
//! [`EnqueueWork`](crate::dma_fence::EnqueueWork) callbacks move every other reaction to a fence
//! into process context. Drivers never see a fence callback.
//!
//! # Job lifecycle
//!
//! ```text
//!  JobQueue::new_job()        all allocations happen here and in add_dependency()
//!        |
//!        v
//!   +---------+  JobQueue::submit()   point of no return: the done fence exists and will
//!   |   Job   | ------------------->  signal exactly once, whatever happens
//!   +---------+                       |
//!                                     v
//!                              +-------------+  a dependency failed     +------------+
//!                              |   waiting   | -----------------------> |  finished  |
//!                              | (deps, room)|   Backend::run() failed  | done fence |
//!                              +-------------+   queue torn down,       | = error    |
//!                                     |          device gone (in order) +------------+
//!             dependencies signalled, |                                       ^
//!             credits available       v                                       |
//!                              +-------------+  hardware fence signals  +------------+
//!                              |   running   | -----------------------> |  finished  |
//!                              | Backend::run|   (done fence follows it,| done fence |
//!                              +-------------+    with its error; the   | = hw result|
//!                               |    ^   |        credits come back)    +------------+
//!              timeout: Backend |    |   | stop() / reset                     |
//!              ::timed_out()    +----+   v                                    v
//!                                 resubmit, cancel, or continue      retired in process
//!                                 (now, or at reset_done())          context: credits handed
//!                                                                    on, then payload
//!                                                                    dropped
//! ```
//!
//! # What the queue guarantees
//!
//! - Every allocation happens in [`JobQueue::new_job`] and [`Job::add_dependency`] (or
//!   [`Job::reserve_dependencies`]); once [`JobQueue::submit`] has started, nothing allocates,
//!   and submission cannot fail: it fails only before it starts, handing the job back.
//! - A done fence signals exactly once: by the hardware fence it follows, or by the queue, with
//!   the result of a hardware fence that had signalled when `run` returned it, or with an error
//!   if the job did not run (a dependency failed, `run` failed, the queue was torn down or the
//!   device is gone) or the backend gave it up (a timeout, a reset). Done fences of a queue
//!   signal in submission order. A job that ends without the hardware does not hold back the
//!   jobs behind it from running, only their done fences.
//! - The driver's payload is dropped in process context only, after the job finished and after
//!   the credits it took are back and handed on: by the queue's drop work, on a workqueue that
//!   all queues share, one at a time per queue, in batches (at the latest a tick after a job
//!   retired, or when the queue runs out of jobs), or by the thread that drops the queue.
//!   Nothing that runs jobs or signals their done fences waits for it, so its `Drop` may sleep,
//!   allocate and wait for fences, those of later jobs of its own queue included (a buffer's
//!   drop may wait for them through reclaim). It must not drop a [`JobQueue`]: the drop work of
//!   every queue shares one lock class, and teardown waits for the drop work.
//!
//! # What the hardware may still use
//!
//! A running job's done fence signals only through its hardware fence, or after the backend has
//! told the queue that the hardware will not touch the job again; its payload (its buffers, its
//! VM) is dropped only after that. The backend says so by returning
//! [`TimeoutAction::Reset`] or [`TimeoutAction::DeviceGone`] from [`Backend::timed_out`] (or
//! [`TimeoutAction::ResetLater`] and then calling [`JobQueue::reset_done`]), by resuming a stopped
//! queue with [`Recovery::Cancel`] or [`Recovery::Resubmit`], and at teardown by returning from
//! [`Backend::stop_hardware`]. [`TimeoutAction::NoHang`] and
//! [`Recovery::Continue`] leave the jobs following their hardware fences, and the timeout armed
//! (unless another resume of the same stop asked for more: see [`StoppedQueue::resume`]).
//!
//! A job whose hardware fence signalled while the queue was stopped, or while the backend
//! handled a timeout, ends as [`Recovery`] describes.
//!
//! Dropping the [`JobQueue`] ends its jobs as [`Backend::stop_hardware`] describes. It removes
//! every callback from foreign fences and waits for its work items: a hardware fence
//! signalling later touches nothing of the queue. The time a queue is stopped does not count
//! towards a job's timeout.
//!
//! The queues of one device or firmware group that a reset takes down together form a
//! [`ResetDomain`]: a timeout in one of them stops them all, and the recovery applies to all.
//! Deadlines set on a done fence (`dma_fence_set_deadline()`) reach the hardware fence the job
//! follows and [`Backend::deadline`].
//!
//! # Error, timeout and teardown semantics
//!
//! (1): unless the job's hardware fence had signalled success when the queue looked at it again
//! (at the resume, after [`Backend::timed_out`] or after [`Backend::stop_hardware`]): the job
//! then finishes `Ok`, without [`Backend::cancelled`]. With [`Recovery::Resubmit`], only if no
//! job before it runs again.
//!
//! | event | done fence | [`Backend::cancelled`] |
//! |---|---|---|
//! | hardware fence signals `Ok`/`Err(e)` | `Ok`/`Err(e)` | no |
//! | it had signalled `Ok`/`Err(e)` when [`Backend::run`] returned it | `Ok`/`Err(e)` | no |
//! | a dependency signalled `Err(e)` (job not run) | `Err(e)` | yes |
//! | [`Backend::run`] returned `Err(e)` | `Err(e)` | yes |
//! | timed out: `Reset`, or `ResetLater` then [`JobQueue::reset_done`] (1) | `-ETIMEDOUT` | yes |
//! | on the hardware at a reset or resume, [`Recovery::Cancel`]`(e)` (1) | `Err(e)` | yes |
//! | on the hardware at a reset or resume, [`Recovery::Resubmit`] (1) | runs again | - |
//! | [`TimeoutAction::DeviceGone`], not ended yet (1) | `-ENODEV` | yes |
//! | not run when the queue is dropped | `-ECANCELED` | yes |
//! | ended as in rows 2-6, not signalled when the queue is dropped | as in rows 2-6 | as there |
//! | on the hardware a timeout into the drop, [`Backend::stop_hardware`] (1) | `-ECANCELED` | yes |
//! | the same, dropped while a reset left to the driver is pending | `-ECANCELED` | yes |
//!
//! # Examples
//!
//! A backend whose "hardware" completes every job at once:
//!
//! ```
//! use kernel::dma_fence::{DmaFence, FenceContext};
//! use kernel::drm::jobqueue::{Backend, JobQueue, JobRef, QueueOptions, TimeoutAction};
//! use kernel::sync::aref::ARef;
//! use kernel::time::Delta;
//!
//! struct Ring {
//!     hw: FenceContext,
//! }
//!
//! impl Backend for Ring {
//!     type Job = u32;
//!
//!     fn run(&self, job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
//!         // A real driver writes the job into its ring here and returns the fence its
//!         // interrupt handler signals.
//!         let fence = self.hw.new_fence(GFP_NOWAIT)?;
//!         let shared = fence.to_aref();
//!         fence.signal(if *job == 0 { Err(EINVAL) } else { Ok(()) });
//!         Ok(shared)
//!     }
//!
//!     fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction {
//!         TimeoutAction::NoHang
//!     }
//!
//!     fn stop_hardware(&self) {
//!         // Every job completed in `run`: nothing is left on the ring.
//!     }
//! }
//!
//! let ring = Ring { hw: FenceContext::new(c"example", c"ring0-hw") };
//! let queue = JobQueue::new(
//!     ring,
//!     QueueOptions::new(c"example", c"ring0", 16, Some(Delta::from_secs(5))),
//! )?;
//!
//! let first = queue.new_job(1, 7)?;
//! let done_first = queue.submit(first)?;
//!
//! // The second job waits for the first one.
//! let mut second = queue.new_job(1, 0)?;
//! second.add_dependency(done_first.clone())?;
//! let done_second = queue.submit(second)?;
//!
//! done_second.wait()?;
//! assert_eq!(done_first.status(), Some(Ok(())));
//! assert_eq!(done_second.status(), Some(Err(EINVAL)));
//! # Ok::<(), Error>(())
//! ```

#![cfg(CONFIG_RUST_DRM_JOBQUEUE)]

use crate::{
    dma_fence::DmaFence,
    prelude::*,
    sync::aref::ARef,
    time::{
        Delta,
        Instant,
        Monotonic, //
    }, //
};

mod job;
mod queue;
mod ring;
mod trace;

#[doc(inline)]
pub use self::{
    job::{
        Job,
        JobRef, //
    },
    queue::{
        JobQueue,
        QueueStats,
        ResetDomain,
        StoppedQueue,
        SubmitError, //
    }, //
};

/// The nesting level of done fences by default: one above plain hardware fences.
pub const DONE_FENCE_LEVEL: u32 = 1;

/// What a driver provides to run the jobs of a [`JobQueue`].
///
/// [`Backend::run`], [`Backend::timed_out`] and [`Backend::deadline`] are called from the
/// queue's work items, in process context, one at a time per queue, with the
/// queue's internal lock held (and, for [`Backend::timed_out`], the lock that
/// [`JobQueue::stop`] and resumes take: its [`ResetDomain`]'s in a domain)
/// and inside a fence signalling critical section
/// ([`SignallingSection`](crate::dma_fence::SignallingSection)): they must not allocate memory
/// other than with `GFP_NOWAIT`/`GFP_ATOMIC`, wait for fences, take a lock that is held elsewhere
/// around such an allocation or wait, or call into any job queue (stop, drop, stats: the queues'
/// locks share one lock class, so lockdep reports it as recursive locking).
/// [`Backend::cancelled`] and [`Backend::stop_hardware`] are called in process context without
/// the lock, outside any signalling section; [`Backend::cancelled`] from the drop work, which may
/// run at the same time as the other methods, or from the thread that drops the queue.
pub trait Backend: Send + Sync + Sized + 'static {
    /// The driver's data for one job.
    ///
    /// Dropped in process context, after the job finished; its `Drop` may sleep and wait for
    /// fences (see the [module documentation](self)).
    type Job: Send + 'static;

    /// Hands `job` to the hardware and returns the fence the hardware signals when the job is
    /// done (in order with the other jobs of the ring), or an error if it could not be run.
    ///
    /// Called again for the same job if it is resubmitted after a reset
    /// ([`Recovery::Resubmit`]).
    fn run(&self, job: JobRef<'_, Self>) -> Result<ARef<DmaFence>>;

    /// Called when `job` has been running for longer than the queue's timeout.
    fn timed_out(&self, job: JobRef<'_, Self>) -> TimeoutAction;

    /// Stops the ring for good; called once, when the [`JobQueue`] is dropped.
    ///
    /// [Teardown](JobQueue#teardown) first gives the jobs on the hardware one timeout (all
    /// together) to finish, then calls this, and only then ends the jobs left: their done fences
    /// signal `-ECANCELED` (or the result they already had, see the table in the [module
    /// documentation](self)) and their payloads are dropped. So when this returns, the hardware
    /// must not touch any job of the queue again, and the hardware fences of its jobs have
    /// signalled or never will (the role of drm_sched's `cancel_job`): take the ring off the
    /// hardware, wait for the firmware to confirm, or reset it. A ring whose device is gone has
    /// nothing to do.
    ///
    /// Called in process context, without the queue's lock: it may sleep, but must not wait for
    /// the done fences of any job queue or call into this one.
    fn stop_hardware(&self);

    /// Called for a job that finishes without the hardware completing it, with the error its
    /// done fence carries (see the table in the [module documentation](self)), just before its
    /// payload is dropped. Does nothing by default.
    fn cancelled(&self, job: JobRef<'_, Self>, error: Error) {
        let _ = (job, error);
    }

    /// Called when a waiter would like `job`, which is on the hardware, to be done by
    /// `deadline`: a hint (`dma_fence_set_deadline()` on its done fence) that the driver may
    /// use to raise clocks or to prioritise the ring, or ignore. Does nothing by default.
    ///
    /// Called with the earliest deadline set so far, from the queue's work (or right after
    /// [`Backend::run`] for a job that got its deadline while it waited), under the same rules
    /// as [`Backend::run`]. The deadline also reaches the hardware fence [`Backend::run`]
    /// returned (`dma_fence_set_deadline()`), once the done fence follows it.
    fn deadline(&self, job: JobRef<'_, Self>, deadline: Instant<Monotonic>) {
        let _ = (job, deadline);
    }
}

/// What [`Backend::timed_out`] did about a job that timed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutAction {
    /// The job is making progress: wait another timeout period.
    NoHang,
    /// The driver reset the ring. The timed-out job's done fence signals `-ETIMEDOUT`; the
    /// other jobs that were on the hardware are recovered as [`Recovery`] says.
    Reset(Recovery),
    /// The driver resets the ring later, from its own work (for example once the firmware has
    /// taken the ring's group off its slot): the queue stays stopped, as after
    /// [`JobQueue::stop`], with the jobs on the hardware detached from their hardware fences,
    /// until the driver calls [`JobQueue::reset_done`]. Then the timed-out job's done fence
    /// signals `-ETIMEDOUT` and the others are recovered as that call says (or as a more drastic
    /// resume of the queue asked for meanwhile: see [`StoppedQueue::resume`]).
    ResetLater,
    /// The device is gone: every job that has not finished is cancelled with `-ENODEV`, and the
    /// queue takes no more jobs.
    DeviceGone,
}

/// What happens to the jobs that were on the hardware when a queue resumes after a stop or a
/// reset.
///
/// Jobs whose hardware fence signalled success before or during the stop (or the handling of a
/// timeout) finish successfully: they are neither run again nor cancelled, unless
/// [`Recovery::Resubmit`] runs a job before them again (they then run again too, in order). A
/// hardware fence that signalled an error meanwhile may have been signalled by the reset: the
/// recovery decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing happened to them: keep following their hardware fences.
    Continue,
    /// The ring was reset and lost them: run them again, in order.
    Resubmit,
    /// The ring was reset and lost them: their done fences signal this error.
    Cancel(Error),
}

/// How to create a [`JobQueue`].
pub struct QueueOptions {
    /// The driver name of the done fences, as in `/sys/kernel/debug/sync` and traces.
    pub driver_name: &'static CStr,
    /// The name of the queue: the timeline name of its done fences and the name of its
    /// workqueue.
    pub name: &'static CStr,
    /// The room on the ring, in credits. A job takes between 1 and this many credits.
    pub capacity: u32,
    /// How long a job may run before [`Backend::timed_out`] is called, counted from when it
    /// started on the hardware: when [`Backend::run`] handed it over, or when the job before it
    /// finished, whichever is later, and not while the queue is stopped or its timeout
    /// suspended. [`None`] for no timeout. Teardown waits at most this long (10 seconds without
    /// a timeout) for all the jobs on the hardware together.
    pub timeout: Option<Delta>,
    /// The workqueue the queue's work runs on; by default an ordered
    /// [`FenceWorkqueue`](crate::dma_fence::FenceWorkqueue) of its own. Several queues may share
    /// one: the queue does not rely on any order between its work items.
    pub workqueue: Option<crate::sync::Arc<crate::dma_fence::FenceWorkqueue>>,
    /// The nesting level of the done fences (see
    /// [`NestedFenceContext`](crate::dma_fence::NestedFenceContext)): the hardware
    /// fences returned by [`Backend::run`] must be of a lower level. [`DONE_FENCE_LEVEL`] by
    /// default.
    pub done_fence_level: u32,
    /// Whether a job's dependencies on earlier jobs of the same queue are dropped at submission,
    /// as the ring runs jobs in order anyway (drm_sched does this): the job is then handed to
    /// the hardware while those jobs still run, and runs even if one of them fails. Only for
    /// rings that stop on a failed job. `false` by default: such a job waits, and does not run
    /// if a job it depends on failed.
    pub pipeline_own_dependencies: bool,
    /// Whether jobs of 0 credits are allowed: jobs that take no room on the ring, such as
    /// sync-only jobs that write nothing to it. They still run and finish in order. `false` by
    /// default: [`JobQueue::new_job`] rejects 0 credits.
    pub allow_zero_credits: bool,
}

impl QueueOptions {
    /// Options with the given names, capacity and timeout, and the defaults for the rest.
    pub fn new(
        driver_name: &'static CStr,
        name: &'static CStr,
        capacity: u32,
        timeout: Option<Delta>,
    ) -> Self {
        Self {
            driver_name,
            name,
            capacity,
            timeout,
            workqueue: None,
            done_fence_level: DONE_FENCE_LEVEL,
            pipeline_own_dependencies: false,
            allow_zero_credits: false,
        }
    }
}
