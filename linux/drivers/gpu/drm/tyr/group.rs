// SPDX-License-Identifier: GPL-2.0 OR MIT

//! Groups: the objects GROUP_CREATE makes, with their queues, and GROUP_SUBMIT.
//!
//! A group is what the CSF firmware schedules on a CSG slot: a set of queues ([`Queue`]) sharing
//! a GPU VM and a priority. Userspace creates one with GROUP_CREATE, submits jobs to its queues
//! with GROUP_SUBMIT, asks for its state with GROUP_GET_STATE and destroys it with
//! GROUP_DESTROY. [`Group`] is the object those ioctls will work on; Tyr in Linux 7.3 has none of
//! them yet, because a group can only run once the CSG scheduler binds it to a CSG slot, and that
//! scheduler, the firmware's CSG and CS interfaces and the job interrupt do not exist upstream
//! (see [`crate::queue`]). Nor does a VM_CREATE ioctl whose VMs a group would use.
//!
//! # Group state
//!
//! A group runs until it times out, faults or is destroyed ([`GroupState`]); from then on its
//! queues run no more jobs (their done fences signal `-ECANCELED`), and
//! [`Group::terminate`] ends the jobs on its rings with the error Panthor uses: `-ETIMEDOUT` for
//! a timed-out group, `-EINVAL` for a faulty one, `-ECANCELED` for a destroyed one. Dropping the
//! group terminates it and tears its queues down.
//!
//! # Synchronisation
//!
//! GROUP_SUBMIT ([`Group::submit`]) turns the wait operations of each job into dependencies of
//! its job queue job, and hands each job's done fence to the syncobjs its signal operations
//! name. Linux 7.3 has no Rust abstraction of `struct drm_syncobj`: [`SyncObjects`] is the
//! boundary, the few syncobj calls GROUP_SUBMIT makes, which the ioctl will implement on the DRM
//! file once the abstraction exists.

use kernel::{
    dma_fence::{
        DmaFence,
        FenceWorkqueue, //
    },
    drm::jobqueue::{
        Job,
        ResetDomain, //
    },
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{
            ordering,
            Atomic, //
        },
        Arc, //
    },
    time::Delta,
    uapi, //
};

use crate::{
    job::{
        QueueSubmit,
        SyncOp,
        SyncOpKind, //
    },
    queue::{
        Queue,
        QueueConfig,
        QueueHw,
        TyrQueueBackend, //
    },
};

/// The most queues a group can have (`MAX_CS_PER_CSG`).
const MAX_QUEUES: usize = 32;

/// Whether a group can still run, and if not, why.
///
/// The first reason wins: a group that timed out and is then destroyed reports a timeout.
pub(crate) struct GroupState {
    flags: Atomic<u32>,
}

impl GroupState {
    /// A job of the group ran for too long.
    pub(crate) const TIMEDOUT: u32 =
        uapi::drm_panthor_group_state_flags_DRM_PANTHOR_GROUP_STATE_TIMEDOUT;
    /// A command stream of the group hit an error.
    pub(crate) const FATAL_FAULT: u32 =
        uapi::drm_panthor_group_state_flags_DRM_PANTHOR_GROUP_STATE_FATAL_FAULT;
    /// The group was destroyed; not reported to userspace.
    const DESTROYED: u32 = 1 << 31;

    fn new() -> Result<Arc<Self>> {
        Ok(Arc::new(
            Self {
                flags: Atomic::new(0),
            },
            GFP_KERNEL,
        )?)
    }

    /// Returns whether the group can run jobs (Panthor's `group_can_run()`).
    pub(crate) fn can_run(&self) -> bool {
        self.flags.load(ordering::Relaxed) == 0
    }

    /// Stops the group for `reason`, unless it was stopped already; returns whether it was
    /// running. Can be called from any context.
    pub(crate) fn fail(&self, reason: u32) -> bool {
        self.flags.cmpxchg(0, reason, ordering::Relaxed).is_ok()
    }

    /// Returns the flags GROUP_GET_STATE reports.
    pub(crate) fn uapi_flags(&self) -> u32 {
        self.flags.load(ordering::Relaxed) & !Self::DESTROYED
    }

    /// Returns the error the jobs on the group's rings end with when it is terminated.
    fn term_error(&self) -> Error {
        match self.flags.load(ordering::Relaxed) {
            Self::TIMEDOUT => ETIMEDOUT,
            Self::FATAL_FAULT => EINVAL,
            _ => ECANCELED,
        }
    }
}

/// The syncobj operations GROUP_SUBMIT needs: the stub boundary for `struct drm_syncobj`.
///
/// The ioctl will implement this on its DRM file once the kernel crate has a syncobj abstraction
/// (`drm_syncobj_find()`, `drm_syncobj_find_fence()`, `drm_syncobj_replace_fence()`,
/// `drm_syncobj_add_point()` with a preallocated `dma_fence_chain`), as Panthor's
/// `panthor_submit_ctx` does in C. Drivers use no `bindings::`, so the glue belongs in that
/// abstraction, not here.
pub(crate) trait SyncObjects {
    /// What [`SyncObjects::prepare_signal`] reserved to attach a fence to a syncobj (point).
    type Signal;

    /// Returns the fence a wait operation waits for (`drm_syncobj_find_fence()`); fails with
    /// `EINVAL` for an unknown handle or a point without a fence.
    fn wait_fence(&self, op: &SyncOp) -> Result<ARef<DmaFence>>;

    /// Looks the syncobj of a signal operation up and allocates what attaching a fence to it
    /// needs: everything that can fail.
    fn prepare_signal(&mut self, op: &SyncOp) -> Result<Self::Signal>;

    /// Attaches `fence` to the syncobj (point) `signal` was prepared for; cannot fail.
    fn signal(&mut self, signal: Self::Signal, fence: &ARef<DmaFence>);
}

/// A job of a GROUP_SUBMIT between its creation and its submission.
struct PendingJob<H: QueueHw, S: SyncObjects> {
    queue: usize,
    job: Job<TyrQueueBackend<H>>,
    /// Earlier jobs of the batch, on other queues, whose done fences this job waits for.
    waits_on: KVec<usize>,
    signals: KVec<S::Signal>,
}

/// A scheduling group and its queues.
pub(crate) struct Group<H: QueueHw> {
    state: Arc<GroupState>,
    vm: H::Vm,
    // Dropped before `_wq`, which the job queues flush.
    queues: KVec<Queue<H>>,
    _wq: Arc<FenceWorkqueue>,
}

impl<H: QueueHw> Group<H> {
    /// Creates a group in the VM `vm` with one queue per item of `queues`.
    ///
    /// A job that runs longer than `timeout` ([`JOB_TIMEOUT`](crate::queue::JOB_TIMEOUT) for the
    /// driver) makes the group time out. Fails with `EINVAL` for no queue or more than 32.
    pub(crate) fn new(
        vm: H::Vm,
        queues: impl IntoIterator<Item = (QueueConfig, H)>,
        timeout: Delta,
    ) -> Result<Self> {
        let state = GroupState::new()?;
        // One ordered workqueue serves the job queues of the group, as one drm_sched submit
        // workqueue serves Panthor's.
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"tyr-group")?, GFP_KERNEL)?;
        // The queues of a group time out and recover together: a timeout takes the whole group
        // off its slot (Panthor serialises its timeouts on one reset workqueue).
        let domain = ResetDomain::with_workqueue(wq.clone())?;
        let mut list = KVec::new();
        for (config, hw) in queues {
            if list.len() == MAX_QUEUES {
                return Err(EINVAL);
            }
            // At most `MAX_QUEUES`: fits.
            let index = list.len() as u32;
            let queue = Queue::new(state.clone(), index, config, hw, timeout, &domain)?;
            list.push(queue, GFP_KERNEL)?;
        }
        if list.is_empty() {
            return Err(EINVAL);
        }
        Ok(Self {
            state,
            vm,
            queues: list,
            _wq: wq,
        })
    }

    /// Returns the queue `index`; fails with `EINVAL` if there is none.
    pub(crate) fn queue(&self, index: u32) -> Result<&Queue<H>> {
        self.queues.get(index as usize).ok_or(EINVAL)
    }

    /// Returns the group's state.
    pub(crate) fn state(&self) -> &GroupState {
        &self.state
    }

    /// Submits the jobs of a GROUP_SUBMIT and returns their done fences.
    ///
    /// Works in two passes, as Panthor does. The first creates every job and allocates all it
    /// needs: the job queue jobs, the dependencies on the fences of wait operations, and the
    /// syncobj slots of signal operations; if it fails, nothing was submitted. The second submits
    /// the jobs in order and hands each done fence to its signal operations.
    ///
    /// A wait operation on a syncobj (point) that an earlier job of the batch signals waits for
    /// that job's done fence instead of the syncobj's current fence. On the same queue there is
    /// nothing to wait for, jobs run in order; on another queue the dependency can only be added
    /// in the second pass, once the earlier job's done fence exists, into room the first pass
    /// reserved ([`Job::reserve_dependencies`]): adding it cannot fail with `ENOMEM`.
    pub(crate) fn submit<S: SyncObjects>(
        &self,
        submits: &[QueueSubmit],
        syncobjs: &mut S,
    ) -> Result<KVec<ARef<DmaFence>>> {
        if !self.state.can_run() {
            return Err(EINVAL);
        }
        let mut pending = KVec::with_capacity(submits.len(), GFP_KERNEL)?;
        for (i, submit) in submits.iter().enumerate() {
            pending.push(self.prepare(submits, i, submit, syncobjs)?, GFP_KERNEL)?;
        }

        let mut done: KVec<ARef<DmaFence>> = KVec::with_capacity(submits.len(), GFP_KERNEL)?;
        for PendingJob {
            queue,
            mut job,
            waits_on,
            signals,
        } in pending
        {
            for &earlier in waits_on.iter() {
                job.add_dependency(done[earlier].clone())?;
            }
            let fence = self.queues[queue].submit(job)?;
            for signal in signals {
                syncobjs.signal(signal, &fence);
            }
            // Cannot fail: the capacity is the number of jobs.
            done.push_within_capacity(fence).map_err(|_| ENOMEM)?;
        }
        Ok(done)
    }

    /// The first pass of [`Group::submit`] for job `i`.
    fn prepare<S: SyncObjects>(
        &self,
        submits: &[QueueSubmit],
        i: usize,
        submit: &QueueSubmit,
        syncobjs: &mut S,
    ) -> Result<PendingJob<H, S>> {
        let queue = submit.queue_index as usize;
        let mut job = self
            .queue(submit.queue_index)?
            .new_job(submit.call, self.vm.clone())?;
        let mut waits_on = KVec::new();
        let mut signals = KVec::new();
        for op in submit.syncs.iter() {
            match op.kind {
                SyncOpKind::Signal => signals.push(syncobjs.prepare_signal(op)?, GFP_KERNEL)?,
                SyncOpKind::Wait => match Self::signalled_by(submits, i, op) {
                    Some(earlier) if submits[earlier].queue_index as usize == queue => {}
                    Some(earlier) => waits_on.push(earlier, GFP_KERNEL)?,
                    None => job.add_dependency(syncobjs.wait_fence(op)?)?,
                },
            }
        }
        // Room for the dependencies on earlier jobs of the batch, added in the second pass.
        job.reserve_dependencies(waits_on.len())?;
        Ok(PendingJob {
            queue,
            job,
            waits_on,
            signals,
        })
    }

    /// Returns the last job before job `i` of the batch that signals the syncobj point `op`
    /// waits for.
    fn signalled_by(submits: &[QueueSubmit], i: usize, op: &SyncOp) -> Option<usize> {
        submits[..i].iter().rposition(|s| {
            s.syncs
                .iter()
                .any(|o| o.kind == SyncOpKind::Signal && o.same_point(op))
        })
    }

    /// Suspends the timeouts of the group's queues: what the CSG scheduler does when it takes
    /// the group off its slot to make room for another, as Panthor does, so that the time the
    /// group waits for a slot does not count as a hang.
    pub(crate) fn suspend_timeouts(&self) {
        for queue in self.queues.iter() {
            queue.suspend_timeout();
        }
    }

    /// Resumes the timeouts of the group's queues once the group is on a slot again.
    pub(crate) fn resume_timeouts(&self) {
        for queue in self.queues.iter() {
            queue.resume_timeout();
        }
    }

    /// Ends the jobs on the rings of a group that can no longer run.
    ///
    /// What the CSG scheduler does once a group that timed out or faulted
    /// ([`QueueHw::request_reset`]) is off its CSG slot, and what destroying a group does after
    /// [`QueueHw::evict`]. The firmware must no longer execute the group's rings. Sleeps:
    /// process context only, not from a queue's work.
    pub(crate) fn terminate(&self) {
        let error = self.state.term_error();
        for queue in self.queues.iter() {
            queue.terminate(error);
        }
    }
}

impl<H: QueueHw> Drop for Group<H> {
    fn drop(&mut self) {
        self.state.fail(GroupState::DESTROYED);
        // Off the slot first: the firmware may still execute the rings.
        for queue in self.queues.iter() {
            queue.evict();
        }
        self.terminate();
    }
}
