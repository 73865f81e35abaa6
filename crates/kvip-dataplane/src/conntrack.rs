//! Flushing the connection-tracking entries of pods whose translation changed, so that
//! existing flows do not keep a stale source address. Which sources have entries is read
//! from `/proc/net/nf_conntrack` of the calling thread's namespace when the kernel has it
//! (no process to start: this runs after every change), else listed with the `conntrack`
//! tool; entries are deleted with the tool.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::error::DataplaneError;
use crate::exec::{one_line, run_tool};

/// The original source of each entry of a conntrack listing (the tool's or the kernel's
/// `/proc` table: the first `src=` of a line is the original direction's).
fn sources_of(listing: &str, out: &mut BTreeSet<IpAddr>) {
    for line in listing.lines() {
        if let Some(src) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("src="))
            .and_then(|s| s.parse::<IpAddr>().ok())
        {
            out.insert(src);
        }
    }
}

/// Original source addresses of the entries currently tracked, in the families asked for:
/// from the kernel's table in `/proc` (this thread's network namespace), or one `conntrack`
/// process per family where the kernel has no such file.
async fn tracked_sources(v4: bool, v6: bool) -> Result<BTreeSet<IpAddr>, DataplaneError> {
    let mut out = BTreeSet::new();
    // Off the runtime's thread (a large table takes a while to read); the blocking pool's
    // threads are in the namespace of the thread that started them, as this one.
    let read = tokio::task::spawn_blocking(|| {
        std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")
    })
    .await
    .map_err(|e| DataplaneError::Io {
        tool: "/proc/thread-self/net/nf_conntrack".into(),
        source: std::io::Error::other(e),
    })?;
    match read {
        Ok(table) => {
            sources_of(&table, &mut out);
            return Ok(out);
        }
        // Not built into this kernel (or conntrack not loaded): ask the tool.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(DataplaneError::Io {
                tool: "/proc/thread-self/net/nf_conntrack".into(),
                source: e,
            });
        }
    }
    let families = [("ipv4", v4), ("ipv6", v6)];
    for fam in families.iter().filter(|f| f.1).map(|f| f.0) {
        let o = run_tool("conntrack", &["-L", "-f", fam], None).await?;
        if !o.status_ok {
            return Err(DataplaneError::ToolFailed {
                tool: "conntrack".into(),
                args: format!("-L -f {fam}"),
                stderr: one_line(&o.stderr),
            });
        }
        sources_of(&o.stdout, &mut out);
    }
    Ok(out)
}

/// Deletes the entries whose original source is one of `sources`; returns how many sources
/// had entries. Lists once, then deletes only for sources that have entries, so the cost
/// follows live flows, not the number of changed pods.
pub async fn flush_sources(sources: &BTreeSet<IpAddr>) -> Result<usize, DataplaneError> {
    if sources.is_empty() {
        return Ok(0);
    }
    let tracked = tracked_sources(
        sources.iter().any(IpAddr::is_ipv4),
        sources.iter().any(IpAddr::is_ipv6),
    )
    .await?;
    let mut flushed = 0;
    for s in sources.intersection(&tracked) {
        let fam = if s.is_ipv4() { "ipv4" } else { "ipv6" };
        let ip = s.to_string();
        let o = run_tool("conntrack", &["-D", "-f", fam, "-s", &ip], None).await?;
        // conntrack exits 1 when no entry matched (the flow ended meanwhile): not an error.
        if !o.status_ok && !o.stderr.contains("0 flow entries") {
            return Err(DataplaneError::ToolFailed {
                tool: "conntrack".into(),
                args: format!("-D -f {fam} -s {ip}"),
                stderr: one_line(&o.stderr),
            });
        }
        flushed += 1;
    }
    Ok(flushed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_sources_of_both_listings() {
        let proc_table = "ipv4     2 udp      17 29 src=10.244.1.5 dst=203.0.113.9 sport=5353 dport=53 src=203.0.113.9 dst=192.0.2.10 sport=53 dport=5353 mark=0 zone=0 use=2\n\
ipv6     10 tcp      6 86399 ESTABLISHED src=fd00::5 dst=2001:db8::9 sport=4242 dport=443 src=2001:db8::9 dst=2001:db8::10 sport=443 dport=4242 [ASSURED] mark=0 zone=0 use=2\n";
        let tool = "udp      17 29 src=10.244.1.6 dst=203.0.113.9 sport=5353 dport=53 src=203.0.113.9 dst=192.0.2.10 sport=53 dport=5353 mark=0 use=1\n";
        let mut out = BTreeSet::new();
        sources_of(proc_table, &mut out);
        sources_of(tool, &mut out);
        let want: BTreeSet<IpAddr> = ["10.244.1.5", "10.244.1.6", "fd00::5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(out, want);
    }
}
