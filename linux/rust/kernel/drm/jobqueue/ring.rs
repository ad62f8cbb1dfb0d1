// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The jobs of a queue by sequence number, in a ring that does not allocate per job.

use crate::{
    alloc::Flags,
    prelude::*, //
};

/// The jobs of a queue from the oldest one not retired on, by sequence number.
///
/// Jobs are added at the back, with the next sequence number, and removed from the front, so a
/// job is found by its sequence number without a search. The ring allocates only when its
/// slots are replaced ([`JobRing::replace_slots`]); the queue does that before the slots run out.
///
/// # Invariants
///
/// - `len <= slots.len()`, and `head < slots.len()` (or 0 if there are no slots).
/// - For `i < len`, `slots[(head + i) % slots.len()]` holds the job whose sequence number is
///   `first + i`; every other slot is `None`.
pub(super) struct JobRing<N> {
    slots: KVVec<Option<N>>,
    head: usize,
    len: usize,
    first: u64,
}

impl<N> JobRing<N> {
    /// Returns `n` empty slots, for [`JobRing::new`] or [`JobRing::replace_slots`].
    pub(super) fn empty_slots(n: usize, flags: Flags) -> Result<KVVec<Option<N>>> {
        let mut slots = KVVec::with_capacity(n, flags)?;
        for _ in 0..n {
            slots.push_within_capacity(None).map_err(|_| ENOMEM)?;
        }
        Ok(slots)
    }

    /// Creates an empty ring of `n` slots.
    pub(super) fn new(n: usize, flags: Flags) -> Result<Self> {
        // INVARIANT: No job, every slot empty.
        Ok(Self {
            slots: Self::empty_slots(n, flags)?,
            head: 0,
            len: 0,
            first: 0,
        })
    }

    /// Returns the number of jobs in the ring.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Returns the number of slots.
    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Returns the sequence number the next job added must have, once the ring holds a job.
    pub(super) fn end(&self) -> u64 {
        self.first + self.len as u64
    }

    fn index(&self, seqno: u64) -> Option<usize> {
        let i = usize::try_from(seqno.checked_sub(self.first)?).ok()?;
        // Lazily: with no slots, `len` is 0 and the remainder is not computed.
        (i < self.len).then(|| (self.head + i) % self.slots.len())
    }

    /// Returns the job of sequence number `seqno`, if it is in the ring.
    pub(super) fn get_mut(&mut self, seqno: u64) -> Option<&mut N> {
        let i = self.index(seqno)?;
        self.slots[i].as_mut()
    }

    /// Adds the job of sequence number `seqno` at the back.
    ///
    /// Gives the job back if no slot is free, or if the ring holds jobs and `seqno` is not
    /// [`JobRing::end`].
    pub(super) fn push(&mut self, seqno: u64, job: N) -> Result<(), N> {
        if self.len == self.slots.len() || (self.len > 0 && seqno != self.end()) {
            return Err(job);
        }
        if self.len == 0 {
            self.first = seqno;
        }
        let i = (self.head + self.len) % self.slots.len();
        // INVARIANT: The slot after the last job was empty, and it is the slot of `seqno`.
        self.slots[i] = Some(job);
        self.len += 1;
        Ok(())
    }

    /// Returns the oldest job.
    pub(super) fn front_mut(&mut self) -> Option<&mut N> {
        if self.len == 0 {
            return None;
        }
        self.slots[self.head].as_mut()
    }

    /// Removes the oldest job.
    pub(super) fn pop_front(&mut self) -> Option<N> {
        if self.len == 0 {
            return None;
        }
        let job = self.slots[self.head].take();
        // INVARIANT: The slot of `first` is empty now, and the jobs after it keep their slots.
        self.head = (self.head + 1) % self.slots.len();
        self.len -= 1;
        self.first += 1;
        job
    }

    /// Iterates over the jobs in sequence number order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &N)> {
        let (before, after) = self.slots.split_at(self.head);
        let first = self.first;
        // `Iterator::` as the kernel prelude's `Init` has a `chain` too.
        Iterator::chain(after.iter(), before)
            .take(self.len)
            .zip(first..)
            .filter_map(|(slot, seqno)| slot.as_ref().map(|job| (seqno, job)))
    }

    /// Iterates over the jobs in sequence number order.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut N)> {
        let (before, after) = self.slots.split_at_mut(self.head);
        let first = self.first;
        // `Iterator::` as in `JobRing::iter`.
        Iterator::chain(after.iter_mut(), before)
            .take(self.len)
            .zip(first..)
            .filter_map(|(slot, seqno)| slot.as_mut().map(|job| (seqno, job)))
    }

    /// Moves the jobs to `slots` (from [`JobRing::empty_slots`]) and returns the old slots, all
    /// empty, for the caller to free where it may. Gives `slots` back if they are fewer than the
    /// jobs.
    pub(super) fn replace_slots(
        &mut self,
        mut slots: KVVec<Option<N>>,
    ) -> Result<KVVec<Option<N>>, KVVec<Option<N>>> {
        if slots.len() < self.len || slots.iter().any(Option::is_some) {
            return Err(slots);
        }
        let (before, after) = self.slots.split_at_mut(self.head);
        // `Iterator::` as in `JobRing::iter`.
        for (new, old) in slots
            .iter_mut()
            .zip(Iterator::chain(after.iter_mut(), before).take(self.len))
        {
            *new = old.take();
        }
        // INVARIANT: The jobs are in order from slot 0 of `slots`, whose other slots were empty.
        self.head = 0;
        Ok(core::mem::replace(&mut self.slots, slots))
    }
}

#[cfg(CONFIG_DRM_JOBQUEUE_KUNIT_TEST)]
#[kunit_tests(drm_jobqueue_ring)]
mod tests {
    use super::*;

    fn seqnos(ring: &JobRing<u32>) -> Result<KVec<(u64, u32)>> {
        let mut v = KVec::new();
        for (seqno, job) in ring.iter() {
            v.push((seqno, *job), GFP_KERNEL)?;
        }
        Ok(v)
    }

    #[test]
    fn push_pop_wraps_in_order() -> Result {
        let mut ring = JobRing::new(3, GFP_KERNEL)?;
        assert_eq!(ring.front_mut(), None);
        assert_eq!(ring.push(5, 50), Ok(()));
        // Not the next sequence number.
        assert_eq!(ring.push(7, 70), Err(70));
        assert_eq!(ring.push(6, 60), Ok(()));
        assert_eq!(ring.push(7, 70), Ok(()));
        // Full.
        assert_eq!(ring.push(8, 80), Err(80));
        assert_eq!(ring.pop_front(), Some(50));
        // Wraps around into the slot 5 left.
        assert_eq!(ring.push(8, 80), Ok(()));
        assert_eq!(seqnos(&ring)?[..], [(6, 60), (7, 70), (8, 80)]);
        assert_eq!(ring.get_mut(5), None);
        assert_eq!(ring.get_mut(9), None);
        if let Some(job) = ring.get_mut(8) {
            *job += 1;
        }
        assert_eq!(ring.get_mut(8).copied(), Some(81));
        for (_, job) in ring.iter_mut() {
            *job += 1;
        }
        assert_eq!(seqnos(&ring)?[..], [(6, 61), (7, 71), (8, 82)]);
        assert_eq!(ring.front_mut().copied(), Some(61));
        Ok(())
    }

    #[test]
    fn emptied_ring_restarts_anywhere() -> Result {
        let mut ring = JobRing::new(2, GFP_KERNEL)?;
        assert_eq!(ring.push(1, 10), Ok(()));
        assert_eq!(ring.pop_front(), Some(10));
        assert_eq!(ring.pop_front(), None);
        assert_eq!(ring.len(), 0);
        // An empty ring takes any sequence number.
        assert_eq!(ring.push(40, 400), Ok(()));
        assert_eq!(ring.end(), 41);
        assert_eq!(seqnos(&ring)?[..], [(40, 400)]);
        Ok(())
    }

    #[test]
    fn replace_slots_keeps_order() -> Result {
        let mut ring = JobRing::new(3, GFP_KERNEL)?;
        for seqno in 1..=3u32 {
            assert_eq!(ring.push(u64::from(seqno), seqno), Ok(()));
        }
        assert_eq!(ring.pop_front(), Some(1));
        assert_eq!(ring.push(4, 4), Ok(()));
        // Too few slots: given back, nothing moved.
        let few = JobRing::<u32>::empty_slots(2, GFP_KERNEL)?;
        assert!(ring.replace_slots(few).is_err());
        let old = ring
            .replace_slots(JobRing::empty_slots(6, GFP_KERNEL)?)
            .map_err(|_| EINVAL)?;
        assert_eq!(old.len(), 3);
        assert!(old.iter().all(Option::is_none));
        assert_eq!(ring.capacity(), 6);
        for seqno in 5..=7u32 {
            assert_eq!(ring.push(u64::from(seqno), seqno), Ok(()));
        }
        assert_eq!(ring.push(8, 8), Err(8));
        assert_eq!(
            seqnos(&ring)?[..],
            [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7)]
        );
        Ok(())
    }
}
