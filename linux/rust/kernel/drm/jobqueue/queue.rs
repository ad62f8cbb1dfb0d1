// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The queue: submission, the run, retire and timeout work, stop/resume, and teardown.
//!
//! # Locking
//!
//! All state is in [`Proc`], behind the queue's mutex. The work items, [`JobQueue::submit`],
//! [`JobQueue::stop`] and teardown take it; the backend's `run` and `timed_out` are called with it
//! held. Fence callbacks never take it: they only enqueue work ([`EnqueueWork`]) or signal a done
//! fence ([`ProxyFence`]). So the lock order is: queue mutex, then fence locks, then the
//! workqueue's locks, and no fence is ever waited for with the mutex held.

use super::{
    job::{
        Job,
        JobRef, //
    },
    trace,
    Backend,
    QueueOptions,
    Recovery,
    TimeoutAction, //
};
use crate::{
    dma_fence::{
        Armed,
        DmaFence,
        EnqueueWork,
        FenceCallback,
        FenceWorkqueue,
        NestedFenceContext, //
        ProxyFence,
        SignallingSection,
    },
    impl_has_delayed_work,
    impl_has_work,
    prelude::*,
    rbtree::RBTree,
    sync::{
        aref::ARef,
        static_lock_class,
        Arc,
        LockClassKey,
        Mutex, //
    },
    time::{
        Delta,
        Instant,
        Monotonic, //
    },
    workqueue::{
        DelayedWork,
        Work,
        WorkItem, //
    }, //
};

/// Work item ids of [`Inner`].
const RUN: u64 = 1;
const RETIRE: u64 = 2;
const TIMEOUT: u64 = 3;

/// Lock class keys and names of every queue.
///
/// They are defined once, outside the generic code: a `static` in a generic function is shared
/// by all its instances, but a name literal would be duplicated per crate, which lockdep rejects.
fn proc_lock_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn run_work_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn retire_work_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn timeout_work_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn timeout_timer_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
static PROC_LOCK_NAME: &CStr = c"drm_jobqueue:proc";
static RUN_WORK_NAME: &CStr = c"drm_jobqueue:run_work";
static RETIRE_WORK_NAME: &CStr = c"drm_jobqueue:retire_work";
static TIMEOUT_WORK_NAME: &CStr = c"drm_jobqueue:timeout_work";
static TIMEOUT_TIMER_NAME: &CStr = c"drm_jobqueue:timeout_work_timer";

/// How many jobs the run work hands on before it lets go of the lock and queues itself again:
/// `submit` waits for the lock, and [`Backend::run`] can be slow or preempted.
const RUN_BATCH: u32 = 16;

/// How many retired jobs the retire work takes out of the queue per hold of the lock.
const RETIRE_BATCH: usize = 16;

/// How long teardown waits for a running job when the queue has no timeout.
const TEARDOWN_TIMEOUT: Delta = Delta::from_secs(10);

type DepCallback<T> = FenceCallback<EnqueueWork<Inner<T>, RUN>>;
type RetireCallback<T> = FenceCallback<EnqueueWork<Inner<T>, RETIRE>>;

/// Where a submitted job is in its life.
pub(super) enum JobState {
    /// Not handed to the hardware (yet, or again after a reset), with the dependencies it may
    /// still have to wait for.
    Waiting { deps: KVec<ARef<DmaFence>> },
    /// Handed to the hardware; `detached` while the queue is stopped.
    Running {
        hw: ARef<DmaFence>,
        started: Instant<Monotonic>,
        detached: bool,
    },
    /// The done fence has signalled, or is about to through its hardware fence.
    Finished,
}

/// How a job ends without its hardware fence.
#[derive(Clone, Copy)]
enum Outcome {
    /// The hardware fence had signalled when `run` returned it.
    Completed(Result),
    /// The job was not run or was lost: the done fence gets the error.
    Cancelled(Error),
}

/// A submitted job.
#[pin_data]
pub(super) struct JobNode<T: Backend> {
    pub(super) payload: T::Job,
    pub(super) credits: u32,
    /// How the job ends without its hardware fence, once that is known; a job that finished
    /// cancelled keeps `Cancelled(e)` here for [`Backend::cancelled`].
    outcome: Option<Outcome>,
    state: JobState,
    holds_credits: bool,
    #[pin]
    pub(super) done: ProxyFence,
}

/// The submitted jobs of a queue, by the sequence numbers of their done fences.
type JobTree<T> = RBTree<u64, Pin<KBox<JobNode<T>>>>;

/// The state of a queue, behind its mutex.
pub(super) struct Proc<T: Backend> {
    /// Every submitted job not retired yet, by the sequence number of its done fence.
    jobs: JobTree<T>,
    /// The first job that may still have to be run.
    next_run: u64,
    /// The done fence of the last job handed on in order, until it signals: later jobs that end
    /// without the hardware wait for it, so that done fences signal in order.
    last_released: Option<ARef<DmaFence>>,
    credits_in_use: u32,
    waiting: u32,
    running: u32,
    stopped: u32,
    dead: bool,
    dying: bool,
    /// Wakes the run work when a dependency (or `last_released`) signals.
    dep_cb: Option<Pin<KBox<DepCallback<T>>>>,
    /// Wakes the retire work when the oldest running job's done fence signals.
    retire_cb: Option<Pin<KBox<RetireCallback<T>>>>,
    /// The retire work is queued or running, or `retire_cb` is armed: the retire work will look
    /// at every job in order without another kick.
    retire_busy: bool,
}

/// The shared part of a [`JobQueue`].
#[pin_data]
pub(super) struct Inner<T: Backend> {
    backend: T,
    name: &'static CStr,
    pub(super) capacity: u32,
    timeout: Option<Delta>,
    pub(super) fence_ctx: NestedFenceContext,
    wq: Arc<FenceWorkqueue>,
    #[pin]
    proc: Mutex<Proc<T>>,
    #[pin]
    run_work: Work<Inner<T>, RUN>,
    #[pin]
    retire_work: Work<Inner<T>, RETIRE>,
    #[pin]
    timeout_work: DelayedWork<Inner<T>, TIMEOUT>,
}

impl_has_work! {
    impl{T: Backend} HasWork<Inner<T>, RUN> for Inner<T> { self.run_work }
    impl{T: Backend} HasWork<Inner<T>, RETIRE> for Inner<T> { self.retire_work }
}

impl_has_delayed_work! {
    impl{T: Backend} HasDelayedWork<Inner<T>, TIMEOUT> for Inner<T> { self.timeout_work }
}

impl<T: Backend> WorkItem<RUN> for Inner<T> {
    type Pointer = Arc<Inner<T>>;

    fn run(this: Arc<Inner<T>>) {
        this.run_jobs();
    }
}

impl<T: Backend> WorkItem<RETIRE> for Inner<T> {
    type Pointer = Arc<Inner<T>>;

    fn run(this: Arc<Inner<T>>) {
        this.retire();
    }
}

impl<T: Backend> WorkItem<TIMEOUT> for Inner<T> {
    type Pointer = Arc<Inner<T>>;

    fn run(this: Arc<Inner<T>>) {
        this.check_timeout();
    }
}

/// Signals the done fence of `node` with the error of `outcome`, and marks the job finished.
fn finish<T: Backend>(counters: &mut Counters<'_>, node: Pin<&mut JobNode<T>>, outcome: Outcome) {
    let this = node.project();
    let result = match outcome {
        Outcome::Completed(result) => result,
        Outcome::Cancelled(e) => {
            trace::job_cancel(this.done.fence(), e);
            // For the cancelled hook, when the job is dropped.
            *this.outcome = Some(outcome);
            Err(e)
        }
    };
    this.done.signal(result);
    counters.leave(this.state, *this.credits, this.holds_credits);
    *this.state = JobState::Finished;
}

/// Drops the signalled dependencies of a waiting job, keeping the first error, and returns the
/// first one still pending.
fn next_dependency<T: Backend>(node: Pin<&mut JobNode<T>>) -> Option<ARef<DmaFence>> {
    let this = node.project();
    let JobState::Waiting { deps } = this.state else {
        return None;
    };
    while let Some(dep) = deps.last() {
        match dep.status() {
            None => return Some(dep.clone()),
            Some(result) => {
                if let Err(e) = result {
                    this.outcome.get_or_insert(Outcome::Cancelled(e));
                }
                deps.pop();
            }
        }
    }
    None
}

/// Makes the done fence of a job follow the hardware fence `run` returned.
///
/// Returns [`None`] if the job is now running, or how it ended without the hardware, with the
/// hardware fence if the hardware was done before `run` returned.
fn attach<T: Backend>(
    node: Pin<&mut JobNode<T>>,
    hw: Result<ARef<DmaFence>>,
) -> Option<(Outcome, Option<ARef<DmaFence>>)> {
    let hw = match hw {
        Ok(hw) => hw,
        Err(e) => return Some((Outcome::Cancelled(e), None)),
    };
    if let Some(result) = hw.status() {
        // Signalled already: the done fence must still wait for the jobs before it.
        return Some((Outcome::Completed(result), Some(hw)));
    }
    let mut this = node.project();
    if let Err(e) = this.done.as_mut().follow(hw.clone()) {
        return Some((Outcome::Cancelled(e), None));
    }
    *this.state = JobState::Running {
        hw,
        started: Instant::now(),
        detached: false,
    };
    *this.holds_credits = true;
    None
}

/// Arms the dependency callback on `fence`; returns `true` if the fence is still pending.
fn wait_on<T: Backend>(
    dep_cb: &mut Option<Pin<KBox<DepCallback<T>>>>,
    fence: ARef<DmaFence>,
) -> bool {
    match dep_cb.as_mut() {
        Some(cb) => cb.as_mut().arm(fence) == Armed::Waiting,
        // Only while the queue is dying: stop processing.
        None => true,
    }
}

/// The counters of a [`Proc`], borrowed apart from its job tree.
struct Counters<'a> {
    credits_in_use: &'a mut u32,
    waiting: &'a mut u32,
    running: &'a mut u32,
}

impl Counters<'_> {
    /// Accounts for a job leaving `state`, giving back its credits.
    fn leave(&mut self, state: &JobState, credits: u32, holds_credits: &mut bool) {
        match state {
            JobState::Waiting { .. } => *self.waiting -= 1,
            JobState::Running { .. } => *self.running -= 1,
            JobState::Finished => {}
        }
        if *holds_credits {
            *self.credits_in_use -= credits;
            *holds_credits = false;
        }
    }
}

impl<T: Backend> Proc<T> {
    fn split(&mut self) -> (&mut JobTree<T>, Counters<'_>) {
        (
            &mut self.jobs,
            Counters {
                credits_in_use: &mut self.credits_in_use,
                waiting: &mut self.waiting,
                running: &mut self.running,
            },
        )
    }

    /// Detaches the done fences of the running jobs from their hardware fences.
    fn detach_running(&mut self) {
        for (_, node) in self.jobs.iter_mut() {
            let this = node.as_mut().project();
            if let JobState::Running { detached, .. } = this.state {
                if !*detached && this.done.detach() {
                    *detached = true;
                }
            }
        }
    }

    /// Recovers the detached running jobs as `recovery` says; `guilty` times out.
    fn recover(&mut self, recovery: Recovery, guilty: Option<u64>) {
        let mut resubmit_from = None;
        let (jobs, mut counters) = self.split();
        for (&seqno, node) in jobs.iter_mut() {
            let detached_hw = match &node.state {
                JobState::Running {
                    hw, detached: true, ..
                } => hw.clone(),
                _ => continue,
            };
            if guilty == Some(seqno) {
                finish(&mut counters, node.as_mut(), Outcome::Cancelled(ETIMEDOUT));
                continue;
            }
            match recovery {
                Recovery::Continue => {
                    let this = node.as_mut().project();
                    // The hardware fence's level was accepted before, so this cannot fail.
                    let _ = this.done.follow(detached_hw);
                    if let JobState::Running { detached, .. } = this.state {
                        *detached = false;
                    }
                }
                Recovery::Resubmit => {
                    let this = node.as_mut().project();
                    counters.leave(this.state, *this.credits, this.holds_credits);
                    *counters.waiting += 1;
                    *this.state = JobState::Waiting { deps: KVec::new() };
                    resubmit_from.get_or_insert(seqno);
                }
                Recovery::Cancel(e) => finish(&mut counters, node.as_mut(), Outcome::Cancelled(e)),
            }
        }
        if let Some(seqno) = resubmit_from {
            // Every job before `seqno` has finished: there is nothing to wait for.
            self.next_run = self.next_run.min(seqno);
            self.last_released = None;
        }
    }

    /// Cancels every job whose done fence has not signalled, in order, with `error`.
    fn cancel_all(&mut self, error: Error) {
        self.detach_running();
        let (jobs, mut counters) = self.split();
        for (_, node) in jobs.iter_mut() {
            let pending = match &node.state {
                JobState::Waiting { .. } => true,
                JobState::Running { detached, .. } => *detached,
                JobState::Finished => false,
            };
            if pending {
                finish(&mut counters, node.as_mut(), Outcome::Cancelled(error));
            }
        }
        self.last_released = None;
    }
}

impl<T: Backend> Inner<T> {
    fn kick_run(self: &Arc<Self>) {
        let _ = self.wq.enqueue::<Arc<Self>, RUN>(self.clone());
    }

    fn kick_retire(self: &Arc<Self>) {
        let _ = self.wq.enqueue::<Arc<Self>, RETIRE>(self.clone());
    }

    fn arm_timeout(self: &Arc<Self>, after: Delta) {
        let jiffies = crate::time::msecs_to_jiffies(
            after.as_millis_ceil().clamp(1, i64::from(i32::MAX)) as u32,
        );
        let _ = self
            .wq
            .enqueue_delayed::<Arc<Self>, TIMEOUT>(self.clone(), jiffies);
    }

    /// The run work: hands the jobs whose turn has come to the hardware, in order.
    fn run_jobs(self: &Arc<Self>) {
        let _section = SignallingSection::begin();
        let mut guard = self.proc.lock();
        let proc = &mut *guard;
        if proc.stopped > 0 || proc.dead || proc.dying {
            return;
        }
        let (mut started, mut finished) = (false, false);
        let (mut handled, mut more) = (0, false);
        loop {
            if handled == RUN_BATCH {
                more = true;
                break;
            }
            let seqno = proc.next_run;
            let Some(node) = proc.jobs.get_mut(&seqno) else {
                break;
            };
            if !matches!(node.state, JobState::Waiting { .. }) {
                proc.next_run += 1;
                continue;
            }
            if let Some(dep) = next_dependency(node.as_mut()) {
                if wait_on(&mut proc.dep_cb, dep) {
                    break;
                }
                // It signalled meanwhile: look again.
                continue;
            }
            let credits = node.credits;
            if node.outcome.is_none() {
                if proc.credits_in_use + credits > self.capacity {
                    // The retire work kicks us when credits come back.
                    break;
                }
                let hw = self.backend.run(JobRef::new(node.as_mut()));
                match attach(node.as_mut(), hw) {
                    None => {
                        proc.credits_in_use += credits;
                        proc.waiting -= 1;
                        proc.running += 1;
                        if let JobState::Running { hw, .. } = &node.state {
                            trace::job_run(
                                self.name,
                                node.done.fence(),
                                hw,
                                proc.waiting,
                                proc.credits_in_use,
                            );
                        }
                        proc.last_released = Some(node.done.fence().clone());
                        proc.next_run += 1;
                        started = true;
                        handled += 1;
                        continue;
                    }
                    Some((outcome, done_hw)) => {
                        // The hardware was done before `run` returned: it ran all the same.
                        if let Some(hw) = done_hw {
                            trace::job_run(
                                self.name,
                                node.done.fence(),
                                &hw,
                                proc.waiting,
                                proc.credits_in_use,
                            );
                        }
                        *node.as_mut().project().outcome = Some(outcome);
                    }
                }
            }

            // The job ends without the hardware: after the jobs before it, in order.
            if let Some(prev) = proc.last_released.clone() {
                if !prev.is_signaled() {
                    if wait_on(&mut proc.dep_cb, prev) {
                        break;
                    }
                    continue;
                }
            }
            let outcome = node.outcome.unwrap_or(Outcome::Cancelled(EINVAL));
            let mut counters = Counters {
                credits_in_use: &mut proc.credits_in_use,
                waiting: &mut proc.waiting,
                running: &mut proc.running,
            };
            finish(&mut counters, node.as_mut(), outcome);
            proc.last_released = None;
            proc.next_run += 1;
            finished = true;
            handled += 1;
        }
        // The retire work needs a kick for the jobs that started or finished, unless it is busy
        // already: then it gets to them in order.
        let retire = (started || finished) && !core::mem::replace(&mut proc.retire_busy, true);
        drop(guard);
        if more {
            // Let submitters have the lock, then go on.
            self.kick_run();
        }

        if started {
            if let Some(timeout) = self.timeout {
                self.arm_timeout(timeout);
            }
        }
        if retire {
            self.kick_retire();
        }
    }

    /// The retire work: removes finished jobs in order, gives their credits back and drops
    /// them, in process context.
    fn retire(self: &Arc<Self>) {
        let mut freed = false;
        let now = Instant::<Monotonic>::now();
        let mut more = true;
        while more {
            // Up to `RETIRE_BATCH` jobs per hold of the lock; they are dropped after it.
            let mut batch: [Option<Pin<KBox<JobNode<T>>>>; RETIRE_BATCH] =
                [const { None }; RETIRE_BATCH];
            let mut taken = 0;
            {
                let mut guard = self.proc.lock();
                let proc = &mut *guard;
                while taken < RETIRE_BATCH {
                    let Some(mut cursor) = proc.jobs.cursor_front_mut() else {
                        proc.retire_busy = false;
                        more = false;
                        break;
                    };
                    let (_, node) = cursor.current_mut();
                    let signalled = node.done.fence().is_signaled();
                    let can_retire = signalled && !matches!(node.state, JobState::Waiting { .. });
                    if !can_retire {
                        let this = node.as_mut().project();
                        let wait_on = match this.state {
                            JobState::Running {
                                started, detached, ..
                            } => {
                                // The oldest job runs: it really started when the one before it
                                // finished, so its timeout counts from `now`, not from when it
                                // was handed to the ring behind other jobs.
                                if freed && (*started - now).is_negative() {
                                    *started = now;
                                }
                                (!*detached).then(|| this.done.fence().clone())
                            }
                            _ => None,
                        };
                        // `cursor` is not used past this point, which ends its borrow of the tree.
                        let mut armed = false;
                        if let (Some(fence), Some(cb)) = (wait_on, proc.retire_cb.as_mut()) {
                            if cb.as_mut().arm(fence) == Armed::RanNow {
                                continue;
                            }
                            armed = true;
                        }
                        // Without the callback, whatever changes the oldest job kicks the retire
                        // work again.
                        proc.retire_busy = armed;
                        more = false;
                        break;
                    }
                    let (_, tree_node) = cursor.remove_current();
                    let (_, mut node) = tree_node.to_key_value();
                    let (_, mut counters) = proc.split();
                    let this = node.as_mut().project();
                    counters.leave(this.state, *this.credits, this.holds_credits);
                    *this.state = JobState::Finished;
                    trace::job_done(this.done.fence());
                    freed = true;
                    batch[taken] = Some(node);
                    taken += 1;
                }
            }
            for node in batch.iter_mut().take(taken).filter_map(Option::take) {
                self.drop_job(node);
            }
        }
        if freed {
            self.kick_run();
        }
    }

    /// Calls the cancelled hook if needed and drops a retired job, without the lock held.
    fn drop_job(&self, mut node: Pin<KBox<JobNode<T>>>) {
        if let Some(Outcome::Cancelled(e)) = node.outcome {
            self.backend.cancelled(JobRef::new(node.as_mut()), e);
        }
        drop(node);
    }

    /// The timeout work: calls the backend for the oldest running job once it ran too long.
    fn check_timeout(self: &Arc<Self>) {
        let Some(timeout) = self.timeout else {
            return;
        };
        let _section = SignallingSection::begin();
        let mut guard = self.proc.lock();
        let proc = &mut *guard;
        if proc.stopped > 0 || proc.dead || proc.dying {
            return;
        }
        let mut oldest = None;
        for (&seqno, node) in proc.jobs.iter_mut() {
            if let JobState::Running {
                started,
                detached: false,
                ..
            } = &node.state
            {
                if !node.done.fence().is_signaled() {
                    oldest = Some((seqno, *started));
                    break;
                }
            }
        }
        let Some((seqno, started)) = oldest else {
            return;
        };
        let elapsed = started.elapsed();
        if elapsed < timeout {
            drop(guard);
            self.arm_timeout(timeout - elapsed);
            return;
        }
        // Detach first: the backend may signal the hardware fences while it resets the ring.
        proc.detach_running();
        let Some(node) = proc.jobs.get_mut(&seqno) else {
            return;
        };
        let action = self.backend.timed_out(JobRef::new(node.as_mut()));
        trace::job_timeout(self.name, node.done.fence(), action);
        match action {
            TimeoutAction::NoHang => {
                if let JobState::Running { started, .. } = &mut node.as_mut().project().state {
                    *started = Instant::now();
                }
                proc.recover(Recovery::Continue, None);
                drop(guard);
                self.arm_timeout(timeout);
            }
            TimeoutAction::Reset(recovery) => {
                proc.recover(recovery, Some(seqno));
                drop(guard);
                self.kick_run();
                self.kick_retire();
            }
            TimeoutAction::DeviceGone => {
                proc.dead = true;
                proc.cancel_all(ENODEV);
                drop(guard);
                self.kick_retire();
            }
        }
    }
}

/// The counters of a [`JobQueue`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs submitted and not handed to the hardware yet.
    pub waiting: u32,
    /// Jobs handed to the hardware and not finished yet.
    pub running: u32,
    /// Credits taken by the running jobs.
    pub credits_in_use: u32,
}

/// A job that [`JobQueue::submit`] refused, with the reason.
pub struct SubmitError<T: Backend> {
    /// `ENODEV` if the device is gone, `EINVAL` if the job belongs to another queue.
    pub error: Error,
    /// The job, unchanged.
    pub job: Job<T>,
}

impl<T: Backend> From<SubmitError<T>> for Error {
    fn from(e: SubmitError<T>) -> Error {
        e.error
    }
}

impl<T: Backend> core::fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SubmitError")
            .field("error", &self.error)
            .finish()
    }
}

/// A job queue for one firmware ring. See the [module documentation](super).
///
/// Dropping it tears the queue down: see the module documentation for what happens to the jobs.
/// It must not be dropped from the queue's own workqueue or from a [`Backend`] method.
pub struct JobQueue<T: Backend> {
    inner: Arc<Inner<T>>,
}

impl<T: Backend> JobQueue<T> {
    /// Creates a queue that runs its jobs through `backend`.
    ///
    /// Fails with `EINVAL` for a capacity of 0 or a done fence level of 0 or above
    /// [`MAX_NESTING_LEVEL`](crate::dma_fence::MAX_NESTING_LEVEL), and with `ENOMEM`.
    pub fn new(backend: T, options: QueueOptions) -> Result<Self> {
        if options.capacity == 0 {
            return Err(EINVAL);
        }
        let fence_ctx =
            NestedFenceContext::new(options.driver_name, options.name, options.done_fence_level)?;
        let wq = match options.workqueue {
            Some(wq) => wq,
            None => Arc::new(FenceWorkqueue::new_ordered(options.name)?, GFP_KERNEL)?,
        };
        let inner_wq = wq.clone();
        let inner = Arc::pin_init(
            pin_init!(Inner {
                backend,
                name: options.name,
                capacity: options.capacity,
                timeout: options.timeout,
                fence_ctx,
                wq: inner_wq,
                proc <- Mutex::new(Proc {
                    jobs: RBTree::new(),
                    next_run: 1,
                    last_released: None,
                    credits_in_use: 0,
                    waiting: 0,
                    running: 0,
                    stopped: 0,
                    dead: false,
                    dying: false,
                    dep_cb: None,
                    retire_cb: None,
                    retire_busy: false,
                }, PROC_LOCK_NAME, proc_lock_class()),
                run_work <- Work::new(RUN_WORK_NAME, run_work_class()),
                retire_work <- Work::new(RETIRE_WORK_NAME, retire_work_class()),
                timeout_work <- DelayedWork::new(
                    TIMEOUT_WORK_NAME,
                    timeout_work_class(),
                    TIMEOUT_TIMER_NAME,
                    timeout_timer_class(),
                ),
            }),
            GFP_KERNEL,
        )?;
        // The callbacks hold references to `inner`: teardown drops them to break the cycle.
        let dep_cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(wq.clone(), inner.clone())),
            GFP_KERNEL,
        )?;
        let retire_cb = KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(wq, inner.clone())),
            GFP_KERNEL,
        )?;
        {
            let mut proc = inner.proc.lock();
            proc.dep_cb = Some(dep_cb);
            proc.retire_cb = Some(retire_cb);
        }
        Ok(Self { inner })
    }

    /// Creates a job taking `credits` on the ring, with the driver's `payload`.
    ///
    /// Allocates everything the job needs in the queue. Fails with `EINVAL` if `credits` is 0 or
    /// above the queue's capacity, and with `ENOMEM`.
    pub fn new_job(&self, credits: u32, payload: T::Job) -> Result<Job<T>> {
        Job::new(&self.inner, credits, payload)
    }

    /// Submits `job` and returns its done fence.
    ///
    /// Fails only before anything happened, handing the job back: with `EINVAL` if the job was
    /// created by another queue, with `ENODEV` if the device is gone. Past that point it cannot
    /// fail and does not allocate; the done fence signals exactly once. Jobs queue up while the
    /// queue is stopped. A job that is next in line and ready is handed to [`Backend::run`] from
    /// here, so call this without locks that [`Backend::run`] takes.
    pub fn submit(&self, job: Job<T>) -> Result<ARef<DmaFence>, SubmitError<T>> {
        if !Arc::ptr_eq(&job.queue, &self.inner) {
            return Err(SubmitError { error: EINVAL, job });
        }
        let mut guard = self.inner.proc.lock();
        if guard.dead {
            drop(guard);
            return Err(SubmitError { error: ENODEV, job });
        }
        let Job {
            queue: _,
            credits,
            payload,
            mut deps,
            fence,
            node,
            reservation,
        } = job;
        // Point of no return: the done fence exists from here on.
        deps.retain(|d| d.status() != Some(Ok(())));
        let done = self.inner.fence_ctx.init_fence(fence);
        let seqno = done.seqno();
        let done_ref = done.to_aref();
        let deps_count = deps.len();
        for dep in deps.iter() {
            trace::job_add_dep(&done_ref, dep);
        }
        let init = pin_init!(JobNode {
            payload,
            credits,
            outcome: None,
            state: JobState::Waiting { deps },
            holds_credits: false,
            done <- ProxyFence::new(done),
        });
        let Ok(node) = KBox::write_pin_init(node, init);
        guard.jobs.insert(reservation.into_node(seqno, node));
        guard.waiting += 1;
        trace::job_queue(
            self.inner.name,
            &done_ref,
            credits,
            deps_count,
            guard.waiting,
            guard.credits_in_use,
        );
        // Only a job that is next to run needs handing on now. Otherwise a job before it has not
        // run yet, and the run work is queued already (it yielded after a batch) or what holds
        // that job back (a dependency, credits, a stop) kicks the run work when it clears; the
        // run work then gets to this job as well. The next job is handed on from here, as the
        // run work would: one trip through the workqueue less per job when the queue keeps up.
        let next = guard.next_run == seqno;
        drop(guard);
        if next {
            self.inner.run_jobs();
        }
        Ok(done_ref)
    }

    /// Stops the queue, for example around a reset of the ring.
    ///
    /// No job is handed to the hardware and no timeout fires until the returned guard resumes
    /// the queue. The jobs on the hardware are detached from their hardware fences: those that
    /// signal meanwhile are ignored, and [`StoppedQueue::resume`] decides their fate. Submission
    /// keeps working. Sleeps; must not be called from a [`Backend`] method.
    pub fn stop(&self) -> StoppedQueue<'_, T> {
        let mut proc = self.inner.proc.lock();
        proc.stopped += 1;
        proc.detach_running();
        drop(proc);
        trace::queue_stop(self.inner.name, self.context());
        StoppedQueue {
            queue: self,
            resumed: false,
        }
    }

    /// Returns the queue's counters.
    pub fn stats(&self) -> QueueStats {
        let proc = self.inner.proc.lock();
        QueueStats {
            waiting: proc.waiting,
            running: proc.running,
            credits_in_use: proc.credits_in_use,
        }
    }

    /// Returns the fence context of the queue's done fences.
    pub fn context(&self) -> u64 {
        self.inner.fence_ctx.context()
    }

    /// Returns the backend.
    pub fn backend(&self) -> &T {
        &self.inner.backend
    }

    /// Waits for the running job with the lowest sequence number, bounded by `limit`.
    ///
    /// Returns `false` when no job is running.
    fn teardown_wait_one(&self, limit: Delta) -> bool {
        let next = {
            let proc = self.inner.proc.lock();
            proc.jobs
                .iter()
                .find_map(|(&seqno, node)| match &node.state {
                    JobState::Running {
                        detached: false, ..
                    } if !node.done.fence().is_signaled() => {
                        Some((seqno, node.done.fence().clone()))
                    }
                    _ => None,
                })
        };
        let Some((seqno, done)) = next else {
            return false;
        };
        if done.wait_uninterruptible_timeout(limit).is_ok() {
            return true;
        }
        // Still running a timeout later: the backend gets a say, then the job is cut loose.
        let _section = SignallingSection::begin();
        let mut guard = self.inner.proc.lock();
        let proc = &mut *guard;
        proc.detach_running();
        let Some(node) = proc.jobs.get_mut(&seqno) else {
            return true;
        };
        let action = self.inner.backend.timed_out(JobRef::new(node.as_mut()));
        trace::job_timeout(self.inner.name, node.done.fence(), action);
        match action {
            TimeoutAction::DeviceGone => {
                proc.dead = true;
                proc.cancel_all(ENODEV);
            }
            TimeoutAction::Reset(_) => {
                proc.recover(Recovery::Cancel(ECANCELED), Some(seqno));
            }
            TimeoutAction::NoHang => {
                proc.recover(Recovery::Continue, Some(seqno));
            }
        }
        true
    }
}

impl<T: Backend> Drop for JobQueue<T> {
    fn drop(&mut self) {
        let inner = &self.inner;
        // No more work: the run and timeout work return early from now on, and no dependency
        // wakes them.
        let dep_cb = {
            let mut proc = inner.proc.lock();
            proc.dying = true;
            proc.dep_cb.take()
        };
        drop(dep_cb);
        inner.run_work.flush();
        inner.timeout_work.flush();

        // Jobs on the hardware: each gets a timeout to finish.
        let limit = inner.timeout.unwrap_or(TEARDOWN_TIMEOUT);
        while self.teardown_wait_one(limit) {}

        // Everything that has not run is cancelled, in order.
        {
            let _section = SignallingSection::begin();
            inner.proc.lock().cancel_all(ECANCELED);
        }

        // Retire everything, then stop the retire work for good.
        let retire_cb = inner.proc.lock().retire_cb.take();
        drop(retire_cb);
        inner.retire_work.flush();
        loop {
            let node = {
                let mut proc = inner.proc.lock();
                let Some(cursor) = proc.jobs.cursor_front_mut() else {
                    break;
                };
                let (_, tree_node) = cursor.remove_current();
                let node = tree_node.to_key_value().1;
                trace::job_done(node.done.fence());
                node
            };
            inner.drop_job(node);
        }
        inner.run_work.flush();
    }
}

/// A stopped [`JobQueue`]; resumes it when dropped, with [`Recovery::Continue`].
pub struct StoppedQueue<'a, T: Backend> {
    queue: &'a JobQueue<T>,
    resumed: bool,
}

impl<T: Backend> StoppedQueue<'_, T> {
    /// Resumes the queue, recovering the jobs that were on the hardware as `recovery` says.
    pub fn resume(mut self, recovery: Recovery) {
        self.resume_inner(recovery);
    }

    fn resume_inner(&mut self, recovery: Recovery) {
        if self.resumed {
            return;
        }
        self.resumed = true;
        let inner = &self.queue.inner;
        {
            let _section = SignallingSection::begin();
            let mut proc = inner.proc.lock();
            proc.recover(recovery, None);
            proc.stopped -= 1;
        }
        trace::queue_start(inner.name, inner.fence_ctx.context(), recovery);
        inner.kick_run();
        inner.kick_retire();
        if let Some(timeout) = inner.timeout {
            inner.arm_timeout(timeout);
        }
    }
}

impl<T: Backend> Drop for StoppedQueue<'_, T> {
    fn drop(&mut self) {
        self.resume_inner(Recovery::Continue);
    }
}
