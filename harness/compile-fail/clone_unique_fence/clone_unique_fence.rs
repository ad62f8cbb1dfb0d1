// SPDX-License-Identifier: GPL-2.0

//! Must not compile: the producer's handle on a fence is cloned.

use kernel::dma_fence::FenceContext;
use kernel::prelude::*;

module! {
    type: M,
    name: "clone_unique_fence",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let ctx = FenceContext::new(c"compile_fail", c"clone");
        let fence = ctx.new_fence(GFP_KERNEL)?;
        let other = fence.clone();
        fence.signal(Ok(()));
        other.signal(Ok(()));
        Ok(M)
    }
}
