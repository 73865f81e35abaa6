//! kvip-kube: kvip's side of the Kubernetes API. Today: Lease-based election with
//! resourceVersion-guarded writes, driven by the pure [`kvip_core::lease::Elector`], and the
//! watches, kept as what `plan()` reads of each object, that feed [`kvip_core::plan`].

pub mod backoff;
pub mod cluster;
pub mod discovery;
pub mod election;
pub mod elections;
pub mod publish;
pub mod rbac;

pub use cluster::ClusterCache;
pub use election::{Election, ElectionError, LeaseLock};

/// An error with each of its sources, joined by `: `, for logs: a client error's reason (a
/// refused certificate, a refused connection) sits several sources down.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut next = self.0.source();
        while let Some(s) = next {
            let text = s.to_string();
            // Many errors repeat their source's text in their own.
            if !said.contains(&text) {
                write!(f, ": {text}")?;
                said = text;
            }
            next = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Causes;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_names_every_source_once() {
        let e = Outer(std::io::Error::other("refused"));
        assert_eq!(Causes(&e).to_string(), "outer: refused");
        let same = std::io::Error::other("refused");
        assert_eq!(Causes(&same).to_string(), "refused");
    }
}
