//! A real BIRD 2 router inside a network namespace, for the BGP tests: started in the
//! foreground (it goes with its handle), asked through its control socket with `birdc`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::Netns;

#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("birdc {command:?} did not answer as BIRD does: {output}")]
    NoAnswer { command: String, output: String },
}

pub struct Bird {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Bird {
    /// Starts `bird` in `ns` with `config` (BIRD 2 syntax) and waits until its control
    /// socket answers.
    pub fn start(ns: &Netns, config: &str) -> Result<Bird, BirdError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| BirdError::Io { what, source }
        };
        let dir = std::env::temp_dir().join(format!("kvip-bird-{}", ns.name()));
        std::fs::create_dir_all(&dir).map_err(io("creating BIRD's directory"))?;
        let conf = dir.join("bird.conf");
        let sock = dir.join("bird.ctl");
        std::fs::write(&conf, config).map_err(io("writing bird.conf"))?;
        let log = std::fs::File::create(dir.join("bird.log")).map_err(io("bird.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting bird"))?;
        let bird = Bird { child, dir, sock };
        // Until the control socket answers (BIRD parses its configuration first).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match bird.cmd("show status") {
                Ok(_) => return Ok(bird),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(BirdError::NoAnswer {
                        command: "show status".into(),
                        output: format!("{e}; log: {}", bird.log()),
                    });
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    /// BIRD's log so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// Runs `birdc` with `command`; its output, checked to come from BIRD.
    pub fn cmd(&self, command: &str) -> Result<String, BirdError> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.sock)
            .args(command.split_whitespace())
            .output()
            .map_err(|source| BirdError::Io {
                what: "running birdc".into(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // birdc greets with "BIRD <version> ready." when it reached the daemon.
        if !out.status.success() || !text.starts_with("BIRD ") || !text.contains(" ready.") {
            return Err(BirdError::NoAnswer {
                command: command.into(),
                output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(text)
    }

    /// Whether protocol `name` (a BGP session) is Established.
    pub fn established(&self, name: &str) -> Result<bool, BirdError> {
        let out = self.cmd(&format!("show protocols {name}"))?;
        Ok(out
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name) && l.contains("Established")))
    }

    /// Every route in BIRD's tables (`show route`): prefix → the next hops of its routes.
    pub fn routes(&self) -> Result<BTreeMap<String, BTreeSet<IpAddr>>, BirdError> {
        let out = self.cmd("show route")?;
        Ok(parse_routes(&out))
    }
}

/// Parses `show route`: a line starting with a prefix opens it (continuation lines of
/// other routes to it start with blanks); `via <address>` lines are next hops.
pub fn parse_routes(out: &str) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let mut routes: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !line.starts_with(char::is_whitespace) && first.contains('/') {
            current = Some(first.to_string());
            routes.entry(first.to_string()).or_default();
        }
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "via"
                && let (Some(c), Some(a)) = (&current, words.next())
                && let Ok(a) = a.parse::<IpAddr>()
            {
                routes.entry(c.clone()).or_default().insert(a);
            }
        }
    }
    routes
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_show_route_with_ecmp() {
        let out = "BIRD 2.0.12 ready.\nTable master4:\n203.0.113.10/32      unicast [n1 10:00:00.000] * (100) [AS64512i]\n\tvia 192.0.2.10 on eth0\n                     unicast [n2 10:00:00.000] (100) [AS64512i]\n\tvia 192.0.2.11 on eth0\n\nTable master6:\n2001:db8:1::10/128   unicast [n1 10:00:00.000] * (100) [AS64512i]\n\tvia 2001:db8::10 on eth0\n";
        let r = super::parse_routes(out);
        assert_eq!(r.len(), 2);
        assert_eq!(r["203.0.113.10/32"].len(), 2);
        assert_eq!(r["2001:db8:1::10/128"].len(), 1);
    }
}
