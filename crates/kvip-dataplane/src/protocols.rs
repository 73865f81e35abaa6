//! Which address protocol (IFA_PROTO, one byte) marks which instance's VIPs in one network
//! namespace. The default instance always uses [`DEFAULT_ADDRESS_PROTOCOL`]; a named instance
//! gets a byte of its own from a registry file (`/run/kvip/net-<ns>/protocols`, one
//! `<byte> <instance>` line each), allocated under an exclusive lock the first time it applies
//! in that namespace. Two instances never share a byte, so neither can mistake the other's
//! addresses for its own; a hash of the name cannot promise that (120 values for 36^8 names).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::DataplaneError;
use crate::names::{DEFAULT_ADDRESS_PROTOCOL, Instance};
use crate::run::{LOCK_TIMEOUT, append_line, lock_bounded, open_rw, read_all};

/// Bytes given to named instances.
pub const NAMED_RANGE: std::ops::RangeInclusive<u8> = 128..=254;

/// The registry of one namespace.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
}

fn parse(text: &str, path: &Path) -> Result<BTreeMap<String, u8>, DataplaneError> {
    let mut map = BTreeMap::new();
    let mut bytes = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad =
            || DataplaneError::readback(format!("{}: malformed line {line:?}", path.display()));
        let (b, name) = line.split_once(' ').ok_or_else(bad)?;
        let b: u8 = b.parse().map_err(|_| bad())?;
        if !NAMED_RANGE.contains(&b)
            || !bytes.insert(b)
            || map.insert(name.to_string(), b).is_some()
        {
            return Err(bad());
        }
    }
    Ok(map)
}

impl Registry {
    pub fn new(dir: &Path) -> Self {
        Registry {
            path: dir.join("protocols"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn locked(&self) -> Result<File, DataplaneError> {
        let file = open_rw(&self.path)?;
        lock_bounded(&file, &self.path, LOCK_TIMEOUT, || None).await?;
        Ok(file)
    }

    /// The instance's byte, or `None` when a named instance has none in this namespace yet
    /// (it has never added an address here). Read anew on every call.
    pub async fn lookup(&self, instance: &Instance) -> Result<Option<u8>, DataplaneError> {
        let Some(name) = instance.name() else {
            return Ok(Some(DEFAULT_ADDRESS_PROTOCOL));
        };
        let file = self.locked().await?;
        Ok(parse(&read_all(&file, &self.path)?, &self.path)?
            .get(name)
            .copied())
    }

    /// The instance's byte, allocated if it has none. Never a byte another instance holds;
    /// then, in this order: `held` (the byte this process used so far, should the file have
    /// been lost), the byte older kvip versions derived from the name (so an upgrade keeps
    /// finding its VIPs) unless an address carries it (`in_use`), the lowest free byte of
    /// [`NAMED_RANGE`] that no address carries.
    pub async fn allocate(
        &self,
        instance: &Instance,
        held: Option<u8>,
        in_use: &BTreeSet<u8>,
    ) -> Result<u8, DataplaneError> {
        let Some(name) = instance.name() else {
            return Ok(DEFAULT_ADDRESS_PROTOCOL);
        };
        let file = self.locked().await?;
        let map = parse(&read_all(&file, &self.path)?, &self.path)?;
        if let Some(b) = map.get(name) {
            return Ok(*b);
        }
        let taken: BTreeSet<u8> = map.values().copied().collect();
        let free = |b: &u8| NAMED_RANGE.contains(b) && !taken.contains(b);
        let legacy = instance.legacy_address_protocol();
        let byte = held
            .filter(free)
            .or_else(|| Some(legacy).filter(|b| free(b) && !in_use.contains(b)))
            .or_else(|| NAMED_RANGE.clone().find(|b| free(b) && !in_use.contains(b)))
            .ok_or_else(|| {
                DataplaneError::Config(format!(
                    "no free address protocol for instance {name:?} in {}: too many instances",
                    self.path.display()
                ))
            })?;
        // One line appended in one write: a process killed at any point leaves the registry
        // with or without the line, never a torn or emptied file.
        append_line(&file, &self.path, &format!("{byte} {name}\n"))?;
        Ok(byte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colliding_names_get_distinct_bytes() {
        let dir = std::env::temp_dir().join(format!("kvip-proto-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let reg = Registry::new(&dir);
        let (blue, stage) = (
            Instance::new(Some("blue")).expect("name"),
            Instance::new(Some("stage")).expect("name"),
        );
        assert_eq!(
            blue.legacy_address_protocol(),
            stage.legacy_address_protocol()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let none = BTreeSet::new();
            assert_eq!(reg.lookup(&blue).await.expect("lookup"), None);
            let b = reg.allocate(&blue, None, &none).await.expect("blue");
            assert_eq!(b, blue.legacy_address_protocol(), "the old byte when free");
            let s = reg.allocate(&stage, None, &none).await.expect("stage");
            assert_ne!(b, s);
            assert_eq!(reg.lookup(&stage).await.expect("lookup"), Some(s));
            assert_eq!(reg.allocate(&blue, None, &none).await.expect("again"), b);
            // A byte some address carries is not given to a newcomer.
            let other = Instance::new(Some("other")).expect("name");
            let busy: BTreeSet<u8> = NAMED_RANGE.clone().take(5).collect();
            let o = reg.allocate(&other, None, &busy).await.expect("other");
            assert!(!busy.contains(&o) && o != b && o != s, "{o}");
            assert_eq!(
                reg.lookup(&Instance::default()).await.expect("default"),
                Some(DEFAULT_ADDRESS_PROTOCOL)
            );
        });
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
