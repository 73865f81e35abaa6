use std::fs::File;
use std::os::fd::AsFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
}

/// Runs a command, returning its output whatever the exit status.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output, NetnsError> {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            cmd: format!("{cmd} {}", args.join(" ")),
            source,
        })
}

/// Runs a command and fails unless it exits 0; returns its standard output.
pub fn run_ok(cmd: &str, args: &[&str]) -> Result<String, NetnsError> {
    let out = run(cmd, args)?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: format!("{cmd} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by this handle; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with loopback up. `tag` (a few letters) helps reading a
    /// listing of leftover namespaces; uniqueness comes from the pid and a counter.
    pub fn new(tag: &str) -> Result<Netns, NetnsError> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(6)
            .collect();
        let name = format!("kvt{}{}x{n}", std::process::id(), tag);
        run_ok("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace; fails unless it exits 0.
    pub fn exec_ok(&self, cmd: &str, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// Runs a shell snippet inside the namespace; fails unless it exits 0.
    pub fn sh(&self, script: &str) -> Result<String, NetnsError> {
        self.exec_ok("sh", &["-ec", script])
    }

    /// A command that runs inside the namespace with an empty environment but for `PATH`
    /// (add variables with `.arg("NAME=value")`, then the program and its arguments): how
    /// tests start kvip as a node would, configured only by what they pass.
    pub fn clean_env_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "env", "-i"])
            .arg(format!(
                "PATH={}",
                std::env::var("PATH").unwrap_or_default()
            ));
        cmd
    }

    /// Writes a sysctl inside the namespace (e.g. `net.ipv4.ip_forward`, `1`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.exec_ok("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// Sockets opened and processes spawned by that thread live in the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).map_err(|source| NetnsError::Enter {
            name: self.name.clone(),
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // Only this thread changes namespace.
                move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                    |e| NetnsError::Enter {
                        name: self.name.clone(),
                        source: e.into(),
                    },
                )?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs the future `make` returns to completion on a single-threaded runtime inside the
    /// namespace (the future is created there, so it need not be `Send`).
    pub fn block_on<Fut, F>(&self, make: F) -> Result<Fut::Output, NetnsError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future,
        Fut::Output: Send,
    {
        self.enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| NetnsError::Enter {
                    name: self.name.clone(),
                    source,
                })?;
            Ok(rt.block_on(make()))
        })?
    }

    /// Connects this namespace to `peer` with a veth pair: `ifname` here, `peer_ifname` there,
    /// both up.
    pub fn veth(&self, ifname: &str, peer: &Netns, peer_ifname: &str) -> Result<(), NetnsError> {
        self.exec_ok(
            "ip",
            &[
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                peer_ifname,
                "netns",
                &peer.name,
            ],
        )?;
        self.exec_ok("ip", &["link", "set", ifname, "up"])?;
        peer.exec_ok("ip", &["link", "set", peer_ifname, "up"])?;
        Ok(())
    }

    /// Adds an address (`CIDR` form) to an interface; IPv6 addresses skip duplicate address
    /// detection so they are usable at once.
    pub fn addr(&self, ifname: &str, cidr: &str) -> Result<(), NetnsError> {
        if cidr.contains(':') {
            self.exec_ok("ip", &["-6", "addr", "add", cidr, "dev", ifname, "nodad"])
        } else {
            self.exec_ok("ip", &["addr", "add", cidr, "dev", ifname])
        }
        .map(|_| ())
    }

    /// Adds a route (`ip route add <args>`).
    pub fn route(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut full = vec!["route", "add"];
        full.extend_from_slice(args);
        if args.first().is_some_and(|d| d.contains(':')) {
            full.insert(0, "-6");
        }
        self.exec_ok("ip", &full).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}
