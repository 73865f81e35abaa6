//! Records the commit the binary is built from, for `kvip --version`: `KVIP_COMMIT` when
//! set (a build outside a git checkout), else what `git rev-parse HEAD` says, else "unknown".

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KVIP_COMMIT");
    let commit = std::env::var("KVIP_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_head)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=KVIP_COMMIT={commit}");
}

/// HEAD's commit, and the files whose change moves it, so the build script runs again
/// after a commit or a checkout.
fn git_head() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--git-dir", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    let git_dir = PathBuf::from(lines.next()?);
    let commit = lines.next()?.trim().to_string();
    let git_dir = if git_dir.is_absolute() {
        git_dir
    } else {
        // Relative to the build script's working directory, the package's directory.
        std::env::current_dir().ok()?.join(git_dir)
    };
    let mut watch = vec![git_dir.join("HEAD"), git_dir.join("packed-refs")];
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD"))
        && let Some(r) = head.strip_prefix("ref: ")
    {
        watch.push(git_dir.join(r.trim()));
    }
    // Only files that exist: cargo runs the script on every build for a missing one.
    for f in watch.iter().filter(|f| f.exists()) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    (commit.len() >= 12).then(|| commit[..12].to_string())
}
