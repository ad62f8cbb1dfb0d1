// SPDX-License-Identifier: GPL-2.0 OR MIT

//! A benchmark of the Rust DRM job queue, run at boot side by side with drm_sched.
//!
//! This module runs its workloads on [`JobQueue`]s when it is initialised; `drm_sched_bench.c`
//! runs the same workloads through drm_sched's C API, and two floors, a little later in the same
//! boot: one `dma_fence` with one callback per job, signalled at once (`impl=floor`), and the same
//! fences pushed straight onto the mock hardware below, without a queue (`impl=ring-floor`).
//! Each prints one line per workload to the kernel log, which `harness/run bench` turns into a
//! table:
//!
//! ```text
//! jq-bench: impl=jobqueue workload=chain queues=1 capacity=1024 jobs=10000 reps=5
//!     ns_per_job=... ns_per_job_min=... ns_per_job_max=... submit_ns_per_job=...
//!     submit_to_run_p50_ns=... submit_to_run_p99_ns=... hw_to_done_p50_ns=...
//!     hw_to_done_p99_ns=... wake_p50_ns=... wake_p99_ns=... errors=0
//! jq-bench: impl=jobqueue workload=memory queues=1 capacity=1024 jobs=200000 reps=5
//!     bytes_per_job=... bytes_per_job_min=... bytes_per_job_max=...
//! ```
//!
//! (one line each in the log). `ns_per_job` is the median over the repetitions of the time from
//! creating the first job to freeing the last one, divided by the number of jobs; the latencies
//! are the medians over the repetitions of each repetition's percentiles. `submit_ns_per_job` is
//! the part of `ns_per_job` until the last job was submitted (creating and submitting jobs, with
//! the queue working meanwhile). The latencies:
//!
//! - `submit_to_run`: from just before [`JobQueue::submit`] to the start of [`Backend::run`];
//! - `hw_to_done`: from the hardware fence's signal to the done fence's signal (their
//!   timestamps);
//! - `wake`: for a job that waits for others (its dependencies, or on a ring of one credit the job
//!   before it), from the last of their done fences' signals to the start of [`Backend::run`].
//!
//! The mock hardware is the same on both sides and completes at once, or `ring_delay_ns` later:
//! [`Backend::run`] puts the hardware fence in a FIFO and starts an hrtimer whose callback
//! signals the FIFO's fences in order, in hardirq context as an interrupt handler would.
//!
//! The workloads (bit `n` of the `workloads` parameter selects the `n`-th):
//!
//! | name          | jobs    | what                                                       |
//! |---------------|---------|------------------------------------------------------------|
//! | `independent` | 10,000  | one queue, no dependencies                                 |
//! | `chain`       | 10,000  | one queue, each job depends on the previous done fence     |
//! | `chain-2q`    | 10,000  | as `chain`, alternating between two queues                 |
//! | `fan-in-16`   | 8,500   | 500 rounds: a job on each of 16 queues, then one job on a  |
//! |               |         | 17th queue depending on the 16                             |
//! | `queues-64`   | 64,000  | 64 queues of 1,000 jobs, submitted round robin             |
//! | `credit-1`    | 5,000   | a ring of one credit: each job waits for the previous one  |
//! | `independent` | 1,000   | scaling series                                             |
//! | `independent` | 100,000 | scaling series                                             |
//! | `stopped`     | 10,000  | one queue, stopped while the jobs are submitted: the bare  |
//! |               |         | cost of creating and submitting a job                      |
//! | `memory`      | 200,000 | bytes per job in flight                                    |
//! | `queues-64-shared` | 64,000 | as `queues-64`, the 64 queues on one unbound workqueue |
//! | `chain-pipelined` | 10,000 | as `chain`, the job queue with `pipeline_own_dependencies` |
//!
//! Memory is measured, not computed: the first job waits for a gate fence that is signalled only
//! at the end, so every job stays in flight. The memory is read with 100,000 jobs in flight, once
//! the deferred frees of earlier work are done, and with 200,000; the difference divided by
//! 100,000 is the memory of one job. The first 100,000 jobs use up what the slab caches kept from
//! earlier work, which a single reading would count as free. Two readings: `bytes_per_job` from
//! the slab allocator's page counters (every allocation of a job is a slab object), and
//! `free_bytes_per_job` from the free memory (`si_meminfo()`), which also moves with the pages
//! on the per-CPU free lists, by megabytes.

use core::{
    mem::MaybeUninit,
    ptr::addr_of_mut, //
};
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
        Job,
        JobQueue,
        JobRef,
        QueueOptions,
        Recovery,
        TimeoutAction, //
    },
    impl_has_hr_timer,
    new_spinlock_irq,
    page::PAGE_SIZE,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{
            ordering,
            Atomic, //
        },
        Arc,
        ArcBorrow,
        Completion,
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
    }, //
};

module! {
    type: JobQueueBench,
    name: "jobqueue_bench",
    authors: ["Rust DRM job queue authors"],
    description: "Benchmark of the Rust DRM job queue, side by side with drm_sched_bench",
    license: "GPL",
    params: {
        workloads: u32 {
            default: 0xffff_ffff,
            description: "Bit mask of the workloads to run (see the module documentation)",
        },
        reps: u32 {
            default: 5,
            description: "Repetitions of each workload",
        },
        ring_delay_ns: u32 {
            default: 0,
            description: "Delay of the mock hardware's signals, in ns (default: none)",
        },
    },
}

/// The room on the ring of every workload but `credit-1`, in credits (one per job).
const CAPACITY: u32 = 1024;

/// The job timeout of every queue: long enough never to fire, but armed as a driver would.
const TIMEOUT: Delta = Delta::from_secs(10);

/// How the jobs of a workload are spread over queues and what they depend on.
#[derive(Clone, Copy)]
enum Shape {
    Independent,
    Chain,
    /// As `Chain`, with [`QueueOptions::pipeline_own_dependencies`]: the job queue hands a job
    /// to the ring without waiting for the done fence of the job before it, as drm_sched does
    /// for a dependency on its own scheduler, which `drm_sched_bench.c` runs the same way.
    ChainPipelined,
    Chain2,
    FanIn,
    Queues64,
    /// As `Queues64`, all on one shared unbound workqueue.
    Queues64Shared,
    Credit1,
    Stopped,
    Memory,
}

impl Shape {
    fn queues(self) -> usize {
        match self {
            Shape::Chain2 => 2,
            Shape::FanIn => 17,
            Shape::Queues64 | Shape::Queues64Shared => 64,
            _ => 1,
        }
    }

    fn capacity(self) -> u32 {
        match self {
            Shape::Credit1 => 1,
            _ => CAPACITY,
        }
    }

    /// Returns the queue of job `i` and the number of jobs just before it that it depends on.
    fn plan(self, i: usize) -> (usize, usize) {
        match self {
            Shape::Independent | Shape::Credit1 | Shape::Stopped | Shape::Memory => (0, 0),
            Shape::Chain | Shape::ChainPipelined => (0, i.min(1)),
            Shape::Chain2 => (i % 2, i.min(1)),
            Shape::FanIn => match i % 17 {
                16 => (16, 16),
                k => (k, 0),
            },
            Shape::Queues64 | Shape::Queues64Shared => (i % 64, 0),
        }
    }

    /// Returns how many of the jobs just before job `i` must finish before it can run: its
    /// dependencies, or on a ring of one credit the job before it.
    fn waits_for(self, i: usize) -> usize {
        match self {
            Shape::Credit1 => i.min(1),
            _ => self.plan(i).1,
        }
    }
}

struct Workload {
    name: &'static str,
    shape: Shape,
    jobs: usize,
}

/// The workloads, in the order of the bits of the `workloads` parameter. `drm_sched_bench.c` has
/// the same table.
const WORKLOADS: [Workload; 12] = [
    Workload {
        name: "independent",
        shape: Shape::Independent,
        jobs: 10_000,
    },
    Workload {
        name: "chain",
        shape: Shape::Chain,
        jobs: 10_000,
    },
    Workload {
        name: "chain-2q",
        shape: Shape::Chain2,
        jobs: 10_000,
    },
    Workload {
        name: "fan-in-16",
        shape: Shape::FanIn,
        jobs: 500 * 17,
    },
    Workload {
        name: "queues-64",
        shape: Shape::Queues64,
        jobs: 64_000,
    },
    Workload {
        name: "credit-1",
        shape: Shape::Credit1,
        jobs: 5_000,
    },
    Workload {
        name: "independent",
        shape: Shape::Independent,
        jobs: 1_000,
    },
    Workload {
        name: "independent",
        shape: Shape::Independent,
        jobs: 100_000,
    },
    Workload {
        name: "stopped",
        shape: Shape::Stopped,
        jobs: 10_000,
    },
    Workload {
        name: "memory",
        shape: Shape::Memory,
        jobs: 200_000,
    },
    Workload {
        name: "queues-64-shared",
        shape: Shape::Queues64Shared,
        jobs: 64_000,
    },
    Workload {
        name: "chain-pipelined",
        shape: Shape::ChainPipelined,
        jobs: 10_000,
    },
];

/// The number of jobs in flight at the first reading of the memory workload.
const MEMORY_FIRST: usize = 100_000;

/// The mock hardware's FIFO: a ring buffer of the fences it has not signalled yet.
struct Fifo {
    slots: KVec<Option<UniqueFence>>,
    head: usize,
    len: usize,
}

/// Mock hardware that completes every job at once, or after `ring_delay_ns`, from hardirq
/// context as an interrupt would: an hrtimer signals the FIFO's fences.
#[pin_data]
struct MockRing {
    hw: FenceContext,
    #[pin]
    fifo: SpinLockIrq<Fifo>,
    #[pin]
    timer: HrTimer<Self>,
    /// The handle of the last start of the timer; dropping it cancels the timer.
    #[pin]
    handle: SpinLockIrq<Option<ArcHrTimerHandle<MockRing>>>,
}

impl_has_hr_timer! {
    impl HasHrTimer<Self> for MockRing {
        mode: RelativeMode<Monotonic>, field: self.timer
    }
}

impl HrTimerCallback for MockRing {
    type Pointer<'a> = Arc<Self>;

    fn run(this: ArcBorrow<'_, Self>, _ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        while let Some(fence) = this.pop() {
            fence.signal(Ok(()));
        }
        HrTimerRestart::NoRestart
    }
}

impl MockRing {
    fn new(slots: usize) -> Result<Arc<Self>> {
        let mut fifo = KVec::with_capacity(slots, GFP_KERNEL)?;
        for _ in 0..slots {
            fifo.push(None, GFP_KERNEL)?;
        }
        Arc::pin_init(
            pin_init!(Self {
                hw: FenceContext::new(c"jobqueue_bench", c"mock-ring"),
                fifo <- new_spinlock_irq!(Fifo {
                    slots: fifo,
                    head: 0,
                    len: 0,
                }),
                timer <- HrTimer::new(),
                handle <- new_spinlock_irq!(None),
            }),
            GFP_KERNEL,
        )
    }

    /// Puts `fence` at the end of the FIFO; hands it back if the FIFO is full.
    fn push(self: &Arc<Self>, fence: UniqueFence) -> Result<(), UniqueFence> {
        let was_empty = {
            let mut fifo = self.fifo.lock();
            let size = fifo.slots.len();
            if fifo.len == size {
                return Err(fence);
            }
            let mut tail = fifo.head + fifo.len;
            if tail >= size {
                tail -= size;
            }
            fifo.slots[tail] = Some(fence);
            fifo.len += 1;
            fifo.len == 1
        };
        // The timer empties the FIFO before it returns, so it only needs starting when the FIFO
        // was empty.
        if was_empty {
            // Dropping the previous handle waits for a callback that is still returning.
            let old = self.handle.lock().take();
            drop(old);
            let delay = i64::from(module_parameters::ring_delay_ns.value());
            let handle = self.clone().start(Delta::from_nanos(delay));
            *self.handle.lock() = Some(handle);
        }
        Ok(())
    }

    /// Stops the timer and drops its reference to the ring.
    fn stop(&self) {
        let old = self.handle.lock().take();
        drop(old);
    }

    fn pop(&self) -> Option<UniqueFence> {
        let mut fifo = self.fifo.lock();
        if fifo.len == 0 {
            return None;
        }
        let head = fifo.head;
        let fence = fifo.slots[head].take();
        fifo.head = if head + 1 == fifo.slots.len() {
            0
        } else {
            head + 1
        };
        fifo.len -= 1;
        fence
    }
}

/// The times recorded for one job, in nanoseconds since [`Rep::base`].
struct Sample {
    submit: Atomic<i64>,
    run: Atomic<i64>,
    hw: Atomic<i64>,
}

/// One repetition of a workload: its samples, and a completion for when every job is freed.
#[pin_data]
struct Rep {
    base: Instant<Monotonic>,
    jobs: usize,
    freed: Atomic<usize>,
    #[pin]
    all_freed: Completion,
    samples: VVec<Sample>,
}

impl Rep {
    fn new(jobs: usize) -> Result<Arc<Self>> {
        let mut samples = VVec::with_capacity(jobs, GFP_KERNEL)?;
        for _ in 0..jobs {
            samples.push(
                Sample {
                    submit: Atomic::new(0),
                    run: Atomic::new(0),
                    hw: Atomic::new(0),
                },
                GFP_KERNEL,
            )?;
        }
        Arc::pin_init(
            pin_init!(Self {
                base: Instant::now(),
                jobs,
                freed: Atomic::new(0),
                all_freed <- Completion::new(),
                samples,
            }),
            GFP_KERNEL,
        )
    }

    fn since_base(&self, t: Instant<Monotonic>) -> i64 {
        (t - self.base).as_nanos()
    }

    fn now(&self) -> i64 {
        self.since_base(Instant::now())
    }

    fn job_freed(&self) {
        // Full ordering: the samples this job wrote are visible to the waiter.
        if self.freed.fetch_add(1, ordering::Full) + 1 == self.jobs {
            self.all_freed.complete_all();
        }
    }
}

/// The driver's data of a job: where to record its times, and its hardware fence.
struct BenchJob {
    rep: Arc<Rep>,
    index: usize,
    hw_alloc: Option<FenceAllocation>,
    hw: Option<ARef<DmaFence>>,
}

impl BenchJob {
    fn new(rep: &Arc<Rep>, index: usize) -> Result<Self> {
        Ok(Self {
            rep: rep.clone(),
            index,
            hw_alloc: Some(FenceAllocation::new(GFP_KERNEL)?),
            hw: None,
        })
    }
}

impl Drop for BenchJob {
    fn drop(&mut self) {
        if let Some(t) = self.hw.as_ref().and_then(|hw| hw.timestamp()) {
            self.rep.samples[self.index]
                .hw
                .store(self.rep.since_base(t), ordering::Relaxed);
        }
        self.rep.job_freed();
    }
}

struct BenchBackend {
    ring: Arc<MockRing>,
}

impl Drop for BenchBackend {
    fn drop(&mut self) {
        // The timer's handle holds a reference to the ring.
        self.ring.stop();
    }
}

impl Backend for BenchBackend {
    type Job = BenchJob;

    fn run(&self, mut job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
        job.rep.samples[job.index]
            .run
            .store(job.rep.now(), ordering::Relaxed);
        let alloc = match job.hw_alloc.take() {
            Some(alloc) => alloc,
            None => FenceAllocation::new(GFP_NOWAIT)?,
        };
        let fence = self.ring.hw.init_fence(alloc);
        let hw = fence.to_aref();
        job.hw = Some(hw.clone());
        if let Err(fence) = self.ring.push(fence) {
            // Cannot happen: the FIFO holds as many fences as the ring has credits.
            fence.signal(Err(EBUSY));
        }
        Ok(hw)
    }

    fn timed_out(&self, _job: JobRef<'_, Self>) -> TimeoutAction {
        TimeoutAction::NoHang
    }

    fn stop_hardware(&self) {
        self.ring.stop();
        // Whatever is left on the ring is lost.
        while let Some(fence) = self.ring.pop() {
            fence.signal(Err(ECANCELED));
        }
    }
}

fn new_queues(shape: Shape) -> Result<KVec<JobQueue<BenchBackend>>> {
    let mut queues = KVec::with_capacity(shape.queues(), GFP_KERNEL)?;
    let shared = match shape {
        Shape::Queues64Shared => Some(Arc::new(
            FenceWorkqueue::new_unbound(c"jq-bench-shared")?,
            GFP_KERNEL,
        )?),
        _ => None,
    };
    for _ in 0..shape.queues() {
        let backend = BenchBackend {
            ring: MockRing::new(shape.capacity() as usize)?,
        };
        let mut options = QueueOptions::new(
            c"jobqueue_bench",
            c"jq-bench",
            shape.capacity(),
            Some(TIMEOUT),
        );
        options.workqueue = shared.clone();
        options.pipeline_own_dependencies = matches!(shape, Shape::ChainPipelined);
        queues.push(JobQueue::new(backend, options)?, GFP_KERNEL)?;
    }
    Ok(queues)
}

/// Creates and submits jobs `range` of a repetition; `gate` is a dependency of the first one.
fn submit_jobs(
    shape: Shape,
    queues: &[JobQueue<BenchBackend>],
    rep: &Arc<Rep>,
    dones: &mut VVec<ARef<DmaFence>>,
    range: core::ops::Range<usize>,
    gate: Option<&DmaFence>,
) -> Result {
    for i in range {
        let (q, deps) = shape.plan(i);
        let queue = &queues[q];
        let mut job: Job<BenchBackend> = queue.new_job(1, BenchJob::new(rep, i)?)?;
        for dep in &dones[i - deps..i] {
            job.add_dependency(dep.clone())?;
        }
        if let (0, Some(gate)) = (i, gate) {
            job.add_dependency(gate.into())?;
        }
        rep.samples[i].submit.store(rep.now(), ordering::Relaxed);
        let done = queue.submit(job)?;
        dones.push(done, GFP_KERNEL)?;
    }
    Ok(())
}

/// The results of one repetition.
#[derive(Clone, Copy, Default)]
struct RepResult {
    ns_per_job: i64,
    submit_ns_per_job: i64,
    submit_to_run_p50: i64,
    submit_to_run_p99: i64,
    hw_to_done_p50: i64,
    hw_to_done_p99: i64,
    wake_p50: i64,
    wake_p99: i64,
    errors: usize,
}

/// Sorts `values` and returns their `p`-th percentile.
fn percentile(values: &mut [i64], p: usize) -> i64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[(values.len() - 1) * p / 100]
}

fn run_rep(w: &Workload) -> Result<RepResult> {
    let queues = new_queues(w.shape)?;
    let rep = Rep::new(w.jobs)?;
    let mut dones = VVec::with_capacity(w.jobs, GFP_KERNEL)?;

    let stopped = match w.shape {
        Shape::Stopped => Some(queues[0].stop()),
        _ => None,
    };
    let start = Instant::<Monotonic>::now();
    submit_jobs(w.shape, &queues, &rep, &mut dones, 0..w.jobs, None)?;
    let submitted = start.elapsed();
    if let Some(stopped) = stopped {
        stopped.resume(Recovery::Continue);
    }
    rep.all_freed.wait_for_completion();
    let elapsed = start.elapsed();

    let mut done_at = VVec::with_capacity(w.jobs, GFP_KERNEL)?;
    let mut submit_to_run = VVec::with_capacity(w.jobs, GFP_KERNEL)?;
    let mut hw_to_done = VVec::with_capacity(w.jobs, GFP_KERNEL)?;
    let mut wake = VVec::with_capacity(w.jobs, GFP_KERNEL)?;
    let mut errors = 0;
    for (i, (done, sample)) in dones.iter().zip(rep.samples.iter()).enumerate() {
        let run = sample.run.load(ordering::Relaxed);
        submit_to_run.push(run - sample.submit.load(ordering::Relaxed), GFP_KERNEL)?;
        let t = match (done.status(), done.timestamp()) {
            (Some(Ok(())), Some(t)) => rep.since_base(t),
            _ => {
                errors += 1;
                0
            }
        };
        done_at.push(t, GFP_KERNEL)?;
        hw_to_done.push(t - sample.hw.load(ordering::Relaxed), GFP_KERNEL)?;
        let waits = w.shape.waits_for(i);
        if let Some(&ready) = done_at.get(i - waits..i).and_then(|d| d.iter().max()) {
            wake.push(run - ready, GFP_KERNEL)?;
        }
    }
    Ok(RepResult {
        ns_per_job: elapsed.as_nanos() / w.jobs as i64,
        submit_ns_per_job: submitted.as_nanos() / w.jobs as i64,
        submit_to_run_p50: percentile(&mut submit_to_run, 50),
        submit_to_run_p99: percentile(&mut submit_to_run, 99),
        hw_to_done_p50: percentile(&mut hw_to_done, 50),
        hw_to_done_p99: percentile(&mut hw_to_done, 99),
        wake_p50: percentile(&mut wake, 50),
        wake_p99: percentile(&mut wake, 99),
        errors,
    })
}

/// Returns the free memory, in bytes.
fn si_free() -> i64 {
    let mut info = MaybeUninit::<bindings::sysinfo>::zeroed();
    // SAFETY: `info` points to memory for a `struct sysinfo`, which the function fills in.
    unsafe { bindings::si_meminfo(info.as_mut_ptr()) };
    // SAFETY: The structure holds integers only (and an empty array), valid as all-zero bytes
    // and as `si_meminfo()` writes them.
    let info = unsafe { info.assume_init() };
    info.freeram as i64 * i64::from(info.mem_unit)
}

/// Waits for the memory freed by earlier work to be back: `kfree_rcu()`, which frees fences,
/// batches objects for up to five seconds before it waits for a grace period.
fn settle() {
    fsleep(Delta::from_secs(6));
    // SAFETY: `rcu_barrier()` may sleep and is called in process context.
    unsafe { bindings::rcu_barrier() };
    fsleep(Delta::from_millis(100));
}

/// Returns the memory the slab allocator holds, in bytes.
fn slab_bytes() -> i64 {
    let items = [
        bindings::node_stat_item_NR_SLAB_RECLAIMABLE_B,
        bindings::node_stat_item_NR_SLAB_UNRECLAIMABLE_B,
    ];
    let pages: i64 = items
        .iter()
        .map(|&item| {
            // SAFETY: `item` is an index into the array; taking the address of a field reads
            // nothing.
            let counter = unsafe { addr_of_mut!(bindings::vm_node_stat[item as usize].counter) };
            // SAFETY: The counter is valid for reads for ever (a static), and it is only ever
            // accessed atomically.
            unsafe { Atomic::from_ptr(counter) }.load(ordering::Relaxed)
        })
        .sum();
    // The global slab counters are kept in pages.
    pages * PAGE_SIZE as i64
}

/// The memory of one job in flight, in bytes: the slab allocator's and the free memory's view.
#[derive(Clone, Copy)]
struct JobMemory {
    slab: i64,
    free: i64,
}

/// Returns the memory of one job in flight.
fn memory_rep(w: &Workload) -> Result<JobMemory> {
    let queues = new_queues(w.shape)?;
    let rep = Rep::new(w.jobs)?;
    let mut dones = VVec::with_capacity(w.jobs, GFP_KERNEL)?;
    let gates = FenceContext::new(c"jobqueue_bench", c"gate");
    let gate = gates.new_fence(GFP_KERNEL)?;

    let first = MEMORY_FIRST.min(w.jobs);
    let mut result = submit_jobs(w.shape, &queues, &rep, &mut dones, 0..first, Some(&*gate));
    settle();
    let (slab_before, free_before) = (slab_bytes(), si_free());
    if result.is_ok() {
        result = submit_jobs(w.shape, &queues, &rep, &mut dones, first..w.jobs, None);
    }
    fsleep(Delta::from_millis(100));
    let (slab_after, free_after) = (slab_bytes(), si_free());
    gate.signal(Ok(()));
    result?;
    rep.all_freed.wait_for_completion();
    let jobs = (w.jobs - first).max(1) as i64;
    Ok(JobMemory {
        slab: (slab_after - slab_before) / jobs,
        free: (free_before - free_after) / jobs,
    })
}

/// Returns the median, minimum and maximum of `values`.
fn stats(values: &mut [i64]) -> (i64, i64, i64) {
    values.sort_unstable();
    match (values.first(), values.last()) {
        (Some(&min), Some(&max)) => (values[(values.len() - 1) / 2], min, max),
        _ => (0, 0, 0),
    }
}

fn bench(w: &Workload, reps: usize) -> Result {
    let (queues, capacity) = (w.shape.queues(), w.shape.capacity());
    if let Shape::Memory = w.shape {
        let mut results = KVec::with_capacity(reps, GFP_KERNEL)?;
        for _ in 0..reps {
            results.push(memory_rep(w)?, GFP_KERNEL)?;
        }
        let mut column = KVec::with_capacity(reps, GFP_KERNEL)?;
        for r in results.iter() {
            column.push(r.slab, GFP_KERNEL)?;
        }
        let (slab, slab_min, slab_max) = stats(&mut column);
        column.clear();
        for r in results.iter() {
            column.push(r.free, GFP_KERNEL)?;
        }
        let (free, free_min, free_max) = stats(&mut column);
        pr_info!(
            "jq-bench: impl=jobqueue workload={} queues={} capacity={} jobs={} reps={} \
             bytes_per_job={} bytes_per_job_min={} bytes_per_job_max={} free_bytes_per_job={} \
             free_bytes_per_job_min={} free_bytes_per_job_max={}\n",
            w.name,
            queues,
            capacity,
            w.jobs,
            reps,
            slab,
            slab_min,
            slab_max,
            free,
            free_min,
            free_max
        );
        return Ok(());
    }

    let mut results = KVec::with_capacity(reps, GFP_KERNEL)?;
    for _ in 0..reps {
        results.push(run_rep(w)?, GFP_KERNEL)?;
    }
    let mut column = KVec::with_capacity(reps, GFP_KERNEL)?;
    let mut median_of = |f: fn(&RepResult) -> i64| -> Result<(i64, i64, i64)> {
        column.clear();
        for r in results.iter() {
            column.push(f(r), GFP_KERNEL)?;
        }
        Ok(stats(&mut column))
    };
    let (ns, ns_min, ns_max) = median_of(|r| r.ns_per_job)?;
    let (submit_ns, _, _) = median_of(|r| r.submit_ns_per_job)?;
    let (s2r_50, _, _) = median_of(|r| r.submit_to_run_p50)?;
    let (s2r_99, _, _) = median_of(|r| r.submit_to_run_p99)?;
    let (h2d_50, _, _) = median_of(|r| r.hw_to_done_p50)?;
    let (h2d_99, _, _) = median_of(|r| r.hw_to_done_p99)?;
    let (wake_50, _, _) = median_of(|r| r.wake_p50)?;
    let (wake_99, _, _) = median_of(|r| r.wake_p99)?;
    let errors: usize = results.iter().map(|r| r.errors).sum();
    pr_info!(
        "jq-bench: impl=jobqueue workload={} queues={} capacity={} jobs={} reps={} \
         ns_per_job={} ns_per_job_min={} ns_per_job_max={} submit_ns_per_job={} \
         submit_to_run_p50_ns={} \
         submit_to_run_p99_ns={} hw_to_done_p50_ns={} hw_to_done_p99_ns={} wake_p50_ns={} \
         wake_p99_ns={} errors={}\n",
        w.name,
        queues,
        capacity,
        w.jobs,
        reps,
        ns,
        ns_min,
        ns_max,
        submit_ns,
        s2r_50,
        s2r_99,
        h2d_50,
        h2d_99,
        wake_50,
        wake_99,
        errors
    );
    Ok(())
}

struct JobQueueBench;

impl kernel::Module for JobQueueBench {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let mask = module_parameters::workloads.value();
        let reps = module_parameters::reps.value().max(1) as usize;
        pr_info!("jq-bench: impl=jobqueue begin\n");
        for (bit, w) in WORKLOADS.iter().enumerate() {
            if (mask & (1 << bit)) == 0 {
                continue;
            }
            if let Err(e) = bench(w, reps) {
                pr_err!(
                    "jq-bench: impl=jobqueue workload={} jobs={} failed: {:?}\n",
                    w.name,
                    w.jobs,
                    e
                );
            }
        }
        pr_info!("jq-bench: impl=jobqueue end\n");
        Ok(Self)
    }
}
