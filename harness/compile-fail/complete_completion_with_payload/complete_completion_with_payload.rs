// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a `CompleteCompletion` fence callback built from a driver object that embeds
//! the completion next to a payload. `CompleteCompletion::new` takes exactly an `Arc<Completion>`:
//! whatever else the driver shares with the waiter cannot reach the callback.

use kernel::dma_fence::CompleteCompletion;
use kernel::prelude::*;
use kernel::sync::{
    Arc,
    Completion, //
};

module! {
    type: M,
    name: "complete_completion_with_payload",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

/// A job's completion and the data its waiter reads.
#[pin_data]
struct JobDone {
    #[pin]
    done: Completion,
    results: KVec<u8>,
}

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let job = Arc::pin_init(
            pin_init!(JobDone { done <- Completion::new(), results: KVec::new() }),
            GFP_KERNEL,
        )?;
        let _kind = CompleteCompletion::new(job);
        Ok(M)
    }
}
