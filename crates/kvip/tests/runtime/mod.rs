//! Container runtimes for the image tests, each with storage of its own under a temporary
//! directory so that tests run in parallel and leave nothing on the host: podman (with runc,
//! cgroupfs and vfs storage, which work on any host of this kind) and a containerd started on
//! its own socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The archive under test: `KVIP_IMAGE_ARCHIVE`, else what `scripts/dev image` writes.
pub fn archive() -> PathBuf {
    let path = std::env::var_os("KVIP_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target")
                .join(format!("kvip-{}.oci.tar", env!("CARGO_PKG_VERSION")))
        });
    assert!(
        path.is_file(),
        "no image archive at {}: build it with scripts/dev image (scripts/dev test does)",
        path.display()
    );
    path
}

/// The name the image carries, and the manifests' default image.
pub fn image_name() -> String {
    format!("localhost/kvip:{}", env!("CARGO_PKG_VERSION"))
}

/// Runs `cmd` and returns its stdout; the test fails with its stderr unless it exits 0.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A directory removed on drop, unique to this process and call.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kvip-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// podman with storage of its own. runc, not crun (which fails on hybrid cgroup hosts);
/// limits set explicitly, since podman's defaults exceed what a container may be given here.
pub struct Podman {
    dir: TempDir,
}

impl Podman {
    pub fn new(tag: &str) -> Podman {
        Podman {
            dir: TempDir::new(&format!("podman-{tag}")),
        }
    }

    pub fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        c
    }

    pub fn load(&self, archive: &Path) {
        let out = stdout_of(self.cmd().arg("load").arg("-i").arg(archive));
        assert!(out.contains(&image_name()), "podman load: {out}");
    }

    /// `podman run --rm <opts> <image> <args>`: the container's stdout.
    pub fn run_ok(&self, opts: &[&str], args: &[&str]) -> String {
        stdout_of(
            self.cmd()
                .args(["run", "--rm", "--ulimit", "nofile=1024:1024"])
                .args(["--ulimit", "nproc=1024:1024"])
                .args(opts)
                .arg(image_name())
                .args(args),
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers ran with --rm; this only catches one left by a failed test.
        let _ = self.cmd().args(["rm", "-af"]).output();
    }
}

/// A containerd of its own: root, state and socket under a temporary directory; the CRI
/// plugin off (nothing here is a kubelet). Stopped on drop.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Containerd {
    pub fn start(tag: &str) -> Containerd {
        let dir = TempDir::new(&format!("containerd-{tag}"));
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n",
                d.join("root").display(),
                d.join("state").display(),
                socket.display(),
                d.join("containerd.sock.ttrpc").display(),
            ),
        )
        .expect("containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd { child, socket, dir };
        c.wait_ready();
        c
    }

    /// Until containerd answers on its socket (it takes well under a second).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .ctr()
                .arg("version")
                .stdin(Stdio::null())
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 30 s: {}",
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket);
        c
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        stdout_of(self.ctr().args(args))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM, so containerd shuts down cleanly; SIGKILL if it has not within 10 s.
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
