//! kvip's files under the runtime directory, one folder per network namespace
//! (`/run/kvip/net-<inode of the namespace>/`):
//!
//! - `<instance>.lock`: an exclusive `flock` serialises the kernel changes of every kvip
//!   process of one instance in one namespace (agent and CLI alike). It holds the token of
//!   the last writer (`writer <pid> <sequence>`) and the pid of the last holder; a process
//!   whose token is no longer there knows another process changed the kernel meanwhile.
//! - `protocols`: which address protocol (IFA_PROTO) marks which named instance's VIPs
//!   ([`crate::protocols`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::DataplaneError;
use crate::names::Instance;

/// Where kvip keeps its runtime files. A containerised agent must see the host's folder
/// (a hostPath volume) for the locks to serialise it with the CLI and with itself.
pub const RUN_DIR: &str = "/run/kvip";

/// How long a kernel change waits for another process of the same instance.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

fn file_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let path = path.to_path_buf();
    move |source| DataplaneError::RunFile { op, path, source }
}

/// The folder of the calling thread's network namespace, created if missing.
pub fn netns_dir() -> Result<PathBuf, DataplaneError> {
    let ns = Path::new("/proc/thread-self/ns/net");
    let ino = std::fs::metadata(ns)
        .map_err(file_err("reading the network namespace of", ns))?
        .ino();
    let dir = Path::new(RUN_DIR).join(format!("net-{ino}"));
    std::fs::create_dir_all(&dir).map_err(file_err("creating", &dir))?;
    Ok(dir)
}

pub(crate) fn open_rw(path: &Path) -> Result<File, DataplaneError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(file_err("opening", path))
}

/// Takes an exclusive lock on `file`, polling for at most `timeout`; `holder` names who has
/// it when that fails.
pub(crate) async fn lock_bounded(
    file: &File,
    path: &Path,
    timeout: Duration,
    holder: impl Fn() -> Option<u32>,
) -> Result<(), DataplaneError> {
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(file_err("locking", path)(e)),
        }
        if start.elapsed() >= timeout {
            return Err(DataplaneError::LockTimeout {
                path: path.to_path_buf(),
                holder: holder(),
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) fn read_all(mut file: &File, path: &Path) -> Result<String, DataplaneError> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut s))
        .map_err(file_err("reading", path))?;
    Ok(s)
}

/// Appends `line` with a single write (the file's end, under the caller's lock).
pub(crate) fn append_line(mut file: &File, path: &Path, line: &str) -> Result<(), DataplaneError> {
    file.seek(SeekFrom::End(0))
        .and_then(|_| file.write_all(line.as_bytes()))
        .map_err(file_err("writing", path))
}

pub(crate) fn replace_all(mut file: &File, path: &Path, text: &str) -> Result<(), DataplaneError> {
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(text.as_bytes()))
        .map_err(file_err("writing", path))
}

/// The lock file of one instance in one namespace.
#[derive(Debug, Clone)]
pub struct InstanceLock {
    path: PathBuf,
}

/// Held while a kernel change runs; released when dropped.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
    /// Whether the writer token found was not the one this process last wrote.
    pub changed_by_other: bool,
}

fn parse_field(text: &str, key: &str) -> Option<Vec<u64>> {
    let line = text.lines().find_map(|l| l.strip_prefix(key))?;
    line.split_whitespace().map(|w| w.parse().ok()).collect()
}

impl InstanceLock {
    pub fn new(dir: &Path, instance: &Instance) -> Self {
        let name = instance.name().unwrap_or("default");
        InstanceLock {
            path: dir.join(format!("{name}.lock")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (at most `timeout`) for the lock and records this process as holder, leaving
    /// the writer token alone: for work that does not change this instance's objects.
    pub async fn hold(&self, timeout: Duration) -> Result<LockGuard, DataplaneError> {
        let file = self.wait(timeout).await?;
        let text = read_all(&file, &self.path)?;
        let writer: String = text
            .lines()
            .filter(|l| l.starts_with("writer "))
            .map(|l| format!("{l}\n"))
            .collect();
        let pid = std::process::id();
        replace_all(&file, &self.path, &format!("{writer}holder {pid}\n"))?;
        Ok(LockGuard {
            _file: file,
            changed_by_other: false,
        })
    }

    async fn wait(&self, timeout: Duration) -> Result<File, DataplaneError> {
        let file = open_rw(&self.path)?;
        let holder = || {
            std::fs::read_to_string(&self.path)
                .ok()
                .and_then(|t| parse_field(&t, "holder "))
                .and_then(|v| v.first().copied())
                .and_then(|p| u32::try_from(p).ok())
        };
        lock_bounded(&file, &self.path, timeout, holder).await?;
        Ok(file)
    }

    /// Waits (at most `timeout`) for the lock, then records this process as holder and as
    /// the next writer. `last_token` is the writer token this process wrote last (updated).
    pub async fn acquire(
        &self,
        timeout: Duration,
        last_token: &mut Option<String>,
    ) -> Result<LockGuard, DataplaneError> {
        let file = self.wait(timeout).await?;
        let text = read_all(&file, &self.path)?;
        let found = text
            .lines()
            .find(|l| l.starts_with("writer "))
            .map(str::to_string);
        let changed_by_other = found != *last_token;
        let seq = parse_field(&text, "writer ")
            .and_then(|v| v.get(1).copied())
            .unwrap_or(0)
            + 1;
        let pid = std::process::id();
        let token = format!("writer {pid} {seq}");
        replace_all(&file, &self.path, &format!("{token}\nholder {pid}\n"))?;
        *last_token = Some(token);
        Ok(LockGuard {
            _file: file,
            changed_by_other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_waits_with_a_bound_and_tracks_other_writers() {
        let dir = std::env::temp_dir().join(format!("kvip-run-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let lock = InstanceLock::new(&dir, &Instance::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (mut a, mut b) = (None, None);
            let held = lock.acquire(LOCK_TIMEOUT, &mut a).await.expect("first");
            let short = Duration::from_millis(50);
            match lock.acquire(short, &mut b).await {
                Err(DataplaneError::LockTimeout { path, holder, .. }) => {
                    assert_eq!(path, lock.path());
                    assert_eq!(holder, Some(std::process::id()));
                }
                other => panic!("expected a timeout, got {other:?}"),
            }
            drop(held);
            let g = lock.acquire(short, &mut b).await.expect("after release");
            assert!(
                g.changed_by_other,
                "b never wrote: a's token is someone else's"
            );
            drop(g);
            let g = lock.acquire(short, &mut b).await.expect("again");
            assert!(!g.changed_by_other, "b's own token");
            drop(g);
            let g = lock.hold(short).await.expect("hold");
            drop(g);
            let g = lock.acquire(short, &mut b).await.expect("after a hold");
            assert!(!g.changed_by_other, "holding does not count as writing");
            drop(g);
            let g = lock.acquire(short, &mut a).await.expect("a again");
            assert!(g.changed_by_other, "b wrote since a did");
        });
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
