// SPDX-License-Identifier: GPL-2.0 OR MIT

//! Jobs: built and allocated by the driver, then submitted to a [`JobQueue`](super::JobQueue).

use super::{
    queue::{
        Inner,
        JobNode, //
    },
    Backend,
};
use crate::{
    dma_fence::{
        DmaFence,
        FenceAllocation, //
    },
    prelude::*,
    sync::{
        aref::ARef,
        Arc, //
    }, //
};
use core::{
    mem::MaybeUninit,
    ops::{
        Deref,
        DerefMut, //
    }, //
};

/// A job that has not been submitted yet.
///
/// Created by [`JobQueue::new_job`](super::JobQueue::new_job), which allocates everything the job
/// will need in the queue; [`Job::add_dependency`] allocates the room for each dependency. Once
/// built, the job is handed to [`JobQueue::submit`](super::JobQueue::submit), which cannot fail
/// past its start and does not allocate.
///
/// # Examples
///
/// ```
/// # use kernel::dma_fence::{DmaFence, FenceContext};
/// # use kernel::drm::jobqueue::{Backend, JobQueue, JobRef, QueueOptions, TimeoutAction};
/// # use kernel::sync::aref::ARef;
/// # struct Ring;
/// # impl Backend for Ring {
/// #     type Job = ();
/// #     fn run(&self, _job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> { Ok(DmaFence::stub()) }
/// #     fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction { TimeoutAction::NoHang }
/// #     fn stop_hardware(&self) {}
/// # }
/// let queue = JobQueue::new(Ring, QueueOptions::new(c"example", c"ring", 4, None))?;
/// let other = FenceContext::new(c"example", c"other");
/// let a = other.new_fence(GFP_KERNEL)?;
/// let b = other.new_fence(GFP_KERNEL)?;
///
/// // Zero credits, or more than the ring holds, are rejected at creation.
/// assert_eq!(queue.new_job(0, ()).err(), Some(EINVAL));
/// assert_eq!(queue.new_job(5, ()).err(), Some(EINVAL));
///
/// let mut job = queue.new_job(2, ())?;
/// job.add_dependency(a.to_aref())?;
/// // Dependencies are deduplicated per context, keeping the later fence.
/// job.add_dependency(b.to_aref())?;
/// // Signalled dependencies are not waited for.
/// job.add_dependency(DmaFence::stub())?;
/// assert_eq!(job.dependencies(), 1);
///
/// let done = queue.submit(job)?;
/// a.signal(Ok(()));
/// b.signal(Ok(()));
/// done.wait()?;
/// # Ok::<(), Error>(())
/// ```
pub struct Job<T: Backend> {
    pub(super) slot: Slot<T>,
    pub(super) credits: u32,
    pub(super) payload: T::Job,
    pub(super) deps: KVec<ARef<DmaFence>>,
    pub(super) fence: FenceAllocation,
    pub(super) node: KBox<MaybeUninit<JobNode<T>>>,
}

impl<T: Backend> Job<T> {
    pub(super) fn new(queue: &Arc<Inner<T>>, credits: u32, payload: T::Job) -> Result<Self> {
        if (credits == 0 && !queue.allow_zero_credits) || credits > queue.credits.capacity() {
            return Err(EINVAL);
        }
        let fence = FenceAllocation::new(GFP_KERNEL)?;
        let node = KBox::new_uninit(GFP_KERNEL)?;
        Ok(Self {
            slot: Slot::take(queue)?,
            credits,
            payload,
            deps: KVec::new(),
            fence,
            node,
        })
    }

    /// Makes the job wait for `fence` before it runs.
    ///
    /// Any fence works, made in Rust or in C, from this queue, another queue or another driver.
    /// Of several fences of one context only the later one is kept: on a timeline it stands for
    /// the earlier ones, and its result decides, in whatever order they were added. If a kept
    /// fence signals an error, the job does not run and its done fence carries the error. Fences
    /// that have signalled successfully are dropped when the job is submitted, before it waits.
    ///
    /// Fails with `EINVAL` for a fence of this queue that has not been submitted yet (the job
    /// would wait for itself or a later job), and with `ENOMEM`.
    pub fn add_dependency(&mut self, fence: ARef<DmaFence>) -> Result {
        let ctx = &self.slot.queue().fence_ctx;
        if fence.context() == ctx.context() && fence.seqno() > ctx.last_seqno() {
            return Err(EINVAL);
        }
        // Before the status is trusted: a fence whose `signaled` op polls (a `dma_fence_array`)
        // can report signalled without its error until signalling is enabled.
        fence.enable_signaling();
        if let Some(dep) = self
            .deps
            .iter_mut()
            .find(|d| d.context() == fence.context())
        {
            if fence.is_later(dep)? {
                *dep = fence;
            }
            return Ok(());
        }
        self.deps.push(fence, GFP_KERNEL)?;
        Ok(())
    }

    /// Reserves room for `n` more dependencies.
    ///
    /// Afterwards, [`Job::add_dependency`] cannot fail with `ENOMEM` for the next `n` fences: a
    /// driver can allocate everything before it starts submitting several jobs that depend on
    /// each other, and then submit them without a failure in the middle.
    pub fn reserve_dependencies(&mut self, n: usize) -> Result {
        self.deps.reserve(n, GFP_KERNEL)?;
        Ok(())
    }

    /// Returns the number of dependencies the job will wait for: those kept after
    /// deduplication that have not signalled successfully.
    pub fn dependencies(&self) -> usize {
        self.deps
            .iter()
            .filter(|d| d.status() != Some(Ok(())))
            .count()
    }

    /// Returns the credits the job takes on the ring while it runs.
    pub fn credits(&self) -> u32 {
        self.credits
    }

    /// Returns the driver's data of the job.
    pub fn payload(&self) -> &T::Job {
        &self.payload
    }

    /// Returns the driver's data of the job.
    pub fn payload_mut(&mut self) -> &mut T::Job {
        &mut self.payload
    }
}

/// A job's place in its queue, from its creation until it is retired: the room the queue keeps for
/// it ([`Inner::reserve_slot`]). Given back when dropped, unless the job was submitted
/// ([`Slot::keep`]); the queue gives it back when it retires the job.
pub(super) struct Slot<T: Backend> {
    queue: Arc<Inner<T>>,
    kept: bool,
}

impl<T: Backend> Slot<T> {
    fn take(queue: &Arc<Inner<T>>) -> Result<Self> {
        queue.reserve_slot()?;
        Ok(Self {
            queue: queue.clone(),
            kept: false,
        })
    }

    /// Returns the queue of the job.
    pub(super) fn queue(&self) -> &Arc<Inner<T>> {
        &self.queue
    }

    /// Leaves the slot to the queue, for the job just submitted.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl<T: Backend> Drop for Slot<T> {
    fn drop(&mut self) {
        if !self.kept {
            self.queue.release_slot();
        }
    }
}

/// A submitted job, as the queue hands it to its [`Backend`].
///
/// Dereferences to the driver's data of the job.
pub struct JobRef<'a, T: Backend> {
    node: Pin<&'a mut JobNode<T>>,
}

impl<'a, T: Backend> JobRef<'a, T> {
    pub(super) fn new(node: Pin<&'a mut JobNode<T>>) -> Self {
        Self { node }
    }

    /// Returns the credits the job takes on the ring.
    pub fn credits(&self) -> u32 {
        self.node.credits
    }

    /// Returns the job's done fence.
    ///
    /// Its sequence number orders the jobs of the queue and can serve as the ring's completion
    /// value.
    pub fn done_fence(&self) -> &DmaFence {
        self.node.done.fence()
    }
}

impl<T: Backend> Deref for JobRef<'_, T> {
    type Target = T::Job;

    fn deref(&self) -> &T::Job {
        &self.node.payload
    }
}

impl<T: Backend> DerefMut for JobRef<'_, T> {
    fn deref_mut(&mut self) -> &mut T::Job {
        self.node.as_mut().project().payload
    }
}
