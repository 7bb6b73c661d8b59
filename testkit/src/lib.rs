//! Herald's test harness, shared by the integration tests (`tests/`) and the benchmark
//! (`herald-bench`): real processes behind one guard ([`process::Process`]), free loopback
//! ports and the waits around them, webhook sinks, and the real parts Herald meets: a control
//! plane, Alertmanager and Prometheus, tinyproxy, PostgreSQL and a one-node cluster.
//!
//! Every external tool comes from `hack/test` (see [`tools`]); a missing one stops the test
//! binary with the list of what to install, never a skip.

use std::path::Path;

pub mod alertmanager;
pub mod cli;
pub mod cluster;
pub mod control_plane;
pub mod core;
pub mod flood;
pub mod node;
pub mod postgres;
pub mod process;
pub mod sink;
pub mod tinyproxy;
pub mod tools;

/// The repository's root directory (where `deploy/`, `crds/`, `hack/` and `examples/` live).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lives in the repository")
}
