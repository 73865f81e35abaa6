//! A real FRR `bgpd` inside a network namespace, for the BGP tests: started in the foreground
//! without zebra (nothing goes to the kernel), or with zebra and `bfdd` for BFD; asked through
//! its own vty socket directory with `vtysh`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::Netns;

#[derive(Debug, thiserror::Error)]
pub enum FrrError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vtysh {command:?} did not answer with JSON: {output}")]
    NoAnswer { command: String, output: String },
}

pub struct Frr {
    daemons: Vec<Child>,
    dir: PathBuf,
}

const DAEMONS: &str = "/usr/lib/frr";

impl Frr {
    /// Starts `bgpd` in `ns` with `config` (FRR syntax, `router bgp ...`), and `bfdd` too
    /// when `bfd`; waits until bgpd answers.
    pub fn start(ns: &Netns, config: &str, bfd: bool) -> Result<Frr, FrrError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| FrrError::Io { what, source }
        };
        let dir = std::env::temp_dir().join(format!("kvip-frr-{}", ns.name()));
        std::fs::create_dir_all(&dir).map_err(io("creating FRR's directory"))?;
        let mut frr = Frr {
            daemons: Vec::new(),
            dir: dir.clone(),
        };
        // BFD for bgpd goes through zebra (bgpd registers its peers with bfdd there).
        let names: &[&str] = if bfd {
            &["zebra", "bfdd", "bgpd"]
        } else {
            &["bgpd"]
        };
        let zserv = dir.join("zserv.api");
        if bfd {
            let ok = Command::new("chown")
                .args(["frr:frr"])
                .arg(&dir)
                .status()
                .map_err(io("chown frr:frr"))?;
            if !ok.success() {
                return Err(FrrError::Io {
                    what: format!("chown frr:frr {}", dir.display()),
                    source: std::io::Error::other("chown failed"),
                });
            }
        }
        for &d in names {
            let conf = dir.join(format!("{d}.conf"));
            let text = if d == "bgpd" { config } else { "" };
            std::fs::write(&conf, text).map_err(io("writing the configuration"))?;
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name()])
                .arg(format!("{DAEMONS}/{d}"))
                .arg("-f")
                .arg(&conf)
                .arg("-i")
                .arg(dir.join(format!("{d}.pid")))
                .arg("--vty_socket")
                .arg(&dir)
                .arg(format!(
                    "--log=file:{}",
                    dir.join(format!("{d}.log")).display()
                ));
            // bgpd stays root (-S); zebra and bfdd have no such switch and run as the
            // package's user, in a directory of its own.
            if d == "bgpd" {
                cmd.arg("-S");
            }
            if bfd {
                cmd.arg("-z").arg(&zserv);
            } else {
                cmd.arg("-Z");
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(io("starting an FRR daemon"))?;
            frr.daemons.push(child);
            // Each daemon is up before the next starts: bgpd registers its BFD sessions
            // through zebra with bfdd, and a registration made before they listen is lost.
            let ready = match d {
                "zebra" => zserv.clone(),
                _ => dir.join(format!("{d}.vty")),
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !ready.exists() {
                if std::time::Instant::now() >= deadline {
                    return Err(FrrError::Io {
                        what: format!("{d} did not open {}", ready.display()),
                        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match frr.json("show bgp summary json") {
                Ok(_) => return Ok(frr),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    /// bgpd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bgpd.log")).unwrap_or_default()
    }

    /// Runs `vtysh -c command` against bgpd (and bfdd for `show bfd ...`); its JSON answer.
    pub fn json(&self, command: &str) -> Result<Value, FrrError> {
        let daemon = if command.starts_with("show bfd") {
            "bfdd"
        } else {
            "bgpd"
        };
        let out = Command::new("vtysh")
            .arg("--vty_socket")
            .arg(&self.dir)
            .args(["-d", daemon, "-c", command])
            .output()
            .map_err(|source| FrrError::Io {
                what: "running vtysh".into(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if out.status.success() => Ok(v),
            _ => Err(FrrError::NoAnswer {
                command: command.into(),
                output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
            }),
        }
    }

    /// The state of bfdd's session with `peer` (`up`, `down`, ...), if it has one.
    pub fn bfd_state(&self, peer: &str) -> Result<Option<String>, FrrError> {
        let v = self.json("show bfd peers json")?;
        Ok(v.as_array().into_iter().flatten().find_map(|p| {
            (p["peer"] == peer).then(|| p["status"].as_str().unwrap_or("").to_string())
        }))
    }

    /// Whether the session with `peer` is Established.
    pub fn established(&self, peer: &str) -> Result<bool, FrrError> {
        let v = self.json(&format!("show bgp neighbors {peer} json"))?;
        Ok(v[peer]["bgpState"] == "Established")
    }

    /// The routes of `afi` (`ipv4` or `ipv6`) unicast: prefix → next hops of its paths
    /// (global addresses; link-local ones are left out).
    pub fn routes(&self, afi: &str) -> Result<BTreeMap<String, BTreeSet<IpAddr>>, FrrError> {
        let v = self.json(&format!("show bgp {afi} unicast json"))?;
        let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        // bgpd always says "routes" (empty when there are none): without it, this is no
        // answer to rely on.
        let Some(routes) = v["routes"].as_object() else {
            return Err(FrrError::NoAnswer {
                command: format!("show bgp {afi} unicast json"),
                output: v.to_string(),
            });
        };
        for (prefix, paths) in routes {
            let hops = out.entry(prefix.clone()).or_default();
            for p in paths.as_array().into_iter().flatten() {
                for h in p["nexthops"].as_array().into_iter().flatten() {
                    if h["scope"] == "link-local" {
                        continue;
                    }
                    if let Some(a) = h["ip"].as_str().and_then(|a| a.parse().ok()) {
                        hops.insert(a);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
