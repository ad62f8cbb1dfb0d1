// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Trace points of the Rust DRM job queue, and their entry points for Rust
 * (rust_do_trace_*()).
 */

#define CREATE_TRACE_POINTS
#define CREATE_RUST_TRACE_POINTS
#include <trace/events/drm_jobqueue.h>
