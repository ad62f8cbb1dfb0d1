// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a module calls `CallbackKind::signalled` on a kind itself, outside a fence
//! callback. The method's last parameter is `kernel::dma_fence::private::Token`, which only the
//! kernel crate can name and build, so only `FenceCallback` runs a kind's action, once per arming.

use kernel::dma_fence::{
    CallbackKind,
    WakeTask, //
};
use kernel::prelude::*;

module! {
    type: M,
    name: "call_signalled_without_token",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let kind = WakeTask::current();
        kind.signalled(Ok(()), kernel::dma_fence::private::Token(()));
        Ok(M)
    }
}
