//! Names of the kernel objects kvip owns. They are derived from the instance name and the
//! policy name only, so that two processes (or a process before and after a restart) agree.

use crate::error::DataplaneError;

/// FNV-1a, 64 bit: a stable hash (std's hasher may change between releases).
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Which kvip instance this is: names its nftables table, its iptables chain prefix, its lock
/// and its entry in the address-protocol registry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instance(Option<String>);

/// The address protocol (IFA_PROTO) value marking the default instance's addresses.
pub const DEFAULT_ADDRESS_PROTOCOL: u8 = 107;

impl Instance {
    /// `None` or an empty name is the default instance. Names are 1 to 8 characters of
    /// `a-z0-9`, so that every derived kernel name fits its limit (iptables chains: 28).
    pub fn new(name: Option<&str>) -> Result<Instance, DataplaneError> {
        match name {
            None | Some("") => Ok(Instance(None)),
            Some(n) => {
                if n.len() > 8
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    return Err(DataplaneError::Config(format!(
                        "instance name {n:?} must be 1 to 8 characters of a-z and 0-9"
                    )));
                }
                Ok(Instance(Some(n.to_string())))
            }
        }
    }

    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The nftables table (family inet): `kvip` or `kvip_<instance>`.
    pub fn nft_table(&self) -> String {
        match &self.0 {
            None => "kvip".to_string(),
            Some(n) => format!("kvip_{n}"),
        }
    }

    /// The iptables chain prefix: `KVIP-` or `KVIP-<INSTANCE>-`.
    pub fn chain_prefix(&self) -> String {
        match &self.0 {
            None => "KVIP-".to_string(),
            Some(n) => format!("KVIP-{}-", n.to_ascii_uppercase()),
        }
    }

    /// The IFA_PROTO value kvip up to this version derived from a named instance's name
    /// (128..=247; 107 for the default instance). Distinct names can share it, so it only
    /// seeds the registry of [`crate::protocols`], never decides ownership by itself.
    pub fn legacy_address_protocol(&self) -> u8 {
        match &self.0 {
            None => DEFAULT_ADDRESS_PROTOCOL,
            Some(n) => 128 + (fnv1a(n) % 120) as u8,
        }
    }
}

/// The nftables chain of an egress policy: readable part of the name plus a hash of the full
/// name, so different names never share a chain.
pub fn nft_policy_chain(policy: &str) -> String {
    let readable: String = policy
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("eg_{readable}_{:016x}", fnv1a(policy))
}

/// The iptables chain suffix of an egress policy: twelve hex digits (48 bits) of its name's
/// hash, the most that fits iptables' 28-character chain names with an instance prefix.
pub fn ipt_policy_id(policy: &str) -> String {
    format!("{:012x}", fnv1a(policy) & 0xffff_ffff_ffff)
}

/// The comment that carries a policy's name on its translation rule.
pub fn policy_comment(policy: &str) -> String {
    format!("kvip egress {policy}")
}

/// The policy name from a translation rule's comment.
pub fn policy_from_comment(comment: &str) -> Option<&str> {
    comment.strip_prefix("kvip egress ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_bounded() {
        assert_eq!(fnv1a(""), 0xcbf29ce484222325);
        let c = nft_policy_chain("default/web");
        assert!(c.starts_with("eg_default_web_"), "{c}");
        assert_ne!(nft_policy_chain("a/b"), nft_policy_chain("a_b"));
        let i = Instance::new(Some("blue")).unwrap();
        assert_eq!(i.nft_table(), "kvip_blue");
        assert_eq!(i.chain_prefix(), "KVIP-BLUE-");
        assert!((128..=247).contains(&i.legacy_address_protocol()));
        assert!(Instance::new(Some("Blue")).is_err());
        assert!(Instance::new(Some("waytoolongname")).is_err());
        assert_eq!(Instance::new(None).unwrap().legacy_address_protocol(), 107);
    }
}
