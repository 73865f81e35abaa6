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
