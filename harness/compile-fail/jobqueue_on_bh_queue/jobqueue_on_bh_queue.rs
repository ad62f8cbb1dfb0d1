// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a job queue is given a BH workqueue for its work. The queue's run and retire
//! work take its mutex, call the driver's `Backend` methods and drop finished jobs (the driver's
//! payload), so on `system_bh()` all of that would run in softirq. `QueueOptions::workqueue`, like
//! `EnqueueWork`, takes only a `FenceWorkqueue`, which is always `WQ_MEM_RECLAIM` and never BH.
//! (Before issue 10 it took a `WorkQueueRef`, made from any `&'static Queue`, and this compiled.)

use kernel::drm::jobqueue::QueueOptions;
use kernel::prelude::*;
use kernel::workqueue;

module! {
    type: M,
    name: "jobqueue_on_bh_queue",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let mut options = QueueOptions::new(c"jobqueue_on_bh_queue", c"ring0", 16, None);
        options.workqueue = Some(workqueue::system_bh().into());
        let _options = options;
        Ok(M)
    }
}
