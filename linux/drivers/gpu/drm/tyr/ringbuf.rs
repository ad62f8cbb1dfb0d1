// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The command stream a queue's ring buffer gets for each job.
//!
//! Userspace builds its command stream (CS) in a buffer of its own and submits its address and
//! size. The kernel does not run that buffer directly: for each job it writes a short sequence of
//! CS instructions into the queue's ring buffer that flushes the GPU caches, calls the user's CS,
//! and then bumps the queue's sync object, a 64-bit counter in GPU memory that the firmware
//! reports through a SYNC_UPDATE event. The sequence is the one Panthor writes
//! (`prepare_job_instrs()` in `drivers/gpu/drm/panthor/panthor_sched.c`), instruction for
//! instruction, so that the same firmware sees the same ring:
//!
//! ```text
//!  MOV32    rV, latest_flush            flush ID of the user's CS (flush reduction)
//!  FLUSH_CACHE2.clean_inv_all rV        signals scoreboard 0 when done
//!  [MOV48 + STORE_STATE: cycles/time before the call, if profiling]
//!  MOV48    rA:rA+1, cs_start
//!  MOV32    rV, cs_size
//!  WAIT     scoreboard 0                the flush has finished
//!  CALL     rA:rA+1, rV                 the user's command stream
//!  [MOV48 + STORE_STATE: cycles/time after the call, if profiling]
//!  MOV48    rA:rA+1, sync_addr
//!  MOV48    rV:rV+1, 1
//!  WAIT     all scoreboards             everything the user's CS started has finished
//!  SYNC_ADD64.system.propagate_err rA, rV   the queue's sync object counts the job
//!  ERROR_BARRIER                        a fault stays within this job
//!  NOP ...                              up to the next 64-byte cache line
//! ```
//!
//! `rA` and `rV = rA + 2` are the first registers the firmware does not preserve across calls.
//! A job takes a whole number of cache lines (8 instructions): 16 instructions without profiling,
//! 24 with both kinds. That number is also the job's credits in its
//! [`JobQueue`](kernel::drm::jobqueue::JobQueue), whose capacity is the ring's size in
//! instructions, so that a job never overwrites the instructions of a job that has not finished.

use core::ops::Range;

/// The size of one CS instruction, in bytes.
pub(crate) const INSTR_SIZE: u64 = 8;

/// Instructions per 64-byte cache line: jobs are padded to whole lines for the prefetcher.
const INSTRS_PER_CACHE_LINE: usize = 64 / INSTR_SIZE as usize;

/// The most instructions a job can take: the whole sequence, with every kind of profiling.
pub(crate) const MAX_INSTRS_PER_JOB: usize = 24;

/// Registers the firmware does not preserve across a CALL (`CSF_UNPRESERVED_REG_COUNT`).
pub(crate) const CSF_UNPRESERVED_REG_COUNT: u32 = 4;

/// What a job's instructions sample around the user's command stream (Panthor's
/// `PANTHOR_DEVICE_PROFILING_*`).
pub(crate) mod profiling {
    /// The GPU cycle counter.
    pub(crate) const CYCLES: u32 = 1 << 0;
    /// The GPU timestamp.
    pub(crate) const TIMESTAMP: u32 = 1 << 1;
    /// Everything.
    pub(crate) const ALL: u32 = CYCLES | TIMESTAMP;
}

/// The layout of the samples of one profiled job in GPU memory, where its STORE_STATE
/// instructions write them (`struct panthor_job_profiling_data`: cycles before and after, then
/// timestamps before and after, each 64 bits).
pub(crate) mod profiling_data {
    /// The size of one job's profiling slot, in bytes.
    pub(crate) const SIZE: u64 = 32;
    pub(super) const CYCLES_BEFORE: u64 = 0;
    pub(super) const CYCLES_AFTER: u64 = 8;
    pub(super) const TIME_BEFORE: u64 = 16;
    pub(super) const TIME_AFTER: u64 = 24;
}

/// Encoders of the CS instructions a job uses.
///
/// Each instruction is 64 bits: the opcode in bits 63:56, register operands in the bytes below.
/// Immediates must fit their field; the callers pass GPU virtual addresses, which have at most
/// 48 bits (checked when a job is created, see [`CallInfo`](crate::job::CallInfo)).
pub(crate) mod instr {
    const MASK_48: u64 = (1 << 48) - 1;

    const fn op(opcode: u64) -> u64 {
        opcode << 56
    }

    /// `MOV48 reg:reg+1, imm48`.
    pub(crate) const fn mov48(reg: u64, imm: u64) -> u64 {
        op(1) | (reg << 48) | (imm & MASK_48)
    }

    /// `MOV32 reg, imm32`.
    pub(crate) const fn mov32(reg: u64, imm: u32) -> u64 {
        op(2) | (reg << 48) | imm as u64
    }

    /// `WAIT scoreboards`: waits until the scoreboard slots in `mask` are idle.
    pub(crate) const fn wait(mask: u64) -> u64 {
        op(3) | (mask << 16)
    }

    /// `CALL addr:addr+1, size`: runs the command stream at `addr` of `size` bytes.
    pub(crate) const fn call(addr_reg: u64, size_reg: u64) -> u64 {
        op(32) | (addr_reg << 40) | (size_reg << 32)
    }

    /// `FLUSH_CACHE2.clean_inv_all.no_wait.signal(0) flush_id_reg`: cleans and invalidates the
    /// L2 and load/store caches and invalidates the others (0x233), unless the flush ID in
    /// `flush_id_reg` shows it happened already; signals scoreboard 0 when done.
    pub(crate) const fn flush_cache2_clean_inv_all(flush_id_reg: u64) -> u64 {
        op(36) | (flush_id_reg << 40) | 0x233
    }

    /// `STORE_STATE`: stores the cycle counter (`state` 1) or the timestamp (`state` 0) at the
    /// address in `reg:reg+1`.
    pub(crate) const fn store_state(reg: u64, state: u64) -> u64 {
        op(40) | (reg << 40) | (state << 32)
    }

    /// `ERROR_BARRIER`: an error of the instructions before it does not reach those after.
    pub(crate) const fn error_barrier() -> u64 {
        op(47)
    }

    /// `SYNC_ADD64.system_scope.propagate_err.nowait addr:addr+1, val:val+1`: adds `val` to the
    /// 64-bit sync object at `addr` and makes the firmware report the update; an error of the
    /// command stream is copied into the sync object's status.
    pub(crate) const fn sync_add64(addr_reg: u64, val_reg: u64) -> u64 {
        op(51) | (addr_reg << 40) | (val_reg << 32) | 1
    }
}

/// What the instructions of one job depend on.
#[derive(Clone, Copy)]
pub(crate) struct JobCsParams {
    /// Which profiling samples to take ([`profiling`] flags).
    pub(crate) profile_mask: u32,
    /// The number of CS registers (the firmware's `CS_FEATURES.WORK_REGS`).
    pub(crate) cs_reg_count: u32,
    /// The number of scoreboard slots of a CS (`CS_FEATURES.SCOREBOARDS`).
    pub(crate) sb_slot_count: u32,
    /// GPU address of the queue's sync object.
    pub(crate) sync_addr: u64,
    /// GPU address of the job's [`profiling_data`] slot; unused without profiling.
    pub(crate) times_addr: u64,
    /// GPU address of the user's command stream.
    pub(crate) cs_start: u64,
    /// Size of the user's command stream in bytes.
    pub(crate) cs_size: u32,
    /// The flush ID userspace read when it built its command stream.
    pub(crate) latest_flush: u32,
}

/// The instructions of one job, padded with NOPs (zeroes) to whole cache lines.
pub(crate) struct JobInstrs {
    buffer: [u64; MAX_INSTRS_PER_JOB],
    count: usize,
}

impl JobInstrs {
    /// Encodes the instructions of the job described by `params` (Panthor's
    /// `prepare_job_instrs()`).
    pub(crate) fn new(params: &JobCsParams) -> Self {
        use instr::*;
        use profiling::{
            CYCLES,
            TIMESTAMP, //
        };
        const ALWAYS: u32 = 0;

        let addr_reg = u64::from(
            params
                .cs_reg_count
                .saturating_sub(CSF_UNPRESERVED_REG_COUNT),
        );
        let val_reg = addr_reg + 2;
        let (cycle_reg, time_reg) = (addr_reg, val_reg);
        let waitall_mask = (1u64 << params.sb_slot_count.min(16)) - 1;
        let times = params.times_addr;
        let seq: [(u32, u64); 19] = [
            (ALWAYS, mov32(val_reg, params.latest_flush)),
            (ALWAYS, flush_cache2_clean_inv_all(val_reg)),
            (
                CYCLES,
                mov48(cycle_reg, times + profiling_data::CYCLES_BEFORE),
            ),
            (CYCLES, store_state(cycle_reg, 1)),
            (
                TIMESTAMP,
                mov48(time_reg, times + profiling_data::TIME_BEFORE),
            ),
            (TIMESTAMP, store_state(time_reg, 0)),
            (ALWAYS, mov48(addr_reg, params.cs_start)),
            (ALWAYS, mov32(val_reg, params.cs_size)),
            (ALWAYS, wait(1)),
            (ALWAYS, call(addr_reg, val_reg)),
            (
                CYCLES,
                mov48(cycle_reg, times + profiling_data::CYCLES_AFTER),
            ),
            (CYCLES, store_state(cycle_reg, 1)),
            (
                TIMESTAMP,
                mov48(time_reg, times + profiling_data::TIME_AFTER),
            ),
            (TIMESTAMP, store_state(time_reg, 0)),
            (ALWAYS, mov48(addr_reg, params.sync_addr)),
            (ALWAYS, mov48(val_reg, 1)),
            (ALWAYS, wait(waitall_mask)),
            (ALWAYS, sync_add64(addr_reg, val_reg)),
            (ALWAYS, error_barrier()),
        ];

        let mut this = Self {
            buffer: [0; MAX_INSTRS_PER_JOB],
            count: 0,
        };
        for (mask, word) in seq {
            if mask == ALWAYS || mask & params.profile_mask != 0 {
                this.buffer[this.count] = word;
                this.count += 1;
            }
        }
        // The buffer is zeroed: padding to the cache line only moves the count.
        this.count = this.count.next_multiple_of(INSTRS_PER_CACHE_LINE);
        this
    }

    /// Returns the instructions, padding included.
    pub(crate) fn words(&self) -> &[u64] {
        &self.buffer[..self.count]
    }

    /// Returns the size of the instructions on the ring, in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.count as u64 * INSTR_SIZE
    }
}

/// Returns the credits of a job: the instructions it takes on the ring (Panthor's
/// `calc_job_credits()`).
pub(crate) fn job_credits(profile_mask: u32) -> u32 {
    let params = JobCsParams {
        profile_mask,
        cs_reg_count: 0,
        sb_slot_count: 0,
        sync_addr: 0,
        times_addr: 0,
        cs_start: 0,
        cs_size: 0,
        latest_flush: 0,
    };
    // At most `MAX_INSTRS_PER_JOB`: fits.
    JobInstrs::new(&params).words().len() as u32
}

/// The memory of a ring buffer, as the kernel writes it.
pub(crate) trait RingMem {
    /// Writes `words` at byte `offset` of the ring buffer; `offset` is 8-byte aligned and the
    /// words fit before the end of the buffer.
    fn write_ring(&self, offset: usize, words: &[u64]);
}

/// The kernel's write position in a ring buffer.
///
/// `insert` only grows: the position in the buffer is `insert` modulo its size, as for the
/// firmware's `INSERT` and `EXTRACT` pointers of the CS input and output interfaces.
pub(crate) struct RingPos {
    size: u64,
    insert: u64,
}

impl RingPos {
    /// A position at the start of a ring buffer of `size` bytes, a power of two.
    pub(crate) fn new(size: u64) -> Self {
        Self { size, insert: 0 }
    }

    /// Returns the insert pointer: where the next job goes.
    pub(crate) fn insert(&self) -> u64 {
        self.insert
    }

    /// Copies `instrs` to the ring at the insert pointer, wrapping around its end, and moves the
    /// insert pointer past them (Panthor's `copy_instrs_to_ringbuf()`).
    ///
    /// Returns the range of insert pointer values the job occupies. The caller checked, through
    /// the credits of its job queue, that the ring has room.
    pub(crate) fn push(&mut self, mem: &impl RingMem, instrs: &JobInstrs) -> Range<u64> {
        let words = instrs.words();
        let start = self.insert & (self.size - 1);
        let first = (self.size - start).min(instrs.size()) / INSTR_SIZE;
        // Both fit in `usize`: they are below the ring's size.
        let (head, tail) = words.split_at(first as usize);
        mem.write_ring(start as usize, head);
        if !tail.is_empty() {
            mem.write_ring(0, tail);
        }
        let range = self.insert..self.insert + instrs.size();
        self.insert = range.end;
        range
    }
}
