// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a fence is signalled twice.

use kernel::dma_fence::FenceContext;
use kernel::prelude::*;

module! {
    type: M,
    name: "signal_twice",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let ctx = FenceContext::new(c"compile_fail", c"twice");
        let fence = ctx.new_fence(GFP_KERNEL)?;
        fence.signal(Ok(()));
        fence.signal(Err(EIO));
        Ok(M)
    }
}
