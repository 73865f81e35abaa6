//! Flushing the connection-tracking entries of pods whose translation changed, so that
//! existing flows do not keep a stale source address. Uses the `conntrack` tool.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::error::DataplaneError;
use crate::exec::{one_line, run_tool};

/// Original source addresses of the entries currently tracked, in the families asked for
/// (one `conntrack` process each).
async fn tracked_sources(v4: bool, v6: bool) -> Result<BTreeSet<IpAddr>, DataplaneError> {
    let mut out = BTreeSet::new();
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
        for line in o.stdout.lines() {
            if let Some(src) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("src="))
                .and_then(|s| s.parse::<IpAddr>().ok())
            {
                out.insert(src);
            }
        }
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
