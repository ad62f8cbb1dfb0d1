// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The queue: submission, the run, retire and timeout work, stop/resume, and teardown.
//!
//! # Locking
//!
//! A queue has three locks. In the order they are taken:
//!
//! 1. The recovery lock, a mutex: held by the handling of a timeout from the stop of the queues
//!    to their resume (or to the return of [`Backend::timed_out`] if it leaves the reset to the
//!    driver), and by whatever must not come in the middle of it (see [`Inner::lock_recovery`]).
//! 2. [`Inner::proc`], a mutex: [`Proc`], the jobs taken in, where the run and the release are,
//!    and the queue's [`Life`] and stops. Taken only through [`Inner::lock`], and never by
//!    [`JobQueue::submit`], job creation, the drop work or fence callbacks. [`Backend::run`],
//!    [`Backend::timed_out`] and [`Backend::deadline`] are called with it held. The credits
//!    ([`Inner::credits`]) are atomics under no lock: the hooks of a job's done fence give them
//!    back, or whoever takes the job off the hardware otherwise ([`Proc`]'s invariants).
//! 3. [`Inner::submitted`], a spinlock: [`Submitted`], the jobs submitted since the mutex was
//!    last taken, the slots, [`Submitted::run_waits`] and the retired jobs on their way to the
//!    drop work. Taken with or without the mutex; nothing takes the mutex or the recovery lock
//!    while holding it.
//!
//! Then come fence locks and the workqueues' locks. Fence callbacks take none of the three:
//! they only enqueue work ([`EnqueueWork`]), or signal a done fence ([`ProxyFence`]) and give
//! the job's credits back ([`JobHooks`]). No fence is waited for with a mutex held. The work
//! items and resume hold the queue's mutex in a fence signalling section ([`SignallingSection`]),
//! so that lockdep reports an allocation that may reclaim, or a wait for a fence, under it.
//!
//! [`Inner::lock`] moves the submitted jobs into [`Proc`] each time it takes the mutex, so a
//! holder sees every job submitted before it took the mutex; one submitted later kicks the run
//! work, or is found by the run path as it stops ([`Submitted::run_waits`]). Both locks keep
//! their jobs in buffers with a slot for every job alive ([`JobRing`] in [`Proc`]): a job takes
//! its slot when it is created ([`Inner::reserve_slot`], which doubles the slots when they run
//! out) and gives it back when it is retired, so that neither submission nor the queue's work
//! allocates. The retire work hands the retired jobs to the drop work through
//! [`Submitted::retired`], a list linked through the jobs themselves, which drops them off the
//! queue's workqueue ([`Inner::drop_retired`]).

use super::{
    job::{
        Job,
        JobRef, //
    },
    ring::JobRing,
    trace,
    Backend,
    QueueOptions,
    Recovery, //
};
use crate::{
    dma_fence::{
        Armed,
        DmaFence,
        EnqueueWork,
        FenceCallback,
        FenceWorkqueue,
        HasRingCredits,
        NestedFenceContext,
        ProxyFence,
        ReturnCredits,
        RingCredits,
        SignallingSection, //
    },
    impl_has_delayed_work,
    impl_has_work,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::Atomic,
        static_lock_class,
        Arc,
        LockClassKey,
        Mutex,
        MutexGuard,
        SetOnce,
        SpinLock, //
    },
    time::{
        Delta,
        Instant,
        Monotonic, //
    },
    workqueue::{
        DelayedWork,
        HasWork,
        Work,
        WorkItem, //
    }, //
};

mod reset;

pub use self::reset::{
    ResetDomain,
    StoppedQueue, //
};

// Work item ids of `Inner`.
const RUN: u64 = 1;
const RETIRE: u64 = 2;
const TIMEOUT: u64 = 3;
const FAULT: u64 = 4;
const DEADLINE: u64 = 5;
const DROP: u64 = 6;
const DROP_SOON: u64 = 7;

// Lock class keys and names of every queue.
//
// They are defined once, outside the generic code: a `static` in a generic function is shared
// by all its instances, but a name literal would be duplicated per crate, which lockdep rejects.
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
fn fault_work_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn deadline_work_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn drop_work_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn drop_soon_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn drop_soon_timer_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn recovery_lock_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
fn submit_lock_class() -> Pin<&'static LockClassKey> {
    static_lock_class!()
}
static PROC_LOCK_NAME: &CStr = c"drm_jobqueue:proc";
static RUN_WORK_NAME: &CStr = c"drm_jobqueue:run_work";
static RETIRE_WORK_NAME: &CStr = c"drm_jobqueue:retire_work";
static TIMEOUT_WORK_NAME: &CStr = c"drm_jobqueue:timeout_work";
static TIMEOUT_TIMER_NAME: &CStr = c"drm_jobqueue:timeout_work_timer";
static FAULT_WORK_NAME: &CStr = c"drm_jobqueue:fault_work";
static DEADLINE_WORK_NAME: &CStr = c"drm_jobqueue:deadline_work";
static DROP_WORK_NAME: &CStr = c"drm_jobqueue:drop_work";
static DROP_SOON_NAME: &CStr = c"drm_jobqueue:drop_soon";
static DROP_SOON_TIMER_NAME: &CStr = c"drm_jobqueue:drop_soon_timer";
static RECOVERY_LOCK_NAME: &CStr = c"drm_jobqueue:recovery";
static SUBMIT_LOCK_NAME: &CStr = c"drm_jobqueue:submitted";

/// How many jobs the run work hands on before it lets go of the lock and queues itself again:
/// the timeout, stop and teardown paths wait for the lock, and [`Backend::run`] can be slow or
/// preempted.
const RUN_BATCH: u32 = 16;

/// How many retired jobs the retire work takes out of the queue per hold of the lock. The test
/// `timeout_counts_from_the_previous_job_after_a_full_retire_batch` fills one batch and one more.
const RETIRE_BATCH: usize = 16;

/// How many retired jobs wait for the drop work before it is kicked at once.
const DROP_BATCH: usize = 16;

/// How long retired jobs wait for more to be dropped with, at most: a tick.
const DROP_DELAY: crate::time::Jiffies = 1;

/// The workqueue of every queue's drop work, made by the first queue and never freed.
///
/// Not a queue's own workqueue, on which the drop work would hold up the run work, and not a
/// system workqueue: this one has a rescuer thread (`WQ_MEM_RECLAIM`), so the drop work runs
/// when memory is short, and teardown may flush it from a work item of another such workqueue.
static DROP_WQ: SetOnce<FenceWorkqueue> = SetOnce::new();

/// Returns [`DROP_WQ`], making it if no queue did yet.
fn drop_wq() -> Result<&'static FenceWorkqueue> {
    loop {
        if let Some(wq) = DROP_WQ.as_ref() {
            return Ok(wq);
        }
        if !DROP_WQ.populate(FenceWorkqueue::new_unbound(c"drm_jobqueue_drop")?) {
            // Another queue's creation made it first, and is about to publish it; ours is gone.
            // Sleep rather than spin: that thread may have been preempted on this CPU.
            while DROP_WQ.as_ref().is_none() {
                crate::time::delay::fsleep(Delta::from_micros(10));
            }
        }
    }
}

/// The slots for jobs a queue starts with ([`Submitted::slots`]); they double when they run out.
const INITIAL_SLOTS: usize = 16;
const _: () = assert!(INITIAL_SLOTS > 0);

/// [`JobState::Running`]'s `deadline_told` before a deadline was told: `KTIME_MAX`, which
/// [`ProxyFence::deadline`] never returns.
const NOT_TOLD: i64 = i64::MAX;

/// How long teardown waits for a running job when the queue has no timeout.
const TEARDOWN_TIMEOUT: Delta = Delta::from_secs(10);

type DepCallback<T> = FenceCallback<EnqueueWork<Inner<T>, RUN>>;
type RetireCallback<T> = FenceCallback<EnqueueWork<Inner<T>, RETIRE>>;
/// The hooks of a job's done fence: when the hardware fence signals, the job's credits go back to
/// [`Inner::credits`] before the done fence signals, and the retire work, which runs the run path,
/// is woken after it if the run path waits for credits ([`Proc::credit_wait`]); a deadline set on
/// the done fence wakes the deadline work.
type JobHooks<T> = ReturnCredits<Inner<T>, RETIRE, DEADLINE>;

/// Where a submitted job is in its life.
///
/// A job goes through two steps in order: it is *run* (handed to [`Backend::run`], or found not
/// to run because a dependency failed) when `Proc::next_run` reaches it, and *released* (its done
/// fence made to follow the hardware fence, or signalled with its outcome) when
/// `Proc::next_release` reaches it. A job that failed without running does not hold back the
/// jobs behind it from running; it only holds back their release, so that done fences signal in
/// order.
///
/// | from | to | when |
/// |---|---|---|
/// | `Waiting` | `Running` (`Unreleased`) | run: [`Backend::run`] returned a pending fence |
/// | `Waiting` | `Ended` | run: a dependency or `run` failed, or the hardware was done already |
/// | `Running` (`Unreleased`) | `Running` (`Following`) | release |
/// | `Running` (`Following`) | `Running` (`Detached`) | a stop, a timeout, teardown |
/// | `Running` (`Detached`) | `Running` (`Following`) | a recovery: [`Recovery::Continue`] |
/// | `Running` (not `Following`) | `Waiting` | a recovery: [`Recovery::Resubmit`] |
/// | `Running` (`Unreleased`) | `Ended` | a recovery ends it: timed out, cancelled or done |
/// | `Running` (`Detached`) | `Finished` | a recovery ends it, as above |
/// | `Ended` | `Finished` | release: the done fence signals the outcome |
/// | not `Finished`, not `Following` | `Finished` | teardown, device gone ([`Proc::finish_all`]) |
/// | `Running` (`Following`) | `Finished` | retire, once the hardware fence signalled |
/// | `Finished` | `Retired` | retire: handed to the drop work, which drops it |
/// | `Waiting` | `Retired` | no room when taken in ([`Inner::take_submitted`]): `-ECANCELED` |
enum JobState<T: Backend> {
    /// Not handed to the hardware (yet, or again after a reset), with the dependencies it may
    /// still have to wait for, and the error of the first that failed: then the job does not
    /// run, and ends with that error once it is its turn to run.
    Waiting {
        deps: KVec<ARef<DmaFence>>,
        failed: Option<Error>,
    },
    /// Ended without its hardware fence (a dependency or `run` failed, the hardware was done
    /// before `run` returned, or a recovery ended it before its release): its done fence
    /// signals `outcome` at its release, in order.
    Ended(Outcome),
    /// Handed to the hardware since `started` as far as the timeout goes, holding its credits
    /// (see [`Proc`]'s invariants).
    Running {
        hw: ARef<DmaFence>,
        started: Instant<Monotonic>,
        link: Link,
        /// The deadline last given to [`Backend::deadline`] for this run, in nanoseconds of the
        /// monotonic clock, or [`NOT_TOLD`]: an `Option<Instant>` would make every job's node 8
        /// bytes larger (see `node_size` in the tests).
        deadline_told: i64,
    },
    /// The done fence has signalled; `cancelled` is the error of a job that ended without the
    /// hardware completing it, for [`Backend::cancelled`].
    Finished { cancelled: Option<Error> },
    /// Retired, its slot given back, in the list of jobs for the drop work ([`RetiredJobs`]),
    /// linked to the job retired before it; `cancelled` as in [`JobState::Finished`].
    Retired {
        older: Option<Node<T>>,
        cancelled: Option<Error>,
    },
}

impl<T: Backend> JobState<T> {
    /// The error to give [`Backend::cancelled`] once the job is dropped, if it was cancelled.
    fn cancelled(&self) -> Option<Error> {
        match self {
            JobState::Finished { cancelled } | JobState::Retired { cancelled, .. } => *cancelled,
            _ => None,
        }
    }
}

/// How the done fence of a job on the hardware relates to the job's hardware fence.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not released yet: the done fence signals after those of the jobs before it.
    Unreleased,
    /// Released: the done fence follows the hardware fence, and signals with it.
    Following,
    /// Released, then detached by a stop, a timeout or teardown: the hardware fence no longer
    /// signals the done fence, and a recovery decides how the job ends.
    Detached,
}

/// How a job ends without its hardware fence.
#[derive(Clone, Copy)]
enum Outcome {
    /// The hardware fence had signalled when `run` returned it, or when the job was recovered
    /// or torn down.
    Completed(Result),
    /// The job was not run or was lost: the done fence gets the error.
    Cancelled(Error),
}

/// Whether a queue is in use, whatever its stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Life {
    /// It takes jobs and hands them to the hardware.
    Alive,
    /// Its device is gone ([`DeviceGone`](super::TimeoutAction::DeviceGone)):
    /// [`Submitted::closed`] refuses new jobs, and the jobs it had ended.
    Dead,
    /// Its [`JobQueue`] is being dropped: the run, timeout and deadline work return at once from
    /// now on, and a resume recovers none of its jobs (see [`Inner::resume`]).
    Dying,
}

/// A submitted job.
#[pin_data]
pub(super) struct JobNode<T: Backend> {
    pub(super) payload: T::Job,
    pub(super) credits: u32,
    state: JobState<T>,
    #[pin]
    pub(super) done: ProxyFence<JobHooks<T>>,
}

/// A submitted job, as the queue holds it.
type Node<T> = Pin<KBox<JobNode<T>>>;

/// The state of a queue, behind its mutex.
///
/// # Invariants
///
/// - `next_release <= next_run`: a job is released only after it ran (or was found not to run).
/// - A job from `next_release` to before `next_run` is not in [`JobState::Waiting`]: it runs, or
///   it ended ([`JobState::Ended`]) and waits for its release.
/// - A job before `next_release` in [`JobState::Running`] is not [`Link::Unreleased`]: its done
///   fence was released.
/// - The credits in use of [`Inner::credits`] are those of the jobs in [`JobState::Running`]
///   whose [`JobHooks`] have not given them back: the hooks of a [`Link::Following`] job do so,
///   without the mutex, when its hardware fence signals, before its done fence signals; a job
///   that leaves [`JobState::Running`] otherwise gives them back as it leaves
///   ([`Counters::leave`]).
/// - `intake` is empty and has room for [`Submitted::slots`] jobs, unless [`Submitted::spare`]
///   holds its replacement.
pub(super) struct Proc<T: Backend> {
    /// Every submitted job not retired yet, by the sequence number of its done fence.
    jobs: JobRing<Node<T>>,
    /// Swapped with [`Submitted::jobs`] to take the submitted jobs.
    intake: KVVec<Node<T>>,
    /// The first job that may still have to be run.
    next_run: u64,
    /// The first job that ran (or ended) but whose done fence was not released yet.
    next_release: u64,
    /// The done fence of the last job released to its hardware fence, until it signals: later
    /// jobs that end without the hardware wait for it, so that done fences signal in order.
    last_released: Option<ARef<DmaFence>>,
    /// The run path stopped at a job the ring had no room for, waiting in [`Inner::credits`]: the
    /// next return of credits wakes the retire work, which retires what finished and runs the run
    /// path. Meanwhile the retire work does not watch the oldest job ([`Inner::take_finished`]).
    credit_wait: bool,
    waiting: u32,
    running: u32,
    stopped: u32,
    /// Stops and timeout suspensions in force: while there are any, the timeout does not fire
    /// and time does not count towards it.
    timeout_paused: u32,
    /// When `timeout_paused` became non-zero.
    paused_at: Option<Instant<Monotonic>>,
    /// The timed-out job of a reset the backend completes later
    /// ([`ResetLater`](super::TimeoutAction::ResetLater)).
    reset_later_job: Option<u64>,
    /// The recovery asked for by the resumes since `stopped` was last 0, the most drastic one, and
    /// the timed-out job of a reset among them: the jobs are recovered when the last stop ends
    /// ([`Inner::resume`]).
    pending_recovery: Recovery,
    pending_timed_out: Option<u64>,
    life: Life,
    /// Wakes the run work when the dependency the next job waits for signals.
    dep_cb: Option<Pin<KBox<DepCallback<T>>>>,
    /// Wakes the run work when what holds back the next release signals (`last_released`, or a
    /// hardware fence the done fence cannot follow).
    release_cb: Option<Pin<KBox<DepCallback<T>>>>,
    /// Wakes the retire work when the oldest job's done fence signals.
    retire_cb: Option<Pin<KBox<RetireCallback<T>>>>,
    /// The retire work is queued or running, or `retire_cb` is armed: the retire work will look
    /// at every job in order without another kick. The run path sets it, and kicks the retire
    /// work, when it leaves jobs that nothing else will retire ([`Inner::watch_retire`]).
    retire_busy: bool,
}

/// The jobs submitted since the queue's mutex was last taken, behind the submission spinlock,
/// the accounting of the slots that every job takes from its creation to its retirement, and
/// the retired jobs on their way to the drop work.
///
/// # Invariants
///
/// - `closed` is set only with the queue's mutex held and `Proc::life` not [`Life::Alive`], and
///   no job is added once it is: the jobs of a dead queue all end with it.
/// - `held <= slots`. Every [`Slot`](super::job::Slot) alive and every job in `jobs`, in
///   `Proc::jobs` or on its way between them is counted in `held` (a retired job, until the
///   retire work gives its slot back; the jobs in `retired` hold none): so `jobs` and
///   `Proc::jobs` together never hold more than `slots` jobs.
/// - `jobs` has room for `slots` jobs. So has, whenever the queue's mutex is free,
///   `Proc::jobs` if `spare` is `None`, and otherwise the slots in `spare`; its two buffers are
///   empty.
pub(super) struct Submitted<T: Backend> {
    /// Added to in sequence number order: the done fence's sequence number is taken with the
    /// spinlock held.
    jobs: KVVec<Node<T>>,
    closed: bool,
    /// The run path stopped at a job that waits ([`Step::Waits`]), or at a stopped, dead or
    /// dying queue: what it waits for runs the run path again, and that run runs the jobs
    /// submitted meanwhile too, so [`JobQueue::submit`] does not kick the run work (as
    /// `drm_sched_wakeup()` does not while the scheduler cannot queue). Written by the run path
    /// only, with the queue's mutex held, and read by `submit()` in the spinlock section that
    /// adds the job: a job added while it is set is taken in by the next holder of the mutex,
    /// or found in `jobs` by the run path as it rewrites the flag.
    run_waits: bool,
    /// The retired jobs the drop work has not taken yet.
    retired: RetiredJobs<T>,
    held: usize,
    slots: usize,
    spare: Option<SpareRoom<T>>,
}

/// Retired jobs on their way to the drop work, linked through their [`JobState::Retired`],
/// newest first: adding one needs no room.
///
/// # Invariants
///
/// - Every job in the list is in [`JobState::Retired`], whose `older` is the next job of the
///   list.
/// - `len` is the number of jobs in the list.
struct RetiredJobs<T: Backend> {
    newest: Option<Node<T>>,
    len: usize,
}

impl<T: Backend> RetiredJobs<T> {
    const fn new() -> Self {
        // INVARIANT: No job, and `len` is 0.
        Self {
            newest: None,
            len: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.newest.is_none()
    }

    /// Adds `node`, as the newest job.
    fn push(&mut self, mut node: Node<T>) {
        // INVARIANT: `node` is `Retired`, linked to the job that was the newest, and one job
        // more is counted.
        let state = node.as_mut().project().state;
        *state = JobState::Retired {
            older: self.newest.take(),
            cancelled: state.cancelled(),
        };
        self.newest = Some(node);
        self.len += 1;
    }

    /// Removes the newest job.
    fn pop(&mut self) -> Option<Node<T>> {
        let mut node = self.newest.take()?;
        // By the invariants, `node` is `Retired` and `older` the rest of the list.
        if let JobState::Retired { older, .. } = node.as_mut().project().state {
            self.newest = older.take();
        }
        // INVARIANT: The rest of the list is the list, and one job less is counted.
        self.len -= 1;
        Some(node)
    }
}

impl<T: Backend> Drop for RetiredJobs<T> {
    fn drop(&mut self) {
        // One at a time: dropping the list through its links would recurse once per job.
        while self.pop().is_some() {}
    }
}

/// Larger buffers for `Proc::jobs` and `Proc::intake`, made by [`Inner::reserve_slot`] for the
/// next holder of the queue's mutex to install.
struct SpareRoom<T: Backend> {
    slots: KVVec<Option<Node<T>>>,
    intake: KVVec<Node<T>>,
}

/// The shared part of a [`JobQueue`].
#[pin_data(PinnedDrop)]
pub(super) struct Inner<T: Backend> {
    backend: T,
    name: &'static CStr,
    /// The credits of the ring (see [`Proc`]'s invariants), and the queue's workqueue
    /// ([`RingCredits::workqueue`]), on which their returns wake the retire work.
    pub(super) credits: RingCredits,
    timeout: Option<Delta>,
    pipeline_own: bool,
    pub(super) allow_zero_credits: bool,
    /// A fault asked for a timeout now.
    fault: Atomic<bool>,
    pub(super) fence_ctx: NestedFenceContext,
    /// [`DROP_WQ`].
    drop_wq: &'static FenceWorkqueue,
    /// The reset domain the queue belongs to, if any: its timeout and fault work run on the
    /// domain's workqueue, and its timeouts stop and recover every queue of the domain.
    domain: Option<Arc<ResetDomain<T>>>,
    /// Outside a domain, the lock the domain's would be: see [`Inner::lock_recovery`].
    #[pin]
    recovery: Mutex<()>,
    #[pin]
    proc: Mutex<Proc<T>>,
    #[pin]
    submitted: SpinLock<Submitted<T>>,
    #[pin]
    run_work: Work<Inner<T>, RUN>,
    #[pin]
    retire_work: Work<Inner<T>, RETIRE>,
    #[pin]
    timeout_work: DelayedWork<Inner<T>, TIMEOUT>,
    #[pin]
    fault_work: Work<Inner<T>, FAULT>,
    #[pin]
    deadline_work: Work<Inner<T>, DEADLINE>,
    #[pin]
    drop_work: Work<Inner<T>, DROP>,
    /// Kicks the drop work a tick after a job was retired that did not kick it at once.
    #[pin]
    drop_soon: DelayedWork<Inner<T>, DROP_SOON>,
}

#[pinned_drop]
impl<T: Backend> PinnedDrop for Inner<T> {
    fn drop(self: Pin<&mut Self>) {
        // Every job gave its slot back and was dropped: each `Slot` holds a reference to `self`,
        // and teardown retired and dropped every job. So every job gave its credits back.
        let submitted = self.submitted.lock();
        crate::warn_on!(submitted.held != 0 || !submitted.retired.is_empty());
        crate::warn_on!(self.credits.in_use() != 0);
    }
}

// SAFETY: `ring_credits` returns a field of `self` and does nothing else.
unsafe impl<T: Backend> HasRingCredits for Inner<T> {
    fn ring_credits(&self) -> &RingCredits {
        &self.credits
    }
}

impl_has_work! {
    impl{T: Backend} HasWork<Inner<T>, RUN> for Inner<T> { self.run_work }
    impl{T: Backend} HasWork<Inner<T>, RETIRE> for Inner<T> { self.retire_work }
    impl{T: Backend} HasWork<Inner<T>, FAULT> for Inner<T> { self.fault_work }
    impl{T: Backend} HasWork<Inner<T>, DEADLINE> for Inner<T> { self.deadline_work }
    impl{T: Backend} HasWork<Inner<T>, DROP> for Inner<T> { self.drop_work }
}

impl_has_delayed_work! {
    impl{T: Backend} HasDelayedWork<Inner<T>, TIMEOUT> for Inner<T> { self.timeout_work }
    impl{T: Backend} HasDelayedWork<Inner<T>, DROP_SOON> for Inner<T> { self.drop_soon }
}

/// Implements [`WorkItem`] for the work items of [`Inner`]: each calls its method.
macro_rules! inner_work_items {
    ($($id:ident => $method:ident),* $(,)?) => {$(
        impl<T: Backend> WorkItem<$id> for Inner<T> {
            type Pointer = Arc<Inner<T>>;

            fn run(this: Arc<Inner<T>>) {
                this.$method();
            }
        }
    )*};
}

inner_work_items! {
    RUN => run_jobs,
    RETIRE => retire,
    TIMEOUT => check_timeout,
    FAULT => check_timeout,
    DEADLINE => tell_deadlines,
    DROP => drop_retired,
    // Not the drops themselves: the drop work drops the jobs of a queue one at a time.
    DROP_SOON => kick_drop,
}

/// Signals the done fence of `node` with the error of `outcome`, and marks the job finished.
fn finish<T: Backend>(counters: &mut Counters<'_>, node: Pin<&mut JobNode<T>>, outcome: Outcome) {
    let this = node.project();
    let (result, cancelled) = match outcome {
        Outcome::Completed(result) => (result, None),
        Outcome::Cancelled(e) => {
            trace::job_cancel(this.done.fence(), e);
            (Err(e), Some(e))
        }
    };
    this.done.signal(result);
    counters.leave(this.state, *this.credits);
    *this.state = JobState::Finished { cancelled };
}

/// Ends a running job with `outcome`: now if it was released, otherwise at its release, in
/// order. Either way its credits come back now: the hardware is done with it.
fn end<T: Backend>(
    counters: &mut Counters<'_>,
    node: Pin<&mut JobNode<T>>,
    outcome: Outcome,
    released: bool,
) {
    if released {
        finish(counters, node, outcome);
    } else {
        take_off_hardware(counters, node, JobState::Ended(outcome));
    }
}

/// Takes a running job off the hardware into `state`, which counts as waiting: `Ended`, until
/// its release, or `Waiting`, to run again. Its credits come back now.
fn take_off_hardware<T: Backend>(
    counters: &mut Counters<'_>,
    node: Pin<&mut JobNode<T>>,
    state: JobState<T>,
) {
    let this = node.project();
    counters.leave(this.state, *this.credits);
    *counters.waiting += 1;
    *this.state = state;
}

/// Drops the signalled dependencies of a waiting job, keeping the first error, and returns the
/// first one still pending.
fn next_dependency<T: Backend>(node: Pin<&mut JobNode<T>>) -> Option<ARef<DmaFence>> {
    let JobState::Waiting { deps, failed } = node.project().state else {
        return None;
    };
    while let Some(dep) = deps.last() {
        match dep.status() {
            None => return Some(dep.clone()),
            Some(result) => {
                if let Err(e) = result {
                    failed.get_or_insert(e);
                }
                deps.pop();
            }
        }
    }
    None
}

/// Arms `cb` on `fence`; returns `true` if the fence is still pending.
fn wait_on<T: Backend>(cb: &mut Option<Pin<KBox<DepCallback<T>>>>, fence: ARef<DmaFence>) -> bool {
    match cb.as_mut() {
        Some(cb) => cb.as_mut().arm(fence) == Armed::Waiting,
        // Taken only by teardown, and the run path does not get here on a dying queue: stop.
        None => true,
    }
}

/// The counters of a [`Proc`], borrowed apart from its jobs, and the queue's credits.
struct Counters<'a> {
    credits: &'a RingCredits,
    waiting: &'a mut u32,
    running: &'a mut u32,
}

impl Counters<'_> {
    /// Accounts for a job leaving `state`, giving back its credits unless its hooks did.
    ///
    /// A waiting run path that this wakes is run by whoever called this: a recovery, which
    /// kicks the run and retire work, or a dead or dying queue's end, which runs nothing more.
    fn leave<T: Backend>(&mut self, state: &JobState<T>, credits: u32) {
        match state {
            JobState::Waiting { .. } | JobState::Ended(_) => *self.waiting -= 1,
            JobState::Running { link, .. } => {
                *self.running -= 1;
                // INVARIANT: The job leaves `Running` with its credits given back: by its hooks
                // if it is `Following` (it leaves `Running` then only once its done fence has
                // signalled), here otherwise. Whoever called this runs the run path, as said
                // above.
                if *link != Link::Following {
                    let _ = self.credits.give_back(credits);
                }
            }
            JobState::Finished { .. } | JobState::Retired { .. } => {}
        }
    }
}

/// What one step of the run work did.
enum Step {
    /// There is no next job.
    Empty,
    /// The next job waits for a dependency or for credits. What it waits for runs the run path
    /// again: the dependency's callback kicks the run work; credits come back in the done
    /// fences' [`JobHooks`], which wake the retire work, which runs it, or in a recovery, which
    /// kicks it.
    Waits,
    /// The next job was handed to the hardware.
    Started,
    /// The next job ended without the hardware.
    Ended,
    /// The next job had run or ended already (a recovery moved the cursor back): go on to the
    /// one after it.
    Skipped,
    /// The dependency the next job waited for signalled meanwhile: look at it again.
    Again,
}

/// What one step of the release did.
enum Release {
    /// The job was released, or had been: go on to the next one.
    Next,
    /// The job ended without the hardware, and its done fence signalled now, in order.
    Finished,
    /// The release waits for a fence: its callback kicks the run work, which goes on.
    Waits,
    /// The fence the release would wait for signalled meanwhile: look at the job again.
    Again,
}

impl<T: Backend> Proc<T> {
    /// Removes the oldest job, finished, for its retirement; its credits are back (see [`Proc`]'s
    /// invariants).
    fn pop_oldest(&mut self, credits: &RingCredits) -> Option<Node<T>> {
        let mut node = self.jobs.pop_front()?;
        let (_, mut counters) = self.split(credits);
        let this = node.as_mut().project();
        counters.leave(this.state, *this.credits);
        if let JobState::Running { .. } = this.state {
            // Its done fence followed the hardware fence.
            *this.state = JobState::Finished { cancelled: None };
        }
        trace::job_done(this.done.fence());
        Some(node)
    }

    /// Counts the timeout of the oldest job, if it runs, from `now` at the latest: the job before
    /// it was just retired, so it started on the hardware by now (see [`Inner::oldest_running`]).
    /// While the timeout is paused its clock stands at `paused_at`, which the end of the pause
    /// moves on.
    fn restart_front(&mut self, now: Instant<Monotonic>) {
        let restart = match self.paused_at {
            Some(paused_at) if (paused_at - now).is_negative() => paused_at,
            _ => now,
        };
        let Some(node) = self.jobs.front_mut() else {
            return;
        };
        if let JobState::Running { started, .. } = node.as_mut().project().state {
            if (*started - restart).is_negative() {
                *started = restart;
            }
        }
    }

    /// Whether the run path and the deadline and timeout work leave the queue's jobs alone: it is
    /// stopped, dead or dying. The retire work still retires the jobs that finished.
    fn halted(&self) -> bool {
        self.stopped > 0 || self.life != Life::Alive
    }

    fn split<'a>(
        &'a mut self,
        credits: &'a RingCredits,
    ) -> (&'a mut JobRing<Node<T>>, Counters<'a>) {
        (
            &mut self.jobs,
            Counters {
                credits,
                waiting: &mut self.waiting,
                running: &mut self.running,
            },
        )
    }

    /// Detaches the done fences of the running jobs from their hardware fences.
    fn detach_running(&mut self) {
        for (_, node) in self.jobs.iter_mut() {
            let this = node.as_mut().project();
            if let JobState::Running { link, .. } = this.state {
                if *link == Link::Following && this.done.detach() {
                    *link = Link::Detached;
                }
            }
        }
    }

    /// Ends every job whose done fence has not signalled, in order: with the outcome it had
    /// already, successfully if its hardware fence signalled success, or with `error`.
    ///
    /// Only called once the hardware will not touch the queue's jobs again.
    fn finish_all(&mut self, credits: &RingCredits, error: Error) {
        self.detach_running();
        let (jobs, mut counters) = self.split(credits);
        for (_, node) in jobs.iter_mut() {
            let outcome = match &node.state {
                JobState::Waiting { failed, .. } => Outcome::Cancelled(failed.unwrap_or(error)),
                JobState::Ended(outcome) => *outcome,
                JobState::Running { hw, link, .. } if *link != Link::Following => {
                    match hw.status() {
                        Some(Ok(())) => Outcome::Completed(Ok(())),
                        // An error may come from the reset or the stop: `error` says why.
                        _ => Outcome::Cancelled(error),
                    }
                }
                // Signalled by its hardware fence.
                JobState::Running { .. } | JobState::Finished { .. } | JobState::Retired { .. } => {
                    continue
                }
            };
            finish(&mut counters, node.as_mut(), outcome);
        }
        self.last_released = None;
    }
}

impl<T: Backend> Inner<T> {
    /// Takes the queue's mutex, with every job submitted so far in [`Proc`].
    fn lock(&self) -> MutexGuard<'_, Proc<T>> {
        let mut proc = self.proc.lock();
        self.take_submitted(&mut proc);
        proc
    }

    /// Moves the submitted jobs into `proc`, whose mutex is held.
    fn take_submitted(&self, proc: &mut Proc<T>) {
        let (mut taken, spare) = {
            let mut submitted = self.submitted.lock();
            let mut spare = submitted.spare.take();
            if submitted.jobs.is_empty() && spare.is_none() {
                return;
            }
            let empty = match &mut spare {
                Some(spare) => core::mem::take(&mut spare.intake),
                None => core::mem::take(&mut proc.intake),
            };
            // INVARIANT: `empty` has room for `slots` jobs, and the ring of `spare`, if any, is
            // `Proc::jobs`' below, before the mutex is let go.
            (core::mem::replace(&mut submitted.jobs, empty), spare)
        };
        // The old buffers are freed here, in the signalling section the caller may be in:
        // freeing does not allocate.
        if let Some(spare) = spare {
            let replaced = proc.jobs.replace_slots(spare.slots);
            crate::warn_on!(replaced.is_err());
        }
        debug_assert!(proc.jobs.len() + taken.len() <= proc.jobs.capacity());
        let mut lost = RetiredJobs::new();
        for node in taken.drain_all() {
            let deps = match &node.state {
                JobState::Waiting { deps, .. } => deps.len(),
                _ => 0,
            };
            trace::job_queue(
                self.name,
                node.done.fence(),
                node.credits,
                deps,
                proc.waiting + 1,
                self.credits.in_use(),
            );
            let seqno = node.done.fence().seqno();
            // Every job holds a slot, so the ring has room (`Submitted`'s invariants), and the
            // jobs come in sequence number order: this fails only if the accounting is wrong.
            if let Err(mut node) = proc.jobs.push(seqno, node) {
                crate::warn_on!(true);
                node.as_mut().project().done.signal(Err(ECANCELED));
                lost.push(node);
                continue;
            }
            proc.waiting += 1;
        }
        if !lost.is_empty() {
            // Their done fences have signalled; they are not dropped here, in the signalling
            // section, but with the next retired jobs or at teardown.
            let mut submitted = self.submitted.lock();
            submitted.held -= lost.len;
            while let Some(node) = lost.pop() {
                submitted.retired.push(node);
            }
        }
        // INVARIANT: Empty again, with room for the jobs of the slots as of the spinlock section
        // above; if the slots grew since, `Submitted::spare` holds its replacement.
        proc.intake = taken;
    }

    /// Takes a slot for a new job: room for it in [`Submitted`] and in [`Proc`], so that neither
    /// its submission nor the queue's work allocates for it. When every slot is taken, doubles
    /// them, without the queue's mutex: the ring is replaced the next time the mutex is taken.
    pub(super) fn reserve_slot(&self) -> Result {
        let mut want = {
            let mut submitted = self.submitted.lock();
            if submitted.held < submitted.slots {
                submitted.held += 1;
                return Ok(());
            }
            submitted.slots * 2
        };
        loop {
            let mut jobs = KVVec::with_capacity(want, GFP_KERNEL)?;
            let mut spare = Some(SpareRoom {
                slots: JobRing::empty_slots(want, GFP_KERNEL)?,
                intake: KVVec::with_capacity(want, GFP_KERNEL)?,
            });
            let mut submitted = self.submitted.lock();
            if submitted.held < submitted.slots {
                // Another job's creation made room meanwhile.
                submitted.held += 1;
                drop(submitted);
                break;
            }
            if submitted.slots >= want {
                want = submitted.slots * 2;
                continue;
            }
            // `held <= slots < want`: this does not fail while the accounting is right.
            if submitted.jobs.len() >= want {
                drop(submitted);
                crate::warn_on!(true);
                return Err(ENOMEM);
            }
            for node in submitted.jobs.drain_all() {
                let pushed = jobs.push_within_capacity(node);
                debug_assert!(pushed.is_ok());
            }
            // INVARIANT: `jobs` and the two buffers of `spare` have room for `want` jobs, more
            // than are held with this one.
            core::mem::swap(&mut submitted.jobs, &mut jobs);
            core::mem::swap(&mut submitted.spare, &mut spare);
            submitted.slots = want;
            submitted.held += 1;
            drop(submitted);
            // The old buffers, emptied: freed without the spinlock, as they may be vmalloc()ed.
            drop(jobs);
            drop(spare);
            break;
        }
        Ok(())
    }

    /// Gives back the slot of a job, retired or dropped before its submission.
    pub(super) fn release_slot(&self) {
        self.submitted.lock().held -= 1;
    }

    /// Marks the queue dead (if it is not dying), with its mutex held: no job is submitted from
    /// now on, and the jobs submitted so far are in `proc`, for the caller to end.
    fn close(&self, proc: &mut Proc<T>) {
        if proc.life == Life::Alive {
            proc.life = Life::Dead;
        }
        // INVARIANT: The caller holds the mutex, and `Proc::life` is not `Life::Alive`.
        self.submitted.lock().closed = true;
        self.take_submitted(proc);
    }

    /// The queue's workqueue: its run, retire and deadline work run there.
    fn wq(&self) -> &FenceWorkqueue {
        self.credits.workqueue()
    }

    /// Allocates a callback that enqueues the queue's work item `ID` when its fence signals.
    ///
    /// One function for the three callbacks of [`Proc`], so that the symbols of the generic
    /// code it calls stay within `KSYM_NAME_LEN` for a backend defined in a doctest.
    fn new_callback<const ID: u64>(
        self: &Arc<Self>,
    ) -> Result<Pin<KBox<FenceCallback<EnqueueWork<Self, ID>>>>>
    where
        Self: WorkItem<ID, Pointer = Arc<Self>> + HasWork<Self, ID>,
    {
        let wq = self.credits.workqueue().clone();
        KBox::pin_init(
            FenceCallback::new(EnqueueWork::new(wq, self.clone())),
            GFP_KERNEL,
        )
    }

    fn kick_run(self: &Arc<Self>) {
        let _ = self.wq().enqueue::<Arc<Self>, RUN>(self.clone());
    }

    /// Queues the drop work, not on the queue's workqueue: a payload's `Drop` may wait for a job
    /// that the run work, behind it there, would hand on.
    fn kick_drop(self: &Arc<Self>) {
        let _ = self.drop_wq.enqueue::<Arc<Self>, DROP>(self.clone());
    }

    fn kick_retire(self: &Arc<Self>) {
        let _ = self.wq().enqueue::<Arc<Self>, RETIRE>(self.clone());
    }

    /// The run work: hands the jobs whose turn has come to the hardware, in order, and releases
    /// their done fences, in order.
    fn run_jobs(self: &Arc<Self>) {
        let _section = SignallingSection::begin();
        self.run_locked(self.lock());
    }

    /// [`Self::run_jobs`] with the mutex held.
    fn run_locked(self: &Arc<Self>, mut guard: MutexGuard<'_, Proc<T>>) {
        let proc = &mut *guard;
        // Set again below if the next job still waits for credits.
        proc.credit_wait = false;
        if proc.halted() {
            // Resuming kicks the run and retire work; a dead queue takes no job. No job finishes
            // meanwhile (the jobs on the hardware are detached, the ended ones wait for the
            // run), but in teardown, which retires every job.
            self.submitted.lock().run_waits = true;
            return;
        }
        let (mut started, mut finished) = (false, false);
        let (mut handled, mut more, mut waits) = (0, false, false);
        loop {
            finished |= self.release_jobs(proc);
            if handled == RUN_BATCH {
                more = true;
                break;
            }
            match self.run_one(proc) {
                Step::Empty => break,
                Step::Waits => {
                    waits = true;
                    break;
                }
                Step::Skipped | Step::Again => {}
                Step::Started => {
                    started = true;
                    handled += 1;
                }
                Step::Ended => handled += 1,
            }
        }
        let retire = Self::watch_retire(proc, finished);
        {
            let mut submitted = self.submitted.lock();
            submitted.run_waits = waits;
            // Submitted since this run took the jobs in, while `run_waits` told the submitter
            // not to kick the run work.
            more |= !waits && !submitted.jobs.is_empty();
        }
        drop(guard);
        if more {
            // Let the other paths have the lock, then go on.
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

    /// Returns whether the retire work needs a kick before the mutex goes, and then marks it
    /// busy: the queue has jobs, the retire work is not busy (then it gets to them in order), and
    /// the run path does not wait for credits (`credit_wait`: their return wakes the retire work)
    /// or it `finished` jobs, which should not wait for that return.
    fn watch_retire(proc: &mut Proc<T>, finished: bool) -> bool {
        if (proc.credit_wait && !finished) || proc.retire_busy || proc.jobs.len() == 0 {
            return false;
        }
        proc.retire_busy = true;
        true
    }

    /// Hands the job at `next_run` to the hardware if its dependencies have signalled and the
    /// ring has room for it.
    fn run_one(&self, proc: &mut Proc<T>) -> Step {
        let seqno = proc.next_run;
        let Some(node) = proc.jobs.get_mut(seqno) else {
            return Step::Empty;
        };
        if !matches!(node.state, JobState::Waiting { .. }) {
            // INVARIANT: The job is not waiting: `next_run` may move past it.
            proc.next_run += 1;
            return Step::Skipped;
        }
        if let Some(dep) = next_dependency(node.as_mut()) {
            if wait_on(&mut proc.dep_cb, dep) {
                return Step::Waits;
            }
            return Step::Again;
        }
        if let JobState::Waiting {
            failed: Some(e), ..
        } = node.state
        {
            // A dependency failed: the job does not run.
            // INVARIANT: Ended before `next_run` moves past it.
            *node.as_mut().project().state = JobState::Ended(Outcome::Cancelled(e));
            proc.next_run += 1;
            return Step::Ended;
        }
        let credits = node.credits;
        if !self.credits.take_or_wait(credits) {
            // The next return of credits wakes the retire work, which runs us.
            proc.credit_wait = true;
            return Step::Waits;
        }
        let hw = self.backend.run(JobRef::new(node.as_mut()));
        // INVARIANT: Every path below leaves the job `Ended`, with its credits given back, or
        // `Running` and holding them, before the mutex goes.
        proc.next_run += 1;
        // A job that is not on the hardware gives its credits back now. A waiting run path is us.
        let hw = match hw {
            Ok(hw) => hw,
            Err(e) => {
                let _ = self.credits.give_back(credits);
                *node.as_mut().project().state = JobState::Ended(Outcome::Cancelled(e));
                return Step::Ended;
            }
        };
        let hw_result = hw.status();
        if hw_result.is_none() {
            proc.waiting -= 1;
            proc.running += 1;
        } else {
            let _ = self.credits.give_back(credits);
        }
        trace::job_run(
            self.name,
            node.done.fence(),
            &hw,
            proc.waiting,
            self.credits.in_use(),
        );
        if let Some(result) = hw_result {
            // The hardware was done before `run` returned: the job ran, and its done fence
            // signals with the result at its release, after those of the jobs before it.
            *node.as_mut().project().state = JobState::Ended(Outcome::Completed(result));
            return Step::Ended;
        }
        *node.as_mut().project().state = JobState::Running {
            hw,
            started: Instant::now(),
            link: Link::Unreleased,
            deadline_told: NOT_TOLD,
        };
        // A deadline set while the job waited.
        self.tell_deadline(node.as_mut());
        Step::Started
    }

    /// Releases the done fences of the jobs that ran, in order: a running job's done fence
    /// follows its hardware fence, the done fence of a job that ended without the hardware
    /// signals once the done fence released before it has. Returns whether a job finished.
    fn release_jobs(&self, proc: &mut Proc<T>) -> bool {
        let mut finished = false;
        // INVARIANT: `next_release` only moves up to `next_run`.
        while proc.next_release < proc.next_run {
            match self.release_one(proc) {
                Release::Waits => break,
                Release::Again => continue,
                Release::Finished => finished = true,
                Release::Next => {}
            }
            proc.next_release += 1;
        }
        finished
    }

    /// Releases the job at `next_release`, which is below `next_run`.
    fn release_one(&self, proc: &mut Proc<T>) -> Release {
        let Some(node) = proc.jobs.get_mut(proc.next_release) else {
            return Release::Next;
        };
        match &node.state {
            JobState::Running {
                hw,
                link: Link::Unreleased,
                ..
            } => {
                let hw = hw.clone();
                let mut this = node.as_mut().project();
                if this.done.as_mut().follow(hw.clone()).is_err() {
                    // A hardware fence of too high a nesting level: the done fence cannot follow
                    // it from its signalling path. Wait for it here instead; the jobs behind
                    // wait for their release.
                    crate::pr_warn_once!(
                        "drm_jobqueue: {}: hardware fence of too high a nesting level\n",
                        self.name
                    );
                    if wait_on(&mut proc.release_cb, hw) {
                        return Release::Waits;
                    }
                    // It signalled meanwhile (its level now reads 0): follow it.
                    return Release::Again;
                }
                if let JobState::Running { link, .. } = this.state {
                    // INVARIANT: `Following` before `next_release` moves past it. Its hooks give
                    // its credits back from now on (already, if the hardware fence signalled).
                    *link = Link::Following;
                }
                proc.last_released = Some(this.done.fence().clone());
                Release::Next
            }
            JobState::Ended(outcome) => {
                // After the jobs before it, in order.
                let outcome = *outcome;
                if let Some(prev) = proc.last_released.clone() {
                    if prev.status().is_none() {
                        if wait_on(&mut proc.release_cb, prev) {
                            return Release::Waits;
                        }
                        return Release::Again;
                    }
                }
                let mut counters = Counters {
                    credits: &self.credits,
                    waiting: &mut proc.waiting,
                    running: &mut proc.running,
                };
                finish(&mut counters, node.as_mut(), outcome);
                proc.last_released = None;
                Release::Finished
            }
            // Released before a recovery moved the cursor back, or finished. A waiting job is not
            // between the cursors (`Proc`'s invariants).
            JobState::Running { .. }
            | JobState::Waiting { .. }
            | JobState::Finished { .. }
            | JobState::Retired { .. } => Release::Next,
        }
    }

    /// The retire work: removes finished jobs in order and hands them to the drop work, and runs
    /// the run path if it took jobs or if the run path waits for credits: a return of credits
    /// wakes this work then.
    fn retire(self: &Arc<Self>) {
        let now = Instant::<Monotonic>::now();
        loop {
            // Up to `RETIRE_BATCH` jobs per hold of the lock; the drop work drops them.
            let mut batch = [const { None }; RETIRE_BATCH];
            let (taken, idle, more) = {
                // For the run below: `Backend::run` is called in a signalling section.
                let _section = SignallingSection::begin();
                let mut guard = self.lock();
                let (taken, more) = self.take_finished(&mut guard, &mut batch, now);
                let idle = guard.jobs.len() == 0;
                if taken > 0 || guard.credit_wait {
                    // Jobs finished, their dependents may run; or credits came back: hand the
                    // next jobs to the hardware, in the same hold of the lock.
                    self.run_locked(guard);
                }
                (taken, idle, more)
            };
            if taken > 0 {
                self.hand_to_drop(&mut batch[..taken], idle);
            }
            if !more {
                break;
            }
        }
    }

    /// Takes the finished jobs at the front of `proc`, in order, into `batch`. Returns how many
    /// it took, and whether the batch is full, with more jobs that may have finished behind it.
    /// Otherwise it leaves the retire work idle: with the retire callback armed on the done fence
    /// of the oldest job, or, without jobs, without the callback or while the run path waits for
    /// credits (whose return wakes the retire work), with `retire_busy` cleared, so that whatever
    /// changes the oldest job kicks the retire work again.
    fn take_finished(
        &self,
        proc: &mut Proc<T>,
        batch: &mut [Option<Node<T>>; RETIRE_BATCH],
        now: Instant<Monotonic>,
    ) -> (usize, bool) {
        let mut taken = 0;
        while taken < RETIRE_BATCH {
            let Some(node) = proc.jobs.front_mut() else {
                proc.retire_busy = false;
                return (taken, false);
            };
            let signalled = node.done.fence().status().is_some();
            if !signalled || matches!(node.state, JobState::Waiting { .. } | JobState::Ended(_)) {
                let fence = node.done.fence().clone();
                // `node` is not used past this point, which ends its borrow of the jobs.
                let mut armed = false;
                if let (false, Some(cb)) = (proc.credit_wait, proc.retire_cb.as_mut()) {
                    if cb.as_mut().arm(fence) == Armed::RanNow {
                        continue;
                    }
                    armed = true;
                }
                proc.retire_busy = armed;
                return (taken, false);
            }
            let Some(node) = proc.pop_oldest(&self.credits) else {
                break;
            };
            batch[taken] = Some(node);
            taken += 1;
            proc.restart_front(now);
        }
        (taken, true)
    }

    /// Gives back the slots of the retired jobs of `batch` and hands them to the drop work: in
    /// batches while the queue has jobs (`idle` says it has none left), so that a ring that
    /// retires one job at a time does not wake a worker for each, and a tick later at most.
    fn hand_to_drop(self: &Arc<Self>, batch: &mut [Option<Node<T>>], idle: bool) {
        let (now, soon) = {
            let mut submitted = self.submitted.lock();
            submitted.held -= batch.len();
            // Otherwise the retired jobs before these have kicked the drop work or armed
            // `drop_soon`, and the drop work has not taken them yet.
            let first = submitted.retired.is_empty();
            for node in batch.iter_mut().filter_map(Option::take) {
                submitted.retired.push(node);
            }
            let now = idle || submitted.retired.len >= DROP_BATCH;
            (now, first && !now)
        };
        if now {
            self.kick_drop();
        } else if soon {
            let _ = self
                .drop_wq
                .enqueue_delayed::<Arc<Self>, DROP_SOON>(self.clone(), DROP_DELAY);
        }
    }

    /// The drop work: drops the retired jobs, in the order they were retired, in process
    /// context and off the queue's workqueue.
    fn drop_retired(&self) {
        let mut newest_first =
            core::mem::replace(&mut self.submitted.lock().retired, RetiredJobs::new());
        // The retire work adds the jobs it retires from now on to an empty list, and queues
        // this work again.
        let mut oldest_first = RetiredJobs::new();
        while let Some(node) = newest_first.pop() {
            oldest_first.push(node);
        }
        while let Some(node) = oldest_first.pop() {
            self.drop_job(node);
        }
    }

    /// Gives [`Backend::deadline`] the deadline of a job on the hardware, if it has one it was
    /// not given yet.
    fn tell_deadline(&self, mut node: Pin<&mut JobNode<T>>) {
        let Some(deadline) = node.done.deadline() else {
            return;
        };
        let JobState::Running { deadline_told, .. } = node.as_mut().project().state else {
            return;
        };
        if *deadline_told == deadline.as_nanos() {
            return;
        }
        *deadline_told = deadline.as_nanos();
        self.backend.deadline(JobRef::new(node), deadline);
    }

    /// The deadline work, woken by a deadline set on a done fence: tells the backend the new
    /// deadlines of the jobs on the hardware. Jobs that have not run yet are told when they
    /// run.
    fn tell_deadlines(self: &Arc<Self>) {
        let _section = SignallingSection::begin();
        let mut proc = self.lock();
        // A stopped queue's jobs are detached, in the middle of a reset: the resume wakes us.
        if proc.halted() {
            return;
        }
        for (_, node) in proc.jobs.iter_mut() {
            self.tell_deadline(node.as_mut());
        }
    }

    /// Waits for the jobs on the hardware to finish, at teardown: one timeout for all of them
    /// together, or [`TEARDOWN_TIMEOUT`] if the queue has none.
    fn wait_for_ring(&self) {
        let limit = self.timeout.unwrap_or(TEARDOWN_TIMEOUT);
        let start = Instant::<Monotonic>::now();
        while let Some(hw) = self.first_on_hardware() {
            let elapsed = start.elapsed();
            if elapsed >= limit || hw.wait_uninterruptible_timeout(limit - elapsed).is_err() {
                break;
            }
        }
    }

    /// Retires and drops every job, at teardown once [`Proc::finish_all`] has finished them, and
    /// leaves no work item of the queue pending.
    fn retire_all(&self) {
        // Stop the retire work for good, then drop what it retired.
        let retire_cb = self.lock().retire_cb.take();
        drop(retire_cb);
        self.retire_work.flush();
        // Runs `drop_soon` now if its timer is pending: it queues the drop work.
        self.drop_soon.flush();
        self.drop_work.flush();
        // The drop work has dropped what it was kicked for; jobs lost to a wrong accounting (see
        // `take_submitted`) may still be on the list.
        self.drop_retired();
        loop {
            // The guard goes at the end of the statement: the job is dropped without the lock.
            let Some(node) = self.lock().pop_oldest(&self.credits) else {
                break;
            };
            self.release_slot();
            self.drop_job(node);
        }
        self.run_work.flush();
        // No done fence of the queue wakes it any more: its proxies are gone with the jobs.
        self.deadline_work.flush();
        // A timeout handled while the queue started dying, or a run or retire that got past
        // their check before it did, may have armed the timeout after it was flushed above.
        // Nothing arms it any more: it returns at once if it fires now.
        self.timeout_work.flush();
    }

    /// Returns the hardware fence of the first job on the hardware that has not signalled.
    fn first_on_hardware(&self) -> Option<ARef<DmaFence>> {
        let proc = self.lock();
        // Bound to a local: the iterator borrows `proc`, so it must go before the guard does.
        let hw = proc.jobs.iter().find_map(|(_, node)| match &node.state {
            JobState::Running { hw, .. } if hw.status().is_none() => Some(hw.clone()),
            _ => None,
        });
        hw
    }

    /// Calls the cancelled hook if needed and drops a retired job, without the lock held.
    fn drop_job(&self, mut node: Pin<KBox<JobNode<T>>>) {
        if let Some(e) = node.state.cancelled() {
            self.backend.cancelled(JobRef::new(node.as_mut()), e);
        }
        drop(node);
    }
}

/// The counters of a [`JobQueue`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs submitted and not handed to the hardware yet, and jobs that have ended but whose
    /// done fence waits for the jobs before it.
    pub waiting: u32,
    /// Jobs handed to the hardware and not finished yet.
    pub running: u32,
    /// Credits taken and not given back yet, as of the read.
    pub credits_in_use: u32,
}

/// A job that [`JobQueue::submit`] refused, with the reason.
pub struct SubmitError<T: Backend> {
    /// `ENODEV` if the device is gone, `EINVAL` if the job belongs to another queue (`ENOMEM`,
    /// with a warning, only if the queue's accounting of its slots is wrong).
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
/// # Teardown
///
/// Dropping the queue:
///
/// 1. stops the run and timeout work and removes the queue's callbacks from the fences it was
///    waiting for, and leaves its reset domain: a reset of the queue's that the driver left to
///    complete later resumes the domain's other queues; no recovery applies to this queue's
///    jobs, not even the timed-out job's `-ETIMEDOUT`: they end as below;
/// 2. waits for the jobs on the ring to finish, at most one timeout for all of them together (10
///    seconds without a timeout);
/// 3. calls [`Backend::stop_hardware`];
/// 4. ends every job whose done fence has not signalled, in order: with the result it already
///    had, successfully if its hardware fence signalled success, and otherwise with
///    `-ECANCELED`;
/// 5. waits for the drop work, then retires the jobs left in the dropping thread:
///    [`Backend::cancelled`] where it applies, then the payload's `Drop`.
///
/// It must not be dropped from the queue's own workqueue, from a [`Backend`] method or from a
/// payload's `Drop`: teardown waits for the queue's work items.
pub struct JobQueue<T: Backend> {
    inner: Arc<Inner<T>>,
}

impl<T: Backend> JobQueue<T> {
    /// Creates a queue that runs its jobs through `backend`.
    ///
    /// Fails with `EINVAL` for a capacity of 0 or a done fence level of 0 or above
    /// [`MAX_NESTING_LEVEL`](crate::dma_fence::MAX_NESTING_LEVEL), and with `ENOMEM`.
    pub fn new(backend: T, options: QueueOptions) -> Result<Self> {
        Self::create(backend, options, None)
    }

    /// Creates a queue, like [`JobQueue::new`], that belongs to `domain`: it times out, stops
    /// and recovers with the other queues of the domain (see [`ResetDomain`]).
    pub fn new_in_domain(
        backend: T,
        options: QueueOptions,
        domain: &Arc<ResetDomain<T>>,
    ) -> Result<Self> {
        let queue = Self::create(backend, options, Some(domain.clone()))?;
        domain.add(queue.inner.clone())?;
        Ok(queue)
    }

    fn create(
        backend: T,
        options: QueueOptions,
        domain: Option<Arc<ResetDomain<T>>>,
    ) -> Result<Self> {
        if options.capacity == 0 {
            return Err(EINVAL);
        }
        let fence_ctx =
            NestedFenceContext::new(options.driver_name, options.name, options.done_fence_level)?;
        let wq = match options.workqueue {
            Some(wq) => wq,
            None => Arc::new(FenceWorkqueue::new_ordered(options.name)?, GFP_KERNEL)?,
        };
        let drop_wq = drop_wq()?;
        let ring = JobRing::new(INITIAL_SLOTS, GFP_KERNEL)?;
        let intake = KVVec::with_capacity(INITIAL_SLOTS, GFP_KERNEL)?;
        let submitted = KVVec::with_capacity(INITIAL_SLOTS, GFP_KERNEL)?;
        // INVARIANT: No slot is held, and the three have room for `INITIAL_SLOTS` jobs.
        let inner = Arc::pin_init(
            pin_init!(Inner {
                backend,
                name: options.name,
                credits: RingCredits::new(options.capacity, wq),
                timeout: options.timeout,
                pipeline_own: options.pipeline_own_dependencies,
                allow_zero_credits: options.allow_zero_credits,
                fault: Atomic::new(false),
                fence_ctx,
                drop_wq,
                domain,
                recovery <- Mutex::new((), RECOVERY_LOCK_NAME, recovery_lock_class()),
                proc <- Mutex::new(Proc {
                    jobs: ring,
                    intake,
                    next_run: 1,
                    next_release: 1,
                    last_released: None,
                    credit_wait: false,
                    waiting: 0,
                    running: 0,
                    stopped: 0,
                    timeout_paused: 0,
                    paused_at: None,
                    reset_later_job: None,
                    pending_recovery: Recovery::Continue,
                    pending_timed_out: None,
                    life: Life::Alive,
                    dep_cb: None,
                    release_cb: None,
                    retire_cb: None,
                    retire_busy: false,
                }, PROC_LOCK_NAME, proc_lock_class()),
                submitted <- SpinLock::new(Submitted {
                    jobs: submitted,
                    closed: false,
                    run_waits: false,
                    retired: RetiredJobs::new(),
                    held: 0,
                    slots: INITIAL_SLOTS,
                    spare: None,
                }, SUBMIT_LOCK_NAME, submit_lock_class()),
                run_work <- Work::new(RUN_WORK_NAME, run_work_class()),
                retire_work <- Work::new(RETIRE_WORK_NAME, retire_work_class()),
                timeout_work <- DelayedWork::new(
                    TIMEOUT_WORK_NAME,
                    timeout_work_class(),
                    TIMEOUT_TIMER_NAME,
                    timeout_timer_class(),
                ),
                fault_work <- Work::new(FAULT_WORK_NAME, fault_work_class()),
                deadline_work <- Work::new(DEADLINE_WORK_NAME, deadline_work_class()),
                drop_work <- Work::new(DROP_WORK_NAME, drop_work_class()),
                drop_soon <- DelayedWork::new(
                    DROP_SOON_NAME,
                    drop_soon_class(),
                    DROP_SOON_TIMER_NAME,
                    drop_soon_timer_class(),
                ),
            }),
            GFP_KERNEL,
        )?;
        // The callbacks hold references to `inner`: teardown drops them to break the cycle.
        let dep_cb = inner.new_callback()?;
        let release_cb = inner.new_callback()?;
        let retire_cb = inner.new_callback()?;
        {
            let mut proc = inner.lock();
            proc.dep_cb = Some(dep_cb);
            proc.release_cb = Some(release_cb);
            proc.retire_cb = Some(retire_cb);
        }
        Ok(Self { inner })
    }

    /// Creates a job taking `credits` on the ring, with the driver's `payload`.
    ///
    /// Allocates everything the job needs in the queue. Fails with `EINVAL` if `credits` is above
    /// the queue's capacity, or 0 without [`QueueOptions::allow_zero_credits`], and with
    /// `ENOMEM`.
    pub fn new_job(&self, credits: u32, payload: T::Job) -> Result<Job<T>> {
        Job::new(&self.inner, credits, payload)
    }

    /// Submits `job` and returns its done fence.
    ///
    /// Fails only before anything happened, handing the job back: with `EINVAL` if the job was
    /// created by another queue, with `ENODEV` if the device is gone ([`SubmitError::error`]).
    /// Past that point it cannot fail and does not allocate; the done fence signals exactly
    /// once. Jobs queue up while the queue is stopped. Never waits for the queue's other paths:
    /// the run work hands the job to [`Backend::run`] when its turn comes.
    pub fn submit(&self, job: Job<T>) -> Result<ARef<DmaFence>, SubmitError<T>> {
        if !Arc::ptr_eq(job.slot.queue(), &self.inner) {
            return Err(SubmitError { error: EINVAL, job });
        }
        let mut submitted = self.inner.submitted.lock();
        if submitted.closed {
            drop(submitted);
            return Err(SubmitError { error: ENODEV, job });
        }
        if submitted.jobs.len() >= submitted.jobs.capacity() {
            // The job's slot is room in `jobs` (`Submitted`'s invariants): only a wrong
            // accounting gets here.
            drop(submitted);
            crate::warn_on!(true);
            return Err(SubmitError { error: ENOMEM, job });
        }
        let Job {
            slot,
            credits,
            payload,
            mut deps,
            fence,
            node,
        } = job;
        // The job keeps its slot until it is retired.
        slot.keep();
        // Point of no return: the done fence exists from here on.
        let own = self.inner.fence_ctx.context();
        let pipeline_own = self.inner.pipeline_own;
        deps.retain(|d| d.status() != Some(Ok(())) && !(pipeline_own && d.context() == own));
        // The sequence number is taken with the spinlock held: `Submitted::jobs` fills in order.
        let done = self.inner.fence_ctx.init_fence(fence);
        let done_ref = done.to_aref();
        for dep in deps.iter() {
            trace::job_add_dep(&done_ref, dep);
        }
        let init = pin_init!(JobNode {
            payload,
            credits,
            state: JobState::Waiting { deps, failed: None },
            done <- ProxyFence::with_hooks(done, ReturnCredits::new(self.inner.clone(), *credits)),
        });
        let Ok(node) = KBox::write_pin_init(node, init);
        // Room was checked above, with the spinlock held.
        let pushed = submitted.jobs.push_within_capacity(node);
        debug_assert!(pushed.is_ok());
        let kick = !submitted.run_waits;
        drop(submitted);
        if kick {
            // The run work takes the job in, even if a holder of the mutex is past its last look
            // at `submitted`: a work item that is running is queued again. Otherwise the run path
            // waits, and the run that ends the wait runs this job too (`run_waits`).
            self.inner.kick_run();
        }
        Ok(done_ref)
    }

    /// Returns the queue's counters.
    pub fn stats(&self) -> QueueStats {
        let proc = self.inner.lock();
        QueueStats {
            waiting: proc.waiting,
            running: proc.running,
            credits_in_use: self.inner.credits.in_use(),
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
}

impl<T: Backend> Drop for JobQueue<T> {
    /// The steps of [Teardown](JobQueue#teardown).
    fn drop(&mut self) {
        let inner = &self.inner;
        // 1. No more work: the run and timeout work return early from now on, and no dependency
        // wakes them.
        let (dep_cb, release_cb) = {
            let mut proc = inner.lock();
            proc.life = Life::Dying;
            (proc.dep_cb.take(), proc.release_cb.take())
        };
        drop(dep_cb);
        drop(release_cb);
        // The domain's timeouts no longer see the queue; a reset of ours the driver left
        // pending resumes the domain.
        if let Some(domain) = &inner.domain {
            domain.remove(inner);
        }
        inner.run_work.flush();
        inner.timeout_work.flush();
        inner.fault_work.flush();

        // 2. One timeout for the jobs on the ring.
        inner.wait_for_ring();
        // 3. The backend stops the ring for good: the hardware fences that have not signalled
        // never will, and the jobs can end.
        inner.backend.stop_hardware();
        // 4. The jobs left end.
        {
            let _section = SignallingSection::begin();
            inner.lock().finish_all(&inner.credits, ECANCELED);
        }
        // 5. They are retired and dropped.
        inner.retire_all();
    }
}

#[cfg(CONFIG_DRM_JOBQUEUE_KUNIT_TEST)]
#[kunit_tests(drm_jobqueue_memory)]
mod tests {
    use super::*;
    use crate::drm::jobqueue::TimeoutAction;

    /// A backend whose jobs carry 32 bytes, as the benchmark's do.
    struct Payload32;

    impl Backend for Payload32 {
        type Job = [u64; 4];

        fn run(&self, _job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
            Err(ENODEV)
        }

        fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction {
            TimeoutAction::NoHang
        }

        fn stop_hardware(&self) {}
    }

    #[test]
    fn node_size() {
        // With a 32-byte payload, a job's node is a kmalloc-192 object: the queue keeps at most
        // 160 bytes per job besides the payload and the done fence.
        let size = core::mem::size_of::<JobNode<Payload32>>();
        pr_info!("drm_jobqueue: a job's node with a 32-byte payload: {size} bytes\n");
        assert!(size <= 192);
    }
}
