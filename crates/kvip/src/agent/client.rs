//! The Kubernetes client and what the agent derives from its configuration: the API server's
//! address, the agent's own namespace, `plan()`'s view of this node, the rule backend.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use kvip_core::NodeConfig;
use kvip_core::config::AgentConfig;
use kvip_dataplane::BackendKind;

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The bound on every single API call the agent makes outside the watches (which the
/// watcher's own idle timeout protects) and the elections (bounded by the retry period).
pub(crate) const API_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The client, and the API server's URL.
pub(crate) async fn client(cfg: &AgentConfig) -> Result<(kube::Client, http::Uri)> {
    let mut config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("k8s_config_file {path}"))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("k8s_config_file {path}"))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no usable KUBECONFIG")?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    let url = config.cluster_url.clone();
    Ok((
        kube::Client::try_from(config).context("creating the Kubernetes client")?,
        url,
    ))
}

/// Awaits an API call for at most [`API_CALL_TIMEOUT`].
pub(crate) async fn bounded<T>(
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(API_CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CallError::Api(e)),
        Err(_) => Err(CallError::Timeout(API_CALL_TIMEOUT)),
    }
}

/// An API call that failed or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error(transparent)]
    Api(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `plan()`'s view of this node, from the configuration.
pub(crate) fn node_config(cfg: &AgentConfig, interface: String) -> NodeConfig {
    NodeConfig {
        node_name: cfg.node_name.clone(),
        interface,
        namespace: cfg.namespace.clone(),
        class_only: cfg.lb_class_only,
        class_name: cfg.lb_class_name.clone(),
        reserved: cfg.control_plane.iter().map(|c| c.address).collect(),
    }
}

/// The rule backend `egress_withnftables` asks for.
pub(crate) fn backend_kind(cfg: &AgentConfig) -> BackendKind {
    match cfg.egress_with_nftables {
        Some(true) => BackendKind::Nftables,
        Some(false) => BackendKind::Iptables,
        None => BackendKind::Auto,
    }
}

/// The agent's own namespace: `POD_NAMESPACE`, else the service account's, else kube-system.
pub(crate) fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "kube-system".into())
}

/// The API server's address, when the client talks to it by IP: always excluded from egress.
pub(crate) fn api_server_addresses(url: &http::Uri) -> Vec<IpAddr> {
    url.host()
        .map(|h| h.trim_matches(|c| c == '[' || c == ']'))
        .and_then(|h| h.parse().ok())
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_address_from_the_url() {
        let addrs = |u: &str| api_server_addresses(&u.parse().expect("a valid URI"));
        assert_eq!(
            addrs("https://192.0.2.1:6443"),
            vec!["192.0.2.1".parse::<IpAddr>().expect("an address")]
        );
        assert_eq!(
            addrs("https://[2001:db8::1]:6443/"),
            vec!["2001:db8::1".parse::<IpAddr>().expect("an address")]
        );
        assert_eq!(
            addrs("http://198.51.100.7"),
            vec!["198.51.100.7".parse::<IpAddr>().expect("an address")]
        );
        assert!(addrs("https://kubernetes.default.svc:443").is_empty());
    }
}
