// SPDX-License-Identifier: GPL-2.0

//! A stress run of the DRM job queue, for `harness/run stress [minutes]`.
//!
//! Sixteen queues (eight sharing one unbound fence workqueue, eight with their own ordered one)
//! run on mock hardware rings that complete jobs in order from hardirq (an hrtimer), each ring at
//! its own pace, so that queues complete out of order with respect to each other. Four submitters
//! (work items) build random dependency graphs across the queues, on plain C fences made with
//! `dma_fence_init()` and on `dma_fence_array`s of other fences; the rings inject hardware errors
//! and hangs, the backend resets rings in every way [`TimeoutAction`] allows, and a controller
//! (the module's init) stops and resumes queues while their hardware completes, completes
//! deferred resets, signals the C fences (some with an error) and tears queues down under load.
//!
//! Everything is checked by counters, not timestamps: a job run before one of its dependencies
//! signalled, or despite the failure of the dependency that stands for its context, a done fence
//! signalled out of order within its queue, a ring holding more credits than its capacity, a job
//! cancelled twice; and at the end every fence made (done, hardware, C and array fences) must have
//! signalled exactly once and every payload must have been dropped. The init prints the figures
//! as `jq-stress:` lines, then returns: the post-test init then unloads the module.

use core::mem::MaybeUninit;
use kernel::{
    bindings,
    dma_fence::{
        DmaFence,
        FenceAllocation,
        FenceContext,
        FenceWorkqueue,
        UniqueFence, //
    },
    drm::jobqueue::{
        Backend,
        JobQueue,
        JobRef,
        QueueOptions,
        Recovery,
        SubmitError,
        TimeoutAction, //
    },
    impl_has_hr_timer,
    new_spinlock,
    new_spinlock_irq,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{
            ordering,
            Atomic, //
        },
        Arc,
        ArcBorrow,
        SpinLock,
        SpinLockIrq, //
    },
    time::{
        delay::fsleep,
        hrtimer::{
            ArcHrTimerHandle,
            HrTimer,
            HrTimerCallback,
            HrTimerCallbackContext,
            HrTimerPointer,
            HrTimerRestart,
            RelativeMode, //
        },
        Delta,
        Instant,
        Monotonic, //
    },
    workqueue::OwnedQueue, //
};

// Fails the `n`-th allocation of the running task from now on, until disarmed. `GFP_KERNEL`
// allocations count only while failslab's `ignore-gfp-wait` is off, as harness/initramfs-init
// sets it for the stress run.
#[cfg(CONFIG_FAULT_INJECTION)]
use kernel::fault_inject::FailNth;

module! {
    type: JqStress,
    name: "jq_stress",
    authors: ["Rust DRM job queue authors"],
    description: "harness: stress run of the DRM job queue",
    license: "GPL",
    params: {
        seconds: u32 {
            default: 60,
            description: "How long to submit jobs, in seconds",
        },
        seed: u64 {
            default: 0x2545_f491_4f6c_dd1d,
            description: "Seed of the random choices",
        },
    },
}

/// Queues sharing one workqueue, then as many with their own.
const SHARED: usize = 8;
const QUEUES: usize = 2 * SHARED;
const SUBMITTERS: usize = 4;
/// Fences kept for later jobs to depend on.
const POOL: usize = 64;
/// C fences pending at most.
const C_PENDING: usize = 32;
/// Jobs completed per timer expiry at most.
const BATCH: usize = 16;
const TIMEOUT: Delta = Delta::from_millis(200);

static NAMES: [&CStr; QUEUES] = [
    c"stress-s0",
    c"stress-s1",
    c"stress-s2",
    c"stress-s3",
    c"stress-s4",
    c"stress-s5",
    c"stress-s6",
    c"stress-s7",
    c"stress-o0",
    c"stress-o1",
    c"stress-o2",
    c"stress-o3",
    c"stress-o4",
    c"stress-o5",
    c"stress-o6",
    c"stress-o7",
];
static CAPACITY: [u32; QUEUES] = [1, 2, 3, 4, 6, 8, 12, 16, 1, 2, 3, 4, 6, 8, 12, 16];

/// A counter of the run.
struct Counter(Atomic<u64>);

impl Counter {
    const fn new() -> Self {
        Self(Atomic::new(0))
    }

    fn inc(&self) {
        self.0.add(1, ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(ordering::Relaxed)
    }
}

/// Every counter of the run; module statics, so that fence callbacks reach them.
struct Counters {
    payloads_made: Counter,
    payloads_dropped: Counter,
    submitted: Counter,
    refused: Counter,
    runs: Counter,
    reruns: Counter,
    completed_in_run: Counter,
    cancelled: Counter,
    // Injected faults.
    inj_hw_error: Counter,
    inj_hang: Counter,
    inj_run_error: Counter,
    inj_c_error: Counter,
    /// Submissions whose building was given an allocation failure (`fail_nth`), those where it
    /// fired, and those that then ended with `ENOMEM`.
    inj_alloc_armed: Counter,
    inj_alloc_fired: Counter,
    inj_alloc_enomem: Counter,
    // What the backend and the controller did.
    hangs_hit: Counter,
    timeouts: Counter,
    no_hang: Counter,
    reset_resubmit: Counter,
    reset_cancel: Counter,
    reset_continue: Counter,
    reset_later: Counter,
    reset_done: Counter,
    device_gone: Counter,
    stops: Counter,
    resume_continue: Counter,
    resume_resubmit: Counter,
    resume_cancel: Counter,
    queues_made: Counter,
    teardowns: Counter,
    // Fences: made and signalled, per kind.
    hw_made: Counter,
    hw_signalled: Counter,
    done_made: Counter,
    done_signalled: Counter,
    c_made: Counter,
    c_signalled: Counter,
    array_made: Counter,
    array_signalled: Counter,
    dep_edges: Counter,
    // Done fences by result.
    done_ok: Counter,
    done_eio: Counter,
    done_etimedout: Counter,
    done_ecanceled: Counter,
    done_enodev: Counter,
    done_epipe: Counter,
    done_enospc: Counter,
    done_other: Counter,
    // Invariant violations.
    v_dep_unsignalled: Counter,
    v_dep_failed_ran: Counter,
    v_run_order: Counter,
    v_done_order: Counter,
    /// Not a violation: the callbacks of two done fences of a queue ran in the other order.
    cb_out_of_order: Counter,
    v_ring_credits: Counter,
    v_queue_credits: Counter,
    v_cancelled_twice: Counter,
    v_unsignalled_at_teardown: Counter,
}

static C: Counters = Counters {
    payloads_made: Counter::new(),
    payloads_dropped: Counter::new(),
    submitted: Counter::new(),
    refused: Counter::new(),
    runs: Counter::new(),
    reruns: Counter::new(),
    completed_in_run: Counter::new(),
    cancelled: Counter::new(),
    inj_hw_error: Counter::new(),
    inj_hang: Counter::new(),
    inj_run_error: Counter::new(),
    inj_c_error: Counter::new(),
    inj_alloc_armed: Counter::new(),
    inj_alloc_fired: Counter::new(),
    inj_alloc_enomem: Counter::new(),
    hangs_hit: Counter::new(),
    timeouts: Counter::new(),
    no_hang: Counter::new(),
    reset_resubmit: Counter::new(),
    reset_cancel: Counter::new(),
    reset_continue: Counter::new(),
    reset_later: Counter::new(),
    reset_done: Counter::new(),
    device_gone: Counter::new(),
    stops: Counter::new(),
    resume_continue: Counter::new(),
    resume_resubmit: Counter::new(),
    resume_cancel: Counter::new(),
    queues_made: Counter::new(),
    teardowns: Counter::new(),
    hw_made: Counter::new(),
    hw_signalled: Counter::new(),
    done_made: Counter::new(),
    done_signalled: Counter::new(),
    c_made: Counter::new(),
    c_signalled: Counter::new(),
    array_made: Counter::new(),
    array_signalled: Counter::new(),
    dep_edges: Counter::new(),
    done_ok: Counter::new(),
    done_eio: Counter::new(),
    done_etimedout: Counter::new(),
    done_ecanceled: Counter::new(),
    done_enodev: Counter::new(),
    done_epipe: Counter::new(),
    done_enospc: Counter::new(),
    done_other: Counter::new(),
    v_dep_unsignalled: Counter::new(),
    v_dep_failed_ran: Counter::new(),
    v_run_order: Counter::new(),
    v_done_order: Counter::new(),
    cb_out_of_order: Counter::new(),
    v_ring_credits: Counter::new(),
    v_queue_credits: Counter::new(),
    v_cancelled_twice: Counter::new(),
    v_unsignalled_at_teardown: Counter::new(),
};

/// Set when the submitters must stop.
static STOP: Atomic<bool> = Atomic::new(false);
/// Submitters still running.
static RUNNING: Atomic<u32> = Atomic::new(0);

/// A small random number generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }

    /// Returns a number below `n`, or 0 if `n` is 0.
    fn below(&mut self, n: u32) -> u32 {
        self.next().checked_rem(n).unwrap_or(0)
    }

    fn one_in(&mut self, n: u32) -> bool {
        self.below(n) == 0
    }
}

/// What the mock hardware does with a job.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Complete,
    Fail,
    Hang,
}

/// A job on a mock ring.
struct HwEntry {
    fence: UniqueFence,
    deadline: Instant<Monotonic>,
    behaviour: Behaviour,
    credits: u32,
}

struct RingState {
    fifo: KVec<HwEntry>,
    /// The timer is armed or its callback runs, or the ring is hung.
    busy: bool,
    hung: bool,
    credits: u32,
    capacity: u32,
    /// When the last job pushed completes.
    last_deadline: Instant<Monotonic>,
    /// Stopped for good by `stop_hardware()`.
    dead: bool,
    /// `timed_out()` returned `ResetLater`: the controller resets the ring.
    reset_pending: bool,
    /// `timed_out()` returned `DeviceGone`: the controller replaces the queue.
    gone: bool,
}

/// A mock hardware ring: completes its jobs in order, at their deadlines, from an hrtimer.
#[pin_data]
struct Ring {
    #[pin]
    timer: HrTimer<Self>,
    hw: FenceContext,
    #[pin]
    state: SpinLockIrq<RingState>,
    #[pin]
    handle: SpinLockIrq<Option<ArcHrTimerHandle<Ring>>>,
    /// Jobs put on the ring whose fence has not signalled yet (they leave `fifo` before).
    unsignalled: Atomic<u32>,
}

impl_has_hr_timer! {
    impl HasHrTimer<Self> for Ring {
        mode: RelativeMode<Monotonic>, field: self.timer
    }
}

impl HrTimerCallback for Ring {
    type Pointer<'a> = Arc<Self>;

    fn run(this: ArcBorrow<'_, Self>, mut ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        let now = Instant::<Monotonic>::now();
        let mut out: [Option<HwEntry>; BATCH] = core::array::from_fn(|_| None);
        let next = {
            let mut st = this.state.lock();
            if st.dead {
                st.busy = false;
                return HrTimerRestart::NoRestart;
            }
            let mut n = 0;
            loop {
                let (deadline, hang) = match st.fifo.first() {
                    None => {
                        st.busy = false;
                        break None;
                    }
                    Some(e) => (e.deadline, e.behaviour == Behaviour::Hang),
                };
                let left = deadline - now;
                if left > Delta::ZERO {
                    break Some(left);
                }
                if hang {
                    // Stalled until a reset; `busy` stays set.
                    if !st.hung {
                        C.hangs_hit.inc();
                    }
                    st.hung = true;
                    break None;
                }
                if n == BATCH {
                    break Some(Delta::from_micros(1));
                }
                let Ok(entry) = st.fifo.remove(0) else {
                    break None;
                };
                st.credits -= entry.credits;
                out[n] = Some(entry);
                n += 1;
            }
        };
        for entry in out.iter_mut().filter_map(Option::take) {
            let result = if entry.behaviour == Behaviour::Fail {
                Err(EIO)
            } else {
                Ok(())
            };
            entry.fence.signal(result);
            C.hw_signalled.inc();
            this.unsignalled.fetch_sub(1, ordering::Release);
        }
        match next {
            Some(delta) => {
                ctx.forward_now(delta.max(Delta::from_micros(1)));
                HrTimerRestart::Restart
            }
            None => HrTimerRestart::NoRestart,
        }
    }
}

impl Ring {
    fn new(capacity: u32) -> Result<Arc<Self>> {
        let mut fifo = KVec::new();
        fifo.reserve(capacity as usize, GFP_KERNEL)?;
        Arc::pin_init(
            pin_init!(Self {
                timer <- HrTimer::new(),
                hw: FenceContext::new(c"jq_stress", c"stress-hw"),
                state <- new_spinlock_irq!(RingState {
                    fifo,
                    busy: false,
                    hung: false,
                    credits: 0,
                    capacity,
                    last_deadline: Instant::<Monotonic>::now(),
                    dead: false,
                    reset_pending: false,
                    gone: false,
                }),
                handle <- new_spinlock_irq!(None),
                unsignalled: Atomic::new(0),
            }),
            GFP_KERNEL,
        )
    }

    /// Starts the timer to fire in `delta`.
    fn kick(self: &Arc<Self>, delta: Delta) {
        // Dropping the previous handle waits for a callback that is still returning.
        let old = self.handle.lock().take();
        drop(old);
        let handle = self.clone().start(delta);
        *self.handle.lock() = Some(handle);
    }

    /// Puts a job on the ring, to complete `duration` after the job before it.
    fn push(
        self: &Arc<Self>,
        fence: UniqueFence,
        duration: Delta,
        behaviour: Behaviour,
        credits: u32,
    ) -> Result {
        let now = Instant::<Monotonic>::now();
        let start = {
            let mut st = self.state.lock();
            if st.dead || st.gone {
                drop(st);
                fence.signal(Err(ENODEV));
                C.hw_signalled.inc();
                return Err(ENODEV);
            }
            st.credits += credits;
            if st.credits > st.capacity {
                C.v_ring_credits.inc();
            }
            let after = if st.last_deadline - now > Delta::ZERO {
                st.last_deadline
            } else {
                now
            };
            let deadline = after + duration;
            st.last_deadline = deadline;
            let entry = HwEntry {
                fence,
                deadline,
                behaviour,
                credits,
            };
            if let Err(e) = st.fifo.push_within_capacity(entry) {
                // Only possible with more jobs than credits on the ring, counted above.
                st.credits -= credits;
                drop(st);
                e.0.fence.signal(Err(ENOSPC));
                C.hw_signalled.inc();
                return Err(ENOSPC);
            }
            self.unsignalled.add(1, ordering::Relaxed);
            !core::mem::replace(&mut st.busy, true)
        };
        if start {
            self.kick(duration);
        }
        Ok(())
    }

    /// Signals every job on the ring with `-ECANCELED` and leaves it idle: a reset.
    fn reset(&self) {
        let old = self.handle.lock().take();
        drop(old);
        loop {
            let entry = {
                let mut st = self.state.lock();
                match st.fifo.remove(0) {
                    Ok(e) => {
                        st.credits -= e.credits;
                        Some(e)
                    }
                    Err(_) => {
                        st.busy = false;
                        st.hung = false;
                        None
                    }
                }
            };
            match entry {
                Some(e) => {
                    e.fence.signal(Err(ECANCELED));
                    C.hw_signalled.inc();
                    self.unsignalled.fetch_sub(1, ordering::Release);
                }
                None => break,
            }
        }
    }

    /// Drops the hung job at the head of the ring and lets the ring go on.
    fn skip_head(self: &Arc<Self>) {
        let old = self.handle.lock().take();
        drop(old);
        let (entry, next) = {
            let mut st = self.state.lock();
            let Ok(entry) = st.fifo.remove(0) else {
                st.busy = false;
                st.hung = false;
                return;
            };
            st.credits -= entry.credits;
            st.hung = false;
            let next = st.fifo.first().map(|e| e.deadline);
            st.busy = next.is_some();
            (entry, next)
        };
        entry.fence.signal(Err(ECANCELED));
        C.hw_signalled.inc();
        self.unsignalled.fetch_sub(1, ordering::Release);
        if let Some(deadline) = next {
            let now = Instant::<Monotonic>::now();
            self.kick((deadline - now).max(Delta::from_micros(1)));
        }
    }

    /// Stops the ring for good without completing its jobs (their fences signal at `reset`).
    fn kill(&self) {
        self.state.lock().dead = true;
        let old = self.handle.lock().take();
        drop(old);
    }

    /// Returns whether every job put on the ring has signalled. Only `run` adds jobs, one at a
    /// time per queue.
    fn idle(&self) -> bool {
        let st = self.state.lock();
        !st.dead && !st.gone && self.unsignalled.load(ordering::Acquire) == 0
    }

    /// Returns whether `fence` is the hung job at the head of the ring.
    fn hung_on(&self, fence: &DmaFence) -> bool {
        let st = self.state.lock();
        st.hung
            && st
                .fifo
                .first()
                .is_some_and(|e| e.fence.as_raw() == fence.as_raw())
    }
}

/// The driver's data of a job.
struct StressJob {
    duration: Delta,
    behaviour: Behaviour,
    run_error: Option<Error>,
    hw_alloc: Option<FenceAllocation>,
    /// The job's dependencies; `true` for those that stand for their context (the latest one
    /// of it), whose failure must keep the job from running.
    check: KVec<(ARef<DmaFence>, bool)>,
    /// The hardware fence of the last run.
    hw: Option<ARef<DmaFence>>,
    runs: u32,
    cancelled: u32,
}

impl StressJob {
    fn new(duration: Delta) -> Result<Self> {
        let hw_alloc = Some(FenceAllocation::new(GFP_KERNEL)?);
        C.payloads_made.inc();
        Ok(Self {
            duration,
            behaviour: Behaviour::Complete,
            run_error: None,
            hw_alloc,
            check: KVec::new(),
            hw: None,
            runs: 0,
            cancelled: 0,
        })
    }
}

impl Drop for StressJob {
    fn drop(&mut self) {
        C.payloads_dropped.inc();
    }
}

/// The backend of a stress queue.
struct StressBackend {
    ring: Arc<Ring>,
    /// The seqno of the last job run for the first time.
    last_run: Atomic<u64>,
    /// The state of the random choices of `timed_out`.
    rng: Atomic<u64>,
}

impl Backend for StressBackend {
    type Job = StressJob;

    fn run(&self, mut job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
        C.runs.inc();
        let seqno = job.done_fence().seqno();
        if job.runs == 0 {
            if self.last_run.xchg(seqno, ordering::Relaxed) >= seqno {
                C.v_run_order.inc();
            }
        } else {
            C.reruns.inc();
        }
        job.runs += 1;
        for (dep, decisive) in job.check.iter() {
            match dep.status() {
                None => C.v_dep_unsignalled.inc(),
                Some(Err(_)) if *decisive => C.v_dep_failed_ran.inc(),
                Some(_) => {}
            }
        }
        if let Some(e) = job.run_error {
            return Err(e);
        }
        let alloc = match job.hw_alloc.take() {
            Some(alloc) => alloc,
            None => FenceAllocation::new(GFP_NOWAIT)?,
        };
        let fence = self.ring.hw.init_fence(alloc);
        C.hw_made.inc();
        let hw = fence.to_aref();
        job.hw = Some(hw.clone());
        let credits = job.credits();
        let (duration, behaviour) = (job.duration, job.behaviour);
        if duration.is_zero() && behaviour == Behaviour::Complete && self.ring.idle() {
            // Done by the time `run` returns. Only on an idle ring: the hardware completes the
            // jobs of a ring in order, and the queue relies on it.
            fence.signal(Ok(()));
            C.hw_signalled.inc();
            C.completed_in_run.inc();
            return Ok(hw);
        }
        self.ring.push(fence, duration, behaviour, credits)?;
        Ok(hw)
    }

    fn timed_out(&self, mut job: JobRef<'_, Self>) -> TimeoutAction {
        C.timeouts.inc();
        let hung = job.hw.as_ref().is_some_and(|hw| self.ring.hung_on(hw));
        if !hung {
            // Slow, not hung (QEMU on a busy host).
            C.no_hang.inc();
            return TimeoutAction::NoHang;
        }
        // A job that hung once completes when run again.
        job.behaviour = Behaviour::Complete;
        let mut rng = Rng(self.rng.load(ordering::Relaxed));
        let choice = rng.below(100);
        self.rng.store(rng.0, ordering::Relaxed);
        match choice {
            0..40 => {
                C.reset_resubmit.inc();
                self.ring.reset();
                TimeoutAction::Reset(Recovery::Resubmit)
            }
            40..55 => {
                C.reset_cancel.inc();
                self.ring.reset();
                TimeoutAction::Reset(Recovery::Cancel(ECANCELED))
            }
            55..75 => {
                C.reset_continue.inc();
                self.ring.skip_head();
                TimeoutAction::Reset(Recovery::Continue)
            }
            75..95 => {
                C.reset_later.inc();
                self.ring.state.lock().reset_pending = true;
                TimeoutAction::ResetLater
            }
            _ => {
                C.device_gone.inc();
                self.ring.state.lock().gone = true;
                self.ring.reset();
                TimeoutAction::DeviceGone
            }
        }
    }

    fn stop_hardware(&self) {
        self.ring.kill();
    }

    fn cancelled(&self, mut job: JobRef<'_, Self>, _error: Error) {
        C.cancelled.inc();
        job.cancelled += 1;
        if job.cancelled > 1 {
            C.v_cancelled_twice.inc();
        }
    }
}

/// Done fences kept per queue for the order check: more than a queue ever has outstanding.
const WINDOW: usize = 64;

/// The order and count of one queue's done fences.
#[pin_data]
struct OrderState {
    /// The highest seqno whose callback ran, for the count of callbacks that ran out of order.
    last: Atomic<u64>,
    tracked: Atomic<u64>,
    signalled: Atomic<u64>,
    /// The latest done fences, at their seqno modulo [`WINDOW`].
    #[pin]
    window: SpinLockIrq<[Option<ARef<DmaFence>>; WINDOW]>,
}

impl OrderState {
    fn new() -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Self {
                last: Atomic::new(0),
                tracked: Atomic::new(0),
                signalled: Atomic::new(0),
                window <- new_spinlock_irq!(core::array::from_fn(|_| None)),
            }),
            GFP_KERNEL,
        )
    }

    /// Keeps `done` for the order check of the fence after it.
    fn keep(&self, done: &ARef<DmaFence>) {
        let i = (done.seqno() % WINDOW as u64) as usize;
        let old = self.window.lock()[i].replace(done.clone());
        // Dropped without the lock: the last reference frees the fence.
        drop(old);
    }

    /// Records that the done fence `seqno` has signalled, and checks that the one before it has
    /// (from its flag: callbacks of different fences may run in any order).
    fn signalled(&self, seqno: u64) {
        self.signalled.add(1, ordering::Relaxed);
        let previous = seqno - 1;
        let window = self.window.lock();
        if let Some(prev) = &window[(previous % WINDOW as u64) as usize] {
            // SAFETY: `prev` is a valid fence; testing its flag takes no lock.
            let prev_signalled = unsafe { bindings::dma_fence_test_signaled_flag(prev.as_raw()) };
            if prev.seqno() == previous && !prev_signalled {
                C.v_done_order.inc();
            }
        }
        drop(window);
        let last = self.last.xchg(seqno, ordering::Relaxed);
        if last > seqno {
            C.cb_out_of_order.inc();
        }
    }
}

/// What a tracked fence is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Done,
    CFence,
    Array,
}

/// A C callback that counts a fence's signal.
#[repr(C)]
struct SignalCb {
    cb: bindings::dma_fence_cb,
    kind: Kind,
    seqno: u64,
    order: Option<Arc<OrderState>>,
}

/// Counts the signal of the fence of `cb`, whose error is `error`.
fn record(cb: &SignalCb, error: i32) {
    match cb.kind {
        Kind::Done => {
            C.done_signalled.inc();
            if let Some(order) = &cb.order {
                order.signalled(cb.seqno);
            }
            let counter = match -error {
                0 => &C.done_ok,
                e if e == EIO.to_errno().abs() => &C.done_eio,
                e if e == ETIMEDOUT.to_errno().abs() => &C.done_etimedout,
                e if e == ECANCELED.to_errno().abs() => &C.done_ecanceled,
                e if e == ENODEV.to_errno().abs() => &C.done_enodev,
                e if e == EPIPE.to_errno().abs() => &C.done_epipe,
                e if e == ENOSPC.to_errno().abs() => &C.done_enospc,
                _ => &C.done_other,
            };
            counter.inc();
        }
        Kind::CFence => C.c_signalled.inc(),
        Kind::Array => C.array_signalled.inc(),
    }
}

/// # Safety
///
/// Called by the C side once, for a `cb` that is the first field of a [`SignalCb`] leaked by
/// [`track`], on the fence it was added to.
unsafe extern "C" fn signal_cb(fence: *mut bindings::dma_fence, cb: *mut bindings::dma_fence_cb) {
    // SAFETY: `cb` is the first field of a `repr(C)` `SignalCb` that `track` leaked from a
    // `KBox` and handed to this callback, which runs once: it owns the box again.
    let this = unsafe { KBox::from_raw(cb.cast::<SignalCb>()) };
    // SAFETY: The fence is valid while its callbacks run; its error is final once signalled.
    let error = unsafe { (*fence).error };
    record(&this, error);
}

/// Counts `fence` as made, and its signal when it comes.
fn track(fence: &DmaFence, kind: Kind, order: Option<&Arc<OrderState>>) -> Result {
    let cb = KBox::new(
        SignalCb {
            // SAFETY: All-zero is a valid `dma_fence_cb`; `dma_fence_add_callback()`
            // initialises it.
            cb: unsafe { core::mem::zeroed() },
            kind,
            seqno: fence.seqno(),
            order: order.cloned(),
        },
        GFP_KERNEL,
    )?;
    match kind {
        Kind::Done => C.done_made.inc(),
        Kind::CFence => C.c_made.inc(),
        Kind::Array => C.array_made.inc(),
    }
    if let Some(order) = order {
        order.tracked.add(1, ordering::Relaxed);
    }
    let raw = KBox::into_raw(cb);
    // SAFETY: The fence is valid; `raw` points to a `SignalCb` whose `cb` is its first field,
    // which stays allocated until the callback ran (it frees it) or was refused (freed below).
    let ret = unsafe {
        bindings::dma_fence_add_callback(
            fence.as_raw(),
            raw.cast::<bindings::dma_fence_cb>(),
            Some(signal_cb),
        )
    };
    if ret != 0 {
        // SAFETY: The callback was not added (the fence has signalled): the box is ours again.
        let this = unsafe { KBox::from_raw(raw) };
        let error = match fence.status() {
            Some(Err(e)) => e.to_errno(),
            _ => 0,
        };
        record(&this, error);
    }
    Ok(())
}

/// `struct dma_fence_ops` of the fences made with the C API.
static C_OPS: bindings::dma_fence_ops = bindings::dma_fence_ops {
    get_driver_name: Some(c_name),
    get_timeline_name: Some(c_name),
    enable_signaling: None,
    signaled: None,
    wait: None,
    release: None,
    set_deadline: None,
};

/// # Safety
///
/// Called by the C side with a valid fence; the fence is not used.
unsafe extern "C" fn c_name(_fence: *mut bindings::dma_fence) -> *const c_char {
    c"jq_stress-c".as_char_ptr()
}

/// Makes a pending fence with the C API, on a context of its own.
fn c_fence() -> Result<ARef<DmaFence>> {
    let mem = KBox::<MaybeUninit<bindings::dma_fence>>::new_uninit(GFP_KERNEL)?;
    let raw = KBox::into_raw(mem).cast::<bindings::dma_fence>();
    // SAFETY: `raw` is a kmalloc'ed fence, freed by `dma_fence_free()` since `C_OPS` has no
    // `release`; its initial reference goes to the `ARef`. `dma_fence_context_alloc()` can be
    // called from any context.
    unsafe {
        let context = bindings::dma_fence_context_alloc(1);
        bindings::dma_fence_init(raw, &C_OPS, core::ptr::null_mut(), context, 1);
        Ok(ARef::from_raw(core::ptr::NonNull::new_unchecked(
            raw.cast(),
        )))
    }
}

extern "C" {
    fn dma_fence_array_create(
        num_fences: c_int,
        fences: *mut *mut bindings::dma_fence,
        context: u64,
        seqno: c_uint,
    ) -> *mut bindings::dma_fence;
}

/// Makes a `dma_fence_array` that signals when all of `members` have.
fn fence_array(members: &[ARef<DmaFence>]) -> Result<ARef<DmaFence>> {
    let mut fences = KVec::<*mut bindings::dma_fence>::with_capacity(members.len(), GFP_KERNEL)?;
    for m in members {
        fences
            .push_within_capacity(ARef::into_raw(m.clone()).as_ptr().cast())
            .map_err(|_| ENOMEM)?;
    }
    let (ptr, len, _cap) = fences.into_raw_parts();
    // SAFETY: `dma_fence_context_alloc()` can be called from any context.
    let context = unsafe { bindings::dma_fence_context_alloc(1) };
    // SAFETY: `ptr` is a kmalloc'ed array of `len` fences whose references it holds; on success
    // the array owns both (and frees them with `kfree()` and `dma_fence_put()`).
    let array = unsafe { dma_fence_array_create(len as c_int, ptr, context, 1) };
    if array.is_null() {
        // SAFETY: Not taken over: the array and the references are still ours.
        let fences = unsafe { KVec::from_raw_parts(ptr, len, len) };
        for f in fences.iter() {
            // SAFETY: Each entry holds a reference taken above.
            drop(unsafe {
                ARef::<DmaFence>::from_raw(core::ptr::NonNull::new_unchecked(f.cast()))
            });
        }
        return Err(ENOMEM);
    }
    // SAFETY: `base` is the first field of `struct dma_fence_array`; its initial reference is
    // ours.
    Ok(unsafe { ARef::from_raw(core::ptr::NonNull::new_unchecked(array.cast())) })
}

/// A queue with its ring, and the order of its done fences. Dropping it tears the queue down,
/// then [`AfterTeardown`] resets the ring and checks the done fences.
struct Instance {
    queue: JobQueue<StressBackend>,
    after: AfterTeardown,
    capacity: u32,
}

/// What is checked and done once a queue is gone.
struct AfterTeardown {
    ring: Arc<Ring>,
    order: Arc<OrderState>,
}

impl Drop for AfterTeardown {
    fn drop(&mut self) {
        // The ring's jobs that never completed signal now.
        C.teardowns.inc();
        self.ring.reset();
        let tracked = self.order.tracked.load(ordering::Relaxed);
        let mut signalled = self.order.signalled.load(ordering::Relaxed);
        // A callback may still be running on another CPU, for a done fence whose signal the
        // teardown did not wait for: give it a moment.
        for _ in 0..50 {
            if tracked == signalled {
                break;
            }
            fsleep(Delta::from_millis(2));
            signalled = self.order.signalled.load(ordering::Relaxed);
        }
        if tracked != signalled {
            C.v_unsignalled_at_teardown
                .0
                .add(tracked.abs_diff(signalled), ordering::Relaxed);
            pr_err!(
                "jq-stress: VIOLATION: {} of {} done fences unsignalled after teardown\n",
                tracked.abs_diff(signalled),
                tracked
            );
        }
    }
}

impl Instance {
    fn new(index: usize, shared: &Arc<FenceWorkqueue>, rng: &mut Rng) -> Result<Arc<Self>> {
        let capacity = CAPACITY[index];
        let ring = Ring::new(capacity)?;
        let backend = StressBackend {
            ring: ring.clone(),
            last_run: Atomic::new(0),
            rng: Atomic::new(u64::from(rng.next()) | 1),
        };
        let mut options = QueueOptions::new(c"jq_stress", NAMES[index], capacity, Some(TIMEOUT));
        if index < SHARED {
            options.workqueue = Some(shared.clone());
        }
        let order = OrderState::new()?;
        let queue = JobQueue::new(backend, options)?;
        C.queues_made.inc();
        Ok(Arc::new(
            Self {
                queue,
                after: AfterTeardown { ring, order },
                capacity,
            },
            GFP_KERNEL,
        )?)
    }

    fn queue(&self) -> &JobQueue<StressBackend> {
        &self.queue
    }

    fn ring(&self) -> &Arc<Ring> {
        &self.after.ring
    }
}

/// One queue's place; its instance is replaced at teardowns.
#[pin_data]
struct Slot {
    #[pin]
    current: SpinLock<Option<Arc<Instance>>>,
}

/// A fence later jobs may depend on.
struct PoolEntry {
    fence: ARef<DmaFence>,
    array: bool,
}

/// What the submitters and the controller share.
#[pin_data]
struct Shared {
    slots: KVec<Pin<KBox<Slot>>>,
    wq: Arc<FenceWorkqueue>,
    #[pin]
    pool: SpinLock<KVec<Option<PoolEntry>>>,
    #[pin]
    c_pending: SpinLock<KVec<ARef<DmaFence>>>,
}

impl Shared {
    fn instance(&self, i: usize) -> Option<Arc<Instance>> {
        self.slots[i].current.lock().clone()
    }

    /// Puts `fence` in the pool at a random place.
    fn pool_put(&self, rng: &mut Rng, fence: ARef<DmaFence>, array: bool) {
        let old = {
            let mut pool = self.pool.lock();
            let i = rng.below(POOL as u32) as usize;
            core::mem::replace(&mut pool[i], Some(PoolEntry { fence, array }))
        };
        drop(old);
    }

    fn pool_get(&self, rng: &mut Rng) -> Option<(ARef<DmaFence>, bool)> {
        let pool = self.pool.lock();
        pool[rng.below(POOL as u32) as usize]
            .as_ref()
            .map(|e| (e.fence.clone(), e.array))
    }
}

/// Adds `fence` to the job's dependencies and to what `run` checks.
fn add_dep(job: &mut kernel::drm::jobqueue::Job<StressBackend>, fence: ARef<DmaFence>) -> Result {
    job.add_dependency(fence.clone())?;
    job.payload_mut().check.push((fence, false), GFP_KERNEL)?;
    C.dep_edges.inc();
    Ok(())
}

/// Marks the latest dependency of each context as the one whose failure must stop the job.
fn mark_decisive(check: &mut KVec<(ARef<DmaFence>, bool)>) {
    for i in 0..check.len() {
        let decisive = check.iter().all(|(other, _)| {
            other.context() != check[i].0.context() || other.seqno() <= check[i].0.seqno()
        });
        check[i].1 = decisive;
    }
}

/// Without `CONFIG_FAULT_INJECTION`, [`kernel::fault_inject::FailNth`] makes nothing fail.
#[cfg(not(CONFIG_FAULT_INJECTION))]
struct FailNth;

#[cfg(not(CONFIG_FAULT_INJECTION))]
impl FailNth {
    fn arm(_n: u32) -> Self {
        Self
    }

    fn disarm(&mut self) -> bool {
        false
    }
}

/// Builds and submits one random job on `inst`; `fail` is disarmed once the job is built.
fn submit_one(shared: &Shared, inst: &Arc<Instance>, rng: &mut Rng, fail: &mut FailNth) -> Result {
    let queue = inst.queue();
    let credits = 1 + rng.below(inst.capacity.min(4));
    // Durations of 0 to 3 ms; a few jobs are done when `run` returns.
    let duration = if rng.one_in(8) {
        Delta::ZERO
    } else {
        Delta::from_micros(i64::from(rng.below(3000)))
    };
    let mut job = queue.new_job(credits, StressJob::new(duration)?)?;
    if rng.one_in(512) {
        job.payload_mut().behaviour = Behaviour::Fail;
        C.inj_hw_error.inc();
    } else if rng.one_in(400) {
        job.payload_mut().behaviour = Behaviour::Hang;
        C.inj_hang.inc();
    } else if rng.one_in(2048) {
        job.payload_mut().run_error = Some(ENOSPC);
        C.inj_run_error.inc();
    }
    // 0.75 dependencies on average (plus arrays and C fences): each failed job then makes fewer
    // than one other fail through the pool, and errors die out instead of spreading to most jobs.
    for _ in 0..[0, 0, 1, 2][rng.below(4) as usize] {
        if let Some((dep, _)) = shared.pool_get(rng) {
            add_dep(&mut job, dep)?;
        }
    }
    if rng.one_in(16) {
        // A plain C fence that the controller signals later.
        let cf = c_fence()?;
        track(&cf, Kind::CFence, None)?;
        let mut pending = shared.c_pending.lock();
        if pending.len() < C_PENDING {
            pending
                .push_within_capacity(cf.clone())
                .map_err(|_| ENOMEM)?;
            drop(pending);
            add_dep(&mut job, cf)?;
        } else {
            drop(pending);
            // SAFETY: `cf` is a valid fence made by `c_fence`, signalled only here.
            unsafe { bindings::dma_fence_signal(cf.as_raw()) };
        }
    }
    if rng.one_in(16) {
        // A dma_fence_array of two or three fences of the pool (not arrays: they do not nest).
        let mut members = KVec::new();
        for _ in 0..2 + rng.below(2) {
            if let Some((f, false)) = shared.pool_get(rng) {
                members.push(f, GFP_KERNEL)?;
            }
        }
        if !members.is_empty() {
            let array = fence_array(&members)?;
            track(&array, Kind::Array, None)?;
            add_dep(&mut job, array.clone())?;
            shared.pool_put(rng, array, true);
        }
    }
    mark_decisive(&mut job.payload_mut().check);
    // Everything that may fail is done: the submission itself does not allocate.
    fail.disarm();
    match queue.submit(job) {
        Ok(done) => {
            C.submitted.inc();
            inst.after.order.keep(&done);
            track(&done, Kind::Done, Some(&inst.after.order))?;
            shared.pool_put(rng, done, false);
        }
        Err(SubmitError { error, job }) => {
            // The device is gone: the controller replaces the queue.
            C.refused.inc();
            drop(job);
            if error != ENODEV {
                return Err(error);
            }
        }
    }
    Ok(())
}

/// A submitter: random jobs on random queues until `STOP`.
fn submitter(shared: Arc<Shared>, mut rng: Rng) {
    let mut failures = 0u32;
    while !STOP.load(ordering::Relaxed) {
        let i = rng.below(QUEUES as u32) as usize;
        let Some(inst) = shared.instance(i) else {
            fsleep(Delta::from_micros(200));
            continue;
        };
        // Keep the backlog short, so that teardown, stops and resets meet busy queues.
        let stats = inst.queue().stats();
        if stats.waiting + stats.running > 2 * inst.capacity + 8 {
            drop(inst);
            fsleep(Delta::from_micros(200));
            continue;
        }
        // One building in 16 gets one of its first 12 allocations failed.
        let n = if rng.one_in(16) { 1 + rng.below(12) } else { 0 };
        if cfg!(CONFIG_FAULT_INJECTION) && n > 0 {
            C.inj_alloc_armed.inc();
        }
        let mut fail = FailNth::arm(n);
        let result = submit_one(&shared, &inst, &mut rng, &mut fail);
        let injected = fail.disarm();
        if injected {
            C.inj_alloc_fired.inc();
        }
        match result {
            Err(e) if e == ENOMEM && injected => C.inj_alloc_enomem.inc(),
            Ok(()) => {}
            Err(e) => {
                failures += 1;
                if failures <= 5 {
                    pr_err!("jq-stress: ERROR: submission failed: {:?}\n", e);
                }
            }
        }
    }
    RUNNING.fetch_sub(1, ordering::Release);
}

/// Signals the C fences, some with an error; all of them if `all`.
fn signal_c_fences(shared: &Shared, rng: &mut Rng, all: bool) {
    loop {
        let fence = {
            let mut pending = shared.c_pending.lock();
            if pending.is_empty() || (!all && !rng.one_in(2)) {
                return;
            }
            let i = rng.below(pending.len() as u32) as usize;
            match pending.remove(i) {
                Ok(f) => f,
                Err(_) => return,
            }
        };
        if rng.one_in(64) {
            C.inj_c_error.inc();
            // SAFETY: `fence` is a valid, unsignalled fence made by `c_fence`.
            unsafe { bindings::dma_fence_set_error(fence.as_raw(), EPIPE.to_errno()) };
        }
        // SAFETY: `fence` is a valid fence made by `c_fence`; only this function signals it, once
        // (it was taken out of the pending list).
        unsafe { bindings::dma_fence_signal(fence.as_raw()) };
    }
}

/// Stops `inst`'s queue for a moment and resumes it as a random recovery says, with its ring
/// reset for the recoveries that need it.
fn stop_and_resume(inst: &Instance, rng: &mut Rng) {
    let stopped = inst.queue().stop();
    C.stops.inc();
    if rng.one_in(2) {
        fsleep(Delta::from_micros(i64::from(rng.below(3000))));
    }
    match rng.below(3) {
        0 => {
            C.resume_continue.inc();
            stopped.resume(Recovery::Continue);
        }
        1 => {
            C.resume_resubmit.inc();
            inst.ring().reset();
            stopped.resume(Recovery::Resubmit);
        }
        _ => {
            C.resume_cancel.inc();
            inst.ring().reset();
            stopped.resume(Recovery::Cancel(ECANCELED));
        }
    }
}

/// The controller: one pass over the queues.
fn control(shared: &Shared, rng: &mut Rng) -> Result {
    for i in 0..QUEUES {
        let Some(inst) = shared.instance(i) else {
            continue;
        };
        let (reset_pending, gone) = {
            let mut st = inst.ring().state.lock();
            (core::mem::take(&mut st.reset_pending), st.gone)
        };
        if reset_pending {
            // The deferred reset of a `ResetLater`.
            inst.ring().reset();
            let recovery = if rng.one_in(2) {
                Recovery::Resubmit
            } else {
                Recovery::Cancel(ECANCELED)
            };
            if inst.queue().reset_done(recovery).is_ok() {
                C.reset_done.inc();
            } else {
                pr_err!("jq-stress: ERROR: reset_done refused on queue {}\n", i);
            }
        }
        let stats = inst.queue().stats();
        if stats.credits_in_use > inst.capacity {
            C.v_queue_credits.inc();
        }
        let teardown = gone || rng.one_in(2000);
        if teardown {
            // Out of the slot first: submitters stop using it; the last user tears it down.
            let old = shared.slots[i].current.lock().take();
            drop(inst);
            drop(old);
            let new = Instance::new(i, &shared.wq, rng)?;
            *shared.slots[i].current.lock() = Some(new);
        } else if rng.one_in(300) {
            stop_and_resume(&inst, rng);
        }
    }
    signal_c_fences(shared, rng, false);
    Ok(())
}

fn print_figures(elapsed: Delta) {
    let secs = elapsed.as_millis() / 1000;
    let per_sec = C.submitted.get() * 1000 / (elapsed.as_millis().max(1) as u64);
    pr_info!(
        "jq-stress: figures: {} s, {} queues ({} on a shared workqueue), {} jobs submitted ({} per s), {} refused, {} runs ({} reruns, {} done in run), {} cancelled, {} dependency edges\n",
        secs, QUEUES, SHARED, C.submitted.get(), per_sec, C.refused.get(), C.runs.get(), C.reruns.get(),
        C.completed_in_run.get(), C.cancelled.get(), C.dep_edges.get()
    );
    pr_info!(
        "jq-stress: fences: done {}/{} hw {}/{} c {}/{} array {}/{} (signalled/made)\n",
        C.done_signalled.get(),
        C.done_made.get(),
        C.hw_signalled.get(),
        C.hw_made.get(),
        C.c_signalled.get(),
        C.c_made.get(),
        C.array_signalled.get(),
        C.array_made.get()
    );
    pr_info!(
        "jq-stress: done fences: ok {} -EIO {} -ETIMEDOUT {} -ECANCELED {} -ENODEV {} -EPIPE {} -ENOSPC {} other {}\n",
        C.done_ok.get(), C.done_eio.get(), C.done_etimedout.get(), C.done_ecanceled.get(),
        C.done_enodev.get(), C.done_epipe.get(), C.done_enospc.get(), C.done_other.get()
    );
    pr_info!(
        "jq-stress: injected: hw errors {} hangs {} (hit {}) run errors {} C fence errors {}; allocation failures armed {} fired {} (ENOMEM {}, absorbed {})\n",
        C.inj_hw_error.get(),
        C.inj_hang.get(),
        C.hangs_hit.get(),
        C.inj_run_error.get(),
        C.inj_c_error.get(),
        C.inj_alloc_armed.get(),
        C.inj_alloc_fired.get(),
        C.inj_alloc_enomem.get(),
        C.inj_alloc_fired.get() - C.inj_alloc_enomem.get()
    );
    pr_info!(
        "jq-stress: recovery: timeouts {} (no hang {}), resets {} (resubmit {} cancel {} continue {} later {}, done {}), device gone {}, stops {} (resume continue {} resubmit {} cancel {}), queues made {} torn down {}\n",
        C.timeouts.get(), C.no_hang.get(),
        C.reset_resubmit.get() + C.reset_cancel.get() + C.reset_continue.get() + C.reset_later.get(),
        C.reset_resubmit.get(), C.reset_cancel.get(), C.reset_continue.get(), C.reset_later.get(),
        C.reset_done.get(), C.device_gone.get(), C.stops.get(), C.resume_continue.get(),
        C.resume_resubmit.get(), C.resume_cancel.get(), C.queues_made.get(), C.teardowns.get()
    );
    pr_info!(
        "jq-stress: payloads: made {} dropped {}; done fence callbacks that ran after a later one's: {} (not a violation: the order check reads the flags)\n",
        C.payloads_made.get(),
        C.payloads_dropped.get(),
        C.cb_out_of_order.get()
    );
}

/// The violations at the end: every counter that must be 0, and every pair that must match.
fn violations() -> u64 {
    let pairs = [
        (
            "done fences signalled",
            C.done_made.get(),
            C.done_signalled.get(),
        ),
        (
            "hardware fences signalled",
            C.hw_made.get(),
            C.hw_signalled.get(),
        ),
        ("C fences signalled", C.c_made.get(), C.c_signalled.get()),
        (
            "fence arrays signalled",
            C.array_made.get(),
            C.array_signalled.get(),
        ),
        (
            "payloads dropped",
            C.payloads_made.get(),
            C.payloads_dropped.get(),
        ),
    ];
    let zero = [
        (
            "job run before a dependency signalled",
            C.v_dep_unsignalled.get(),
        ),
        (
            "job run despite a failed dependency",
            C.v_dep_failed_ran.get(),
        ),
        ("jobs run out of order", C.v_run_order.get()),
        ("done fences signalled out of order", C.v_done_order.get()),
        ("ring credits over capacity", C.v_ring_credits.get()),
        ("queue credits over capacity", C.v_queue_credits.get()),
        ("jobs cancelled twice", C.v_cancelled_twice.get()),
        (
            "done fences unsignalled after teardown",
            C.v_unsignalled_at_teardown.get(),
        ),
    ];
    let mut total = 0;
    for (what, made, signalled) in pairs {
        if made != signalled {
            let how = if signalled > made {
                "more than once"
            } else {
                "never"
            };
            pr_err!(
                "jq-stress: VIOLATION: {} {}: {} made, {} signalled or dropped\n",
                what,
                how,
                made,
                signalled
            );
            total += made.abs_diff(signalled);
        }
    }
    for (what, n) in zero {
        if n != 0 {
            pr_err!("jq-stress: VIOLATION: {}: {}\n", what, n);
            total += n;
        }
    }
    total
}

fn run(secs: u32, seed: u64) -> Result<u64> {
    let mut rng = Rng(seed | 1);
    let mut slots = KVec::with_capacity(QUEUES, GFP_KERNEL)?;
    for _ in 0..QUEUES {
        slots.push(
            KBox::pin_init(
                pin_init!(Slot { current <- new_spinlock!(None) }),
                GFP_KERNEL,
            )?,
            GFP_KERNEL,
        )?;
    }
    let mut pool = KVec::with_capacity(POOL, GFP_KERNEL)?;
    for _ in 0..POOL {
        pool.push(None, GFP_KERNEL)?;
    }
    let wq = Arc::new(
        FenceWorkqueue::new_unbound(c"jq_stress_shared")?,
        GFP_KERNEL,
    )?;
    let c_pending = KVec::with_capacity(C_PENDING, GFP_KERNEL)?;
    let shared = Arc::pin_init(
        pin_init!(Shared {
            slots,
            wq,
            pool <- new_spinlock!(pool),
            c_pending <- new_spinlock!(c_pending),
        }),
        GFP_KERNEL,
    )?;
    for i in 0..QUEUES {
        let inst = Instance::new(i, &shared.wq, &mut rng)?;
        *shared.slots[i].current.lock() = Some(inst);
    }
    pr_info!(
        "jq-stress: start: {} s, seed {:#x}, {} queues ({} sharing a workqueue), {} submitters\n",
        secs,
        seed,
        QUEUES,
        SHARED,
        SUBMITTERS
    );

    // A queue of their own, which the end drains: no submitter runs the module's code after it.
    let submit_wq = OwnedQueue::new_unbound(c"jq_stress_submit")?;
    STOP.store(false, ordering::Relaxed);
    for _ in 0..SUBMITTERS {
        let s = shared.clone();
        let r = Rng(u64::from(rng.next()) | 1 << 40);
        RUNNING.add(1, ordering::Relaxed);
        if submit_wq
            .try_spawn(GFP_KERNEL, move || submitter(s, r))
            .is_err()
        {
            RUNNING.fetch_sub(1, ordering::Release);
        }
    }

    let start = Instant::<Monotonic>::now();
    let limit = Delta::from_secs(i64::from(secs));
    let mut next_report = Delta::from_secs(60);
    let mut result = Ok(());
    while start.elapsed() < limit {
        if let Err(e) = control(&shared, &mut rng) {
            pr_err!("jq-stress: ERROR: controller failed: {:?}\n", e);
            result = Err(e);
            break;
        }
        if start.elapsed() >= next_report {
            pr_info!(
                "jq-stress: progress: {} s, {} jobs submitted, {} done fences signalled\n",
                next_report.as_millis() / 1000,
                C.submitted.get(),
                C.done_signalled.get()
            );
            next_report += Delta::from_secs(60);
        }
        fsleep(Delta::from_millis(2));
    }
    STOP.store(true, ordering::Relaxed);
    let elapsed = start.elapsed();
    while RUNNING.load(ordering::Acquire) != 0 {
        // Deferred resets and C fences may hold submitters' jobs back.
        let _ = control(&shared, &mut rng);
        fsleep(Delta::from_millis(2));
    }
    drop(submit_wq);

    // The end: nothing is submitted any more. Complete what is pending, then tear every queue
    // down, some with jobs still waiting.
    signal_c_fences(&shared, &mut rng, true);
    for i in 0..QUEUES {
        let inst = shared.slots[i].current.lock().take();
        if let Some(inst) = &inst {
            let pending = core::mem::take(&mut inst.ring().state.lock().reset_pending);
            if pending {
                inst.ring().reset();
                if inst.queue().reset_done(Recovery::Resubmit).is_ok() {
                    C.reset_done.inc();
                }
            }
        }
        drop(inst);
    }
    for e in shared.pool.lock().iter_mut() {
        let old = e.take();
        drop(old);
    }
    shared.wq.flush();
    // Fence arrays signal from irq_work.
    fsleep(Delta::from_millis(100));
    result?;

    print_figures(elapsed);
    Ok(violations())
}

struct JqStress;

impl kernel::Module for JqStress {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let secs = module_parameters::seconds.value();
        let seed = module_parameters::seed.value();
        match run(secs, seed) {
            Ok(0) => pr_info!("jq-stress: result: clean\n"),
            Ok(n) => pr_err!("jq-stress: result: FAILED: {} violation(s)\n", n),
            Err(e) => pr_err!("jq-stress: result: FAILED: the run stopped: {:?}\n", e),
        }
        Ok(JqStress)
    }
}
