// SPDX-License-Identifier: GPL-2.0 OR MIT

//! Stops, timeouts and recovery: [`JobQueue::stop`] and [`StoppedQueue`], the timeout and fault
//! work, [`JobQueue::reset_done`], and the [`ResetDomain`]s whose queues stop and recover
//! together.
//!
//! A queue stops (`Proc::stopped`) for each [`StoppedQueue`], for the handling of a timeout, and
//! for a reset its backend completes later; while any stop is in force no job is handed to the
//! hardware, no timeout fires, and the jobs on the hardware are detached from their hardware
//! fences. The end of the
//! last stop recovers them ([`Inner::resume`]). The handling of a timeout holds the recovery lock
//! (see [`Inner::lock_recovery`]).

use super::{
    end,
    take_off_hardware,
    Inner,
    JobNode,
    JobQueue,
    JobState,
    Life,
    Link,
    Outcome,
    Proc,
    DEADLINE,
    FAULT,
    TIMEOUT, //
};
use crate::{
    dma_fence::{
        FenceWorkqueue,
        RingCredits,
        SignallingSection, //
    },
    drm::jobqueue::{
        trace,
        Backend,
        JobRef,
        Recovery,
        TimeoutAction, //
    },
    prelude::*,
    sync::{
        atomic::ordering,
        static_lock_class,
        Arc,
        LockClassKey,
        Mutex,
        MutexGuard, //
    },
    time::{
        Delta,
        Instant,
        Monotonic, //
    }, //
};

// The lock class key and name of every domain's recovery lock, outside the generic code as those
// of `queue.rs`.
fn domain_lock_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
static DOMAIN_LOCK_NAME: &CStr = c"drm_jobqueue:reset_domain";

impl<T: Backend> Proc<T> {
    /// Recovers the running jobs whose done fence does not follow their hardware fence (detached
    /// or not released yet) by the rules of [`Recovery`]; job `timed_out` ends with
    /// `-ETIMEDOUT`.
    fn recover(&mut self, credits: &RingCredits, recovery: Recovery, timed_out: Option<u64>) {
        let mut resubmit_from = None;
        let (jobs, mut counters) = self.split(credits);
        for (seqno, node) in jobs.iter_mut() {
            let (hw_result, released) = match &node.state {
                JobState::Running { hw, link, .. } if *link != Link::Following => {
                    (hw.status(), *link == Link::Detached)
                }
                _ => continue,
            };
            let completed = hw_result == Some(Ok(())) && resubmit_from.is_none();
            let outcome = if completed {
                Some(Outcome::Completed(Ok(())))
            } else if timed_out == Some(seqno) {
                Some(Outcome::Cancelled(ETIMEDOUT))
            } else {
                match recovery {
                    Recovery::Continue => {
                        if released {
                            node.as_mut().reattach();
                        }
                        None
                    }
                    Recovery::Resubmit => {
                        // It runs again, in order; its dependencies signalled before it ran.
                        let again = JobState::Waiting {
                            deps: KVec::new(),
                            failed: None,
                        };
                        take_off_hardware(&mut counters, node.as_mut(), again);
                        resubmit_from.get_or_insert(seqno);
                        None
                    }
                    Recovery::Cancel(e) => Some(Outcome::Cancelled(e)),
                }
            };
            if let Some(outcome) = outcome {
                end(&mut counters, node.as_mut(), outcome, released);
            }
        }
        if let Some(seqno) = resubmit_from {
            // Every released job before `seqno` has signalled: there is nothing to wait for.
            // INVARIANT: Both cursors move back to at most `seqno`, so `next_release` stays at most
            // `next_run`.
            self.next_run = self.next_run.min(seqno);
            self.next_release = self.next_release.min(seqno);
            self.last_released = None;
        }
    }

    /// Stops the queue: no job is handed to the hardware and no timeout fires until it resumes,
    /// and the jobs on the hardware are detached from their hardware fences.
    fn stop(&mut self) {
        self.stopped += 1;
        self.pause_timeout();
        self.detach_running();
    }

    /// Stops the clock of the timeout, for a stop or a suspension of the timeout.
    fn pause_timeout(&mut self) {
        if self.timeout_paused == 0 {
            self.paused_at = Some(Instant::now());
        }
        self.timeout_paused += 1;
    }

    /// Ends a [`Proc::pause_timeout`]; once none is left, shifts the start of the running jobs
    /// by the time the clock stood still. Returns whether the clock runs again.
    fn unpause_timeout(&mut self) -> bool {
        self.timeout_paused = self.timeout_paused.saturating_sub(1);
        if self.timeout_paused > 0 {
            return false;
        }
        let Some(paused_at) = self.paused_at.take() else {
            return true;
        };
        let paused_for = paused_at.elapsed();
        for (_, node) in self.jobs.iter_mut() {
            if let JobState::Running { started, .. } = &mut node.as_mut().project().state {
                *started = *started + paused_for;
            }
        }
        true
    }
}

/// The more drastic of two recoveries, `earlier` if they are as drastic: cancelling over
/// resubmitting over continuing. Jobs that one resume found lost stay lost, whatever a later one
/// says: the queue stayed stopped in between, so the hardware did not run them again.
fn more_drastic(earlier: Recovery, later: Recovery) -> Recovery {
    match (earlier, later) {
        (Recovery::Cancel(e), _) | (_, Recovery::Cancel(e)) => Recovery::Cancel(e),
        (Recovery::Resubmit, _) | (_, Recovery::Resubmit) => Recovery::Resubmit,
        (Recovery::Continue, Recovery::Continue) => Recovery::Continue,
    }
}

impl<T: Backend> JobNode<T> {
    /// Makes the done fence of a released running job follow its hardware fence again.
    fn reattach(self: Pin<&mut Self>) {
        let this = self.project();
        if let JobState::Running { hw, link, .. } = this.state {
            // The hardware fence's level was accepted at the release, or it signalled since
            // (then its level reads 0): this cannot fail.
            if this.done.follow(hw.clone()).is_ok() {
                *link = Link::Following;
            }
        }
    }
}

impl<T: Backend> Inner<T> {
    /// The workqueue of the timeout and fault work: the reset domain's, or the queue's.
    fn timeout_wq(&self) -> &FenceWorkqueue {
        match &self.domain {
            Some(domain) => &domain.wq,
            None => self.wq(),
        }
    }

    pub(super) fn arm_timeout(self: &Arc<Self>, after: Delta) {
        let jiffies = crate::time::msecs_to_jiffies(
            after.as_millis_ceil().clamp(1, i64::from(i32::MAX)) as u32,
        );
        let _ = self
            .timeout_wq()
            .enqueue_delayed::<Arc<Self>, TIMEOUT>(self.clone(), jiffies);
    }

    /// Returns the oldest job on the hardware whose hardware fence has not signalled, and when
    /// it started: when it was handed to the hardware, or when the job before it finished on
    /// the hardware, whichever is later. The retire work records the latter, but the timeout
    /// work can get here first: on a workqueue that is not ordered, or the reset domain's.
    fn oldest_running(proc: &Proc<T>) -> Option<(u64, Instant<Monotonic>)> {
        let mut previous_end: Option<Instant<Monotonic>> = None;
        for (seqno, node) in proc.jobs.iter() {
            match &node.state {
                JobState::Running { hw, started, .. } if hw.status().is_none() => {
                    let start = match previous_end {
                        Some(end) if (*started - end).is_negative() => end,
                        _ => *started,
                    };
                    return Some((seqno, start));
                }
                JobState::Running { hw, .. } => previous_end = hw.timestamp(),
                _ => previous_end = node.done.fence().timestamp(),
            }
        }
        None
    }

    /// The timeout and fault work: calls the backend for the oldest running job once it ran too
    /// long, or at once after a fault.
    pub(super) fn check_timeout(self: &Arc<Self>) {
        let _section = SignallingSection::begin();
        // Held until the recovery ends: see `Inner::lock_recovery`.
        let recovering = self.lock_recovery();
        let mut guard = self.lock();
        let proc = &mut *guard;
        let fault = self.fault.xchg(false, ordering::Relaxed);
        if proc.halted() {
            return;
        }
        // A fault is handled at once, a timeout once the oldest job ran for that long.
        let timeout = match (fault, self.timeout) {
            (true, _) => None,
            (false, Some(timeout)) if proc.timeout_paused == 0 => Some(timeout),
            (false, _) => return,
        };
        let Some((seqno, started)) = Self::oldest_running(proc) else {
            return;
        };
        if let Some(timeout) = timeout {
            let elapsed = started.elapsed();
            if elapsed < timeout {
                drop(guard);
                self.arm_timeout(timeout - elapsed);
                return;
            }
        }
        // Stopped before the lock goes: nothing reruns or ends the job meanwhile.
        proc.stop();
        trace::queue_stop(self.name, self.fence_ctx.context());
        drop(guard);
        match recovering {
            Recovering::Domain(mut members) => ResetDomain::timed_out(&mut members, self, seqno),
            // A queue outside a domain recovers as a domain of one.
            Recovering::Alone(_guard) => {
                Self::recover_timeout(core::slice::from_ref(self), self, seqno);
            }
        }
    }

    /// Takes the recovery lock: the domain's ([`ResetDomain::members`]), or the queue's own
    /// outside a domain ([`Inner::recovery`]).
    ///
    /// The handling of a timeout (the timeout and fault work) holds it from the stop of the
    /// queues to their resume, across [`Backend::timed_out`], or to its return if it leaves the
    /// reset to the driver: the timeouts of a domain are handled one at a time. Until the
    /// driver's [`JobQueue::reset_done`], the queues then stay stopped, and a resume recovers
    /// nothing ([`Inner::resume`]). [`JobQueue::stop`], the resume of a [`StoppedQueue`],
    /// [`JobQueue::reset_done`], and a queue that joins or leaves a domain take it too, so that
    /// they do not come in the middle of it: a resume there would make the done fences follow
    /// their hardware fences again while the backend resets the ring. It is taken before the
    /// queues' own locks, and nothing allocates with reclaim under it.
    fn lock_recovery(&self) -> Recovering<'_, T> {
        match &self.domain {
            Some(domain) => Recovering::Domain(domain.members.lock()),
            None => Recovering::Alone(self.recovery.lock()),
        }
    }

    /// Handles the timeout of job `seqno` of `guilty`, stopped since the timeout was found, for
    /// `queues`, which stop and recover together and include `guilty`: see [`ResetDomain`].
    /// Returns what the backend decided.
    fn recover_timeout(queues: &[Arc<Self>], guilty: &Arc<Self>, seqno: u64) -> TimeoutAction {
        for queue in queues {
            if !Arc::ptr_eq(queue, guilty) {
                queue.stop();
            }
        }
        let action = guilty.call_timed_out(seqno);
        let (recovery, seqno) = match action {
            TimeoutAction::NoHang => (Recovery::Continue, None),
            TimeoutAction::Reset(recovery) => (recovery, Some(seqno)),
            // Until `JobQueue::reset_done`.
            TimeoutAction::ResetLater => return action,
            TimeoutAction::DeviceGone => {
                for queue in queues {
                    let mut proc = queue.lock();
                    queue.close(&mut proc);
                    proc.finish_all(&queue.credits, ENODEV);
                }
                (Recovery::Continue, None)
            }
        };
        Self::resume_queues(queues, guilty, recovery, seqno);
        action
    }

    /// Calls [`Backend::timed_out`] for job `seqno`, stopped since it was found timed out, if it
    /// is still on the hardware and not done, and the queue alive: otherwise the job finished
    /// meanwhile, or the queue is being dropped, and there is nothing to recover
    /// ([`TimeoutAction::NoHang`]).
    fn call_timed_out(&self, seqno: u64) -> TimeoutAction {
        let mut guard = self.lock();
        let proc = &mut *guard;
        if proc.life != Life::Alive {
            return TimeoutAction::NoHang;
        }
        // The queue is stopped, so its timeout paused, since `paused_at`: the resume shifts the
        // start by the time since then.
        let restart = proc.paused_at.unwrap_or_else(Instant::now);
        let Some(node) = proc.jobs.get_mut(seqno) else {
            return TimeoutAction::NoHang;
        };
        if !matches!(&node.state, JobState::Running { hw, .. } if hw.status().is_none()) {
            return TimeoutAction::NoHang;
        }
        let action = self.backend.timed_out(JobRef::new(node.as_mut()));
        trace::job_timeout(self.name, node.done.fence(), action);
        match action {
            TimeoutAction::NoHang => {
                // Another full timeout from the resume.
                if let JobState::Running { started, .. } = node.as_mut().project().state {
                    *started = restart;
                }
            }
            TimeoutAction::ResetLater => proc.reset_later_job = Some(seqno),
            TimeoutAction::Reset(_) | TimeoutAction::DeviceGone => {}
        }
        action
    }

    /// Resumes `queues` after a timeout or a reset of `guilty`'s job `seqno`, if any.
    fn resume_queues(
        queues: &[Arc<Self>],
        guilty: &Arc<Self>,
        recovery: Recovery,
        seqno: Option<u64>,
    ) {
        for queue in queues {
            let is_guilty = Arc::ptr_eq(queue, guilty);
            queue.resume(recovery, seqno.filter(|_| is_guilty));
        }
    }

    /// Stops the queue, as [`JobQueue::stop`] does.
    fn stop(&self) {
        let mut proc = self.lock();
        proc.stop();
        trace::queue_stop(self.name, self.fence_ctx.context());
    }

    /// Ends a stop, and once none is left recovers the jobs that were on the hardware and
    /// restarts the run, retire and timeout work.
    ///
    /// While other stops are in force (a driver's [`StoppedQueue`], a reset the backend
    /// completes later), whoever holds them may still be resetting the ring: `recovery` and
    /// `timed_out` are kept for the end of the last stop, which applies the most drastic recovery
    /// asked for.
    ///
    /// A dying queue's last stop may be that of a reset that never completed
    /// ([`ResetDomain::remove`]), so the hardware may still run its jobs whatever the recovery
    /// says: it recovers nothing. Its jobs end by their hardware fences (those that signalled
    /// already end now), or with the teardown, once [`Backend::stop_hardware`] has returned.
    fn resume(self: &Arc<Self>, recovery: Recovery, timed_out: Option<u64>) {
        {
            let _section = SignallingSection::begin();
            let mut proc = self.lock();
            proc.pending_recovery = more_drastic(proc.pending_recovery, recovery);
            if timed_out.is_some() {
                proc.pending_timed_out = timed_out;
            }
            proc.stopped -= 1;
            if proc.stopped == 0 {
                let applied = core::mem::replace(&mut proc.pending_recovery, Recovery::Continue);
                let timed_out = proc.pending_timed_out.take();
                if proc.life == Life::Dying {
                    proc.recover(&self.credits, Recovery::Continue, None);
                } else {
                    proc.recover(&self.credits, applied, timed_out);
                }
            }
            proc.unpause_timeout();
            // With the lock held: once it goes, any holder may run the recovered jobs, and a
            // trace must show the start before their runs. It records what this stop asked for.
            trace::queue_start(self.name, self.fence_ctx.context(), recovery);
        }
        self.kick_run();
        self.kick_retire();
        // Deadlines set while the queue was stopped.
        let _ = self.wq().enqueue::<Arc<Self>, DEADLINE>(self.clone());
        if let Some(timeout) = self.timeout {
            self.arm_timeout(timeout);
        }
    }
}

impl<T: Backend> JobQueue<T> {
    /// Stops the queue, for example around a reset of the ring.
    ///
    /// No job is handed to the hardware and no timeout fires until the returned guard, and any
    /// other stop in force, resumes the queue. The jobs on the hardware are detached from their
    /// hardware fences: those that signal meanwhile are ignored, and [`StoppedQueue::resume`]
    /// decides their fate. Submission keeps working. Sleeps, waiting for a timeout being handled
    /// to end; must not be called from a [`Backend`] method.
    ///
    /// # Examples
    ///
    /// A reset of the ring that loses the job on it:
    ///
    /// ```
    /// # use kernel::dma_fence::{DmaFence, FenceContext, UniqueFence};
    /// # use kernel::drm::jobqueue::{Backend, JobQueue, JobRef, QueueOptions};
    /// # use kernel::drm::jobqueue::{Recovery, TimeoutAction};
    /// # use kernel::new_spinlock;
    /// # use kernel::sync::{aref::ARef, Arc, Completion, SpinLock};
    /// # /// A ring that leaves the hardware fence of its last job to the example.
    /// # struct Ring {
    /// #     hw: FenceContext,
    /// #     last: Arc<SpinLock<Option<UniqueFence>>>,
    /// #     ran: Arc<Completion>,
    /// # }
    /// # impl Backend for Ring {
    /// #     type Job = ();
    /// #     fn run(&self, _job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
    /// #         let fence = self.hw.new_fence(GFP_NOWAIT)?;
    /// #         let hw = fence.to_aref();
    /// #         *self.last.lock() = Some(fence);
    /// #         self.ran.complete_all();
    /// #         Ok(hw)
    /// #     }
    /// #     fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction {
    /// #         // The queue has no timeout.
    /// #         TimeoutAction::NoHang
    /// #     }
    /// #     fn stop_hardware(&self) {
    /// #         let last = self.last.lock().take();
    /// #         if let Some(fence) = last {
    /// #             fence.signal(Err(ECANCELED));
    /// #         }
    /// #     }
    /// # }
    /// # let last = Arc::pin_init(new_spinlock!(None), GFP_KERNEL)?;
    /// # let ran = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
    /// # let ring = Ring {
    /// #     hw: FenceContext::new(c"example", c"ring0-hw"),
    /// #     last: last.clone(),
    /// #     ran: ran.clone(),
    /// # };
    /// let queue = JobQueue::new(ring, QueueOptions::new(c"example", c"ring0", 4, None))?;
    /// let done = queue.submit(queue.new_job(1, ())?)?;
    /// // The run work hands the job to `Backend::run`, which writes it to the ring.
    /// ran.wait_for_completion();
    ///
    /// let stopped = queue.stop();
    /// // The reset signals the lost job's hardware fence with an error: the stopped queue
    /// // ignores it, and the recovery decides.
    /// let lost = last.lock().take();
    /// if let Some(fence) = lost {
    ///     fence.signal(Err(EIO));
    /// }
    /// stopped.resume(Recovery::Cancel(EIO));
    /// assert_eq!(done.status(), Some(Err(EIO)));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn stop(&self) -> StoppedQueue<'_, T> {
        let _recovering = self.inner.lock_recovery();
        self.inner.stop();
        StoppedQueue {
            queue: self,
            resumed: false,
        }
    }

    /// Completes a reset that [`Backend::timed_out`] left to the driver
    /// ([`TimeoutAction::ResetLater`]), recovering the jobs that were on the hardware as
    /// `recovery` says (once no other stop is in force, and as a more drastic resume asked for
    /// meanwhile: see [`StoppedQueue::resume`]); the timed-out job's done fence signals
    /// `-ETIMEDOUT` (unless its hardware fence signalled success meanwhile).
    ///
    /// Call it from the driver's reset work once the hardware no longer runs the ring (or runs
    /// it again, for [`Recovery::Continue`]). Fails with `EINVAL` if no such reset is pending.
    /// Sleeps; must not be called from a [`Backend`] method.
    ///
    /// # Examples
    ///
    /// A fault on the ring, whose reset the driver completes from its own work:
    ///
    /// ```
    /// # use kernel::dma_fence::{DmaFence, FenceContext, UniqueFence};
    /// # use kernel::drm::jobqueue::{Backend, JobQueue, JobRef, QueueOptions};
    /// # use kernel::drm::jobqueue::{Recovery, TimeoutAction};
    /// # use kernel::new_spinlock;
    /// # use kernel::sync::{aref::ARef, Arc, Completion, SpinLock};
    /// # /// A ring that leaves the hardware fence of its last job to the example.
    /// # struct Ring {
    /// #     hw: FenceContext,
    /// #     last: Arc<SpinLock<Option<UniqueFence>>>,
    /// #     ran: Arc<Completion>,
    /// #     reset_asked: Arc<Completion>,
    /// # }
    /// # impl Backend for Ring {
    /// #     type Job = ();
    /// #     fn run(&self, _job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
    /// #         let fence = self.hw.new_fence(GFP_NOWAIT)?;
    /// #         let hw = fence.to_aref();
    /// #         *self.last.lock() = Some(fence);
    /// #         self.ran.complete_all();
    /// #         Ok(hw)
    /// #     }
    /// #     fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction {
    /// #         // Asks the firmware to take the ring off the hardware, which takes a while.
    /// #         self.reset_asked.complete_all();
    /// #         TimeoutAction::ResetLater
    /// #     }
    /// #     fn stop_hardware(&self) {
    /// #         let last = self.last.lock().take();
    /// #         if let Some(fence) = last {
    /// #             fence.signal(Err(ECANCELED));
    /// #         }
    /// #     }
    /// # }
    /// # let last = Arc::pin_init(new_spinlock!(None), GFP_KERNEL)?;
    /// # let ran = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
    /// # let reset_asked = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
    /// # let ring = Ring {
    /// #     hw: FenceContext::new(c"example", c"ring0-hw"),
    /// #     last: last.clone(),
    /// #     ran: ran.clone(),
    /// #     reset_asked: reset_asked.clone(),
    /// # };
    /// let queue = JobQueue::new(ring, QueueOptions::new(c"example", c"ring0", 4, None))?;
    /// let done = queue.submit(queue.new_job(1, ())?)?;
    /// // The run work hands the job to `Backend::run`, which writes it to the ring.
    /// ran.wait_for_completion();
    ///
    /// // The oldest job on the ring times out now, from the queue's work.
    /// queue.fault();
    /// reset_asked.wait_for_completion();
    ///
    /// // The driver's reset work, once the ring is off the hardware.
    /// let lost = last.lock().take();
    /// if let Some(fence) = lost {
    ///     fence.signal(Err(EIO));
    /// }
    /// queue.reset_done(Recovery::Cancel(EIO))?;
    /// assert_eq!(done.status(), Some(Err(ETIMEDOUT)));
    /// assert_eq!(queue.reset_done(Recovery::Continue), Err(EINVAL));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn reset_done(&self, recovery: Recovery) -> Result {
        let recovering = self.inner.lock_recovery();
        let timed_out = self.inner.lock().reset_later_job.take().ok_or(EINVAL)?;
        match recovering {
            Recovering::Domain(mut members) => {
                ResetDomain::resume_all(&mut members, &self.inner, recovery, timed_out);
            }
            Recovering::Alone(_guard) => self.inner.resume(recovery, Some(timed_out)),
        }
        Ok(())
    }

    /// Suspends the timeout, for example while the ring's group is not resident on a firmware
    /// slot (drm_sched's `drm_sched_suspend_timeout()`): until [`JobQueue::resume_timeout`], no
    /// timeout fires and the time does not count towards any job's timeout. Suspensions nest.
    pub fn suspend_timeout(&self) {
        self.inner.lock().pause_timeout();
    }

    /// Ends a [`JobQueue::suspend_timeout`] (drm_sched's `drm_sched_resume_timeout()`).
    pub fn resume_timeout(&self) {
        let runs = self.inner.lock().unpause_timeout();
        if let (true, Some(timeout)) = (runs, self.inner.timeout) {
            self.inner.arm_timeout(timeout);
        }
    }

    /// Handles the oldest job on the hardware as timed out now, for example from a fault
    /// interrupt (drm_sched's `drm_sched_fault()`): [`Backend::timed_out`] is called for it from
    /// the queue's work, even if the timeout is suspended or the queue has none. Does nothing
    /// while the queue is stopped. Can be called from any context.
    pub fn fault(&self) {
        self.inner.fault.store(true, ordering::Relaxed);
        let _ = self
            .inner
            .timeout_wq()
            .enqueue::<Arc<Inner<T>>, FAULT>(self.inner.clone());
    }
}

/// A stopped [`JobQueue`]; resumes it when dropped, with [`Recovery::Continue`].
pub struct StoppedQueue<'a, T: Backend> {
    queue: &'a JobQueue<T>,
    resumed: bool,
}

impl<T: Backend> StoppedQueue<'_, T> {
    /// Resumes the queue, recovering the jobs that were on the hardware as `recovery` says.
    ///
    /// If the queue is stopped otherwise too (by another [`StoppedQueue`], or for a reset left
    /// to the driver, [`TimeoutAction::ResetLater`]), it stays stopped, and its jobs are
    /// recovered when the last stop ends, with the most drastic recovery asked for meanwhile:
    /// [`Recovery::Cancel`] over [`Recovery::Resubmit`] over [`Recovery::Continue`]. Sleeps,
    /// waiting for a timeout being handled to end; must not be called, nor the guard dropped,
    /// from a [`Backend`] method.
    pub fn resume(mut self, recovery: Recovery) {
        self.resume_inner(recovery);
    }

    fn resume_inner(&mut self, recovery: Recovery) {
        if self.resumed {
            return;
        }
        self.resumed = true;
        let _recovering = self.queue.inner.lock_recovery();
        self.queue.inner.resume(recovery, None);
    }
}

impl<T: Backend> Drop for StoppedQueue<'_, T> {
    fn drop(&mut self) {
        self.resume_inner(Recovery::Continue);
    }
}

/// Queues that time out, stop and recover together: the rings of one device, or of one
/// firmware group, that a reset takes down at once (amdgpu's reset domain, drm_sched's shared
/// `timeout_wq`).
///
/// Its queues are made with [`JobQueue::new_in_domain`]. Their timeout and fault work run on
/// the domain's workqueue, and their timeouts are handled one at a time. When a job of one of
/// them times out, every queue of the domain is stopped first, as by [`JobQueue::stop`] (its
/// jobs on the hardware detached from their hardware fences, its timeout paused), then
/// [`Backend::timed_out`] is called for the job, and what it returns applies to the whole
/// domain:
///
/// - [`TimeoutAction::NoHang`]: every queue resumes with [`Recovery::Continue`].
/// - [`TimeoutAction::Reset`]`(recovery)`: every queue resumes with `recovery`; the timed-out
///   job's done fence signals `-ETIMEDOUT`.
/// - [`TimeoutAction::ResetLater`]: every queue stays stopped until the driver calls
///   [`JobQueue::reset_done`] on the timed-out job's queue, which resumes them all with its
///   recovery (or a more drastic one a resume asked for meanwhile: see
///   [`StoppedQueue::resume`]).
/// - [`TimeoutAction::DeviceGone`]: every queue ends its jobs with `-ENODEV` and takes no more.
///
/// Dropping a queue whose [`TimeoutAction::ResetLater`] is pending resumes the other queues
/// with [`Recovery::Continue`] (or what a resume asked for meanwhile), with a warning: call
/// [`JobQueue::reset_done`] first.
///
/// # Examples
///
/// ```
/// use kernel::dma_fence::{DmaFence, FenceContext};
/// use kernel::drm::jobqueue::{
///     Backend, JobQueue, JobRef, QueueOptions, ResetDomain, TimeoutAction,
/// };
/// use kernel::sync::aref::ARef;
///
/// struct Ring {
///     hw: FenceContext,
/// }
///
/// impl Backend for Ring {
///     type Job = ();
///
///     fn run(&self, _job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
///         let fence = self.hw.new_fence(GFP_NOWAIT)?;
///         let shared = fence.to_aref();
///         fence.signal(Ok(()));
///         Ok(shared)
///     }
///
///     fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction {
///         TimeoutAction::NoHang
///     }
///
///     fn stop_hardware(&self) {}
/// }
///
/// let domain = ResetDomain::new(c"example-device")?;
/// let compute = JobQueue::new_in_domain(
///     Ring { hw: FenceContext::new(c"example", c"compute-hw") },
///     QueueOptions::new(c"example", c"compute", 8, None),
///     &domain,
/// )?;
/// let copy = JobQueue::new_in_domain(
///     Ring { hw: FenceContext::new(c"example", c"copy-hw") },
///     QueueOptions::new(c"example", c"copy", 8, None),
///     &domain,
/// )?;
/// compute.submit(compute.new_job(1, ())?)?.wait()?;
/// copy.submit(copy.new_job(1, ())?)?.wait()?;
/// # Ok::<(), Error>(())
/// ```
#[pin_data]
pub struct ResetDomain<T: Backend> {
    wq: Arc<FenceWorkqueue>,
    /// The queues of the domain, behind the domain's recovery lock ([`Inner::lock_recovery`]).
    #[pin]
    members: Mutex<Members<T>>,
}

/// The lock of [`Inner::lock_recovery`], held.
enum Recovering<'a, T: Backend> {
    Domain(MutexGuard<'a, Members<T>>),
    Alone(MutexGuard<'a, ()>),
}

/// The queues of a [`ResetDomain`] and what they went through together.
struct Members<T: Backend> {
    list: KVec<Arc<Inner<T>>>,
    /// A reset the driver completes later is pending: every queue is stopped by the domain.
    stopped: bool,
    /// The device is gone: every queue is dead.
    gone: bool,
}

impl<T: Backend> ResetDomain<T> {
    /// Creates an empty reset domain with an ordered workqueue of its own, named `name`.
    pub fn new(name: &'static CStr) -> Result<Arc<Self>> {
        Self::with_workqueue(Arc::new(FenceWorkqueue::new_ordered(name)?, GFP_KERNEL)?)
    }

    /// Creates an empty reset domain whose queues' timeout and fault work run on `wq`, for
    /// example the workqueue the queues' other work runs on.
    pub fn with_workqueue(wq: Arc<FenceWorkqueue>) -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Self {
                wq,
                members <- Mutex::new(
                    Members {
                        list: KVec::new(),
                        stopped: false,
                        gone: false,
                    },
                    DOMAIN_LOCK_NAME,
                    domain_lock_class()
                ),
            }),
            GFP_KERNEL,
        )
    }

    /// Returns the workqueue of the domain's timeout and fault work.
    pub fn workqueue(&self) -> &Arc<FenceWorkqueue> {
        &self.wq
    }

    /// Adds a queue. The list grows outside the lock, which is taken in signalling sections. A
    /// queue that joins a stopped domain is stopped with it, one that joins a domain whose device
    /// is gone is dead.
    pub(super) fn add(&self, member: Arc<Inner<T>>) -> Result {
        let mut member = member;
        loop {
            let mut members = self.members.lock();
            match members.list.push_within_capacity(member) {
                Ok(()) => {
                    if let Some(added) = members.list.last() {
                        if members.gone {
                            added.close(&mut added.lock());
                        } else if members.stopped {
                            added.stop();
                        }
                    }
                    return Ok(());
                }
                Err(err) => member = err.0,
            }
            let want = members.list.capacity() * 2 + 4;
            drop(members);
            let mut bigger = KVec::with_capacity(want, GFP_KERNEL)?;
            let mut members = self.members.lock();
            if members.list.capacity() < want {
                for m in members.list.drain_all() {
                    // Cannot fail: `bigger` has room for all of them.
                    let _ = bigger.push_within_capacity(m);
                }
                core::mem::swap(&mut members.list, &mut bigger);
            }
            drop(members);
            // The old list, empty, is freed here, without the lock.
            drop(bigger);
        }
    }

    /// Removes a queue that is being dropped. A reset of the queue's that the driver left
    /// pending resumes the domain, with [`Recovery::Continue`]: the other queues recover their
    /// jobs as their own resumes asked for meanwhile, if any (whoever asked for it said that
    /// their ring lost them), and the queue itself recovers none ([`Inner::resume`]).
    pub(super) fn remove(&self, member: &Arc<Inner<T>>) {
        let mut members = self.members.lock();
        let found = members
            .list
            .iter()
            .position(|m| Arc::ptr_eq(m, member))
            .and_then(|i| members.list.remove(i).ok());
        let pending = member.lock().reset_later_job.take();
        if let Some(seqno) = pending {
            crate::pr_warn!(
                "drm_jobqueue: {}: dropped with a reset pending; resuming its domain\n",
                member.name
            );
            Self::resume_all(&mut members, member, Recovery::Continue, seqno);
            // The queue itself was taken out of the list: its stop is undone here.
            member.resume(Recovery::Continue, None);
        }
        drop(members);
        // Dropped without the lock.
        drop(found);
    }

    /// Handles the timeout of job `seqno` of `guilty`, for the whole domain, with the domain's
    /// lock held since the timeout was found and `guilty` stopped since.
    fn timed_out(members: &mut Members<T>, guilty: &Arc<Inner<T>>, seqno: u64) {
        match Inner::recover_timeout(&members.list, guilty, seqno) {
            TimeoutAction::ResetLater => members.stopped = true,
            TimeoutAction::DeviceGone => members.gone = true,
            TimeoutAction::NoHang | TimeoutAction::Reset(_) => {}
        }
    }

    /// Resumes every queue of `members`, the domain's, after the reset of `guilty`'s job `seqno`.
    fn resume_all(
        members: &mut Members<T>,
        guilty: &Arc<Inner<T>>,
        recovery: Recovery,
        seqno: u64,
    ) {
        members.stopped = false;
        Inner::resume_queues(&members.list, guilty, recovery, Some(seqno));
    }
}
