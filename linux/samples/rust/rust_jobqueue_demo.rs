// SPDX-License-Identifier: GPL-2.0

//! Rust DRM job queue demo.
//!
//! Three mock hardware rings (`copy`, `compute`, `gfx`) run a small rendering pipeline of four
//! frames through [`JobQueue`]s: each frame uploads its data on the copy ring, simulates on the
//! compute ring, renders on the gfx ring and reads back on the copy ring, every step depending on
//! the one before. The rings complete jobs from hardirq context (an hrtimer per ring) after each
//! job's duration. Two faults are injected:
//!
//! - the compute job of frame 2 fails on the hardware with `-EIO`: its render and readback do
//!   not run, and their done fences carry the error;
//! - the render job of frame 3 hangs the gfx ring: after the queue's timeout the backend asks
//!   for a reset ([`TimeoutAction::ResetLater`]) and the queue stops; the demo's reset (in the
//!   module's init, standing in for a driver's reset work) resets the ring and resumes the
//!   queue with [`JobQueue::reset_done`]. The job's done fence gets `-ETIMEDOUT`, and the job
//!   behind it is resubmitted.
//!
//! Boot with `trace_event=drm_jobqueue:* tp_printk` to see the queue's trace events as the jobs
//! move; the demo ends with a summary of every job.

use kernel::{
    dma_fence::{
        DmaFence,
        FenceContext,
        UniqueFence, //
    },
    drm::jobqueue::{
        Backend,
        JobQueue,
        JobRef,
        QueueOptions,
        Recovery,
        TimeoutAction, //
    },
    impl_has_hr_timer,
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
        Completion,
        SpinLockIrq, //
    },
    time::{
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
    type: Demo,
    name: "rust_jobqueue_demo",
    authors: ["Rust DRM job queue authors"],
    description: "Rust DRM job queue demo: a pipeline on three mock rings",
    license: "GPL",
}

/// What the mock hardware does with a job.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Fail,
    Hang,
}

/// A job on a mock ring: its hardware fence and how long it takes.
struct Slot {
    fence: UniqueFence,
    duration: Delta,
    fault: Fault,
}

struct RingState {
    slots: KVec<Slot>,
    busy: bool,
}

/// A mock hardware ring: completes its jobs in order, from an hrtimer (hardirq).
#[pin_data]
struct Ring {
    name: &'static CStr,
    hw: FenceContext,
    #[pin]
    timer: HrTimer<Self>,
    #[pin]
    state: SpinLockIrq<RingState>,
    #[pin]
    handle: SpinLockIrq<Option<ArcHrTimerHandle<Ring>>>,
    resets: Atomic<u32>,
}

impl_has_hr_timer! {
    impl HasHrTimer<Self> for Ring {
        mode: RelativeMode<Monotonic>, field: self.timer
    }
}

impl HrTimerCallback for Ring {
    type Pointer<'a> = Arc<Self>;

    fn run(this: ArcBorrow<'_, Self>, mut ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        let (slot, next) = {
            let mut st = this.state.lock();
            let fault = match st.slots.first() {
                Some(slot) => slot.fault,
                None => {
                    st.busy = false;
                    return HrTimerRestart::NoRestart;
                }
            };
            if fault == Fault::Hang {
                // The ring is stuck until the backend resets it.
                return HrTimerRestart::NoRestart;
            }
            let Ok(slot) = st.slots.remove(0) else {
                return HrTimerRestart::NoRestart;
            };
            let next = st.slots.first().map(|s| s.duration);
            st.busy = next.is_some();
            (slot, next)
        };
        let result = match slot.fault {
            Fault::Fail => Err(EIO),
            _ => Ok(()),
        };
        slot.fence.signal(result);
        match next {
            Some(duration) => {
                ctx.forward_now(duration);
                HrTimerRestart::Restart
            }
            None => HrTimerRestart::NoRestart,
        }
    }
}

impl Ring {
    fn new(name: &'static CStr, slots: usize) -> Result<Arc<Self>> {
        let mut vec = KVec::new();
        vec.reserve(slots, GFP_KERNEL)?;
        Arc::pin_init(
            pin_init!(Self {
                name,
                hw: FenceContext::new(c"rust_jobqueue_demo", name),
                timer <- HrTimer::new(),
                state <- new_spinlock_irq!(RingState { slots: vec, busy: false }),
                handle <- new_spinlock_irq!(None),
                resets: Atomic::new(0),
            }),
            GFP_KERNEL,
        )
    }

    /// Puts a job on the ring, starting the ring if it was idle.
    fn push(self: &Arc<Self>, slot: Slot) -> Result {
        let duration = slot.duration;
        let start = {
            let mut st = self.state.lock();
            st.slots.push_within_capacity(slot).map_err(|_| ENOSPC)?;
            !core::mem::replace(&mut st.busy, true)
        };
        if start {
            let old = self.handle.lock().take();
            drop(old);
            let handle = self.clone().start(duration);
            *self.handle.lock() = Some(handle);
        }
        Ok(())
    }

    /// Resets the ring: the jobs on it are lost, their fences signal `-ECANCELED`.
    fn reset(&self) {
        self.resets.add(1, ordering::Relaxed);
        self.clear();
    }

    /// Stops the ring and signals the fences of the jobs on it with `-ECANCELED`.
    fn clear(&self) {
        let old = self.handle.lock().take();
        drop(old);
        loop {
            let slot = {
                let mut st = self.state.lock();
                let slot = st.slots.remove(0).ok();
                if slot.is_none() {
                    st.busy = false;
                }
                slot
            };
            match slot {
                Some(slot) => slot.fence.signal(Err(ECANCELED)),
                None => break,
            }
        }
    }
}

/// A job of the demo: a named step of a frame.
struct Step {
    name: &'static str,
    frame: u32,
    duration: Delta,
    fault: Fault,
    runs: u32,
}

/// The driver side of a ring's job queue.
struct RingBackend {
    ring: Arc<Ring>,
    /// Completed when a job timed out and the ring waits for its reset.
    reset_asked: Arc<Completion>,
}

impl Backend for RingBackend {
    type Job = Step;

    fn run(&self, mut job: JobRef<'_, Self>) -> Result<ARef<DmaFence>> {
        job.runs += 1;
        let fence = self.ring.hw.new_fence(GFP_NOWAIT)?;
        let hw = fence.to_aref();
        self.ring.push(Slot {
            fence,
            duration: job.duration,
            fault: job.fault,
        })?;
        Ok(hw)
    }

    fn timed_out(&self, job: JobRef<'_, Self>) -> TimeoutAction {
        pr_info!(
            "demo: {}#{} timed out on the {} ring: asking for a reset\n",
            job.name,
            job.frame,
            self.ring.name.to_str().unwrap_or("?")
        );
        // The queue stops until the reset is done (`run_demo`).
        self.reset_asked.complete_all();
        TimeoutAction::ResetLater
    }

    fn stop_hardware(&self) {
        // At teardown: whatever is left on the ring is lost.
        self.ring.clear();
    }

    fn cancelled(&self, job: JobRef<'_, Self>, error: Error) {
        pr_info!(
            "demo: {}#{} did not complete: error {}\n",
            job.name,
            job.frame,
            error.to_errno()
        );
    }
}

/// One submitted step, for the summary.
struct Record {
    name: &'static str,
    frame: u32,
    step: usize,
    ring: usize,
    done: ARef<DmaFence>,
}

struct Demo;

const RINGS: [&CStr; 3] = [c"copy", c"compute", c"gfx"];
const COPY: usize = 0;
const COMPUTE: usize = 1;
const GFX: usize = 2;

fn ms(n: i64) -> Delta {
    Delta::from_millis(n)
}

fn run_demo() -> Result {
    let start = Instant::<Monotonic>::now();
    let mut rings = KVec::new();
    let mut queues = KVec::new();
    let reset_asked = Arc::pin_init(Completion::new(), GFP_KERNEL)?;
    for name in RINGS {
        let ring = Ring::new(name, 4)?;
        let options = QueueOptions::new(c"rust_jobqueue_demo", name, 4, Some(ms(100)));
        let backend = RingBackend {
            ring: ring.clone(),
            reset_asked: reset_asked.clone(),
        };
        queues.push(JobQueue::new(backend, options)?, GFP_KERNEL)?;
        rings.push(ring, GFP_KERNEL)?;
    }
    pr_info!("demo: three rings (copy, compute, gfx), 4 credits each, job timeout 100 ms\n");

    // (name, ring, duration in ms): each step depends on the one before it in the frame. The
    // readbacks are submitted after the four frames, so that the copy ring uploads ahead.
    let steps: [(&'static str, usize, i64); 4] = [
        ("upload", COPY, 2),
        ("simulate", COMPUTE, 5),
        ("render", GFX, 8),
        ("readback", COPY, 1),
    ];
    let mut records = KVec::new();
    let mut renders: KVec<ARef<DmaFence>> = KVec::new();
    for pass in 0..2 {
        for frame in 1..=4u32 {
            let mut previous = if pass == 1 {
                Some(renders[frame as usize - 1].clone())
            } else {
                None
            };
            let range = if pass == 0 { 0..3 } else { 3..4 };
            for (step_index, &(name, ring, duration)) in steps.iter().enumerate() {
                if !range.contains(&step_index) {
                    continue;
                }
                let fault = match (frame, name) {
                    (2, "simulate") => Fault::Fail,
                    (3, "render") => Fault::Hang,
                    _ => Fault::None,
                };
                let step = Step {
                    name,
                    frame,
                    duration: ms(duration),
                    fault,
                    runs: 0,
                };
                let mut job = queues[ring].new_job(1, step)?;
                if let Some(dep) = previous.take() {
                    job.add_dependency(dep)?;
                }
                let done = queues[ring].submit(job)?;
                pr_info!(
                    "demo: submitted {}#{} to the {} ring: done fence {}:{}\n",
                    name,
                    frame,
                    RINGS[ring].to_str().unwrap_or("?"),
                    done.context(),
                    done.seqno()
                );
                if name == "render" {
                    renders.push(done.clone(), GFP_KERNEL)?;
                }
                previous = Some(done.clone());
                records.push(
                    Record {
                        name,
                        frame,
                        step: step_index,
                        ring,
                        done,
                    },
                    GFP_KERNEL,
                )?;
            }
        }
    }
    // Frame by frame for the summary.
    records.sort_unstable_by_key(|r| (r.frame, r.step));

    // The driver's reset work: the hung render job times out after 100 ms and its queue stops.
    // Once the ring is off the hardware, the queue resubmits the jobs that were behind the hung
    // one.
    reset_asked.wait_for_completion();
    pr_info!("demo: resetting the gfx ring\n");
    rings[GFX].reset();
    queues[GFX].reset_done(Recovery::Resubmit)?;

    for record in &records {
        record.done.wait_timeout(Delta::from_secs(30))?;
    }
    let elapsed = start.elapsed();

    pr_info!("demo: summary\n");
    let (mut ok, mut eio, mut etimedout) = (0, 0, 0);
    for record in &records {
        let status = record.done.status().unwrap_or(Err(EINPROGRESS));
        let when = record
            .done
            .timestamp()
            .map(|t| (t - start).as_micros_ceil())
            .unwrap_or(-1);
        let result = match status {
            Ok(()) => {
                ok += 1;
                "ok"
            }
            Err(e) if e == EIO => {
                eio += 1;
                "-EIO"
            }
            Err(e) if e == ETIMEDOUT => {
                etimedout += 1;
                "-ETIMEDOUT"
            }
            Err(_) => "error",
        };
        pr_info!(
            "demo:   {:<8} #{}  {:<7}  {:<10}  done at {:>6} us\n",
            record.name,
            record.frame,
            RINGS[record.ring].to_str().unwrap_or("?"),
            result,
            when
        );
    }
    let resets: u32 = rings.iter().map(|r| r.resets.load(ordering::Relaxed)).sum();
    pr_info!(
        "demo: {} jobs in {} us: {} completed; -EIO: 1 hardware error, {} dependent job(s) not \
         run; -ETIMEDOUT: 1 hung job, {} dependent job(s) not run; {} ring reset(s)\n",
        records.len(),
        elapsed.as_micros_ceil(),
        ok,
        eio - 1,
        etimedout - 1,
        resets
    );
    for queue in &queues {
        // A job whose done fence signalled counts as running until the retire work took it.
        let stats = queue.stats();
        pr_info!(
            "demo: queue {} at the end: waiting {}, running {}, credits in use {}\n",
            queue.context(),
            stats.waiting,
            stats.running,
            stats.credits_in_use
        );
    }
    drop(queues);
    for ring in &rings {
        ring.reset();
    }
    Ok(())
}

impl kernel::Module for Demo {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        pr_info!("demo: Rust DRM job queue demo starts\n");
        match run_demo() {
            Ok(()) => pr_info!("demo: done\n"),
            Err(e) => pr_err!("demo: failed: {}\n", e.to_errno()),
        }
        Ok(Demo)
    }
}
