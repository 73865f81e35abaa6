//! kvip-testkit: a network-namespace lab for tests and the demo.
//!
//! Every namespace gets a name unique to this process (`kvt<pid>x<n>`), so tests run in
//! parallel without seeing each other, and is deleted when its handle is dropped.

pub mod apiserver;
pub mod bird;
pub mod capture;
mod endpoint;
pub mod frr;
pub mod lab;
pub mod netns;
pub mod probe;
pub mod tls;

pub use netns::{Netns, NetnsError, run, run_ok};

/// Whether kernel tests can run here: true as root. Otherwise it panics — CI or not — so a
/// kernel test never reports "passed" without having run.
pub fn kernel_tests_enabled() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    panic!("kernel test needs root: run as root (it creates network namespaces)");
}

/// The start of a bench binary (`harness = false`) that needs `what` (e.g. "network
/// namespaces"): false when cargo only lists or tests the target (nothing to run); without
/// root, says so and exits 1, so a bench never reports success without having run.
pub fn bench_start(bench: &str, what: &str) -> bool {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("the {bench} bench needs root ({what})");
        std::process::exit(1);
    }
    true
}

/// Fails the calling test unless kernel tests can run (root): see [`kernel_tests_enabled`].
#[macro_export]
macro_rules! require_kernel {
    () => {
        assert!($crate::kernel_tests_enabled());
    };
}
