// SPDX-License-Identifier: GPL-2.0

//! Must not compile: a module outside the kernel crate implements the hooks of a proxy fence,
//! which run in the signalling path of its source.

use kernel::dma_fence::ProxyHooks;
use kernel::prelude::*;

module! {
    type: M,
    name: "implement_proxy_hooks",
    authors: ["Rust DRM job queue authors"],
    description: "compile-fail check",
    license: "GPL",
}

struct M;

impl kernel::Module for M {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        Ok(M)
    }
}

/// A driver trying to run its own code when a hardware fence signals a done fence.
struct DropsInAtomic(KVec<u8>);

// The methods cannot be written either: their token is a type the kernel crate does not export.
impl ProxyHooks for DropsInAtomic {}
