//! What makes one instance's kernel changes its own: the instance's lock around each change,
//! and the address protocol that marks its VIPs (see [`crate::run`], [`crate::protocols`]).

use crate::{DataplaneError, KernelDataplane, addr, run};

impl KernelDataplane {
    /// The lock file serialising this instance's kernel changes in this namespace.
    pub fn lock_path(&self) -> &std::path::Path {
        self.lock.path()
    }

    /// Takes the instance's lock for one kernel change. If another process changed the
    /// kernel since this one last did, what this process remembers is forgotten: the change
    /// reads the kernel and replaces everything.
    pub(crate) async fn begin_change(&mut self) -> Result<run::LockGuard, DataplaneError> {
        let guard = self
            .lock
            .acquire(run::LOCK_TIMEOUT, &mut self.last_token)
            .await?;
        if guard.changed_by_other {
            self.forget();
        }
        Ok(guard)
    }

    /// The address protocol of this instance's VIPs, read from the registry on every call;
    /// allocated when `create` and there is none yet. `None`: no VIP of this instance can
    /// exist in this namespace.
    pub(crate) async fn address_protocol(
        &mut self,
        create: bool,
    ) -> Result<Option<u8>, DataplaneError> {
        let found = match self.registry.lookup(&self.cfg.instance).await? {
            Some(b) => Some(b),
            None if create => {
                let in_use = self.addrs.protocols_in_use().await?;
                Some(
                    self.registry
                        .allocate(&self.cfg.instance, self.protocol, &in_use)
                        .await?,
                )
            }
            // The registry lost the entry this process allocated: keep using it.
            None => self.protocol,
        };
        if let (Some(old), Some(new)) = (self.protocol, found)
            && old != new
        {
            tracing::warn!(
                old,
                new,
                registry = %self.registry.path().display(),
                "the address-protocol registry names another protocol for this instance"
            );
        }
        if found.is_some() {
            self.protocol = found;
        }
        Ok(found)
    }

    /// The addresses of this instance (none when it has no address protocol yet).
    pub(crate) async fn owned_addresses(
        &self,
        protocol: Option<u8>,
    ) -> Result<Vec<addr::OwnedAddress>, DataplaneError> {
        match protocol {
            Some(p) => self.addrs.owned(p).await,
            None => Ok(Vec::new()),
        }
    }
}
