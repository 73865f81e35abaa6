//! A kernel test run without root fails: it never returns early and reports "passed".

use std::process::Command;

const INNER: &str = "KVIP_TESTKIT_UNPRIVILEGED_CHILD";

#[test]
fn kernel_test_without_root_fails() {
    if std::env::var_os(INNER).is_some() {
        // The child, running as nobody: this must panic.
        kvip_testkit::require_kernel!();
        return;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "this test drops privileges and so needs root: run as root"
    );
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args(["--exact", "kernel_test_without_root_fails", "--nocapture"])
        .env(INNER, "1")
        .env_remove("CI")
        .output()
        .expect("run setpriv (util-linux)");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "passed without root:\n{all}");
    assert!(all.contains("needs root: run as root"), "{all}");
    assert!(all.contains("1 failed"), "{all}");
}
