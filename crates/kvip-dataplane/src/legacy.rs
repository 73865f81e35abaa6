//! Removing what kube-vip leaves behind (opt-in, `clean-legacy`), and nothing else:
//! - the `KUBE-VIP-EGRESS` chain of the mangle table and the PREROUTING jumps to it;
//! - nat POSTROUTING rules whose comment starts with `a3ViZS12aXAK=` (base64 of "kube-vip\n");
//! - nftables tables named `kube_vip_*` (kube-vip's `kube_vip_v4`, `kube_vip_v6`).
//!
//! Both iptables variants and both families are cleaned where their tools run.

use kvip_core::Family;
use serde_json::{Value, json};

use crate::exec::run_tool;
use crate::iptables::Variant;
use crate::nft::nft_apply;

/// kube-vip's comment marker: base64 of "kube-vip\n".
pub const KUBE_VIP_COMMENT: &str = "a3ViZS12aXAK=";
/// kube-vip's egress chain in the mangle table.
pub const KUBE_VIP_CHAIN: &str = "KUBE-VIP-EGRESS";

/// What a legacy clean-up removed and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LegacyReport {
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

fn has_kube_vip_comment(line: &str) -> bool {
    line.contains(&format!("--comment {KUBE_VIP_COMMENT}"))
        || line.contains(&format!("--comment \"{KUBE_VIP_COMMENT}"))
}

/// The restore input removing kube-vip's rules from one `iptables-save` listing (all tables),
/// with a line per removed object for the report. `None` when there is nothing of kube-vip.
pub fn render_legacy_cleanup(save: &str) -> Option<(String, Vec<String>)> {
    let mut table = "";
    let mut mangle = Vec::new();
    let mut mangle_has_chain = false;
    let mut nat = Vec::new();
    let mut removed = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t {
                "mangle" => "mangle",
                "nat" => "nat",
                _ => "",
            };
            continue;
        }
        match table {
            "mangle" => {
                if line.starts_with(&format!(":{KUBE_VIP_CHAIN} ")) {
                    mangle_has_chain = true;
                } else if let Some(rest) = line.strip_prefix("-A PREROUTING ")
                    && rest
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .windows(2)
                        .any(|w| w == ["-j", KUBE_VIP_CHAIN])
                {
                    mangle.push(format!("-D PREROUTING {rest}"));
                    removed.push(format!("mangle: {line}"));
                }
            }
            "nat" => {
                if let Some(rest) = line.strip_prefix("-A POSTROUTING ")
                    && has_kube_vip_comment(line)
                {
                    nat.push(format!("-D POSTROUTING {rest}"));
                    removed.push(format!("nat: {line}"));
                }
            }
            _ => {}
        }
    }
    if mangle_has_chain {
        removed.push(format!("mangle: chain {KUBE_VIP_CHAIN}"));
    }
    if removed.is_empty() {
        return None;
    }
    let mut out = String::new();
    if mangle_has_chain || !mangle.is_empty() {
        out.push_str("*mangle\n");
        if mangle_has_chain {
            out.push_str(&format!(":{KUBE_VIP_CHAIN} - [0:0]\n"));
        }
        for l in &mangle {
            out.push_str(l);
            out.push('\n');
        }
        if mangle_has_chain {
            out.push_str(&format!("-X {KUBE_VIP_CHAIN}\n"));
        }
        out.push_str("COMMIT\n");
    }
    if !nat.is_empty() {
        out.push_str("*nat\n");
        for l in &nat {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    Some((out, removed))
}

/// kube-vip's nftables tables in a `nft -j list tables` listing, as (family, name).
pub fn kube_vip_tables(listing: &Value) -> Vec<(String, String)> {
    listing["nftables"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.get("table"))
                .filter_map(|t| {
                    let name = t["name"].as_str()?;
                    let fam = t["family"].as_str()?;
                    name.starts_with("kube_vip_")
                        .then(|| (fam.to_string(), name.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes kube-vip's leftovers from every iptables variant and family whose tools run, and
/// kube-vip's nftables tables. Never stops at the first error. Holds the default instance's
/// lock meanwhile (it rewrites the same nat tables as that instance's applies), without
/// counting as a change of kvip's objects.
pub async fn clean_legacy() -> LegacyReport {
    let lock = crate::run::netns_dir()
        .map(|dir| crate::run::InstanceLock::new(&dir, &crate::names::Instance::default()));
    let _held = match lock {
        Ok(l) => match l.hold(crate::run::LOCK_TIMEOUT).await {
            Ok(g) => g,
            Err(e) => {
                return LegacyReport {
                    errors: vec![e.to_string()],
                    ..LegacyReport::default()
                };
            }
        },
        Err(e) => {
            return LegacyReport {
                errors: vec![e.to_string()],
                ..LegacyReport::default()
            };
        }
    };
    scan_legacy(true).await
}

/// What [`clean_legacy`] would remove, changing nothing (`removed` lists it).
pub async fn find_legacy() -> LegacyReport {
    scan_legacy(false).await
}

async fn scan_legacy(remove: bool) -> LegacyReport {
    let mut report = LegacyReport::default();
    for v in [Variant::Legacy, Variant::Nft] {
        for f in [Family::V4, Family::V6] {
            let save = match run_tool(v.save_cmd(f), &[], None).await {
                Ok(o) if o.status_ok => o.stdout,
                _ => continue,
            };
            let Some((input, removed)) = render_legacy_cleanup(&save) else {
                continue;
            };
            if !remove {
                report.removed.extend(
                    removed
                        .into_iter()
                        .map(|r| format!("{} {}: {r}", v.save_cmd(f).trim_end_matches("-save"), f)),
                );
                continue;
            }
            match run_tool(v.restore_cmd(f), &["--noflush"], Some(input.as_bytes())).await {
                Ok(o) if o.status_ok => report.removed.extend(
                    removed
                        .into_iter()
                        .map(|r| format!("{} {}: {r}", v.save_cmd(f).trim_end_matches("-save"), f)),
                ),
                Ok(o) => report.errors.push(format!(
                    "{}: {}",
                    v.restore_cmd(f),
                    crate::exec::one_line(&o.stderr)
                )),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    match run_tool("nft", &["-j", "list", "tables"], None).await {
        Ok(o) if o.status_ok => {
            let listing: Value = serde_json::from_str(&o.stdout).unwrap_or(Value::Null);
            let tables = kube_vip_tables(&listing);
            if !tables.is_empty() && !remove {
                report.removed.extend(
                    tables
                        .iter()
                        .map(|(f, n)| format!("nftables: table {f} {n}")),
                );
            } else if !tables.is_empty() {
                let cmds: Vec<Value> = tables
                    .iter()
                    .map(|(f, n)| json!({"delete": {"table": {"family": f, "name": n}}}))
                    .collect();
                match nft_apply(&json!({ "nftables": cmds }).to_string()).await {
                    Ok(()) => report.removed.extend(
                        tables
                            .iter()
                            .map(|(f, n)| format!("nftables: table {f} {n}")),
                    ),
                    Err(e) => report.errors.push(e.to_string()),
                }
            }
        }
        Ok(o) => report.errors.push(format!(
            "nft list tables: {}",
            crate::exec::one_line(&o.stderr)
        )),
        Err(crate::error::DataplaneError::ToolMissing { .. }) => {}
        Err(e) => report.errors.push(e.to_string()),
    }
    report
}
