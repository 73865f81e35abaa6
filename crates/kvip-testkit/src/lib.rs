//! kvip-testkit: a network-namespace lab for tests and the demo.
//!
//! Every namespace gets a name unique to this process (`kvt<pid>x<n>`), so tests run in
//! parallel without seeing each other, and is deleted when its handle is dropped.

pub mod apiserver;
pub mod capture;
pub mod lab;
pub mod netns;
pub mod probe;

pub use netns::{Netns, NetnsError, run, run_ok};

/// Whether kernel tests can run here (root). Under `CI=true` a missing privilege is a failure,
/// never a silent skip: the caller panics with the reason.
pub fn kernel_tests_enabled() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("kernel tests need root and CI=true is set: they must not be skipped");
    }
    eprintln!("skipping kernel test: not root (run as root, or set CI=true to make this fail)");
    false
}

/// Skips the calling test (returns early) when kernel tests cannot run outside CI.
#[macro_export]
macro_rules! require_kernel {
    () => {
        if !$crate::kernel_tests_enabled() {
            return;
        }
    };
}
