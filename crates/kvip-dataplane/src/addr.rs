//! VIP addresses through rtnetlink. kvip marks every address it adds with its instance's
//! address protocol (IFA_PROTO, see [`crate::protocols`]), so it can find its own after a
//! crash and never touches another one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol, CacheInfo,
};
use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, LinkAttribute, LinkMessage};
use rtnetlink::Handle;

use crate::error::DataplaneError;

/// An address kvip owns, as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedAddress {
    pub address: IpAddr,
    pub ifindex: u32,
    pub interface: String,
    /// Seconds until the kernel removes the address by itself; `None`: never.
    pub valid_lft: Option<u32>,
    message: AddressMessage,
}

/// The kernel's "forever" lifetime.
const INFINITY_LIFE_TIME: u32 = u32::MAX;

/// A valid and preferred lifetime of `secs` seconds.
fn lifetime(secs: u32) -> AddressAttribute {
    let mut c = CacheInfo::default();
    c.ifa_valid = secs;
    c.ifa_preferred = secs;
    AddressAttribute::CacheInfo(c)
}

/// A link as kvip needs it: name, index and hardware address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// Whether the link can hold IPv6 addresses (IPv6 present and `disable_ipv6` 0).
    pub ipv6: bool,
}

/// Netlink access to addresses, bound to the network namespace it was created in.
pub struct AddrManager {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
    /// This kernel was seen to keep an address's protocol: a property of the kernel, checked
    /// on the first address added, not on each (reading an address back is a dump of every
    /// address, which made adding N addresses cost N dumps).
    marks_kept: std::sync::atomic::AtomicBool,
}

impl Drop for AddrManager {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn link_from(msg: &LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        ipv6: false,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(m) if m.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(m);
                l.mac = Some(mac);
            }
            LinkAttribute::AfSpecUnspec(specs) => {
                for spec in specs {
                    if let AfSpecUnspec::Inet6(inet6) = spec {
                        for a in inet6 {
                            if let AfSpecInet6::DevConf(c) = a {
                                l.ipv6 = c.disable_ipv6 == 0;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    l
}

impl AddrManager {
    /// Opens a netlink socket (in the calling thread's network namespace) on the current
    /// tokio runtime.
    pub fn new() -> Result<Self, DataplaneError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|source| DataplaneError::NetlinkSocket { source })?;
        let conn = tokio::spawn(conn);
        Ok(AddrManager {
            handle,
            conn,
            marks_kept: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub async fn links(&self) -> Result<Vec<Link>, DataplaneError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::netlink("listing links", e))?;
        Ok(msgs.iter().map(link_from).collect())
    }

    /// Every address of this namespace, as netlink gives them.
    async fn addresses(&self) -> Result<Vec<AddressMessage>, DataplaneError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| DataplaneError::netlink("listing addresses", e))
    }

    /// Every interface's addresses that are not kvip's (none carries an address protocol in
    /// `kvip_protocols`): the node's own, e.g. for a BGP next hop. One dump of links, one of
    /// addresses; interfaces without such an address are listed with none.
    pub async fn own_addresses(
        &self,
        kvip_protocols: &BTreeSet<u8>,
    ) -> Result<BTreeMap<String, Vec<IpAddr>>, DataplaneError> {
        let names = self.link_names().await?;
        let mut out: BTreeMap<String, Vec<IpAddr>> =
            names.values().map(|n| (n.clone(), Vec::new())).collect();
        for m in self.addresses().await? {
            let kvip = protocol_of(&m).is_some_and(|p| kvip_protocols.contains(&p));
            if let (Some(a), Some(name), false) = (address_of(&m), names.get(&m.header.index), kvip)
            {
                out.entry(name.clone()).or_default().push(a);
            }
        }
        Ok(out)
    }

    /// Interface names by index.
    async fn link_names(&self) -> Result<BTreeMap<u32, String>, DataplaneError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect())
    }

    /// Every address protocol carried by an address of this namespace.
    pub async fn protocols_in_use(&self) -> Result<BTreeSet<u8>, DataplaneError> {
        let msgs = self.addresses().await?;
        Ok(msgs.iter().filter_map(protocol_of).collect())
    }

    /// Every address carrying `protocol`, on any interface.
    pub async fn owned(&self, protocol: u8) -> Result<Vec<OwnedAddress>, DataplaneError> {
        let names = self.link_names().await?;
        let msgs = self.addresses().await?;
        let mut out = Vec::new();
        for m in msgs {
            if protocol_of(&m) != Some(protocol) {
                continue;
            }
            let addr = address_of(&m);
            let valid_lft = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::CacheInfo(c) if c.ifa_valid != INFINITY_LIFE_TIME => {
                    Some(c.ifa_valid)
                }
                _ => None,
            });
            if let Some(address) = addr {
                out.push(OwnedAddress {
                    address,
                    ifindex: m.header.index,
                    interface: names.get(&m.header.index).cloned().unwrap_or_default(),
                    valid_lft,
                    message: m,
                });
            }
        }
        out.sort_by_key(|a| (a.address, a.ifindex));
        Ok(out)
    }

    /// A request for `address` as a host address (/32 or /128) marked as kvip's, with
    /// `lifetime_secs` (forever when `None`); IPv6 skips duplicate address detection so the
    /// VIP is usable (and answerable) at once.
    fn request(
        &self,
        address: IpAddr,
        ifindex: u32,
        protocol: u8,
        lifetime_secs: Option<u32>,
    ) -> rtnetlink::AddressAddRequest {
        let len = if address.is_ipv4() { 32 } else { 128 };
        let mut req = self.handle.address().add(ifindex, address, len);
        let msg = req.message_mut();
        msg.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(protocol)));
        if address.is_ipv6() {
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Some(secs) = lifetime_secs {
            msg.attributes.push(lifetime(secs));
        }
        req
    }

    /// Adds `address` marked as kvip's, for `lifetime_secs` (forever when `None`): the kernel
    /// removes it by itself once that runs out.
    pub async fn add(
        &self,
        address: IpAddr,
        ifindex: u32,
        protocol: u8,
        lifetime_secs: Option<u32>,
    ) -> Result<(), DataplaneError> {
        let req = self.request(address, ifindex, protocol, lifetime_secs);
        req.execute().await.map_err(|e| {
            DataplaneError::netlink(format!("adding {address} to interface {ifindex}"), e)
        })?;
        if self.marks_kept.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        // A kernel without address protocols (IFA_PROTO, Linux 6.1) accepts the address but
        // drops the mark: kvip could then never find it again after a restart. Refuse that
        // loudly instead of leaking addresses, and take back the one just added.
        let msgs = self.at(address, ifindex).await?;
        let marked = msgs.iter().any(|m| protocol_of(m) == Some(protocol));
        if !marked {
            for m in msgs {
                if let Err(e) = self.handle.address().del(m).execute().await {
                    tracing::error!(%address, ifindex, error = %e, "taking back an unmarked address failed");
                }
            }
            return Err(DataplaneError::KernelUnsupported(
                "this kernel does not keep address protocols (IFA_PROTO, Linux 6.1 or later): \
                 kvip cannot mark its VIPs as its own, so it does not add them"
                    .into(),
            ));
        }
        self.marks_kept
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sets the lifetime of kvip's `address` on `ifindex` to `secs` from now (one replace
    /// request; an address that has just expired is added again, which is what a refreshed
    /// deadline means).
    pub async fn set_lifetime(
        &self,
        address: IpAddr,
        ifindex: u32,
        protocol: u8,
        secs: u32,
    ) -> Result<(), DataplaneError> {
        self.request(address, ifindex, protocol, Some(secs))
            .replace()
            .execute()
            .await
            .map_err(|e| {
                DataplaneError::netlink(
                    format!("setting the lifetime of {address} on interface {ifindex}"),
                    e,
                )
            })
    }

    /// The kernel's entries for `address` on `ifindex` (none when it is not there).
    async fn at(
        &self,
        address: IpAddr,
        ifindex: u32,
    ) -> Result<Vec<AddressMessage>, DataplaneError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(address)
            .execute()
            .try_collect()
            .await
            .map_err(|e| {
                DataplaneError::netlink(format!("reading {address} on interface {ifindex}"), e)
            })
    }

    /// Removes kvip's `address` (the host address carrying `protocol`) from `ifindex`;
    /// already gone is not an error, and an address of the same IP that is not kvip's is
    /// left alone.
    pub async fn remove_at(
        &self,
        address: IpAddr,
        ifindex: u32,
        protocol: u8,
    ) -> Result<(), DataplaneError> {
        let host_len = if address.is_ipv4() { 32 } else { 128 };
        for m in self.at(address, ifindex).await? {
            let ours = m.header.prefix_len == host_len
                && m.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == protocol),
                );
            if !ours {
                continue;
            }
            self.handle.address().del(m).execute().await.map_err(|e| {
                DataplaneError::netlink(format!("removing {address} from interface {ifindex}"), e)
            })?;
        }
        Ok(())
    }

    /// Removes one of kvip's addresses.
    pub async fn remove(&self, a: &OwnedAddress) -> Result<(), DataplaneError> {
        self.handle
            .address()
            .del(a.message.clone())
            .execute()
            .await
            .map_err(|e| {
                DataplaneError::netlink(format!("removing {} from {}", a.address, a.interface), e)
            })
    }
}

/// An address message's address: its local address (IFA_LOCAL), else IFA_ADDRESS.
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(a) => Some(*a),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) => Some(*a),
            _ => None,
        })
    })
}

/// An address message's protocol (IFA_PROTO), if any.
fn protocol_of(m: &AddressMessage) -> Option<u8> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Protocol(p) => Some(u8::from(*p)),
        _ => None,
    })
}
