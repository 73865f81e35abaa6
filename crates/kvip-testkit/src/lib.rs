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

/// Fails the calling test unless kernel tests can run (root): see [`kernel_tests_enabled`].
#[macro_export]
macro_rules! require_kernel {
    () => {
        assert!($crate::kernel_tests_enabled());
    };
}
