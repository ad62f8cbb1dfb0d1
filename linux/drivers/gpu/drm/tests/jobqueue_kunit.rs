// SPDX-License-Identifier: GPL-2.0 OR MIT

//! KUnit tests of the Rust DRM job queue.
//!
//! A mock hardware ring completes jobs in order from hardirq context: an hrtimer fires after each
//! job's programmed duration and signals its hardware fence, with an error if the job is
//! programmed to fail; a job programmed to hang stalls the ring until the backend resets it. The
//! cases cover the scenarios of drm_sched's own KUnit suite and the job queue's own guarantees:
//! dependency errors, C fences, teardown, timeouts, stop/resume and a random dependency graph
//! across eight queues that checks every invariant.

use core::mem::MaybeUninit;
use kernel::{
    dma_fence::{
        DmaFence,
        FenceAllocation,
        FenceContext,
        FenceWorkqueue,
        NestedFenceContext,
        NoHook,
        ProxyFence,
        UniqueFence, //
    },
    drm::jobqueue::{
        Backend,
        Job,
        JobQueue,
        JobRef,
        QueueOptions,
        Recovery,
        ResetDomain,
        TimeoutAction, //
    },
    impl_has_hr_timer,
    impl_has_work,
    new_spinlock_irq,
    new_work,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{
            ordering,
            Atomic, //
        },
        Arc,
        ArcBorrow,
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
    workqueue::{
        self,
        Work,
        WorkItem, //
    }, //
};

module! {
    type: JobQueueKunit,
    name: "drm_jobqueue_kunit",
    authors: ["Rust DRM job queue authors"],
    description: "KUnit tests for the Rust DRM job queue",
    license: "GPL",
}

struct JobQueueKunit;

impl kernel::Module for JobQueueKunit {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        Ok(Self)
    }
}

/// What the mock hardware does with a job.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Complete,
    Fail(Error),
    Hang,
}

/// A job on the mock ring.
struct HwEntry {
    fence: UniqueFence,
    duration: Delta,
    behaviour: Behaviour,
    credits: u32,
}

struct RingState {
    fifo: KVec<HwEntry>,
    /// The timer is armed or its callback runs (or the ring is hung).
    busy: bool,
    hung: bool,
    credits: u32,
    max_credits: u32,
    completed: u32,
    /// The ring was stopped for good: it runs nothing more and takes no more jobs.
    dead: bool,
}

/// The mock hardware ring.
#[pin_data]
struct MockRing {
    #[pin]
    timer: HrTimer<Self>,
    hw: FenceContext,
    /// Hardware fences of too high a nesting level for a done fence to follow.
    hw_high: NestedFenceContext,
    #[pin]
    state: SpinLockIrq<RingState>,
    #[pin]
    handle: SpinLockIrq<Option<ArcHrTimerHandle<MockRing>>>,
    in_hardirq: Atomic<bool>,
}

impl_has_hr_timer! {
    impl HasHrTimer<Self> for MockRing {
        mode: RelativeMode<Monotonic>, field: self.timer
    }
}

impl HrTimerCallback for MockRing {
    type Pointer<'a> = Arc<Self>;

    fn run(this: ArcBorrow<'_, Self>, mut ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        // SAFETY: Reading the preempt count has no requirements.
        let hardirq = unsafe { kernel::bindings::in_hardirq() };
        if !hardirq {
            this.in_hardirq.store(false, ordering::Relaxed);
        }
        let (entry, next) = {
            let mut st = this.state.lock();
            if st.dead {
                st.busy = false;
                return HrTimerRestart::NoRestart;
            }
            let hang = match st.fifo.first() {
                None => {
                    st.busy = false;
                    return HrTimerRestart::NoRestart;
                }
                Some(e) => e.behaviour == Behaviour::Hang,
            };
            if hang {
                // Stalled until reset: `busy` stays set.
                st.hung = true;
                return HrTimerRestart::NoRestart;
            }
            let Ok(entry) = st.fifo.remove(0) else {
                return HrTimerRestart::NoRestart;
            };
            st.credits -= entry.credits;
            st.completed += 1;
            let next = st.fifo.first().map(|e| e.duration);
            if next.is_none() {
                st.busy = false;
            }
            (entry, next)
        };
        let result = match entry.behaviour {
            Behaviour::Fail(e) => Err(e),
            _ => Ok(()),
        };
        entry.fence.signal(result);
        match next {
            Some(duration) => {
                ctx.forward_now(duration);
                HrTimerRestart::Restart
            }
            None => HrTimerRestart::NoRestart,
        }
    }
}

impl MockRing {
    fn new(slots: usize) -> Result<Arc<Self>> {
        let mut fifo = KVec::new();
        fifo.reserve(slots, GFP_KERNEL)?;
        let hw_high = NestedFenceContext::new(c"jobqueue_kunit", c"mock-ring-high", 1)?;
        Arc::pin_init(
            pin_init!(Self {
                timer <- HrTimer::new(),
                hw: FenceContext::new(c"jobqueue_kunit", c"mock-ring"),
                hw_high,
                state <- new_spinlock_irq!(RingState {
                    fifo,
                    busy: false,
                    hung: false,
                    credits: 0,
                    max_credits: 0,
                    completed: 0,
                    dead: false,
                }),
                handle <- new_spinlock_irq!(None),
                in_hardirq: Atomic::new(true),
            }),
            GFP_KERNEL,
        )
    }

    /// Starts the timer for `duration` if the ring was idle.
    fn kick(self: &Arc<Self>, duration: Delta) {
        // Dropping the previous handle waits for a callback that is still returning.
        let old = self.handle.lock().take();
        drop(old);
        let handle = self.clone().start(duration);
        *self.handle.lock() = Some(handle);
    }

    /// Puts a job on the ring; fails with `ENOSPC` if the ring has no slot left.
    fn push(self: &Arc<Self>, entry: HwEntry) -> Result {
        let duration = entry.duration;
        let start = {
            let mut st = self.state.lock();
            if st.dead {
                return Err(ENODEV);
            }
            let credits = entry.credits;
            st.fifo.push_within_capacity(entry).map_err(|_| ENOSPC)?;
            st.credits += credits;
            st.max_credits = st.max_credits.max(st.credits);
            !core::mem::replace(&mut st.busy, true)
        };
        if start {
            self.kick(duration);
        }
        Ok(())
    }

    /// Resets the ring: the jobs on it are lost and their fences signal `-ECANCELED`.
    ///
    /// A job pushed meanwhile (the queue hands on the next job as soon as a lost job's fence has
    /// signalled and its credits are back) is not lost: the ring starts on it.
    fn reset(self: &Arc<Self>) {
        let old = self.handle.lock().take();
        drop(old);
        let lost = {
            let mut st = self.state.lock();
            st.hung = false;
            st.fifo.len()
        };
        for _ in 0..lost {
            let entry = {
                let mut st = self.state.lock();
                let Ok(entry) = st.fifo.remove(0) else {
                    break;
                };
                st.credits -= entry.credits;
                entry
            };
            entry.fence.signal(Err(ECANCELED));
        }
        let next = {
            let mut st = self.state.lock();
            let next = st.fifo.first().map(|e| e.duration);
            st.busy = next.is_some();
            next
        };
        if let Some(duration) = next {
            self.kick(duration);
        }
    }

    /// Drops the hung job at the head of the ring, its fence signalling `-ECANCELED`, and lets
    /// the ring go on with the jobs behind it.
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
            let next = st.fifo.first().map(|e| e.duration);
            st.busy = next.is_some();
            (entry, next)
        };
        entry.fence.signal(Err(ECANCELED));
        if let Some(duration) = next {
            self.kick(duration);
        }
    }

    /// Stops the ring for good without completing its jobs: their fences signal only when the
    /// ring is reset (by the [`RingGuard`], after the queue is gone).
    fn kill(&self) {
        self.state.lock().dead = true;
        let old = self.handle.lock().take();
        drop(old);
    }

    /// Returns whether `fence` belongs to a job the ring may still execute.
    fn is_live(&self, fence: &DmaFence) -> bool {
        let st = self.state.lock();
        !st.dead && st.fifo.iter().any(|e| e.fence.as_raw() == fence.as_raw())
    }

    fn max_credits(&self) -> u32 {
        self.state.lock().max_credits
    }

    fn completed(&self) -> u32 {
        self.state.lock().completed
    }
}

/// Counters shared by a test, its backend and its jobs.
struct Stats {
    runs: Atomic<u32>,
    cancelled: Atomic<u32>,
    timeouts: Atomic<u32>,
    dropped: Atomic<u32>,
    order_violations: Atomic<u32>,
    dependency_violations: Atomic<u32>,
    last_seqno: Atomic<u64>,
    /// Payloads dropped while the ring could still execute their job.
    freed_while_running: Atomic<u32>,
    /// Payloads whose drop waited in vain for a fence.
    drop_wait_failed: Atomic<u32>,
    /// Calls of `Backend::deadline`, and the last deadline in milliseconds after the job's
    /// `deadline_base`.
    deadlines: Atomic<u32>,
    last_deadline_ms: Atomic<i64>,
    /// Runs of jobs with a `run_gate`, and those whose gate did not open in time.
    gated_runs: Atomic<u32>,
    gate_timeouts: Atomic<u32>,
    /// `dropped` when `Backend::stop_hardware` was called, `u32::MAX` before.
    dropped_before_stop: Atomic<u32>,
}

impl Stats {
    fn new() -> Result<Arc<Self>> {
        Ok(Arc::new(
            Self {
                runs: Atomic::new(0),
                cancelled: Atomic::new(0),
                timeouts: Atomic::new(0),
                dropped: Atomic::new(0),
                order_violations: Atomic::new(0),
                dependency_violations: Atomic::new(0),
                last_seqno: Atomic::new(0),
                freed_while_running: Atomic::new(0),
                drop_wait_failed: Atomic::new(0),
                deadlines: Atomic::new(0),
                last_deadline_ms: Atomic::new(0),
                gated_runs: Atomic::new(0),
                gate_timeouts: Atomic::new(0),
                dropped_before_stop: Atomic::new(u32::MAX),
            },
            GFP_KERNEL,
        )?)
    }

    fn get(counter: &Atomic<u32>) -> u32 {
        counter.load(ordering::Relaxed)
    }
}

/// The driver's data of a mock job.
struct MockJob {
    stats: Arc<Stats>,
    duration: Delta,
    behaviour: Behaviour,
    run_error: Option<Error>,
    signalled_hw: Option<Result>,
    hw_alloc: Option<FenceAllocation>,
    /// Fences that must have signalled when the job runs.
    check: KVec<ARef<DmaFence>>,
    sleep_on_drop: bool,
    runs: u32,
    /// Hand a hardware fence of too high a nesting level to the queue.
    high_level_hw: bool,
    /// A fence the drop waits for (for at most five seconds), as a payload holding a buffer might
    /// through reclaim.
    wait_on_drop: Option<ARef<DmaFence>>,
    /// How long the drop sleeps.
    drop_sleep: Option<Delta>,
    /// The ring and the hardware fence of the last run, to check the drop against.
    ring: Option<Arc<MockRing>>,
    hw: Option<ARef<DmaFence>>,
    /// What `Backend::deadline` measures deadlines from.
    deadline_base: Option<Instant<Monotonic>>,
    /// `run` waits (sleeping, for at most five seconds) until this is set, with the queue's lock
    /// held, as a backend might for a firmware doorbell.
    run_gate: Option<Arc<Atomic<bool>>>,
    /// The hardware fence `run` returns instead of one of the ring's: the test signals it.
    external_hw: Option<ARef<DmaFence>>,
}

impl MockJob {
    fn new(stats: &Arc<Stats>, duration: Delta) -> Result<Self> {
        Ok(Self {
            stats: stats.clone(),
            duration,
            behaviour: Behaviour::Complete,
            run_error: None,
            signalled_hw: None,
            hw_alloc: Some(FenceAllocation::new(GFP_KERNEL)?),
            check: KVec::new(),
            sleep_on_drop: false,
            runs: 0,
            high_level_hw: false,
            wait_on_drop: None,
            drop_sleep: None,
            ring: None,
            hw: None,
            deadline_base: None,
            run_gate: None,
            external_hw: None,
        })
    }
}

impl Drop for MockJob {
    fn drop(&mut self) {
        if let (Some(ring), Some(hw)) = (&self.ring, &self.hw) {
            if ring.is_live(hw) {
                self.stats.freed_while_running.add(1, ordering::Relaxed);
            }
        }
        if let Some(fence) = self.wait_on_drop.take() {
            if fence
                .wait_uninterruptible_timeout(Delta::from_secs(5))
                .is_err()
            {
                self.stats.drop_wait_failed.add(1, ordering::Relaxed);
            }
        }
        if let Some(duration) = self.drop_sleep {
            fsleep(duration);
        }
        if self.sleep_on_drop {
            // Only legal in process context: DEBUG_ATOMIC_SLEEP would complain otherwise.
            fsleep(Delta::from_micros(100));
        }
        self.stats.dropped.add(1, ordering::Relaxed);
    }
}

/// The backend the queues under test run on.
struct MockBackend {
    ring: Arc<MockRing>,
    stats: Arc<Stats>,
    on_timeout: TimeoutAction,
    /// The other rings of the device, which a reset takes down with this one.
    peers: KVec<Arc<MockRing>>,
}

impl Backend for MockBackend {
    type Job = MockJob;

    fn run(&self, mut job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
        self.stats.runs.add(1, ordering::Relaxed);
        let seqno = job.done_fence().seqno();
        let last = self.stats.last_seqno.xchg(seqno, ordering::Relaxed);
        if seqno <= last && job.runs == 0 {
            self.stats.order_violations.add(1, ordering::Relaxed);
        }
        job.runs += 1;
        if let Some(gate) = &job.run_gate {
            self.stats.gated_runs.add(1, ordering::Relaxed);
            let start = Instant::<Monotonic>::now();
            while !gate.load(ordering::Acquire) {
                if start.elapsed() > Delta::from_secs(5) {
                    self.stats.gate_timeouts.add(1, ordering::Relaxed);
                    break;
                }
                fsleep(us(500));
            }
        }
        if job.check.iter().any(|f| !f.is_signaled()) {
            self.stats.dependency_violations.add(1, ordering::Relaxed);
        }
        if let Some(e) = job.run_error {
            return Err(e);
        }
        if let Some(hw) = job.external_hw.take() {
            return Ok(hw);
        }
        let alloc = match job.hw_alloc.take() {
            Some(alloc) => alloc,
            None => FenceAllocation::new(GFP_NOWAIT)?,
        };
        let fence = if job.high_level_hw {
            self.ring.hw_high.init_fence(alloc).into_unique()
        } else {
            self.ring.hw.init_fence(alloc)
        };
        let hw = fence.to_aref();
        job.ring = Some(self.ring.clone());
        job.hw = Some(hw.clone());
        if let Some(result) = job.signalled_hw {
            fence.signal(result);
            return Ok(hw);
        }
        self.ring.push(HwEntry {
            fence,
            duration: job.duration,
            behaviour: job.behaviour,
            credits: job.credits(),
        })?;
        Ok(hw)
    }

    fn timed_out(&self, mut job: JobRef<'_, Self>) -> TimeoutAction {
        self.stats.timeouts.add(1, ordering::Relaxed);
        match self.on_timeout {
            // The test resets the ring later, as a driver's reset work would.
            TimeoutAction::NoHang | TimeoutAction::ResetLater => {}
            // Only the hung job is lost; the ring goes on with the others.
            TimeoutAction::Reset(Recovery::Continue) => self.ring.skip_head(),
            _ => {
                self.ring.reset();
                for peer in &self.peers {
                    peer.reset();
                }
            }
        }
        // A job that hung once completes when run again.
        job.behaviour = Behaviour::Complete;
        self.on_timeout
    }

    fn stop_hardware(&self) {
        let dropped = Stats::get(&self.stats.dropped);
        self.stats
            .dropped_before_stop
            .store(dropped, ordering::Relaxed);
        // The ring runs nothing more; its fences signal when the test resets it.
        self.ring.kill();
    }

    fn cancelled(&self, _job: JobRef<'_, Self>, _error: Error) {
        self.stats.cancelled.add(1, ordering::Relaxed);
    }

    fn deadline(&self, job: JobRef<'_, Self>, deadline: Instant<Monotonic>) {
        if let Some(base) = job.deadline_base {
            let ms = (deadline - base).as_millis();
            self.stats.last_deadline_ms.store(ms, ordering::Relaxed);
        }
        self.stats.deadlines.add(1, ordering::Relaxed);
    }
}

/// Shuts the mock ring down when dropped, breaking the reference cycle of its timer handle.
struct RingGuard(Arc<MockRing>);

impl core::ops::Deref for RingGuard {
    type Target = Arc<MockRing>;

    fn deref(&self) -> &Arc<MockRing> {
        &self.0
    }
}

impl Drop for RingGuard {
    fn drop(&mut self) {
        self.0.reset();
    }
}

/// A queue under test with its ring and counters. The queue is dropped before the ring.
struct Fixture {
    queue: JobQueue<MockBackend>,
    ring: RingGuard,
    stats: Arc<Stats>,
}

const LONG: Delta = Delta::from_secs(30);

impl Fixture {
    fn new(name: &'static CStr, capacity: u32, timeout: Option<Delta>) -> Result<Self> {
        Self::with_action(
            name,
            capacity,
            timeout,
            TimeoutAction::Reset(Recovery::Resubmit),
        )
    }

    fn with_action(
        name: &'static CStr,
        capacity: u32,
        timeout: Option<Delta>,
        on_timeout: TimeoutAction,
    ) -> Result<Self> {
        Self::build(
            QueueOptions::new(c"jobqueue_kunit", name, capacity, timeout),
            capacity as usize,
            on_timeout,
        )
    }

    /// A queue of 4 credits and a 30 ms timeout whose backend leaves resets to the driver
    /// ([`TimeoutAction::ResetLater`]), for [`hang_until_reset_later`].
    fn reset_later(name: &'static CStr) -> Result<Self> {
        Self::with_action(
            name,
            4,
            Some(Delta::from_millis(30)),
            TimeoutAction::ResetLater,
        )
    }

    /// A queue made with `options` on a ring of `slots` jobs.
    fn build(options: QueueOptions, slots: usize, on_timeout: TimeoutAction) -> Result<Self> {
        Self::build_in(options, slots, on_timeout, None)
    }

    /// A queue of `capacity` credits, without a timeout, on the workqueue `wq`.
    fn on_workqueue(name: &'static CStr, capacity: u32, wq: &Arc<FenceWorkqueue>) -> Result<Self> {
        let mut options = QueueOptions::new(c"jobqueue_kunit", name, capacity, None);
        options.workqueue = Some(wq.clone());
        let action = TimeoutAction::Reset(Recovery::Resubmit);
        Self::build(options, capacity as usize, action)
    }

    /// [`Self::build`], in `domain` if there is one.
    fn build_in(
        options: QueueOptions,
        slots: usize,
        on_timeout: TimeoutAction,
        domain: Option<&Arc<ResetDomain<MockBackend>>>,
    ) -> Result<Self> {
        let ring = MockRing::new(slots)?;
        let stats = Stats::new()?;
        let backend = MockBackend {
            ring: ring.clone(),
            stats: stats.clone(),
            on_timeout,
            peers: KVec::new(),
        };
        let queue = match domain {
            Some(domain) => JobQueue::new_in_domain(backend, options, domain)?,
            None => JobQueue::new(backend, options)?,
        };
        Ok(Self {
            queue,
            ring: RingGuard(ring),
            stats,
        })
    }

    fn queue(&self) -> &JobQueue<MockBackend> {
        &self.queue
    }

    fn job(&self, credits: u32, duration: Delta) -> Result<Job<MockBackend>> {
        self.queue
            .new_job(credits, MockJob::new(&self.stats, duration)?)
    }

    fn submit_simple(&self, duration: Delta) -> Result<ARef<DmaFence>> {
        Ok(self.queue.submit(self.job(1, duration)?)?)
    }

    /// Submits a job whose `run` waits for the returned gate, and returns once it waits there,
    /// with the queue's mutex held, in the run work: the job waited for a dependency, so the
    /// submitter did not run it. Returns the job's done fence and the gate.
    fn submit_gated(&self) -> Result<(ARef<DmaFence>, Arc<Atomic<bool>>)> {
        let ctx = FenceContext::new(c"jobqueue_kunit", c"gated-dep");
        let dep = ctx.new_fence(GFP_KERNEL)?;
        let gate = Arc::new(Atomic::new(false), GFP_KERNEL)?;
        let mut first = MockJob::new(&self.stats, us(10))?;
        first.run_gate = Some(gate.clone());
        let mut job = self.queue.new_job(1, first)?;
        job.add_dependency(dep.to_aref())?;
        let done = self.queue.submit(job)?;
        dep.signal(Ok(()));
        let mut tries = 0;
        while Stats::get(&self.stats.gated_runs) == 0 && tries < 10_000 {
            fsleep(us(1000));
            tries += 1;
        }
        if Stats::get(&self.stats.gated_runs) != 1 {
            gate.store(true, ordering::Release);
            return Err(ETIMEDOUT);
        }
        Ok((done, gate))
    }

    /// Drops the queue; the ring and the counters stay for checks.
    fn teardown(self) -> (RingGuard, Arc<Stats>) {
        let Fixture { queue, ring, stats } = self;
        drop(queue);
        (ring, stats)
    }
}

fn us(n: i64) -> Delta {
    Delta::from_micros(n)
}

fn wait(fence: &DmaFence) -> Result {
    fence.wait_timeout(LONG)
}

/// Submits a job that hangs and one behind it to `f`, whose backend leaves resets to the driver
/// ([`TimeoutAction::ResetLater`]), and returns their done fences once the first timed out, or
/// `ETIMEDOUT` if it did not within 2 seconds.
fn hang_until_reset_later(f: &Fixture) -> Result<(ARef<DmaFence>, ARef<DmaFence>)> {
    let mut hang = f.job(1, us(10))?;
    hang.payload_mut().behaviour = Behaviour::Hang;
    let hung = f.queue().submit(hang)?;
    let behind = f.submit_simple(us(10))?;
    let mut tries = 0;
    while Stats::get(&f.stats.timeouts) == 0 {
        if tries == 2000 {
            return Err(ETIMEDOUT);
        }
        fsleep(us(1000));
        tries += 1;
    }
    Ok((hung, behind))
}

/// A small deterministic random number generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

/// Submits jobs from a work item, for the parallel submission case.
#[pin_data]
struct Submitter {
    #[pin]
    work: Work<Submitter>,
    fixture: Arc<Fixture>,
    jobs: u32,
    #[pin]
    last: SpinLockIrq<Option<ARef<DmaFence>>>,
    errors: Atomic<u32>,
    in_order: Atomic<bool>,
}

impl_has_work! {
    impl HasWork<Self> for Submitter { self.work }
}

impl Submitter {
    /// Starts `n` submitters of `jobs` jobs each to the queue of `fixture`, on the system
    /// workqueue.
    fn spawn(fixture: &Arc<Fixture>, n: usize, jobs: u32) -> Result<KVec<Arc<Submitter>>> {
        let mut submitters = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            let fixture = fixture.clone();
            let s = Arc::pin_init(
                pin_init!(Submitter {
                    work <- new_work!("jobqueue_kunit::Submitter"),
                    fixture,
                    jobs,
                    last <- new_spinlock_irq!(None),
                    errors: Atomic::new(0),
                    in_order: Atomic::new(true),
                }),
                GFP_KERNEL,
            )?;
            let _ = workqueue::system_dfl().enqueue(s.clone());
            submitters.push(s, GFP_KERNEL)?;
        }
        Ok(submitters)
    }
}

impl WorkItem for Submitter {
    type Pointer = Arc<Submitter>;

    fn run(this: Arc<Submitter>) {
        let mut previous: Option<ARef<DmaFence>> = None;
        for _ in 0..this.jobs {
            match this.fixture.submit_simple(us(20)) {
                Ok(done) => {
                    if let Some(prev) = &previous {
                        if done.is_later(prev) != Ok(true) {
                            this.in_order.store(false, ordering::Relaxed);
                        }
                    }
                    previous = Some(done);
                }
                Err(_) => {
                    this.errors.add(1, ordering::Relaxed);
                }
            }
        }
        *this.last.lock() = previous;
    }
}

/// A work item that holds up the ordered workqueue it runs on until the test opens it: the work
/// queued behind it waits.
#[pin_data]
struct Blocker {
    #[pin]
    work: Work<Blocker>,
    running: Atomic<bool>,
    open: Atomic<bool>,
}

impl_has_work! {
    impl HasWork<Self> for Blocker { self.work }
}

/// Opens its blocker when dropped, also when a test returns early.
struct Blocked(Arc<Blocker>);

impl Drop for Blocked {
    fn drop(&mut self) {
        self.0.open.store(true, ordering::Release);
    }
}

impl Blocker {
    /// Queues a blocker on `wq` and returns once it runs there; dropping the result opens it.
    fn block(wq: &FenceWorkqueue) -> Result<Blocked> {
        let blocker = Arc::pin_init(
            pin_init!(Blocker {
                work <- new_work!("jobqueue_kunit::Blocker"),
                running: Atomic::new(false),
                open: Atomic::new(false),
            }),
            GFP_KERNEL,
        )?;
        let _ = wq.enqueue(blocker.clone());
        let blocked = Blocked(blocker);
        let mut tries = 0;
        while !blocked.0.running.load(ordering::Acquire) && tries < 10_000 {
            fsleep(us(200));
            tries += 1;
        }
        if !blocked.0.running.load(ordering::Acquire) {
            return Err(ETIMEDOUT);
        }
        Ok(blocked)
    }
}

impl WorkItem for Blocker {
    type Pointer = Arc<Blocker>;

    fn run(this: Arc<Blocker>) {
        this.running.store(true, ordering::Release);
        // Bounded, so that a failing test does not hang the workqueue for good.
        let start = Instant::<Monotonic>::now();
        while !this.open.load(ordering::Acquire) && start.elapsed() < Delta::from_secs(10) {
            fsleep(us(500));
        }
    }
}

/// A fence above the done fences' nesting level, for a payload's drop to wait for: it follows
/// the done fence of a job submitted later.
fn fence_to_follow() -> Result<Pin<KBox<ProxyFence<NoHook>>>> {
    let ctx = NestedFenceContext::new(c"jobqueue_kunit", c"follow", 2)?;
    let fence = ctx.new_fence(GFP_KERNEL)?;
    KBox::pin_init(ProxyFence::new(fence), GFP_KERNEL)
}

/// A C fence callback that records when its fence signalled, relative to the others of an
/// [`OrderWatch`]: the order of the signals themselves, not of timestamps.
#[repr(C)]
struct OrderCb {
    cb: kernel::bindings::dma_fence_cb,
    next: Arc<Atomic<u32>>,
    position: Atomic<u32>,
    fence: ARef<DmaFence>,
}

/// # Safety
///
/// Called by the C side for a `cb` that is the first field of a live [`OrderCb`].
unsafe extern "C" fn order_cb(
    _fence: *mut kernel::bindings::dma_fence,
    cb: *mut kernel::bindings::dma_fence_cb,
) {
    // SAFETY: `cb` is the first field of a `repr(C)` `OrderCb`, which `OrderWatch` keeps alive
    // until the callback ran or was removed.
    let this = unsafe { &*cb.cast::<OrderCb>() };
    let position = this.next.fetch_add(1, ordering::Full) + 1;
    this.position.store(position, ordering::Relaxed);
}

/// Records the order in which a set of fences signals, from their signalling paths.
struct OrderWatch {
    cbs: KVec<Pin<KBox<OrderCb>>>,
    next: Arc<Atomic<u32>>,
}

impl OrderWatch {
    fn new() -> Result<Self> {
        Ok(Self {
            cbs: KVec::new(),
            next: Arc::new(Atomic::new(0), GFP_KERNEL)?,
        })
    }

    /// Starts watching `fence`; a fence that has signalled already gets the next position now.
    fn watch(&mut self, fence: &ARef<DmaFence>) -> Result {
        let cb = KBox::pin(
            OrderCb {
                // SAFETY: All-zero is a valid `dma_fence_cb`; `dma_fence_add_callback()`
                // initialises it.
                cb: unsafe { core::mem::zeroed() },
                next: self.next.clone(),
                position: Atomic::new(0),
                fence: fence.clone(),
            },
            GFP_KERNEL,
        )?;
        let raw = core::ptr::from_ref(&cb.cb).cast_mut();
        // SAFETY: The fence is valid; `cb` is pinned in its box and stays there until it is
        // removed in `drop` or has run.
        let ret = unsafe {
            kernel::bindings::dma_fence_add_callback(fence.as_raw(), raw, Some(order_cb))
        };
        if ret != 0 {
            // SAFETY: The fence had signalled and the callback was not added; `raw` is the first
            // field of the `OrderCb` in `cb`, alive until `self` is dropped.
            unsafe { order_cb(fence.as_raw(), raw) };
        }
        self.cbs.push(cb, GFP_KERNEL)?;
        Ok(())
    }

    /// Returns whether every watched fence has signalled, in the order they were watched.
    fn in_order(&self) -> bool {
        let mut last = 0;
        for cb in self.cbs.iter() {
            let position = cb.position.load(ordering::Relaxed);
            if position == 0 || position < last {
                return false;
            }
            last = position;
        }
        true
    }
}

impl Drop for OrderWatch {
    fn drop(&mut self) {
        for cb in self.cbs.iter() {
            let raw = core::ptr::from_ref(&cb.cb).cast_mut();
            // SAFETY: `cb` was added to `cb.fence` or ran; removing a callback that ran is a
            // no-op, as the C side reinitialises its list node.
            unsafe { kernel::bindings::dma_fence_remove_callback(cb.fence.as_raw(), raw) };
        }
    }
}

/// `struct dma_fence` with a `signaled` op that polls a member fence and, like
/// `dma_fence_array`, reports its error only once signalling is enabled.
#[repr(C)]
struct PolledFence {
    base: kernel::bindings::dma_fence,
    member: *mut kernel::bindings::dma_fence,
}

/// # Safety
///
/// `fence` is the `base` of a live [`PolledFence`] whose member is alive.
unsafe extern "C" fn polled_signaled(fence: *mut kernel::bindings::dma_fence) -> bool {
    // SAFETY: As the caller guarantees.
    let member = unsafe { (*fence.cast::<PolledFence>()).member };
    // SAFETY: The member is alive.
    unsafe { kernel::bindings::dma_fence_test_signaled_flag(member) }
}

/// # Safety
///
/// As for [`polled_signaled`]; called with the fence lock held.
unsafe extern "C" fn polled_enable_signaling(fence: *mut kernel::bindings::dma_fence) -> bool {
    // SAFETY: As the caller guarantees.
    let member = unsafe { (*fence.cast::<PolledFence>()).member };
    // SAFETY: The member is alive; the fence lock is held, so the error can be set.
    unsafe {
        if !kernel::bindings::dma_fence_test_signaled_flag(member) {
            // The test signals it later, with the member's error.
            return true;
        }
        (*fence).error = (*member).error;
    }
    // Signalled already: the C side signals the fence now, with the error.
    false
}

/// # Safety
///
/// Called by the C side with a valid fence; the fence is not used.
unsafe extern "C" fn polled_name(_fence: *mut kernel::bindings::dma_fence) -> *const c_char {
    c"polled-fence".as_char_ptr()
}

static POLLED_OPS: kernel::bindings::dma_fence_ops = kernel::bindings::dma_fence_ops {
    get_driver_name: Some(polled_name),
    get_timeline_name: Some(polled_name),
    enable_signaling: Some(polled_enable_signaling),
    signaled: Some(polled_signaled),
    wait: None,
    release: None,
    set_deadline: None,
};

/// Makes a [`PolledFence`] on `member`, which must outlive it until it signalled.
fn polled_fence(member: &DmaFence) -> Result<ARef<DmaFence>> {
    let mem = KBox::<MaybeUninit<PolledFence>>::new_uninit(GFP_KERNEL)?;
    let raw = KBox::into_raw(mem).cast::<PolledFence>();
    // SAFETY: `raw` is a kmalloc'ed `PolledFence` whose `base` comes first, freed by
    // `dma_fence_free()` since `POLLED_OPS` has no `release`; its initial reference goes to the
    // `ARef`.
    unsafe {
        (*raw).member = member.as_raw();
        let base = core::ptr::addr_of_mut!((*raw).base);
        let context = kernel::bindings::dma_fence_context_alloc(1);
        kernel::bindings::dma_fence_init(base, &POLLED_OPS, core::ptr::null_mut(), context, 1);
        Ok(ARef::from_raw(core::ptr::NonNull::new_unchecked(
            base.cast(),
        )))
    }
}

#[kunit_tests(drm_jobqueue)]
mod tests {
    use super::*;

    #[test]
    fn basic_submit() -> Result {
        let f = Fixture::new(c"basic", 8, None)?;
        let done = f.submit_simple(us(100))?;
        assert_eq!(done.context(), f.queue().context());
        wait(&done)?;
        assert_eq!(done.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 1);
        assert!(f.ring.in_hardirq.load(ordering::Relaxed));
        // Retired in process context: credits back, payload dropped.
        let mut tries = 0;
        while Stats::get(&f.stats.dropped) != 1 && tries < 1000 {
            fsleep(us(1000));
            tries += 1;
        }
        assert_eq!(Stats::get(&f.stats.dropped), 1);
        let stats = f.queue().stats();
        assert_eq!(
            (stats.waiting, stats.running, stats.credits_in_use),
            (0, 0, 0)
        );
        Ok(())
    }

    #[test]
    fn chain_of_100() -> Result {
        let f = Fixture::new(c"chain", 16, None)?;
        let mut previous: Option<ARef<DmaFence>> = None;
        for _ in 0..100 {
            let mut job = f.job(1, us(10))?;
            if let Some(prev) = previous.take() {
                job.payload_mut().check.push(prev.clone(), GFP_KERNEL)?;
                job.add_dependency(prev)?;
            }
            previous = Some(f.queue().submit(job)?);
        }
        let last = previous.ok_or(EINVAL)?;
        wait(&last)?;
        assert_eq!(last.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 100);
        assert_eq!(Stats::get(&f.stats.order_violations), 0);
        assert_eq!(Stats::get(&f.stats.dependency_violations), 0);
        Ok(())
    }

    #[test]
    fn independent_and_interdependent_queues() -> Result {
        let names = [c"q0", c"q1", c"q2", c"q3"];
        let mut fixtures = KVec::new();
        for name in names {
            fixtures.push(Fixture::new(name, 4, None)?, GFP_KERNEL)?;
        }
        // Independent: 25 jobs on each.
        let mut last = KVec::new();
        for f in &fixtures {
            let mut done = None;
            for _ in 0..25 {
                done = Some(f.submit_simple(us(10))?);
            }
            last.push(done.ok_or(EINVAL)?, GFP_KERNEL)?;
        }
        for done in &last {
            wait(done)?;
        }
        // Inter-dependent: each job depends on the previous job of the next queue.
        let mut previous: [Option<ARef<DmaFence>>; 4] = [None, None, None, None];
        for round in 0..25 {
            for (i, f) in fixtures.iter().enumerate() {
                let mut job = f.job(1, us(10 + round))?;
                if let Some(dep) = previous[(i + 1) % 4].clone() {
                    job.payload_mut().check.push(dep.clone(), GFP_KERNEL)?;
                    job.add_dependency(dep)?;
                }
                previous[i] = Some(f.queue().submit(job)?);
            }
        }
        for done in previous.iter().flatten() {
            wait(done)?;
            assert_eq!(done.status(), Some(Ok(())));
        }
        for f in &fixtures {
            assert_eq!(Stats::get(&f.stats.runs), 50);
            assert_eq!(Stats::get(&f.stats.dependency_violations), 0);
            assert_eq!(Stats::get(&f.stats.order_violations), 0);
        }
        Ok(())
    }

    #[test]
    fn teardown_mid_chain() -> Result {
        let f = Fixture::new(c"mid-chain", 4, Some(Delta::from_millis(200)))?;
        let mut dones = KVec::new();
        let mut previous: Option<ARef<DmaFence>> = None;
        for _ in 0..50 {
            let mut job = f.job(1, us(500))?;
            if let Some(prev) = previous.take() {
                job.add_dependency(prev)?;
            }
            let done = f.queue().submit(job)?;
            previous = Some(done.clone());
            dones.push(done, GFP_KERNEL)?;
        }
        wait(&dones[3])?;
        let (_ring, stats) = f.teardown();
        // Everything signalled: what ran completed, what did not was cancelled, in order.
        let mut cancelled_seen = false;
        for done in &dones {
            let status = done.status();
            assert!(status.is_some());
            if let Some(Err(e)) = status {
                assert_eq!(e, ECANCELED);
                cancelled_seen = true;
            } else {
                assert!(!cancelled_seen);
            }
        }
        assert!(cancelled_seen);
        assert_eq!(Stats::get(&stats.dropped), 50);
        assert_eq!(Stats::get(&stats.cancelled) + Stats::get(&stats.runs), 50);
        Ok(())
    }

    #[test]
    fn sixteen_parallel_submitters() -> Result {
        let f = Arc::new(Fixture::new(c"parallel", 8, None)?, GFP_KERNEL)?;
        let submitters = Submitter::spawn(&f, 16, 50)?;
        for s in &submitters {
            s.work.flush();
            assert_eq!(Stats::get(&s.errors), 0);
            assert!(s.in_order.load(ordering::Relaxed));
            let last = s.last.lock().clone().ok_or(EINVAL)?;
            wait(&last)?;
        }
        assert_eq!(Stats::get(&f.stats.runs), 16 * 50);
        assert_eq!(Stats::get(&f.stats.order_violations), 0);
        drop(submitters);
        Ok(())
    }

    #[test]
    fn submit_never_waits_for_the_queue() -> Result {
        let f = Fixture::new(c"no_wait", 4, None)?;
        let (done_first, gate) = f.submit_gated()?;
        // Returns at once, although the queue is busy in `run`: the run work hands the job on.
        let done_second = f.submit_simple(us(20))?;
        gate.store(true, ordering::Release);
        wait(&done_first)?;
        wait(&done_second)?;
        assert_eq!(Stats::get(&f.stats.gate_timeouts), 0);
        assert_eq!(done_first.status(), Some(Ok(())));
        assert_eq!(done_second.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 2);
        assert_eq!(Stats::get(&f.stats.order_violations), 0);
        Ok(())
    }

    #[test]
    fn job_submitted_while_the_run_path_waits_runs_when_it_stops_waiting() -> Result {
        // The first job waits for a dependency, and the run work, done, left the run path
        // waiting for it: `submit()` does not kick the run work then. The dependency signals,
        // and the second job is submitted while the first one's `run` holds the run path, which
        // has taken in the submitted jobs already. The run path's look at the submission list,
        // as it stops waiting, gets the second job run at once, while the first is on the
        // hardware for a second; the retire work would take it in too, but run it only once the
        // first job is done.
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"jq_kunit_waits")?, GFP_KERNEL)?;
        let f = Fixture::on_workqueue(c"run-waits", 4, &wq)?;
        let ctx = FenceContext::new(c"jobqueue_kunit", c"waited-dep");
        let dep = ctx.new_fence(GFP_KERNEL)?;
        let gate = Arc::new(Atomic::new(false), GFP_KERNEL)?;
        let mut first = MockJob::new(&f.stats, Delta::from_secs(1))?;
        first.run_gate = Some(gate.clone());
        let mut job = f.queue().new_job(1, first)?;
        job.add_dependency(dep.to_aref())?;
        let done_first = f.queue().submit(job)?;
        wq.flush();
        assert_eq!(f.queue().stats().waiting, 1);
        dep.signal(Ok(()));
        wait_count(&f.stats.gated_runs, 1);
        let done_second = f.submit_simple(us(20))?;
        gate.store(true, ordering::Release);
        wait_count(&f.stats.runs, 2);
        let first_on_hardware = done_first.status().is_none();
        assert_eq!(Stats::get(&f.stats.runs), 2);
        assert!(first_on_hardware);
        wait(&done_first)?;
        wait(&done_second)?;
        assert_eq!(Stats::get(&f.stats.gated_runs), 1);
        assert_eq!(Stats::get(&f.stats.gate_timeouts), 0);
        assert_eq!(done_first.status(), Some(Ok(())));
        assert_eq!(done_second.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.order_violations), 0);
        Ok(())
    }

    #[test]
    fn slots_grow_while_the_queue_is_busy() -> Result {
        // Many more jobs alive at once than the slots a queue starts with (16), some held
        // unsubmitted, some dropped unsubmitted, while the queue's mutex is held by a `run` that
        // waits: the submitted jobs pile up behind the spinlock, and the slots double three times
        // before the ring can take the larger ones. Every job still runs once, in order.
        let f = Fixture::new(c"slots", 4, None)?;
        let (first, gate) = f.submit_gated()?;
        let mut dones = KVec::new();
        dones.push(first, GFP_KERNEL)?;
        let mut held = KVec::new();
        for i in 0..150 {
            let job = f.job(1, us(10))?;
            match i % 3 {
                0 => held.push(job, GFP_KERNEL)?,
                1 => dones.push(f.queue().submit(job)?, GFP_KERNEL)?,
                _ => drop(job),
            }
        }
        for job in held.drain_all() {
            dones.push(f.queue().submit(job)?, GFP_KERNEL)?;
        }
        gate.store(true, ordering::Release);
        for done in &dones {
            wait(done)?;
            assert_eq!(done.status(), Some(Ok(())));
        }
        assert_eq!(Stats::get(&f.stats.gate_timeouts), 0);
        assert_eq!(Stats::get(&f.stats.runs), 101);
        assert_eq!(Stats::get(&f.stats.order_violations), 0);
        // The 50 jobs dropped unsubmitted gave their payloads back; none is cancelled.
        assert_eq!(Stats::get(&f.stats.cancelled), 0);
        Ok(())
    }

    #[test]
    fn interleaved_submission() -> Result {
        let f = Fixture::new(c"interleaved", 2, None)?;
        let mut dones = KVec::new();
        for round in 0..20 {
            for _ in 0..3 {
                dones.push(f.submit_simple(us(20))?, GFP_KERNEL)?;
            }
            if round % 2 == 0 {
                wait(&dones[dones.len() - 2])?;
            }
        }
        for done in &dones {
            wait(done)?;
            assert_eq!(done.status(), Some(Ok(())));
        }
        for pair in dones.windows(2) {
            assert_eq!(pair[1].is_later(&pair[0]), Ok(true));
            let (a, b) = (pair[0].timestamp(), pair[1].timestamp());
            assert!(a.is_some() && b.is_some());
        }
        assert!(f.ring.max_credits() <= 2);
        Ok(())
    }

    #[test]
    fn cancel_on_teardown() -> Result {
        let f = Fixture::new(c"cancel", 4, None)?;
        let blocker = FenceContext::new(c"jobqueue_kunit", c"blocker");
        let gate = blocker.new_fence(GFP_KERNEL)?;
        let mut dones = KVec::new();
        for _ in 0..20 {
            let mut job = f.job(1, us(10))?;
            job.add_dependency(gate.to_aref())?;
            dones.push(f.queue().submit(job)?, GFP_KERNEL)?;
        }
        assert_eq!(f.queue().stats().waiting, 20);
        let (_ring, stats) = f.teardown();
        for done in &dones {
            assert_eq!(done.status(), Some(Err(ECANCELED)));
        }
        assert_eq!(Stats::get(&stats.runs), 0);
        assert_eq!(Stats::get(&stats.cancelled), 20);
        assert_eq!(Stats::get(&stats.dropped), 20);
        // The queue removed its callback from the foreign fence.
        gate.signal(Ok(()));
        Ok(())
    }

    #[test]
    fn timeout_resets_and_resubmits() -> Result {
        let f = Fixture::new(c"timeout", 4, Some(Delta::from_millis(50)))?;
        let first = f.submit_simple(us(100))?;
        let mut hang = f.job(1, us(100))?;
        hang.payload_mut().behaviour = Behaviour::Hang;
        let hung = f.queue().submit(hang)?;
        let after = f.submit_simple(us(100))?;
        wait(&after)?;
        assert_eq!(first.status(), Some(Ok(())));
        assert_eq!(hung.status(), Some(Err(ETIMEDOUT)));
        // Resubmitted after the reset, and completed.
        assert_eq!(after.status(), Some(Ok(())));
        assert!(Stats::get(&f.stats.timeouts) >= 1);
        assert!(Stats::get(&f.stats.runs) >= 4);
        Ok(())
    }

    #[test]
    fn no_hang_keeps_waiting() -> Result {
        let f = Fixture::with_action(
            c"no-hang",
            4,
            Some(Delta::from_millis(20)),
            TimeoutAction::NoHang,
        )?;
        let done = f.submit_simple(Delta::from_millis(120))?;
        wait(&done)?;
        assert_eq!(done.status(), Some(Ok(())));
        assert!(Stats::get(&f.stats.timeouts) >= 1);
        assert_eq!(Stats::get(&f.stats.runs), 1);
        Ok(())
    }

    #[test]
    fn credit_limit_one() -> Result {
        let f = Fixture::new(c"one-credit", 1, None)?;
        let mut last = None;
        for _ in 0..30 {
            last = Some(f.submit_simple(us(30))?);
        }
        let last = last.ok_or(EINVAL)?;
        wait(&last)?;
        assert_eq!(f.ring.max_credits(), 1);
        assert_eq!(f.ring.completed(), 30);
        // Credits are checked at creation.
        assert_eq!(f.job(2, us(1)).err(), Some(EINVAL));
        assert_eq!(f.job(0, us(1)).err(), Some(EINVAL));
        Ok(())
    }

    #[test]
    fn credits_never_exceed_capacity() -> Result {
        let f = Fixture::new(c"credits", 5, None)?;
        let mut last = None;
        for i in 0..60 {
            last = Some(f.queue().submit(f.job(1 + i % 3, us(20))?)?);
        }
        let last = last.ok_or(EINVAL)?;
        wait(&last)?;
        assert!(f.ring.max_credits() <= 5);
        assert!(f.ring.max_credits() >= 3);
        Ok(())
    }

    #[test]
    fn dependency_error_propagates() -> Result {
        let f = Fixture::new(c"dep-error", 4, None)?;
        let other = FenceContext::new(c"jobqueue_kunit", c"other");
        let failing = other.new_fence(GFP_KERNEL)?;
        let mut job = f.job(1, us(10))?;
        job.add_dependency(failing.to_aref())?;
        let done = f.queue().submit(job)?;
        // A job behind it is not affected.
        let next = f.submit_simple(us(10))?;
        failing.signal(Err(EIO));
        wait(&next)?;
        wait(&done)?;
        assert_eq!(done.status(), Some(Err(EIO)));
        assert_eq!(next.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 1);
        // And a dependency that had failed before it was added.
        let mut job = f.job(1, us(10))?;
        job.add_dependency(done.clone())?;
        assert_eq!(job.dependencies(), 1);
        let done2 = f.queue().submit(job)?;
        wait(&done2)?;
        assert_eq!(done2.status(), Some(Err(EIO)));
        assert_eq!(Stats::get(&f.stats.runs), 1);
        Ok(())
    }

    #[test]
    fn done_fences_signal_in_order_on_errors() -> Result {
        let f = Fixture::new(c"order", 4, None)?;
        let slow = f.submit_simple(Delta::from_millis(30))?;
        let mut failing = f.job(1, us(10))?;
        failing.payload_mut().run_error = Some(ENOSPC);
        let failed = f.queue().submit(failing)?;
        let mut instant = f.job(1, us(10))?;
        instant.payload_mut().signalled_hw = Some(Err(EREMOTEIO));
        let signalled = f.queue().submit(instant)?;
        let fast = f.submit_simple(us(10))?;
        wait(&fast)?;
        for fence in [&slow, &failed, &signalled] {
            assert!(fence.is_signaled());
        }
        assert_eq!(failed.status(), Some(Err(ENOSPC)));
        assert_eq!(signalled.status(), Some(Err(EREMOTEIO)));
        let stamps = [&slow, &failed, &signalled, &fast].map(|f| f.timestamp());
        for pair in stamps.windows(2) {
            let (a, b) = (pair[0].ok_or(EINVAL)?, pair[1].ok_or(EINVAL)?);
            assert!(!(b - a).is_negative());
        }
        Ok(())
    }

    /// `struct dma_fence_ops` of a fence made with the C API.
    static C_OPS: kernel::bindings::dma_fence_ops = kernel::bindings::dma_fence_ops {
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
    unsafe extern "C" fn c_name(_fence: *mut kernel::bindings::dma_fence) -> *const c_char {
        c"c-fence".as_char_ptr()
    }

    /// Makes a pending fence with the C API (`dma_fence_init()`).
    fn c_fence(context: u64, seqno: u64) -> Result<ARef<DmaFence>> {
        let mem = KBox::<MaybeUninit<kernel::bindings::dma_fence>>::new_uninit(GFP_KERNEL)?;
        let raw = KBox::into_raw(mem).cast::<kernel::bindings::dma_fence>();
        // SAFETY: `raw` is a kmalloc'ed fence, freed by `dma_fence_free()` since `C_OPS` has no
        // `release`; its initial reference goes to the `ARef`.
        unsafe {
            kernel::bindings::dma_fence_init(raw, &C_OPS, core::ptr::null_mut(), context, seqno);
            Ok(ARef::from_raw(core::ptr::NonNull::new_unchecked(
                raw.cast(),
            )))
        }
    }

    /// Signals a fence made by [`c_fence`].
    fn c_signal(fence: &DmaFence) {
        // SAFETY: `fence` is a valid fence.
        unsafe { kernel::bindings::dma_fence_signal(fence.as_raw()) };
    }

    #[test]
    fn c_fences_as_dependencies() -> Result {
        let f = Fixture::new(c"c-fences", 4, None)?;
        // SAFETY: `dma_fence_context_alloc()` can be called from any context.
        let cf = c_fence(unsafe { kernel::bindings::dma_fence_context_alloc(1) }, 1)?;
        let mut job = f.job(1, us(10))?;
        job.add_dependency(cf.clone())?;
        job.add_dependency(DmaFence::stub())?;
        job.payload_mut().check.push(cf.clone(), GFP_KERNEL)?;
        assert_eq!(job.dependencies(), 1);
        let done = f.queue().submit(job)?;
        assert_eq!(done.wait_timeout(Delta::from_millis(20)), Err(ETIMEDOUT));
        c_signal(&cf);
        wait(&done)?;
        assert_eq!(done.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.dependency_violations), 0);
        Ok(())
    }

    #[test]
    fn duplicate_and_signalled_dependencies() -> Result {
        let f = Fixture::new(c"dedup", 4, None)?;
        let other = FenceContext::new(c"jobqueue_kunit", c"dedup-src");
        let a = other.new_fence(GFP_KERNEL)?;
        let b = other.new_fence(GFP_KERNEL)?;
        let c = other.new_fence(GFP_KERNEL)?;
        let signalled = FenceContext::new(c"jobqueue_kunit", c"x").new_fence(GFP_KERNEL)?;
        let sview = signalled.to_aref();
        signalled.signal(Ok(()));
        let mut job = f.job(1, us(10))?;
        job.add_dependency(b.to_aref())?;
        job.add_dependency(a.to_aref())?;
        job.add_dependency(b.to_aref())?;
        job.add_dependency(sview)?;
        assert_eq!(job.dependencies(), 1);
        job.add_dependency(c.to_aref())?;
        assert_eq!(job.dependencies(), 1);
        job.payload_mut().check.push(c.to_aref(), GFP_KERNEL)?;
        let done = f.queue().submit(job)?;
        a.signal(Ok(()));
        b.signal(Ok(()));
        assert_eq!(done.wait_timeout(Delta::from_millis(20)), Err(ETIMEDOUT));
        c.signal(Ok(()));
        wait(&done)?;
        assert_eq!(Stats::get(&f.stats.dependency_violations), 0);
        Ok(())
    }

    #[test]
    fn teardown_with_10000_pending() -> Result {
        let f = Fixture::new(c"ten-thousand", 16, None)?;
        let blocker = FenceContext::new(c"jobqueue_kunit", c"gate");
        let gate = blocker.new_fence(GFP_KERNEL)?;
        let mut first = f.job(1, us(10))?;
        first.add_dependency(gate.to_aref())?;
        let first = f.queue().submit(first)?;
        let mut last = None;
        for _ in 0..9999 {
            last = Some(f.submit_simple(us(10))?);
        }
        assert_eq!(f.queue().stats().waiting, 10000);
        let (_ring, stats) = f.teardown();
        assert_eq!(first.status(), Some(Err(ECANCELED)));
        assert_eq!(last.ok_or(EINVAL)?.status(), Some(Err(ECANCELED)));
        assert_eq!(Stats::get(&stats.dropped), 10000);
        assert_eq!(Stats::get(&stats.cancelled), 10000);
        gate.signal(Ok(()));
        Ok(())
    }

    #[test]
    fn hardware_fence_signals_after_queue_is_gone() -> Result {
        let f = Fixture::with_action(
            c"late-hw",
            4,
            Some(Delta::from_millis(30)),
            TimeoutAction::NoHang,
        )?;
        let mut job = f.job(1, us(10))?;
        job.payload_mut().behaviour = Behaviour::Hang;
        let done = f.queue().submit(job)?;
        // Let it reach the ring.
        wait_runs(&f, 1);
        // Teardown waits a timeout, then stops the ring for good through the backend; only then
        // does the job finish, cancelled, and its payload go.
        let (ring, stats) = f.teardown();
        assert_eq!(done.status(), Some(Err(ECANCELED)));
        assert_eq!(Stats::get(&stats.dropped), 1);
        assert_eq!(Stats::get(&stats.freed_while_running), 0);
        // The hung hardware fence signals now: nothing of the queue is touched.
        ring.reset();
        Ok(())
    }

    #[test]
    fn random_graph_across_8_queues() -> Result {
        const QUEUES: usize = 8;
        const JOBS: usize = 400;
        let names = [c"r0", c"r1", c"r2", c"r3", c"r4", c"r5", c"r6", c"r7"];
        let mut fixtures = KVec::new();
        for (i, name) in names.iter().enumerate() {
            fixtures.push(Fixture::new(name, 1 + i as u32 % 4, None)?, GFP_KERNEL)?;
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // Each entry: the done fence and the error it must carry.
        let mut dones: KVec<(ARef<DmaFence>, Option<Error>)> = KVec::new();
        let mut queue_of: KVec<usize> = KVec::new();
        for _ in 0..JOBS {
            let q = rng.below(QUEUES as u32) as usize;
            let f = &fixtures[q];
            let credits = 1 + rng.below(1 + q as u32 % 4);
            let mut job = f.job(credits, us(1 + i64::from(rng.below(40))))?;
            // Every failure is `EIO`: a job fails if it is programmed to, or if one of its
            // dependencies failed (then it does not run).
            let mut expected = None;
            if rng.below(25) == 0 {
                job.payload_mut().behaviour = Behaviour::Fail(EIO);
                expected = Some(EIO);
            }
            // Of several dependencies on one queue only the latest counts (as `add_dependency`
            // deduplicates): remember the latest per queue.
            let mut latest: [Option<usize>; QUEUES] = [None; QUEUES];
            for _ in 0..rng.below(4) {
                if dones.is_empty() {
                    break;
                }
                let index = rng.below(dones.len() as u32) as usize;
                let (dep, _) = &dones[index];
                job.add_dependency(dep.clone())?;
                job.payload_mut().check.push(dep.clone(), GFP_KERNEL)?;
                let slot = &mut latest[queue_of[index]];
                *slot = Some(slot.map_or(index, |l| l.max(index)));
            }
            if latest.iter().flatten().any(|&i| dones[i].1.is_some()) {
                expected = Some(EIO);
            }
            let done = f.queue().submit(job)?;
            dones.push((done, expected), GFP_KERNEL)?;
            queue_of.push(q, GFP_KERNEL)?;
        }
        for (done, expected) in &dones {
            wait(done)?;
            match expected {
                None => assert_eq!(done.status(), Some(Ok(()))),
                Some(e) => assert_eq!(done.status(), Some(Err(*e))),
            }
        }
        for (i, f) in fixtures.iter().enumerate() {
            assert_eq!(Stats::get(&f.stats.dependency_violations), 0);
            assert_eq!(Stats::get(&f.stats.order_violations), 0);
            assert!(f.ring.max_credits() <= 1 + i as u32 % 4);
        }
        // Done fences of one queue signal in order.
        for f in &fixtures {
            let mut last_stamp: Option<kernel::time::Instant<Monotonic>> = None;
            for (done, _) in dones
                .iter()
                .filter(|(d, _)| d.context() == f.queue().context())
            {
                let stamp = done.timestamp().ok_or(EINVAL)?;
                if let Some(prev) = last_stamp {
                    assert!(!(stamp - prev).is_negative());
                }
                last_stamp = Some(stamp);
            }
        }
        Ok(())
    }

    #[test]
    fn bad_input() -> Result {
        let f = Fixture::new(c"bad-input", 4, None)?;
        let g = Fixture::new(c"bad-input-2", 4, None)?;
        // A job of another queue is handed back.
        let job = g.job(1, us(10))?;
        let err = f.queue().submit(job).err().ok_or(EINVAL)?;
        assert_eq!(err.error, EINVAL);
        let done = g.queue().submit(err.job)?;
        wait(&done)?;
        // A fence of this queue that was not submitted yet would deadlock: rejected.
        let mut job = f.job(1, us(10))?;
        let forged = c_fence(f.queue().context(), 1000)?;
        assert_eq!(job.add_dependency(forged.clone()), Err(EINVAL));
        c_signal(&forged);
        // Earlier jobs of the same queue are fine.
        let mut own = f.job(1, us(10))?;
        let own_done = f.queue().submit(f.job(1, us(10))?)?;
        own.add_dependency(own_done.clone())?;
        let own_done2 = f.queue().submit(own)?;
        wait(&own_done2)?;
        drop(job);
        // A payload whose drop sleeps is dropped in process context.
        let mut sleepy = f.job(1, us(10))?;
        sleepy.payload_mut().sleep_on_drop = true;
        let done = f.queue().submit(sleepy)?;
        wait(&done)?;
        // A run that fails.
        let mut failing = f.job(1, us(10))?;
        failing.payload_mut().run_error = Some(EBUSY);
        let done = f.queue().submit(failing)?;
        wait(&done)?;
        assert_eq!(done.status(), Some(Err(EBUSY)));
        // A hardware fence that had signalled already.
        let mut instant = f.job(1, us(10))?;
        instant.payload_mut().signalled_hw = Some(Ok(()));
        let done = f.queue().submit(instant)?;
        wait(&done)?;
        assert_eq!(done.status(), Some(Ok(())));
        Ok(())
    }

    /// Waits (bounded) until the backend has run `n` jobs in all.
    fn wait_runs(f: &Fixture, n: u32) {
        wait_count(&f.stats.runs, n);
    }

    /// Waits (bounded) until `counter` reaches `n`.
    fn wait_count(counter: &Atomic<u32>, n: u32) {
        let mut tries = 0;
        while Stats::get(counter) < n && tries < 10_000 {
            fsleep(us(200));
            tries += 1;
        }
    }

    /// The queues of a mock device in a reset domain, each on a ring of its own; a reset takes
    /// all the rings down.
    struct Device {
        rings: KVec<Arc<MockRing>>,
        queues: KVec<JobQueue<MockBackend>>,
        stats: KVec<Arc<Stats>>,
    }

    impl Device {
        fn new(
            timeouts: &[Option<Delta>],
            on_timeout: TimeoutAction,
        ) -> Result<(Self, Arc<ResetDomain<MockBackend>>)> {
            const NAMES: [&CStr; 3] = [c"domain-0", c"domain-1", c"domain-2"];
            let domain = ResetDomain::new(c"jq-kunit-domain")?;
            let mut rings = KVec::new();
            for _ in timeouts {
                rings.push(MockRing::new(4)?, GFP_KERNEL)?;
            }
            let mut dev = Self {
                rings: KVec::new(),
                queues: KVec::new(),
                stats: KVec::new(),
            };
            for (i, timeout) in timeouts.iter().enumerate() {
                let stats = Stats::new()?;
                let mut peers = KVec::new();
                for ring in rings.iter() {
                    peers.push(ring.clone(), GFP_KERNEL)?;
                }
                let backend = MockBackend {
                    ring: rings[i].clone(),
                    stats: stats.clone(),
                    on_timeout,
                    peers,
                };
                let options = QueueOptions::new(c"jobqueue_kunit", NAMES[i], 4, *timeout);
                dev.queues.push(
                    JobQueue::new_in_domain(backend, options, &domain)?,
                    GFP_KERNEL,
                )?;
                dev.stats.push(stats, GFP_KERNEL)?;
            }
            dev.rings = rings;
            Ok((dev, domain))
        }

        fn submit(
            &self,
            i: usize,
            duration: Delta,
            behaviour: Behaviour,
        ) -> Result<ARef<DmaFence>> {
            let mut job = MockJob::new(&self.stats[i], duration)?;
            job.behaviour = behaviour;
            let q = &self.queues[i];
            Ok(q.submit(q.new_job(1, job)?)?)
        }

        fn timeouts(&self) -> u32 {
            self.stats.iter().map(|s| Stats::get(&s.timeouts)).sum()
        }
    }

    impl Drop for Device {
        fn drop(&mut self) {
            while let Some(q) = self.queues.pop() {
                drop(q);
            }
            for ring in self.rings.iter() {
                ring.reset();
            }
            for stats in self.stats.iter() {
                assert_eq!(Stats::get(&stats.freed_while_running), 0);
            }
        }
    }

    /// Hook: a timeout in a reset domain stops every queue of the domain before the reset, and
    /// the recovery applies to them all: a job of another queue that the reset took off its
    /// ring runs again instead of failing with the reset's error.
    #[test]
    fn reset_domain_recovers_together() -> Result {
        let (dev, _domain) = Device::new(
            &[Some(Delta::from_millis(50)), None, None],
            TimeoutAction::Reset(Recovery::Resubmit),
        )?;
        let hung = dev.submit(0, us(10), Behaviour::Hang)?;
        let victim = dev.submit(1, Delta::from_millis(300), Behaviour::Complete)?;
        let idle = dev.submit(2, us(10), Behaviour::Complete)?;
        wait(&idle)?;
        wait(&hung)?;
        assert_eq!(hung.status(), Some(Err(ETIMEDOUT)));
        wait(&victim)?;
        assert_eq!(victim.status(), Some(Ok(())));
        assert_eq!(Stats::get(&dev.stats[1].runs), 2);
        assert_eq!(Stats::get(&dev.stats[0].timeouts), 1);
        assert_eq!(dev.timeouts(), 1);
        assert_eq!(idle.status(), Some(Ok(())));
        Ok(())
    }

    /// Hook: the timeouts of a reset domain are handled one at a time; while the driver resets
    /// after [`TimeoutAction::ResetLater`], no other queue of the domain times out, and the
    /// driver's [`JobQueue::reset_done`] resumes them all.
    #[test]
    fn reset_domain_serialises_timeouts() -> Result {
        let timeout = Some(Delta::from_millis(50));
        let (dev, _domain) = Device::new(&[timeout, timeout], TimeoutAction::ResetLater)?;
        let first = dev.submit(0, us(10), Behaviour::Hang)?;
        let second = dev.submit(1, us(10), Behaviour::Hang)?;
        let mut tries = 0;
        while dev.timeouts() == 0 && tries < 10_000 {
            fsleep(us(200));
            tries += 1;
        }
        // The domain is stopped: the other queue's hang is not handled meanwhile.
        fsleep(Delta::from_millis(200));
        assert_eq!(dev.timeouts(), 1);
        assert_eq!(first.status(), None);
        assert_eq!(second.status(), None);
        let (guilty, other) = if Stats::get(&dev.stats[0].timeouts) == 1 {
            (0, 1)
        } else {
            (1, 0)
        };
        assert_eq!(
            dev.queues[other].reset_done(Recovery::Continue),
            Err(EINVAL)
        );
        // The driver's reset work: the guilty ring only, then the domain resumes.
        dev.rings[guilty].reset();
        dev.queues[guilty].reset_done(Recovery::Continue)?;
        let dones = [&first, &second];
        wait(dones[guilty])?;
        assert_eq!(dones[guilty].status(), Some(Err(ETIMEDOUT)));
        // Now the other queue's hang is seen.
        wait_count(&dev.stats[other].timeouts, 1);
        assert_eq!(dev.timeouts(), 2);
        dev.rings[other].reset();
        dev.queues[other].reset_done(Recovery::Continue)?;
        wait(dones[other])?;
        assert_eq!(dones[other].status(), Some(Err(ETIMEDOUT)));
        Ok(())
    }

    /// Hook: a deadline set on a done fence reaches the backend, the earliest one and once: at
    /// once for a job on the hardware, when it runs for a job that waits.
    #[test]
    fn deadlines_reach_the_backend() -> Result {
        let f = Fixture::new(c"deadline", 1, None)?;
        let base = Instant::<Monotonic>::now() + Delta::from_secs(100);
        let at = |ms: i64| base + Delta::from_millis(ms);
        // Long enough to be on the hardware for the first half of the test.
        let mut a = f.job(1, Delta::from_secs(1))?;
        a.payload_mut().deadline_base = Some(base);
        let done_a = f.queue().submit(a)?;
        // Long enough to be still on the hardware when `run` returns: a job the hardware
        // finished before that never runs for the queue, and is told nothing.
        let mut b = f.job(1, Delta::from_millis(50))?;
        b.payload_mut().deadline_base = Some(base);
        let done_b = f.queue().submit(b)?;
        wait_runs(&f, 1);
        // `b` waits for `a`'s credit: it is told when it runs.
        done_b.set_deadline(at(30));
        done_a.set_deadline(at(50));
        wait_count(&f.stats.deadlines, 1);
        assert_eq!(f.stats.last_deadline_ms.load(ordering::Relaxed), 50);
        // A later deadline is not news; an earlier one is.
        done_a.set_deadline(at(70));
        done_a.set_deadline(at(40));
        wait_count(&f.stats.deadlines, 2);
        assert_eq!(f.stats.last_deadline_ms.load(ordering::Relaxed), 40);
        assert_eq!(Stats::get(&f.stats.runs), 1);
        wait(&done_b)?;
        assert_eq!(Stats::get(&f.stats.deadlines), 3);
        assert_eq!(f.stats.last_deadline_ms.load(ordering::Relaxed), 30);
        // Finished jobs take no more deadlines.
        done_b.set_deadline(at(1));
        let (_ring, stats) = f.teardown();
        assert_eq!(Stats::get(&stats.deadlines), 3);
        Ok(())
    }

    #[test]
    fn stop_and_resume() -> Result {
        let f = Fixture::new(c"stop", 4, None)?;
        // Continue: jobs on the hardware keep their hardware fences.
        let a = f.submit_simple(Delta::from_millis(20))?;
        wait_runs(&f, 1);
        let stopped = f.queue().stop();
        let b = f.submit_simple(us(10))?;
        fsleep(Delta::from_millis(40));
        assert_eq!(b.status(), None);
        assert_eq!(Stats::get(&f.stats.runs), 1);
        stopped.resume(Recovery::Continue);
        assert_eq!(wait(&b), Ok(()));
        assert_eq!(a.status(), Some(Ok(())));

        // Cancel: the ring was reset and the jobs on it are lost.
        let mut hang = f.job(1, us(10))?;
        hang.payload_mut().behaviour = Behaviour::Hang;
        let c = f.queue().submit(hang)?;
        wait_runs(&f, 3);
        let stopped = f.queue().stop();
        f.ring.reset();
        stopped.resume(Recovery::Cancel(ECANCELED));
        assert_eq!(wait(&c), Ok(()));
        assert_eq!(c.status(), Some(Err(ECANCELED)));

        // Resubmit: run again after the reset.
        let mut hang = f.job(1, us(10))?;
        hang.payload_mut().behaviour = Behaviour::Hang;
        let d = f.queue().submit(hang)?;
        wait_runs(&f, 4);
        {
            let stopped = f.queue().stop();
            f.ring.reset();
            stopped.resume(Recovery::Resubmit);
        }
        // Run again, and hung again (the mock does what the payload says): reset and cancel.
        wait_runs(&f, 5);
        assert_eq!(Stats::get(&f.stats.runs), 5);
        let stopped = f.queue().stop();
        f.ring.reset();
        stopped.resume(Recovery::Cancel(EIO));
        assert_eq!(wait(&d), Ok(()));
        assert_eq!(d.status(), Some(Err(EIO)));
        Ok(())
    }

    #[test]
    fn device_gone() -> Result {
        let f = Fixture::with_action(
            c"gone",
            4,
            Some(Delta::from_millis(20)),
            TimeoutAction::DeviceGone,
        )?;
        let mut hang = f.job(1, us(10))?;
        hang.payload_mut().behaviour = Behaviour::Hang;
        let hung = f.queue().submit(hang)?;
        let blocked = f.submit_simple(us(10))?;
        wait(&blocked)?;
        assert_eq!(hung.status(), Some(Err(ENODEV)));
        assert_eq!(blocked.status(), Some(Err(ENODEV)));
        let job = f.job(1, us(10))?;
        let err = f.queue().submit(job).err().ok_or(EINVAL)?;
        assert_eq!(err.error, ENODEV);
        Ok(())
    }

    /// Submitters racing a timeout that finds the device gone: each submission is refused with
    /// `ENODEV` or its done fence signals (with `ENODEV` unless it finished before), none is lost
    /// between the submission list and the queue's end.
    #[test]
    fn submit_races_device_gone() -> Result {
        let f = Arc::new(
            Fixture::with_action(
                c"gone-race",
                4,
                Some(Delta::from_millis(20)),
                TimeoutAction::DeviceGone,
            )?,
            GFP_KERNEL,
        )?;
        let mut hang = f.job(1, us(10))?;
        hang.payload_mut().behaviour = Behaviour::Hang;
        let hung = f.queue().submit(hang)?;
        let submitters = Submitter::spawn(&f, 4, 400)?;
        wait(&hung)?;
        assert_eq!(hung.status(), Some(Err(ENODEV)));
        for s in &submitters {
            s.work.flush();
            assert!(s.in_order.load(ordering::Relaxed));
            let last = s.last.lock().clone();
            if let Some(last) = last {
                wait(&last)?;
                assert!(matches!(last.status(), Some(Ok(()) | Err(ENODEV))));
            }
        }
        // Refused from the end on. The fences of the run are counted: every one signals.
        let job = f.job(1, us(10))?;
        assert_eq!(f.queue().submit(job).err().map(|e| e.error), Some(ENODEV));
        Ok(())
    }

    /// Defect 1: teardown stops the ring through the backend before it finishes the jobs on it,
    /// and waits one timeout for all of them, not one per job.
    #[test]
    fn teardown_stops_the_ring_before_finishing() -> Result {
        let f = Fixture::with_action(
            c"teardown-kill",
            4,
            Some(Delta::from_millis(100)),
            TimeoutAction::NoHang,
        )?;
        let mut dones = KVec::new();
        for _ in 0..3 {
            let mut job = f.job(1, us(10))?;
            job.payload_mut().behaviour = Behaviour::Hang;
            dones.push(f.queue().submit(job)?, GFP_KERNEL)?;
        }
        wait_runs(&f, 3);
        let start = kernel::time::Instant::<Monotonic>::now();
        let (ring, stats) = f.teardown();
        let took = start.elapsed();
        for done in &dones {
            assert_eq!(done.status(), Some(Err(ECANCELED)));
        }
        assert_eq!(Stats::get(&stats.freed_while_running), 0);
        assert_eq!(Stats::get(&stats.dropped), 3);
        assert!(took < Delta::from_millis(250));
        ring.reset();
        Ok(())
    }

    /// Defect 3: after a reset that continues the other jobs, the next hang is detected too.
    #[test]
    fn reset_continue_rearms_timeout() -> Result {
        let f = Fixture::with_action(
            c"reset-continue",
            4,
            Some(Delta::from_millis(30)),
            TimeoutAction::Reset(Recovery::Continue),
        )?;
        let mut first = f.job(1, us(10))?;
        first.payload_mut().behaviour = Behaviour::Hang;
        let first = f.queue().submit(first)?;
        let mut second = f.job(1, us(10))?;
        second.payload_mut().behaviour = Behaviour::Hang;
        let second = f.queue().submit(second)?;
        wait(&first)?;
        assert_eq!(first.status(), Some(Err(ETIMEDOUT)));
        // Nothing new starts: the timeout must still be armed for the second job.
        let _ = second.wait_timeout(Delta::from_millis(500));
        assert_eq!(second.status(), Some(Err(ETIMEDOUT)));
        assert_eq!(Stats::get(&f.stats.timeouts), 2);
        Ok(())
    }

    /// Defect 4: the time a queue is stopped does not count towards a job's timeout.
    #[test]
    fn time_stopped_does_not_count() -> Result {
        let f = Fixture::new(c"stop-time", 4, Some(Delta::from_millis(200)))?;
        let mut job = f.job(1, us(10))?;
        job.payload_mut().behaviour = Behaviour::Hang;
        let done = f.queue().submit(job)?;
        wait_runs(&f, 1);
        let stopped = f.queue().stop();
        fsleep(Delta::from_millis(150));
        stopped.resume(Recovery::Continue);
        // 250 ms after the start, 100 ms of which not stopped: no timeout yet.
        fsleep(Delta::from_millis(100));
        assert_eq!(Stats::get(&f.stats.timeouts), 0);
        assert_eq!(done.status(), None);
        wait(&done)?;
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        Ok(())
    }

    /// Defect 5: a job whose hardware fence signalled while the queue was stopped has finished,
    /// whatever the recovery: it is neither run again nor reported failed.
    #[test]
    fn recover_keeps_hw_completions() -> Result {
        let f = Fixture::new(c"recover-done", 4, None)?;
        let a = f.submit_simple(Delta::from_millis(20))?;
        wait_runs(&f, 1);
        let stopped = f.queue().stop();
        fsleep(Delta::from_millis(60));
        assert_eq!(f.ring.completed(), 1);
        stopped.resume(Recovery::Resubmit);
        wait(&a)?;
        assert_eq!(a.status(), Some(Ok(())));
        let b = f.submit_simple(Delta::from_millis(20))?;
        wait_runs(&f, 2);
        let stopped = f.queue().stop();
        fsleep(Delta::from_millis(60));
        stopped.resume(Recovery::Cancel(EIO));
        wait(&b)?;
        assert_eq!(b.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 2);
        assert_eq!(Stats::get(&f.stats.cancelled), 0);
        Ok(())
    }

    /// Defect 6: credits come back before payloads are dropped, so a payload drop that waits
    /// for a later job of a one-credit ring does not deadlock.
    #[test]
    fn credits_return_before_payload_drop() -> Result {
        let f = Fixture::new(c"credit-drop", 1, None)?;
        let mut first = f.job(1, us(100))?;
        let second = f.job(1, us(100))?;
        // The first payload's drop waits for the second job's done fence.
        let mut proxy = fence_to_follow()?;
        first.payload_mut().wait_on_drop = Some(proxy.fence().clone());
        let a = f.queue().submit(first)?;
        let b = f.queue().submit(second)?;
        proxy.as_mut().follow(b.clone())?;
        wait(&a)?;
        wait(&b)?;
        wait_count(&f.stats.dropped, 2);
        assert_eq!(Stats::get(&f.stats.drop_wait_failed), 0);
        assert_eq!(b.status(), Some(Ok(())));
        drop(proxy);
        Ok(())
    }

    /// A job's credits come back when its hardware fence signals its done fence, in that fence's
    /// signalling path: not once the retire work has run, held up here behind a blocker.
    #[test]
    fn credits_come_back_with_the_hardware_fence() -> Result {
        let wq = Arc::new(
            FenceWorkqueue::new_ordered(c"jq_kunit_credits")?,
            GFP_KERNEL,
        )?;
        let f = Fixture::on_workqueue(c"credits-hw", 2, &wq)?;
        let hw_ctx = FenceContext::new(c"jobqueue_kunit", c"credits-hw");
        let hw = hw_ctx.new_fence(GFP_KERNEL)?;
        let mut job = f.job(2, us(10))?;
        job.payload_mut().external_hw = Some(hw.to_aref());
        let done = f.queue().submit(job)?;
        wait_runs(&f, 1);
        // The run work has made the done fence follow the hardware fence.
        wq.flush();
        let blocked = Blocker::block(&wq)?;
        let before = f.queue().stats().credits_in_use;
        hw.signal(Ok(()));
        let status = done.status();
        let after = f.queue().stats().credits_in_use;
        drop(blocked);
        wait(&done)?;
        assert_eq!(status, Some(Ok(())));
        assert_eq!((before, after), (2, 0));
        Ok(())
    }

    /// A job's timeout counts from when the job before it finished, also when the retire work
    /// retires more jobs than it takes in one hold of the queue's lock (`RETIRE_BATCH`, 16): here
    /// 16 jobs finish together while the workqueue is held up, 250 ms into a 400 ms timeout, and
    /// the 17th, handed to the ring with them, must not time out 400 ms after it was.
    #[test]
    fn timeout_counts_from_the_previous_job_after_a_full_retire_batch() -> Result {
        const JOBS: usize = 17;
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"jq_kunit_batch")?, GFP_KERNEL)?;
        let mut options = QueueOptions::new(
            c"jobqueue_kunit",
            c"timeout-batch",
            JOBS as u32,
            Some(Delta::from_millis(400)),
        );
        options.workqueue = Some(wq.clone());
        let f = Fixture::build(options, JOBS, TimeoutAction::Reset(Recovery::Resubmit))?;
        let hw_ctx = FenceContext::new(c"jobqueue_kunit", c"timeout-batch-hw");
        let mut hws = KVec::with_capacity(JOBS, GFP_KERNEL)?;
        let mut dones = KVec::with_capacity(JOBS, GFP_KERNEL)?;
        for _ in 0..JOBS {
            let hw = hw_ctx.new_fence(GFP_KERNEL)?;
            let mut job = f.job(1, us(10))?;
            job.payload_mut().external_hw = Some(hw.to_aref());
            dones.push(f.queue().submit(job)?, GFP_KERNEL)?;
            hws.push(hw, GFP_KERNEL)?;
        }
        wait_runs(&f, JOBS as u32);
        fsleep(Delta::from_millis(250));
        let last = hws.pop().ok_or(EINVAL)?;
        {
            let _blocked = Blocker::block(&wq)?;
            for hw in hws.drain_all() {
                hw.signal(Ok(()));
            }
        }
        // The first 16 retire now; the 17th runs from now on, for 250 ms of its 400.
        fsleep(Delta::from_millis(250));
        let timeouts = Stats::get(&f.stats.timeouts);
        last.signal(Ok(()));
        for done in &dones {
            wait(done)?;
        }
        assert_eq!(timeouts, 0);
        assert_eq!(Stats::get(&f.stats.runs), JOBS as u32);
        Ok(())
    }

    /// Submits to `f`, whose queue runs on `wq`, a job whose payload's drop waits for the done
    /// fence `later` returns, and makes the retire work that drops it come on `wq` before the
    /// run work that hands on the jobs `later` submits. Returns whether the drop's wait
    /// succeeded.
    fn drop_waits_for(
        f: &Fixture,
        wq: &FenceWorkqueue,
        later: impl FnOnce() -> Result<ARef<DmaFence>>,
    ) -> Result<bool> {
        let hw_ctx = FenceContext::new(c"jobqueue_kunit", c"drop-wait-hw");
        let hw = hw_ctx.new_fence(GFP_KERNEL)?;
        let mut proxy = fence_to_follow()?;
        let mut first = f.job(1, us(10))?;
        first.payload_mut().external_hw = Some(hw.to_aref());
        first.payload_mut().wait_on_drop = Some(proxy.fence().clone());
        let first = f.queue().submit(first)?;
        wait_runs(f, 1);
        // The retire work has armed its callback on the first job's done fence.
        wq.flush();
        let blocked = Blocker::block(wq)?;
        // The first job's end queues the retire work behind the blocker, the submissions queue
        // the run work behind it.
        hw.signal(Ok(()));
        let last = later()?;
        proxy.as_mut().follow(last.clone())?;
        drop(blocked);
        wait(&first)?;
        wait(&last)?;
        // The first payload is the first dropped.
        wait_count(&f.stats.dropped, 1);
        Ok(Stats::get(&f.stats.dropped) >= 1 && Stats::get(&f.stats.drop_wait_failed) == 0)
    }

    /// A finished job's payload is dropped while a later job of its queue still waits (here for
    /// a dependency), not only once the queue runs out of jobs.
    #[test]
    fn payload_dropped_while_a_job_waits() -> Result {
        let f = Fixture::new(c"drop-soon", 4, None)?;
        // Long enough for the second job to be submitted before the first is retired.
        let first = f.submit_simple(Delta::from_millis(20))?;
        let ctx = FenceContext::new(c"jobqueue_kunit", c"drop-soon-dep");
        let dep = ctx.new_fence(GFP_KERNEL)?;
        let mut job = f.job(1, us(10))?;
        job.add_dependency(dep.to_aref())?;
        let second = f.queue().submit(job)?;
        wait(&first)?;
        wait_count(&f.stats.dropped, 1);
        let dropped = Stats::get(&f.stats.dropped);
        let waiting = second.status().is_none();
        dep.signal(Ok(()));
        wait(&second)?;
        drop(f);
        assert!(waiting);
        assert_eq!(dropped, 1);
        Ok(())
    }

    /// A payload's drop that waits for a later job of its queue does not wait behind the run
    /// work, even when the retire work that drops it finds more jobs to hand on than one run of
    /// the queue hands on (16).
    #[test]
    fn payload_drop_waits_for_a_job_past_one_batch() -> Result {
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"jq_kunit_drop")?, GFP_KERNEL)?;
        let f = Fixture::on_workqueue(c"drop-batch", 64, &wq)?;
        let waited = drop_waits_for(&f, &wq, || {
            let mut last = f.submit_simple(us(10))?;
            for _ in 1..32 {
                last = f.submit_simple(us(10))?;
            }
            Ok(last)
        })?;
        let runs = Stats::get(&f.stats.runs);
        // Before the assertions, which end the test without dropping what it holds.
        drop(f);
        assert!(waited);
        assert_eq!(runs, 33);
        Ok(())
    }

    /// A payload's drop that waits for a job of another queue on the same ordered workqueue
    /// does not wait behind that queue's run work.
    #[test]
    fn payload_drop_waits_for_a_job_of_a_queue_on_the_same_workqueue() -> Result {
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"jq_kunit_drop")?, GFP_KERNEL)?;
        let first = Fixture::on_workqueue(c"drop-shared-0", 4, &wq)?;
        let second = Fixture::on_workqueue(c"drop-shared-1", 4, &wq)?;
        let waited = drop_waits_for(&first, &wq, || second.submit_simple(us(10)))?;
        drop(first);
        drop(second);
        assert!(waited);
        Ok(())
    }

    /// Defect 7: a hardware fence the done fence cannot follow does not cut the job loose.
    #[test]
    fn hw_fence_of_too_high_level() -> Result {
        let f = Fixture::new(c"high-level", 4, None)?;
        let mut job = f.job(1, Delta::from_millis(20))?;
        job.payload_mut().high_level_hw = true;
        let a = f.queue().submit(job)?;
        let b = f.submit_simple(us(10))?;
        let mut order = OrderWatch::new()?;
        order.watch(&a)?;
        order.watch(&b)?;
        wait(&b)?;
        assert_eq!(a.status(), Some(Ok(())));
        assert!(order.in_order());
        let mut tries = 0;
        while Stats::get(&f.stats.dropped) < 2 && tries < 2000 {
            fsleep(us(1000));
            tries += 1;
        }
        assert_eq!(Stats::get(&f.stats.freed_while_running), 0);
        assert_eq!(Stats::get(&f.stats.cancelled), 0);
        Ok(())
    }

    /// Defect 8: teardown keeps the result a waiting job already had.
    #[test]
    fn teardown_keeps_recorded_results() -> Result {
        let f = Fixture::new(c"teardown-results", 4, None)?;
        let slow = f.submit_simple(Delta::from_millis(100))?;
        let mut failing = f.job(1, us(10))?;
        failing.payload_mut().run_error = Some(EBUSY);
        let failed = f.queue().submit(failing)?;
        let mut instant = f.job(1, us(10))?;
        instant.payload_mut().signalled_hw = Some(Ok(()));
        let completed = f.queue().submit(instant)?;
        // Torn down once the run work ran all three, while the slow job runs and the other two
        // wait for their turn to signal.
        wait_runs(&f, 3);
        let mut order = OrderWatch::new()?;
        for fence in [&slow, &failed, &completed] {
            order.watch(fence)?;
        }
        let (_ring, stats) = f.teardown();
        assert_eq!(slow.status(), Some(Ok(())));
        assert_eq!(failed.status(), Some(Err(EBUSY)));
        assert_eq!(completed.status(), Some(Ok(())));
        assert!(order.in_order());
        assert_eq!(Stats::get(&stats.cancelled), 1);
        assert_eq!(Stats::get(&stats.dropped), 3);
        Ok(())
    }

    /// Defect 9: a dependency that reports signalled when polled, without its error (as a
    /// `dma_fence_array` does), still fails the job.
    #[test]
    fn polled_dependency_error_is_seen() -> Result {
        let f = Fixture::new(c"polled-dep", 4, None)?;
        let ctx = FenceContext::new(c"jobqueue_kunit", c"member");
        let member = ctx.new_fence(GFP_KERNEL)?;
        let member_ref = member.to_aref();
        let array = polled_fence(&member_ref)?;
        member.signal(Err(EIO));
        let mut job = f.job(1, us(10))?;
        job.add_dependency(array.clone())?;
        let done = f.queue().submit(job)?;
        wait(&done)?;
        assert_eq!(done.status(), Some(Err(EIO)));
        assert_eq!(Stats::get(&f.stats.runs), 0);
        Ok(())
    }

    /// Defect 10: a job that fails without running does not hold back the jobs behind it, and
    /// the done fences still signal in order.
    #[test]
    fn failed_job_does_not_hold_back_the_next() -> Result {
        let f = Fixture::new(c"no-holdback", 4, None)?;
        let slow = f.submit_simple(Delta::from_millis(200))?;
        let mut failing = f.job(1, us(10))?;
        failing.payload_mut().run_error = Some(EBUSY);
        let failed = f.queue().submit(failing)?;
        let other_ctx = FenceContext::new(c"jobqueue_kunit", c"holdback-dep");
        let dep = other_ctx.new_fence(GFP_KERNEL)?;
        let mut dep_failing = f.job(1, us(10))?;
        dep_failing.add_dependency(dep.to_aref())?;
        let dep_failed = f.queue().submit(dep_failing)?;
        dep.signal(Err(EIO));
        let fast = f.submit_simple(us(10))?;
        let mut order = OrderWatch::new()?;
        for fence in [&slow, &failed, &dep_failed, &fast] {
            order.watch(fence)?;
        }
        // The fast job runs while the slow one is still on the ring.
        wait_runs(&f, 3);
        assert_eq!(Stats::get(&f.stats.runs), 3);
        assert_eq!(slow.status(), None);
        wait(&fast)?;
        assert!(order.in_order());
        assert_eq!(failed.status(), Some(Err(EBUSY)));
        assert_eq!(dep_failed.status(), Some(Err(EIO)));
        assert_eq!(fast.status(), Some(Ok(())));
        Ok(())
    }

    /// Defect 10: the timeout work can run before the retire work (on a workqueue that is not
    /// ordered, or the reset domain's); it must not judge the new oldest job by when it was
    /// handed to the ring.
    #[test]
    fn stale_start_on_unordered_workqueue() -> Result {
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"jq_kunit_stale")?, GFP_KERNEL)?;
        let domain = ResetDomain::new(c"jq-kunit-stale")?;
        let mut options = QueueOptions::new(
            c"jobqueue_kunit",
            c"stale-start",
            4,
            Some(Delta::from_millis(400)),
        );
        options.workqueue = Some(wq.clone());
        let action = TimeoutAction::Reset(Recovery::Resubmit);
        let f = Fixture::build_in(options, 4, action, Some(&domain))?;
        // Both on the ring at once: `b` runs from when `a` ends, 300 ms on, to 500 ms, past the
        // timeout counted from when it was handed to the ring.
        let a = f.submit_simple(Delta::from_millis(300))?;
        let b = f.submit_simple(Delta::from_millis(200))?;
        wait_runs(&f, 2);
        // The retire work has armed its callback on `a`'s done fence; when `a` ends, it waits
        // behind the blocker, and the timeout work, on the domain's workqueue, comes first.
        wq.flush();
        let blocked = Blocker::block(&wq)?;
        let set_up = a.status().is_none();
        wait(&a)?;
        wait(&b)?;
        drop(blocked);
        let (status, timeouts) = (b.status(), Stats::get(&f.stats.timeouts));
        drop(f);
        // Otherwise the retire work may have run before the blocker, and nothing was tested.
        assert!(set_up);
        assert_eq!(status, Some(Ok(())));
        assert_eq!(timeouts, 0);
        Ok(())
    }

    /// Defect 10: with `pipeline_own_dependencies`, a job that depends on an earlier job of its
    /// own queue is handed to the ring while that job runs; by default it waits for it.
    #[test]
    fn own_dependencies_pipelined_on_request() -> Result {
        for pipeline in [false, true] {
            let mut options = QueueOptions::new(c"jobqueue_kunit", c"pipeline", 4, None);
            options.pipeline_own_dependencies = pipeline;
            let f = Fixture::build(options, 4, TimeoutAction::NoHang)?;
            let first = f.submit_simple(Delta::from_millis(50))?;
            let mut second = f.job(1, us(10))?;
            second.add_dependency(first.clone())?;
            let second = f.queue().submit(second)?;
            let mut order = OrderWatch::new()?;
            order.watch(&first)?;
            order.watch(&second)?;
            fsleep(Delta::from_millis(10));
            let expected = if pipeline { 2 } else { 1 };
            assert_eq!(Stats::get(&f.stats.runs), expected);
            wait(&second)?;
            assert!(order.in_order());
            assert_eq!(second.status(), Some(Ok(())));
        }
        Ok(())
    }

    /// Hook: a fault handles the oldest job as timed out at once.
    #[test]
    fn fault_times_out_now() -> Result {
        let f = Fixture::new(c"fault", 4, Some(LONG))?;
        let mut job = f.job(1, us(10))?;
        job.payload_mut().behaviour = Behaviour::Hang;
        let done = f.queue().submit(job)?;
        wait_runs(&f, 1);
        f.queue().fault();
        assert_eq!(done.wait_timeout(Delta::from_secs(2)), Ok(()));
        assert_eq!(done.status(), Some(Err(ETIMEDOUT)));
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        Ok(())
    }

    /// Hook: a suspended timeout does not fire, and the time it was suspended does not count.
    #[test]
    fn suspended_timeout_does_not_fire() -> Result {
        let f = Fixture::new(c"suspend", 4, Some(Delta::from_millis(50)))?;
        let mut job = f.job(1, us(10))?;
        job.payload_mut().behaviour = Behaviour::Hang;
        let done = f.queue().submit(job)?;
        f.queue().suspend_timeout();
        fsleep(Delta::from_millis(150));
        assert_eq!(Stats::get(&f.stats.timeouts), 0);
        assert_eq!(done.status(), None);
        f.queue().resume_timeout();
        wait(&done)?;
        assert_eq!(done.status(), Some(Err(ETIMEDOUT)));
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        Ok(())
    }

    /// Hook: a reset the driver completes from its own work; until then nothing of the jobs on
    /// the hardware signals or is dropped.
    #[test]
    fn reset_later_is_completed_by_the_driver() -> Result {
        let f = Fixture::reset_later(c"reset-later")?;
        assert_eq!(f.queue().reset_done(Recovery::Resubmit), Err(EINVAL));
        let (hung, behind) = hang_until_reset_later(&f)?;
        fsleep(Delta::from_millis(60));
        // Stopped: no second timeout, nothing signalled, nothing dropped.
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        assert_eq!(hung.status(), None);
        assert_eq!(behind.status(), None);
        assert_eq!(Stats::get(&f.stats.dropped), 0);
        // Jobs submitted meanwhile wait.
        let later = f.submit_simple(us(10))?;
        assert_eq!(Stats::get(&f.stats.runs), 2);
        // The driver's reset work.
        f.ring.reset();
        f.queue().reset_done(Recovery::Resubmit)?;
        wait(&later)?;
        assert_eq!(hung.status(), Some(Err(ETIMEDOUT)));
        assert_eq!(behind.status(), Some(Ok(())));
        assert_eq!(later.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 4);
        Ok(())
    }

    /// A driver's stops and resumes while a reset it was left is pending: the queue stays
    /// stopped, nothing of the jobs on the hardware signals or is dropped, and the reset's
    /// completion recovers them, with the most drastic recovery asked for, the timed-out job
    /// with `-ETIMEDOUT`.
    #[test]
    fn stops_during_a_pending_reset_recover_nothing() -> Result {
        let f = Fixture::reset_later(c"reset-later-stop")?;
        let (hung, behind) = hang_until_reset_later(&f)?;
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        // The driver finds the ring's jobs lost, then resumes again with nothing to report.
        f.queue().stop().resume(Recovery::Cancel(EIO));
        f.queue().stop().resume(Recovery::Continue);
        fsleep(Delta::from_millis(60));
        assert_eq!(hung.status(), None);
        assert_eq!(behind.status(), None);
        assert_eq!(Stats::get(&f.stats.dropped), 0);
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        let later = f.submit_simple(us(10))?;
        assert_eq!(Stats::get(&f.stats.runs), 2);
        // The driver's reset work: its hardware fences signal `-ECANCELED`.
        f.ring.reset();
        f.queue().reset_done(Recovery::Continue)?;
        wait(&later)?;
        assert_eq!(hung.status(), Some(Err(ETIMEDOUT)));
        assert_eq!(behind.status(), Some(Err(EIO)));
        assert_eq!(later.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 3);
        Ok(())
    }

    /// A driver's stop held across the completion of a reset it was left: the queue stays
    /// stopped, and the driver's resume recovers the jobs as the reset asked, the timed-out job
    /// with `-ETIMEDOUT`.
    #[test]
    fn a_stop_held_across_reset_done_recovers_at_its_resume() -> Result {
        let f = Fixture::reset_later(c"reset-later-held")?;
        let (hung, behind) = hang_until_reset_later(&f)?;
        let stopped = f.queue().stop();
        f.ring.reset();
        f.queue().reset_done(Recovery::Resubmit)?;
        fsleep(Delta::from_millis(60));
        assert_eq!(hung.status(), None);
        assert_eq!(behind.status(), None);
        assert_eq!(Stats::get(&f.stats.runs), 2);
        assert_eq!(Stats::get(&f.stats.dropped), 0);
        stopped.resume(Recovery::Continue);
        wait(&behind)?;
        assert_eq!(hung.status(), Some(Err(ETIMEDOUT)));
        assert_eq!(behind.status(), Some(Ok(())));
        assert_eq!(Stats::get(&f.stats.runs), 3);
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        Ok(())
    }

    /// Recoveries asked for while a reset is pending add up to the most drastic one, whatever
    /// their order: a resubmission asked for by a driver's resume gives way to the reset's
    /// cancellation, and a cancellation asked for first stays with its error.
    #[test]
    fn pending_recoveries_take_the_most_drastic() -> Result {
        for (first, last) in [
            (Recovery::Resubmit, Recovery::Cancel(EIO)),
            (Recovery::Cancel(EIO), Recovery::Resubmit),
            (Recovery::Cancel(EIO), Recovery::Cancel(ENODEV)),
        ] {
            let f = Fixture::reset_later(c"reset-later-merge")?;
            let (hung, behind) = hang_until_reset_later(&f)?;
            f.queue().stop().resume(first);
            f.ring.reset();
            f.queue().reset_done(last)?;
            wait(&behind)?;
            assert_eq!(hung.status(), Some(Err(ETIMEDOUT)));
            assert_eq!(behind.status(), Some(Err(EIO)));
            // Neither job ran again.
            assert_eq!(Stats::get(&f.stats.runs), 2);
        }
        Ok(())
    }

    /// A queue of a reset domain dropped while a reset it was left is pending, after the driver
    /// resumed it with [`Recovery::Cancel`]: the reset never completes, so the teardown ends the
    /// jobs once the backend stopped the ring, not the recovery asked for meanwhile, and no
    /// payload is dropped before. The other queue of the domain, stopped by the reset, resumes.
    #[test]
    fn dropped_during_a_pending_reset_ends_jobs_after_the_ring_stops() -> Result {
        let domain = ResetDomain::new(c"jq-kunit-dropped")?;
        let timeout = Some(Delta::from_millis(30));
        let options = QueueOptions::new(c"jobqueue_kunit", c"reset-later-drop", 4, timeout);
        let f = Fixture::build_in(options, 4, TimeoutAction::ResetLater, Some(&domain))?;
        let options = QueueOptions::new(c"jobqueue_kunit", c"reset-later-peer", 4, None);
        let peer = Fixture::build_in(options, 4, TimeoutAction::ResetLater, Some(&domain))?;
        let (hung, behind) = hang_until_reset_later(&f)?;
        assert_eq!(Stats::get(&f.stats.timeouts), 1);
        f.queue().stop().resume(Recovery::Cancel(EIO));
        let waits = peer.submit_simple(us(10))?;
        fsleep(Delta::from_millis(20));
        assert_eq!(Stats::get(&peer.stats.runs), 0);
        let (_ring, stats) = f.teardown();
        // Ended by the teardown after `stop_hardware()`, whose ring never signals them.
        assert_eq!(Stats::get(&stats.dropped_before_stop), 0);
        assert_eq!(hung.status(), Some(Err(ECANCELED)));
        assert_eq!(behind.status(), Some(Err(ECANCELED)));
        assert_eq!(Stats::get(&stats.freed_while_running), 0);
        assert_eq!(Stats::get(&stats.dropped), 2);
        assert_eq!(Stats::get(&stats.runs), 2);
        wait(&waits)?;
        assert_eq!(waits.status(), Some(Ok(())));
        Ok(())
    }

    /// Hook: jobs of 0 credits where the queue allows them; they take no room and stay in
    /// order.
    #[test]
    fn zero_credit_jobs() -> Result {
        let f = Fixture::new(c"no-zero", 1, None)?;
        assert_eq!(f.job(0, us(10)).err(), Some(EINVAL));
        let mut options = QueueOptions::new(c"jobqueue_kunit", c"zero", 1, None);
        options.allow_zero_credits = true;
        let f = Fixture::build(options, 4, TimeoutAction::NoHang)?;
        let a = f.submit_simple(Delta::from_millis(50))?;
        let b = f.queue().submit(f.job(0, us(10))?)?;
        let c = f.submit_simple(us(10))?;
        let mut order = OrderWatch::new()?;
        for fence in [&a, &b, &c] {
            order.watch(fence)?;
        }
        // The job of 0 credits runs while the other holds the ring's only credit.
        wait_runs(&f, 2);
        assert_eq!(Stats::get(&f.stats.runs), 2);
        assert_eq!(a.status(), None);
        wait(&c)?;
        assert!(order.in_order());
        assert!([&a, &b, &c].iter().all(|d| d.status() == Some(Ok(()))));
        assert!(f.ring.max_credits() <= 1);
        Ok(())
    }

    /// Defect 10: credits add up without overflowing, whatever the capacity.
    #[test]
    fn credits_do_not_overflow() -> Result {
        let f = Fixture::build(
            QueueOptions::new(c"jobqueue_kunit", c"overflow", 0xc000_0000, None),
            4,
            TimeoutAction::NoHang,
        )?;
        let mut big = f.job(0x8000_0000, us(10))?;
        big.payload_mut().behaviour = Behaviour::Hang;
        let first = f.queue().submit(big)?;
        let second = f.queue().submit(f.job(0x8000_0000, us(10))?)?;
        wait_runs(&f, 1);
        fsleep(Delta::from_millis(20));
        // The second job does not fit while the first runs.
        assert_eq!(Stats::get(&f.stats.runs), 1);
        f.ring.reset();
        wait(&first)?;
        wait(&second)?;
        assert_eq!(second.status(), Some(Ok(())));
        Ok(())
    }
}

/// Every allocation on the paths of the job queue and of dma_fence fails once
/// ([`kernel::fault_inject::sweep`]): each gives a clean `ENOMEM`, leaves no fence unsignalled and
/// the queue usable.
///
/// `GFP_KERNEL` allocations can be made to fail only once failslab's `ignore-gfp-wait` is off,
/// which only debugfs can do: at boot the cases skip, and harness/initramfs-init runs the suite
/// again through `/sys/kernel/debug/kunit/<suite>/run` once it has turned it off.
#[cfg(CONFIG_FAULT_INJECTION)]
#[kunit_tests(drm_jobqueue_fault_injection)]
mod fault_tests {
    use super::*;
    use core::cell::{
        Cell,
        RefCell, //
    };
    use kernel::{
        dma_fence::{
            Armed,
            CompleteCompletion,
            FenceCallback,
            ProxyFence, //
        },
        fault_inject::{
            check_fail_nth,
            kunit::{
                armed_or_skip,
                reset_cases, //
            },
            sweep, //
        },
        kthread,
        sync::Completion, //
    };

    fn nothing() -> Result {
        Ok(())
    }

    /// The result a job's done fence signalled, once it has.
    fn finished(done: &ARef<DmaFence>) -> Result {
        wait(done)?;
        done.status().unwrap_or(Err(EBUSY))
    }

    /// Runs one job through `queue` and checks that it completed.
    fn run_one(queue: &JobQueue<MockBackend>, stats: &Arc<Stats>) -> Result {
        let job = queue.new_job(1, MockJob::new(stats, us(10))?)?;
        finished(&queue.submit(job)?)
    }

    /// Checks the fence `last` holds, made by an operation that returned `result`: signalled
    /// `Ok` if the operation succeeded, `-ECANCELED` (dropped unsignalled) if it failed.
    fn fence_signalled(last: &Cell<Option<ARef<DmaFence>>>, result: Result) -> Result {
        let Some(fence) = last.take() else {
            return if result.is_err() { Ok(()) } else { Err(EINVAL) };
        };
        match (result, fence.status()) {
            (Ok(()), Some(Ok(()))) => Ok(()),
            (Err(_), Some(Err(e))) if e == ECANCELED => Ok(()),
            (_, None) => Err(EBUSY),
            _ => Err(EINVAL),
        }
    }

    #[test]
    fn fences_and_callbacks() -> Result {
        if !armed_or_skip() {
            return Ok(());
        }
        let ctx = FenceContext::new(c"jobqueue_kunit", c"fault-fences");
        let nested = NestedFenceContext::new(c"jobqueue_kunit", c"fault-nested", 1)?;
        let last = Cell::new(None);

        let s = sweep(
            "FenceContext::new_fence",
            nothing,
            || {
                let fence = ctx.new_fence(GFP_KERNEL)?;
                last.set(Some(fence.to_aref()));
                fence.signal(Ok(()));
                Ok(())
            },
            |r| fence_signalled(&last, r),
        )?;
        assert!(s.enomem >= 1);

        let s = sweep(
            "NestedFenceContext::new_fence",
            nothing,
            || {
                let fence = nested.new_fence(GFP_KERNEL)?;
                last.set(Some(fence.to_aref()));
                fence.signal(Ok(()));
                Ok(())
            },
            |r| fence_signalled(&last, r),
        )?;
        assert!(s.enomem >= 1);

        // The proxy's box fails after its fence was made: the fence signals -ECANCELED.
        let s = sweep(
            "ProxyFence",
            nothing,
            || {
                let fence = nested.new_fence(GFP_KERNEL)?;
                last.set(Some(fence.to_aref()));
                let mut proxy = KBox::pin_init(ProxyFence::new(fence), GFP_KERNEL)?;
                proxy.as_mut().signal(Ok(()));
                Ok(())
            },
            |r| fence_signalled(&last, r),
        )?;
        assert!(s.enomem >= 1);

        let s = sweep(
            "FenceCallback",
            nothing,
            || {
                let fence = ctx.new_fence(GFP_KERNEL)?;
                last.set(Some(fence.to_aref()));
                let done = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
                let mut cb = KBox::pin_init(
                    FenceCallback::new(CompleteCompletion::new(done.clone())),
                    GFP_KERNEL,
                )?;
                if cb.as_mut().arm(fence.to_aref()) != Armed::Waiting {
                    return Err(EINVAL);
                }
                fence.signal(Ok(()));
                done.wait_for_completion();
                Ok(())
            },
            |r| fence_signalled(&last, r),
        )?;
        assert!(s.enomem >= 1);
        Ok(())
    }

    #[test]
    fn workqueues_and_workers() -> Result {
        if !armed_or_skip() {
            return Ok(());
        }
        let s = sweep(
            "FenceWorkqueue::new_ordered",
            nothing,
            || FenceWorkqueue::new_ordered(c"jq_fault_ordered").map(drop),
            |_| Ok(()),
        )?;
        assert!(s.enomem >= 1);
        let s = sweep(
            "FenceWorkqueue::new_unbound",
            nothing,
            || FenceWorkqueue::new_unbound(c"jq_fault_unbound").map(drop),
            |_| Ok(()),
        )?;
        assert!(s.enomem >= 1);
        let s = sweep(
            "kthread::Worker::new",
            nothing,
            || kthread::Worker::new(c"jq_fault_worker").map(drop),
            |_| Ok(()),
        )?;
        assert!(s.enomem >= 1);
        Ok(())
    }

    #[test]
    fn queue_creation() -> Result {
        if !armed_or_skip() {
            return Ok(());
        }
        // A queue's teardown kills its ring for good: each run has a ring of its own.
        let ring = RefCell::new(MockRing::new(8)?);
        let stats = Stats::new()?;
        let wq = Arc::new(FenceWorkqueue::new_ordered(c"jq_fault_shared")?, GFP_KERNEL)?;
        let made = RefCell::new(None);
        let prepare = || {
            ring.replace(MockRing::new(8)?);
            Ok(())
        };
        let backend = || MockBackend {
            ring: ring.borrow().clone(),
            stats: stats.clone(),
            on_timeout: TimeoutAction::NoHang,
            peers: KVec::new(),
        };
        let options = |shared: bool| {
            let mut options = QueueOptions::new(c"jobqueue_kunit", c"fault-queue", 8, None);
            if shared {
                options.workqueue = Some(wq.clone());
            }
            options
        };
        // Whether or not it was made, a queue on the same ring runs a job.
        let check = |shared: bool| {
            let _ring = RingGuard(ring.borrow().clone());
            let queue = match made.take() {
                Some(queue) => queue,
                None => JobQueue::new(backend(), options(shared))?,
            };
            run_one(&queue, &stats)
        };

        // Its own workqueue (alloc_workqueue()), the state, three fence callbacks.
        let s = sweep(
            "JobQueue::new",
            prepare,
            || {
                made.replace(Some(JobQueue::new(backend(), options(false))?));
                Ok(())
            },
            |_| check(false),
        )?;
        assert!(s.enomem >= 5);
        // On a shared workqueue: the state and the three fence callbacks.
        let s = sweep(
            "JobQueue::new shared workqueue",
            prepare,
            || {
                made.replace(Some(JobQueue::new(backend(), options(true))?));
                Ok(())
            },
            |_| check(true),
        )?;
        assert!(s.enomem >= 1);
        Ok(())
    }

    #[test]
    fn job_creation() -> Result {
        if !armed_or_skip() {
            return Ok(());
        }
        let f = Fixture::new(c"fault-jobs", 8, None)?;
        // Each payload has counters of its own: its drop is seen at once.
        let payload = RefCell::new(None);
        let stats = RefCell::new(Stats::new()?);
        let job = RefCell::new(None);
        let s = sweep(
            "JobQueue::new_job",
            || {
                let own = Stats::new()?;
                payload.replace(Some(MockJob::new(&own, us(10))?));
                stats.replace(own);
                Ok(())
            },
            || {
                let payload = payload.take().ok_or(EINVAL)?;
                job.replace(Some(f.queue().new_job(1, payload)?));
                Ok(())
            },
            |r| {
                match job.take() {
                    Some(job) => finished(&f.queue().submit(job)?)?,
                    // The payload came back and was dropped, not leaked.
                    None if r.is_err() && Stats::get(&stats.borrow().dropped) == 1 => {}
                    None => return Err(EINVAL),
                }
                run_one(f.queue(), &f.stats)
            },
        )?;
        // The done fence's memory and the job's node.
        assert!(s.enomem >= 2);

        // A new queue has room for 16 jobs (`INITIAL_SLOTS` in queue.rs): with 16 held
        // unsubmitted, the next job doubles the room (three more allocations). Each failure
        // leaves the room and the held jobs as they were.
        let fixture = RefCell::new(None);
        let held = RefCell::new(KVec::new());
        let s = sweep(
            "JobQueue::new_job growing the room for jobs",
            || {
                let grow = Fixture::new(c"fault-slots", 8, None)?;
                let mut held = held.borrow_mut();
                held.clear();
                held.reserve(17, GFP_KERNEL)?;
                for _ in 0..16 {
                    held.push(grow.job(1, us(10))?, GFP_KERNEL)?;
                }
                payload.replace(Some(MockJob::new(&grow.stats, us(10))?));
                fixture.replace(Some(grow));
                Ok(())
            },
            || {
                let payload = payload.take().ok_or(EINVAL)?;
                let fixture = fixture.borrow();
                let grow = fixture.as_ref().ok_or(EINVAL)?;
                let job = grow.queue().new_job(1, payload)?;
                held.borrow_mut().push(job, GFP_KERNEL)?;
                Ok(())
            },
            |r| {
                let fixture = fixture.borrow();
                let grow = fixture.as_ref().ok_or(EINVAL)?;
                let mut held = held.borrow_mut();
                if held.len() != if r.is_ok() { 17 } else { 16 } {
                    return Err(EINVAL);
                }
                let mut last = None;
                for job in held.drain_all() {
                    last = Some(grow.queue().submit(job)?);
                }
                finished(&last.ok_or(EINVAL)?)?;
                run_one(grow.queue(), &grow.stats)
            },
        )?;
        // The done fence's memory and the job's node fail with `ENOMEM`; the three buffers of
        // the larger room are allocated with `kvmalloc()`, which falls back to `vmalloc()` when
        // `kmalloc()` fails, so not every failure there is one.
        assert!(s.enomem >= 2);
        assert!(s.points >= 7);
        Ok(())
    }

    #[test]
    fn dependencies() -> Result {
        if !armed_or_skip() {
            return Ok(());
        }
        let f = Fixture::new(c"fault-deps", 8, None)?;
        let contexts = [c"dep0", c"dep1", c"dep2", c"dep3"]
            .map(|name| FenceContext::new(c"jobqueue_kunit", name));
        let job = RefCell::new(None);
        let deps = RefCell::new(KVec::new());
        let prepare = || {
            job.replace(Some(f.job(1, us(10))?));
            let mut deps = deps.borrow_mut();
            deps.clear();
            for ctx in contexts.iter() {
                deps.push(ctx.new_fence(GFP_KERNEL)?, GFP_KERNEL)?;
            }
            Ok(())
        };
        // Adds the first `n` fences to the job.
        let add = |n: usize| -> Result {
            let mut job = job.borrow_mut();
            let job = job.as_mut().ok_or(EINVAL)?;
            for dep in deps.borrow().iter().take(n) {
                job.add_dependency(dep.to_aref())?;
            }
            Ok(())
        };
        // The job waits for the fences it kept, and runs once they signalled.
        let check = |n: usize, r: Result| -> Result {
            let job = job.take().ok_or(EINVAL)?;
            let kept = job.dependencies();
            if (r.is_ok() && kept != n) || kept > n {
                return Err(EINVAL);
            }
            let done = f.queue().submit(job)?;
            fsleep(us(200));
            if kept > 0 && done.status().is_some() {
                return Err(EINVAL);
            }
            for dep in deps.take() {
                dep.signal(Ok(()));
            }
            finished(&done)?;
            run_one(f.queue(), &f.stats)
        };

        let s = sweep("Job::add_dependency", prepare, || add(1), |r| check(1, r))?;
        assert!(s.enomem >= 1);
        let s = sweep(
            "Job::add_dependency x4",
            prepare,
            || add(4),
            |r| check(4, r),
        )?;
        assert!(s.enomem >= 1);
        let s = sweep(
            "Job::reserve_dependencies",
            prepare,
            || {
                job.borrow_mut()
                    .as_mut()
                    .ok_or(EINVAL)?
                    .reserve_dependencies(4)?;
                // Within the reserved room: cannot fail.
                add(4)
            },
            |r| check(4, r),
        )?;
        assert!(s.enomem >= 1);
        Ok(())
    }

    /// Submission does not allocate, as documented: no failure point at all.
    #[test]
    fn submit_does_not_allocate() -> Result {
        if !armed_or_skip() {
            return Ok(());
        }
        let f = Fixture::new(c"fault-submit", 8, None)?;
        let other = FenceContext::new(c"jobqueue_kunit", c"fault-submit-dep");
        let job = RefCell::new(None);
        let dep = RefCell::new(None);
        let done = RefCell::new(None);
        for waits in [false, true] {
            let s = sweep(
                "JobQueue::submit",
                || {
                    let mut new = f.job(1, us(10))?;
                    new.add_dependency(DmaFence::stub())?;
                    if waits {
                        let fence = other.new_fence(GFP_KERNEL)?;
                        new.add_dependency(fence.to_aref())?;
                        dep.replace(Some(fence));
                    }
                    job.replace(Some(new));
                    Ok(())
                },
                || {
                    let job = job.take().ok_or(EINVAL)?;
                    done.replace(Some(f.queue().submit(job)?));
                    Ok(())
                },
                |_| {
                    if let Some(fence) = dep.take() {
                        fence.signal(Ok(()));
                    }
                    finished(&done.take().ok_or(EINVAL)?)?;
                    run_one(f.queue(), &f.stats)
                },
            )?;
            assert_eq!(s.points, 0);
        }
        Ok(())
    }

    /// Last: checks the semantics `fail_nth` has in this run, and lets the cases that skipped
    /// at boot run when harness/initramfs-init runs the suite again.
    #[test]
    fn fail_nth_semantics() -> Result {
        // SAFETY: `TEST_CASES` is the case array of this suite, a static: valid for reads and
        // writes. KUnit runs the suite's cases one after the other and waits meanwhile, so
        // nothing else accesses them.
        unsafe { reset_cases(&raw mut TEST_CASES) };
        check_fail_nth()
    }
}
