// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a `WakeTask` fence callback built from a driver object that carries a payload
//! next to the task to wake. `WakeTask::new` takes exactly an `ARef<Task>`: the callback holds no
//! driver data, and only reads the task reference when the fence signals.

use kernel::dma_fence::WakeTask;
use kernel::prelude::*;
use kernel::sync::aref::ARef;
use kernel::task::Task;

module! {
    type: M,
    name: "wake_task_with_payload",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

/// A waiter that owns a buffer: dropping it frees memory.
struct Waiter {
    task: ARef<Task>,
    buffer: KVec<u8>,
}

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let task: &Task = current!();
        let waiter = Waiter {
            task: task.into(),
            buffer: KVec::new(),
        };
        let _kind = WakeTask::new(waiter);
        Ok(M)
    }
}
