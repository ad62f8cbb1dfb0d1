// SPDX-License-Identifier: GPL-2.0 OR MIT

//! CSF queues: one [`JobQueue`] per command stream ring of a group.
//!
//! Each queue of a group has a ring buffer of CS instructions that the firmware executes while
//! the group is resident on a CSG slot, and a 64-bit sync object that the firmware increments at
//! the end of every job (see [`crate::ringbuf`]). A queue submits its jobs through a
//! [`JobQueue<TyrQueueBackend>`](JobQueue), which does what drm_sched does for Panthor: it holds a
//! job back until its dependencies have signalled and the ring has room for it (a job's credits
//! are its instructions, the capacity is the ring's size in instructions), hands it to
//! [`Backend::run`] in order, makes the job's done fence follow the hardware fence `run`
//! returns, and calls [`Backend::timed_out`] when a job runs too long.
//!
//! # Hardware fences and the sync object
//!
//! [`TyrQueueBackend::run`] writes the job's instructions at the ring's insert pointer, publishes
//! the new insert pointer to the firmware and rings the queue's doorbell. It returns a hardware
//! fence from the queue's own [`FenceContext`]: the n-th job written to the ring gets sequence
//! number n, and its last instruction makes the sync object count it, so the job is done once
//! the sync object's value reaches n. [`QueueRing::sync_update`], which the interrupt handler
//! calls when the firmware reports a sync object update, signals the hardware fences of every
//! job the sync object has reached, in order and without allocating: the fences live in a fixed
//! array, allocated with the queue, with one slot per job the ring can hold.
//!
//! Jobs without a command stream (sync-only jobs) write nothing: like Panthor, `run` returns the
//! hardware fence of the last job written to the ring, so the job is done when the jobs before it
//! are. Unlike Panthor, which reserves ring space for them as drm_sched needs at least one credit
//! per job, they take no credits ([`QueueOptions::allow_zero_credits`]): a full ring does not
//! hold them back.
//!
//! # Timeouts, faults and termination
//!
//! As in Panthor, a group that faults or times out is never run again. [`Backend::timed_out`]
//! first looks for completions the interrupt path missed; if there are, the ring made progress
//! and the job gets another period ([`TimeoutAction::NoHang`]). Otherwise the group is marked
//! timed out and the CSG scheduler is asked to take it off its CSG slot
//! ([`QueueHw::request_reset`]); the queue stays stopped ([`TimeoutAction::ResetLater`]) with
//! nothing signalled, since the firmware may still execute the ring. Once the group is off its
//! slot, the scheduler's reset work calls [`Group::terminate`](crate::group::Group::terminate),
//! which signals the hardware fences of every ring of the group with the group's error and
//! completes the reset with [`Recovery::Cancel`], what Panthor's `group_term_post_processing()`
//! does for every job of a timed-out group, after the group left its slot. The queues of a group
//! form a [`ResetDomain`]: a timeout stops all of them, so that no other queue of the group times
//! out while it is being taken off its slot, and completing the reset resumes them all. Destroying
//! a group takes it off its slot ([`QueueHw::evict`]) before it ends the jobs on its rings.
//!
//! # What is missing upstream
//!
//! Tyr in Linux 7.3 boots the firmware but has no CSF global, CSG or CS interface code and no CSG
//! scheduler: nothing allocates the CS input/output interfaces in the firmware's shared memory,
//! binds a group to a CSG slot, assigns doorbells or handles the job interrupt. [`QueueHw`] is the
//! boundary: it names exactly what a queue needs from those parts. The KUnit suite implements it
//! with a fake firmware that interprets the ring; the driver will implement it once the
//! firmware interfaces and the scheduler exist.
//!
//! # Locking
//!
//! The job queue calls [`TyrQueueBackend::run`] and [`TyrQueueBackend::timed_out`] with its own
//! mutex held, in a fence signalling section. The ring state is behind an irq-disabling spinlock,
//! taken by `run`, the interrupt path and termination; [`QueueHw`] methods may be called with it
//! held, except [`QueueHw::ring_doorbell`] and [`QueueHw::request_reset`]. Hardware fences are
//! signalled with the ring lock held, so that they signal in order: the lock order is job queue
//! mutex, ring lock, fence locks.

use kernel::{
    dma_fence::{
        DmaFence,
        FenceAllocation,
        FenceContext,
        SignallingSection,
        UniqueFence, //
    },
    drm::jobqueue::{
        Backend,
        Job,
        JobQueue,
        JobRef,
        QueueOptions,
        QueueStats,
        Recovery,
        ResetDomain,
        TimeoutAction, //
    },
    new_spinlock_irq,
    prelude::*,
    sync::{
        aref::ARef,
        Arc,
        SpinLockIrq, //
    },
    time::Delta,
    uapi, //
};

use crate::{
    group::GroupState,
    job::{
        CallInfo,
        TyrJob, //
    },
    ringbuf::{
        self,
        JobCsParams,
        JobInstrs,
        RingMem,
        RingPos, //
    },
};

/// How long a job may run before the group is considered hung (Panthor's `JOB_TIMEOUT_MS`).
pub(crate) const JOB_TIMEOUT: Delta = Delta::from_millis(5000);

/// The highest priority of a queue within its group (4 bits, `CSF_MAX_QUEUE_PRIO`).
const MAX_QUEUE_PRIORITY: u8 = 15;

/// A queue's sync object as the firmware left it (`struct panthor_syncobj_64b`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SyncObj {
    /// The number of jobs of the queue the firmware has completed.
    pub(crate) seqno: u64,
    /// Non-zero once an error of a command stream was propagated into the sync object.
    pub(crate) status: u32,
}

/// What a queue needs from the firmware interfaces and the CSG scheduler: the stub boundary.
///
/// Tyr in Linux 7.3 has none of the parts behind these methods (see the [module
/// documentation](self)). Once it has, the implementation is small: the ring buffer and the sync
/// objects are kernel buffer objects mapped in the group's VM (written and read through their
/// kernel mapping, e.g. a `VMapOwned`), the CS input and output interfaces are in the firmware's
/// shared memory, and the doorbell is a register of the doorbell page assigned to the group's
/// CSG slot.
///
/// The methods are called from the job queue's work, in a fence signalling section, and from the
/// interrupt path: they must not sleep or allocate.
pub(crate) trait QueueHw: RingMem + Send + Sync + 'static {
    /// The reference a job holds on its group's GPU VM until it has finished.
    ///
    /// The job queue needs `'static` payloads, as its work items and fence callbacks are not tied
    /// to any borrow; 7.3's `Vm<'drm>` borrows the bound device, so a job cannot hold an
    /// `Arc<Vm<'drm>>`. The VM handle GROUP_CREATE resolves `vm_id` to will go here.
    type Vm: Clone + Send + Sync + 'static;

    /// Reads the `EXTRACT` pointer of the CS output interface: how far the firmware has read the
    /// ring.
    fn output_extract(&self) -> u64;

    /// Writes the `INSERT` and `EXTRACT` pointers of the CS input interface.
    ///
    /// Must order the ring buffer writes before the `INSERT` write, for the firmware (Panthor's
    /// `wmb()`).
    fn publish(&self, insert: u64, extract: u64);

    /// Tells the firmware the queue has new instructions: rings the queue's doorbell if the group
    /// is resident on a CSG slot, otherwise asks the CSG scheduler to schedule the group
    /// (Panthor's `panthor_fw_ring_doorbell()` and `group_schedule_locked()`).
    ///
    /// Called without the ring lock held.
    fn ring_doorbell(&self);

    /// Reads the queue's sync object.
    fn sync_object(&self) -> SyncObj;

    /// Overwrites the queue's sync object, to release whatever waits on it on the GPU once the
    /// queue is terminated.
    fn force_sync_object(&self, sync: SyncObj);

    /// Asks the CSG scheduler to take the group off its CSG slot, and, once the firmware no
    /// longer executes any ring of the group, to terminate the group
    /// ([`Group::terminate`](crate::group::Group::terminate)) from process context. Does not wait
    /// for any of it.
    ///
    /// Called without the ring lock held, from the job queue's timeout work.
    fn request_reset(&self);

    /// Takes the group off its CSG slot, if it is on one, and returns once the firmware no
    /// longer executes the queue's ring (Panthor's `panthor_group_destroy()` path, which
    /// schedules the group out and waits for it). From then on the ring's hardware fences signal
    /// only when [`Group::terminate`](crate::group::Group::terminate) signals them.
    ///
    /// Called without the ring lock held, in process context: it may sleep.
    fn evict(&self);
}

/// What the firmware says about every CS of the GPU (Panthor's `csif_info` and
/// `sb_slot_count`), read from the CSF global interface once Tyr parses it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CsifInfo {
    /// The number of CS registers (`CS_FEATURES.WORK_REGS`).
    pub(crate) cs_reg_count: u32,
    /// The number of scoreboard slots of a CS (`CS_FEATURES.SCOREBOARDS`).
    pub(crate) sb_slot_count: u32,
}

/// The checked arguments of one queue of GROUP_CREATE (`drm_panthor_queue_create`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueArgs {
    /// The queue's priority within its group.
    pub(crate) priority: u8,
    /// The size of the ring buffer in bytes: a power of two from 4 KiB to 64 KiB.
    pub(crate) ringbuf_size: u32,
}

impl QueueArgs {
    /// Checks the arguments as Panthor's `group_create_queue()` does; fails with `EINVAL`.
    pub(crate) fn from_uapi(args: &uapi::drm_panthor_queue_create) -> Result<Self> {
        const MIN: u32 = 4 << 10;
        const MAX: u32 = 64 << 10;

        if args.pad != [0; 3]
            || !(MIN..=MAX).contains(&args.ringbuf_size)
            || !args.ringbuf_size.is_power_of_two()
            || args.priority > MAX_QUEUE_PRIORITY
        {
            return Err(EINVAL);
        }
        Ok(Self {
            priority: args.priority,
            ringbuf_size: args.ringbuf_size,
        })
    }

    /// Returns the ring's capacity in credits: its size in instructions.
    pub(crate) fn capacity(&self) -> u32 {
        // `INSTR_SIZE` is 8: the quotient fits.
        (u64::from(self.ringbuf_size) / ringbuf::INSTR_SIZE) as u32
    }

    /// Returns how many jobs the ring holds at most, which is also how many profiling slots the
    /// queue needs (Panthor's `calc_profiling_ringbuf_num_slots()`).
    pub(crate) fn max_jobs(&self) -> u32 {
        self.capacity().div_ceil(ringbuf::job_credits(0))
    }
}

/// Where a queue's objects are in its group's VM, and what the firmware says about its CS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueConfig {
    /// The checked GROUP_CREATE arguments.
    pub(crate) args: QueueArgs,
    /// What the firmware says about every CS.
    pub(crate) csif: CsifInfo,
    /// GPU address of the queue's sync object.
    pub(crate) sync_addr: u64,
    /// Which profiling samples the queue's jobs take ([`ringbuf::profiling`]).
    pub(crate) profile_mask: u32,
    /// GPU address of [`QueueArgs::max_jobs`] profiling slots; unused without profiling.
    pub(crate) profiling_addr: u64,
}

/// The ring state of a queue, behind [`QueueRing::state`].
struct RingState {
    /// The kernel's write position.
    pos: RingPos,
    /// The hardware fences of the jobs on the ring that have not signalled, by sequence number
    /// modulo the length.
    in_flight: KVec<Option<UniqueFence>>,
    /// The sequence number of the oldest unsignalled hardware fence.
    oldest: u64,
    /// The hardware fence of the last job written to the ring.
    last: Option<ARef<DmaFence>>,
    /// The profiling slot of the next job.
    profiling_slot: u32,
}

impl RingState {
    fn slot(&self, seqno: u64) -> usize {
        // The remainder is below the length, a `usize`.
        (seqno % self.in_flight.len() as u64) as usize
    }

    /// Takes the oldest unsignalled hardware fence if its sequence number is at most `seqno`.
    fn take_oldest(&mut self, seqno: u64) -> Option<UniqueFence> {
        if self.oldest > seqno {
            return None;
        }
        let slot = self.slot(self.oldest);
        let fence = self.in_flight[slot].take()?;
        self.oldest += 1;
        Some(fence)
    }
}

impl Drop for RingState {
    fn drop(&mut self) {
        // Only reached if the queue is dropped with jobs on a ring that will not run them.
        while let Some(fence) = self.take_oldest(u64::MAX) {
            fence.signal(Err(ECANCELED));
        }
    }
}

/// The part of a queue that the job queue's backend and the interrupt path share.
#[pin_data]
pub(crate) struct QueueRing<H: QueueHw> {
    hw: H,
    group: Arc<GroupState>,
    index: u32,
    config: QueueConfig,
    /// The timeline of the ring's hardware fences; only the run path creates fences on it.
    hw_fences: FenceContext,
    #[pin]
    state: SpinLockIrq<RingState>,
}

impl<H: QueueHw> QueueRing<H> {
    fn new(group: Arc<GroupState>, index: u32, config: QueueConfig, hw: H) -> Result<Arc<Self>> {
        let slots = config.args.max_jobs() as usize;
        let mut in_flight = KVec::with_capacity(slots, GFP_KERNEL)?;
        for _ in 0..slots {
            in_flight.push(None, GFP_KERNEL)?;
        }
        Arc::pin_init(
            pin_init!(Self {
                hw,
                group,
                index,
                config,
                hw_fences: FenceContext::new(c"tyr", c"tyr-queue-hw"),
                state <- new_spinlock_irq!(RingState {
                    pos: RingPos::new(u64::from(config.args.ringbuf_size)),
                    in_flight,
                    oldest: 1,
                    last: None,
                    profiling_slot: 0,
                }),
            }),
            GFP_KERNEL,
        )
    }

    /// Returns the GPU address of the next job's profiling slot and moves to the following one.
    fn next_times_addr(&self, state: &mut RingState) -> u64 {
        let slots = self.config.args.max_jobs();
        let addr = self.config.profiling_addr
            + u64::from(state.profiling_slot) * ringbuf::profiling_data::SIZE;
        state.profiling_slot = (state.profiling_slot + 1) % slots;
        addr
    }

    /// Writes `job` to the ring and returns its hardware fence (Panthor's `queue_run_job()`).
    fn run(&self, job: &mut TyrJob<H::Vm>) -> Result<ARef<DmaFence>> {
        let mut state = self.state.lock();
        if job.call.is_sync_only() {
            return Ok(state.last.clone().unwrap_or_else(DmaFence::stub));
        }
        // The run path is the only user of `hw_fences` and the job queue serialises it: this is
        // the sequence number `init_fence()` hands out below.
        let seqno = self.hw_fences.last_seqno() + 1;
        let slot = state.slot(seqno);
        if state.in_flight[slot].is_some() {
            // The credits keep this from happening: more jobs than the ring holds.
            return Err(ENOSPC);
        }
        let alloc = match job.hw_fence.take() {
            Some(alloc) => alloc,
            None => FenceAllocation::new(GFP_NOWAIT)?,
        };
        let params = JobCsParams {
            profile_mask: job.profile_mask,
            cs_reg_count: self.config.csif.cs_reg_count,
            sb_slot_count: self.config.csif.sb_slot_count,
            sync_addr: self.config.sync_addr,
            times_addr: self.next_times_addr(&mut state),
            cs_start: job.call.start,
            cs_size: job.call.size,
            latest_flush: job.call.latest_flush,
        };
        job.ringbuf = state.pos.push(&self.hw, &JobInstrs::new(&params));
        let fence = self.hw_fences.init_fence(alloc);
        let hw_fence = fence.to_aref();
        state.in_flight[slot] = Some(fence);
        state.last = Some(hw_fence.clone());
        self.hw
            .publish(state.pos.insert(), self.hw.output_extract());
        drop(state);
        self.hw.ring_doorbell();
        Ok(hw_fence)
    }

    /// Signals the hardware fences of the jobs the sync object has reached, in order; returns how
    /// many.
    ///
    /// This is what the interrupt path calls when the firmware reports a sync object update of
    /// the queue's group (Panthor's `queue_check_job_completion()`). It can be called from the
    /// interrupt handler or any other context that may take a spinlock, and does not allocate.
    /// A non-zero status of the sync object means a command stream error reached it: the jobs
    /// it completes fail with `-EINVAL`, and the group is marked faulty, as Panthor does for a
    /// queue with a fatal error.
    pub(crate) fn sync_update(&self) -> u32 {
        let _section = SignallingSection::begin();
        let mut state = self.state.lock();
        let sync = self.hw.sync_object();
        let result = if sync.status == 0 {
            Ok(())
        } else {
            self.group.fail(GroupState::FATAL_FAULT);
            Err(EINVAL)
        };
        let mut signalled = 0;
        while let Some(fence) = state.take_oldest(sync.seqno) {
            fence.signal(result);
            signalled += 1;
        }
        signalled
    }

    /// Returns whether the ring has no unsignalled hardware fence.
    fn is_idle(&self) -> bool {
        let state = self.state.lock();
        state.in_flight.iter().all(Option::is_none)
    }

    /// Signals every unsignalled hardware fence with `error` and overwrites the sync object with
    /// the last sequence number and an error status, as Panthor's `group_term_post_processing()`
    /// does.
    fn cancel_in_flight(&self, error: Error) {
        let _section = SignallingSection::begin();
        let mut state = self.state.lock();
        while let Some(fence) = state.take_oldest(u64::MAX) {
            fence.signal(Err(error));
        }
        self.hw.force_sync_object(SyncObj {
            seqno: self.hw_fences.last_seqno(),
            status: u32::MAX,
        });
    }
}

/// The [`Backend`] of a queue's [`JobQueue`].
pub(crate) struct TyrQueueBackend<H: QueueHw> {
    ring: Arc<QueueRing<H>>,
}

impl<H: QueueHw> Backend for TyrQueueBackend<H> {
    type Job = TyrJob<H::Vm>;

    fn run(&self, mut job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
        if !self.ring.group.can_run() {
            // Panthor's `queue_run_job()` for a group that timed out, faulted or was destroyed.
            return Err(ECANCELED);
        }
        self.ring.run(&mut job)
    }

    fn timed_out(&self, job: JobRef<'_, Self>) -> TimeoutAction {
        // The interrupt may have been missed or may race with the timeout: completions found now
        // are progress (Panthor's `queue_timeout_work()`).
        if self.ring.sync_update() > 0 || self.ring.is_idle() {
            return TimeoutAction::NoHang;
        }
        pr_warn!(
            "job timeout: queue {}, seqno {}\n",
            self.ring.index,
            job.done_fence().seqno()
        );
        self.ring.group.fail(GroupState::TIMEDOUT);
        // The firmware may still execute the ring: nothing signals until the group is off its
        // slot and `Group::terminate` ends the jobs (`Queue::terminate`).
        self.ring.hw.request_reset();
        TimeoutAction::ResetLater
    }

    fn stop_hardware(&self) {
        // Dropping the group took it off its slot and terminated it; this is for a queue that
        // goes without its group.
        self.ring.hw.evict();
        self.ring.cancel_in_flight(ECANCELED);
    }

    fn cancelled(&self, job: JobRef<'_, Self>, error: Error) {
        pr_debug!(
            "queue {}: job {} cancelled: {:?}\n",
            self.ring.index,
            job.done_fence().seqno(),
            error
        );
    }
}

/// A queue of a group: its job queue and its ring.
pub(crate) struct Queue<H: QueueHw> {
    jobs: JobQueue<TyrQueueBackend<H>>,
    profile_mask: u32,
}

impl<H: QueueHw> Queue<H> {
    /// Creates the queue `index` of the group whose state is `group`, in the group's reset
    /// domain.
    ///
    /// Its work runs on the domain's workqueue, shared by the queues of the group.
    pub(crate) fn new(
        group: Arc<GroupState>,
        index: u32,
        config: QueueConfig,
        hw: H,
        timeout: Delta,
        domain: &Arc<ResetDomain<TyrQueueBackend<H>>>,
    ) -> Result<Self> {
        let ring = QueueRing::new(group, index, config, hw)?;
        let mut options =
            QueueOptions::new(c"tyr", c"tyr-queue", config.args.capacity(), Some(timeout));
        options.workqueue = Some(domain.workqueue().clone());
        options.allow_zero_credits = true;
        Ok(Self {
            jobs: JobQueue::new_in_domain(TyrQueueBackend { ring }, options, domain)?,
            profile_mask: config.profile_mask,
        })
    }

    /// Creates a job that runs `call` in the group's VM `vm`.
    ///
    /// Allocates everything the job needs; its credits are the instructions it takes on the
    /// ring.
    pub(crate) fn new_job(&self, call: CallInfo, vm: H::Vm) -> Result<Job<TyrQueueBackend<H>>> {
        let credits = if call.is_sync_only() {
            0
        } else {
            ringbuf::job_credits(self.profile_mask)
        };
        let payload = TyrJob::new(call, self.profile_mask, vm)?;
        self.jobs.new_job(credits, payload)
    }

    /// Submits `job` and returns its done fence.
    pub(crate) fn submit(&self, job: Job<TyrQueueBackend<H>>) -> Result<ARef<DmaFence>> {
        Ok(self.jobs.submit(job)?)
    }

    /// Returns the part of the queue the interrupt path needs.
    pub(crate) fn ring(&self) -> &Arc<QueueRing<H>> {
        &self.jobs.backend().ring
    }

    /// Returns the fence context of the queue's done fences.
    pub(crate) fn context(&self) -> u64 {
        self.jobs.context()
    }

    /// Returns the job queue's counters.
    pub(crate) fn stats(&self) -> QueueStats {
        self.jobs.stats()
    }

    /// Ends every job on the ring with `error`; the jobs that have not run are cancelled by
    /// [`Backend::run`], as the group can no longer run.
    ///
    /// Only once the firmware no longer executes the ring (the group is off its slot). Sleeps:
    /// process context only, not from the job queue's own work.
    pub(crate) fn terminate(&self, error: Error) {
        // The done fences of the jobs on the ring follow these hardware fences, unless a timeout
        // stopped the queue: then completing the reset ends them.
        self.ring().cancel_in_flight(error);
        let _ = self.jobs.reset_done(Recovery::Cancel(error));
    }

    /// Stops the clock of the queue's timeout while its group is not resident on a CSG slot
    /// (Panthor's `queue_suspend_timeout()`).
    pub(crate) fn suspend_timeout(&self) {
        self.jobs.suspend_timeout();
    }

    /// Restarts it once the group is back on a slot (Panthor's `queue_resume_timeout()`).
    pub(crate) fn resume_timeout(&self) {
        self.jobs.resume_timeout();
    }

    /// Evicts the queue's group from its slot ([`QueueHw::evict`]).
    pub(crate) fn evict(&self) {
        self.ring().hw.evict();
    }
}
