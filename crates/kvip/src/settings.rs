//! How `kvip run` and `kvip doctor` read their options: the environment, with `--set`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

/// The environment, with `--set name=value` options merged in (as the lowercase spelling).
/// A `--set` that disagrees with the environment (either spelling) is an error.
/// `set` with `name=true` added when `flag` is on.
pub(crate) fn with_flag(set: &[String], flag: bool, name: &str) -> Vec<String> {
    let mut v = set.to_vec();
    if flag {
        v.push(format!("{name}=true"));
    }
    v
}

pub(crate) fn run_settings(set: &[String]) -> Result<BTreeMap<String, String>> {
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    for item in set {
        let (name, value) = item
            .split_once('=')
            .with_context(|| format!("--set {item:?}: expected NAME=VALUE"))?;
        let lower = name.trim().to_ascii_lowercase();
        for spelling in [lower.clone(), lower.to_ascii_uppercase()] {
            if let Some(env) = vars.get(&spelling)
                && env.trim() != value.trim()
            {
                bail!(
                    "--set {lower}={value:?} disagrees with the environment's {spelling}={env:?}: set one of them"
                );
            }
        }
        vars.insert(lower, value.to_string());
    }
    Ok(vars)
}

/// Without `vip_nodename` or `NODE_NAME`, the host name, lowercased (as kube-vip does, and as
/// the kubelet names its Node by default).
pub(crate) fn default_node_name(vars: &mut BTreeMap<String, String>) -> Result<()> {
    let has_name = ["vip_nodename", "VIP_NODENAME", "NODE_NAME"]
        .iter()
        .any(|k| vars.get(*k).is_some_and(|v| !v.trim().is_empty()));
    if !has_name {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("no vip_nodename or NODE_NAME, and the host name cannot be read")?;
        vars.insert("NODE_NAME".into(), host.trim().to_ascii_lowercase());
    }
    Ok(())
}
